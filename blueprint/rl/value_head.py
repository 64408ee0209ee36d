"""The PPO value head: a zero-initialised linear read-out of the policy's last hidden state, saved as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden state (no dropout: PPO's values must be deterministic)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        # Zero init (lm-human-preferences' value head, std=0): the first advantages are then the plain returns, not
        # returns minus random value noise that advantage whitening would blow up to unit scale.
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str | None = None) -> ValueHead:
        from safetensors.torch import load_file

        state = load_file(str(path))
        head = cls(state["linear.weight"].shape[1])
        head.load_state_dict(state)
        return head.to(device) if device is not None else head
