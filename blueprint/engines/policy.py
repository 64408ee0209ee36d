"""The PPO side of an engine: rollouts of the policy adapter sampled by vLLM, the policy's new weights sent after
every update, and the gap check on the trainer's log-probs of the samples."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from blueprint.engines.gap import check_gap, logprob_gap
from blueprint.engines.vllm_engine import Sampling, VLLMEngine


class PolicySampler:
    """What `PPOTrainer.engine` holds: `sample` instead of `generate()`, `check` after the trainer's forwards,
    `sync` after each update."""

    name = "vllm"

    def __init__(self, engine: VLLMEngine, model: Any, adapter: str, max_gap: float):
        self.engine, self.adapter, self.max_gap = engine, adapter, max_gap
        self.sync_s = engine.load(model, adapter)

    def sample(
        self, query_ids: list[list[int]], k: int, seeds: Sequence[int] | None, cfg: Any, eos: int, pad: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(responses [B, L] padded with `pad`, the engine's log-probs of them [B, L]) for the rows `query_ids`
        (each query k times in a row). `seeds` (one per query): each of its k samples from its own seed derived
        from it; else the row seeds come from torch's generator (the rank's stream, as `generate()` draws)."""
        if seeds is None:
            row_seeds = torch.randint(0, 2**62, (len(query_ids),)).tolist()
        else:
            row_seeds = [random.Random(f"{s}/{j}").getrandbits(62) for s in seeds for j in range(k)]
        sampling = Sampling(cfg.max_new_tokens, eos, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_new_tokens)
        samples = self.engine.generate(query_ids, sampling, seeds=row_seeds, logprobs=True)
        width = max(1, max(len(s.tokens) for s in samples))
        tokens = torch.full((len(samples), width), pad, dtype=torch.long)
        logp = torch.zeros((len(samples), width))
        for i, s in enumerate(samples):
            tokens[i, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
            logp[i, : len(s.tokens)] = torch.tensor(s.logprobs)
        return tokens, logp

    def check(
        self, trainer_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, step: int
    ) -> dict[str, float]:
        """The gap figures of this step's rollout; raises EngineGapError above `max_gap`."""
        mean, worst = logprob_gap(trainer_logp, engine_logp, mask)
        check_gap(mean, worst, self.max_gap, self.name, step)
        return {"engine_logprob_gap_mean": mean, "engine_logprob_gap_max": worst}

    def before_update(self) -> None:
        self.engine.sleep()  # GPU: its KV cache and weights make room for the update

    def sync(self, model: Any) -> float:
        """Send the policy's updated weights; seconds it took."""
        t0 = time.perf_counter()
        self.engine.load(model, self.adapter)
        return time.perf_counter() - t0
