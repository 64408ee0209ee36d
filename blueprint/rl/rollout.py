"""One batch of PPO experience, and the token budgets that split it into passes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from blueprint.rl.ppo_math import Targets


@dataclass
class Rollout:
    """One batch of experience. Tensors over response tokens are [B, R]; `input_ids` is [B, Q+R] (query left-padded)."""

    query_ids: list[list[int]]
    response_ids: list[list[int]]  # EOS-cut (what score_fn saw)
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response: torch.Tensor  # sampled tokens, trimmed to the longest valid response
    mask: torch.Tensor  # 1.0 up to and including the first EOS
    has_eos: torch.Tensor  # bool [B]
    raw_scores: torch.Tensor  # what score_fn returned
    copy_rate: torch.Tensor
    scores: torch.Tensor  # raw − copy_penalty·copy_rate − missing_eos_penalty·(no EOS)
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    engine_gap: dict[str, float] = field(default_factory=dict)  # engine_logprob_gap_mean/max when an engine sampled
    permutation: torch.Tensor | None = None  # the update's first epoch, drawn before the no-grad forwards use it
    padding: tuple[int, int] = (0, 0)  # (padding, all) token positions of the no-grad forwards

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.raw_scores).all())

    def targets(self, advantages: torch.Tensor, returns: torch.Tensor) -> Targets:
        """What the update's losses are measured against: this rollout's log-probs and values, with `advantages`
        and `returns` computed from them."""
        return Targets(self.logp, self.values, advantages, returns, self.mask)


def rows_within(budget: int | None, tokens_per_row: int, default: int) -> int:
    """Sequences per pass that keep rows x tokens within `budget` (at least one; `default` without a budget)."""
    return default if budget is None else max(1, budget // max(tokens_per_row, 1))


def query_lists(queries: Sequence[torch.Tensor | Sequence[int]] | torch.Tensor) -> list[list[int]]:
    """Queries as token lists (a [B, Q] tensor, or ragged rows); an empty batch or query is refused."""
    if isinstance(queries, torch.Tensor):
        if queries.dim() != 2:
            raise ValueError("a query tensor must be [B, Q] (unpadded rows); pass a list for ragged queries")
        queries = list(queries)
    lists = [q.tolist() if isinstance(q, torch.Tensor) else list(q) for q in queries]
    if not lists or any(len(q) == 0 for q in lists):
        raise ValueError("queries must be a non-empty batch of non-empty token sequences")
    return lists
