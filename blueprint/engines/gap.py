"""Proof that the engine samples the policy being trained: the per-token gap between its log-probs of the sampled
tokens and the trainer's own, and the error that stops a round when the gap says the engine runs another policy."""

from __future__ import annotations

import torch

from blueprint.errors import UserError


class EngineGapError(UserError, RuntimeError):
    """The engine's log-probs of its own samples differ from the trainer's: it is not running the trained policy."""


def logprob_gap(trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, max) of |trainer − engine| log-prob over the valid response tokens (`mask` 1.0), in nats."""
    gap = (trainer_logp.float() - engine_logp.float().to(trainer_logp.device)).abs() * mask
    valid = mask.sum()
    if valid == 0:
        return 0.0, 0.0
    return float(gap.sum() / valid), float(gap.max())


def check_gap(mean: float, worst: float, bound: float, engine: str, step: int) -> None:
    """Raise EngineGapError when the mean gap of PPO step `step` exceeds `bound` (or is not a number)."""
    if not mean <= bound:
        raise EngineGapError(
            f"engine {engine}: at PPO step {step} its log-probs of its own samples differ from the trainer's by "
            f"{mean:.4f} nats/token on average (max {worst:.4f}), above engine_max_gap={bound}: the engine is not "
            "sampling the policy being trained (weights not synced?); nothing of this round is committed"
        )
