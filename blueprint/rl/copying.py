"""Copy guard: how much of a summary is pasted verbatim from the code it summarises.

The round-trip reward pays a summarizer for letting the coder rebuild the code; the cheapest way to do that is to
paste the code into the "summary". `copy_rate` measures that on token n-grams and PPO subtracts
`copy_penalty * copy_rate` from the score. Token n-grams (not characters) keep it tokenizer-consistent with what
the policy actually emits and cheap enough to run on every rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TokenIds = Sequence[int] | torch.Tensor


def _as_list(ids: TokenIds) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)


def ngrams(ids: TokenIds, n: int) -> list[tuple[int, ...]]:
    """All contiguous token n-grams of `ids`, in order, with repeats."""
    ids = _as_list(ids)
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def copy_rate(summary_ids: TokenIds, code_ids: TokenIds, n: int = 4) -> float:
    """Share of the summary's token n-grams (counted with repeats) that also occur somewhere in the code.

    0.0 for a summary shorter than `n` tokens: it cannot have copied an n-gram. 1.0 means every window of the summary
    is a verbatim piece of the code.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = ngrams(summary_ids, n)
    if not grams:
        return 0.0
    code_grams = set(ngrams(code_ids, n))
    return sum(g in code_grams for g in grams) / len(grams)


def copy_rates(summaries: Sequence[TokenIds], codes: Sequence[TokenIds], n: int = 4) -> torch.Tensor:
    """`copy_rate` for each (summary, code) pair, as a float tensor [B]."""
    if len(summaries) != len(codes):
        raise ValueError(f"{len(summaries)} summaries but {len(codes)} codes")
    return torch.tensor([copy_rate(s, c, n) for s, c in zip(summaries, codes, strict=True)], dtype=torch.float32)
