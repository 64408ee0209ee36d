"""How a PPO step's rows are cut into forward passes: one layout for the rollout's no-grad forwards and the update.

Why one layout: in bf16 a row's log-probs depend on the shape of the pass it is computed in (kernels chosen by
shape, attention reductions over another number of columns). Old log-probs scored in one shape and new ones in
another make the PPO ratio differ from 1 before the first update. So the rollout's forwards run the very micro-
batches of the update's first epoch (the same rows, the same trimmed columns), and the ratio is exactly 1 there.

Why trimming: queries are left-padded to the longest in the batch and responses right-padded to the longest, so on
code of mixed length much of every pass is padding. Each micro-batch keeps only the columns some row of it uses,
and when a mini-batch is split, its rows are grouped by length first so that the parts are short together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blueprint import distributed
from blueprint.rl import data_parallel


@dataclass(frozen=True)
class MicroBatch:
    """Local rows of one pass and the columns they use: input columns [start, stop), response columns [0, width)."""

    rows: torch.Tensor
    start: int
    stop: int
    width: int

    @property
    def tokens(self) -> int:
        """Token positions the pass computes (valid and padding)."""
        return len(self.rows) * (self.stop - self.start)


def row_lengths(attention_mask: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query tokens, valid response tokens) of each row of a rollout (query left-padded, response right-padded)."""
    n_response = mask.shape[1]
    return attention_mask[:, : attention_mask.shape[1] - n_response].sum(1), mask.sum(1).long()


def trim(rows: torch.Tensor, query_len: torch.Tensor, response_len: torch.Tensor, query_width: int) -> MicroBatch:
    """`rows` with the columns that are padding in every one of them dropped: leading query padding and response
    columns after the longest valid response (at least one, so an all-empty micro-batch still has a shape)."""
    longest_query = int(query_len[rows].max()) if len(rows) else 0
    width = max(int(response_len[rows].max()) if len(rows) else 0, 1)
    return MicroBatch(rows, query_width - longest_query, query_width + width, width)


def pack(
    rows: torch.Tensor,
    query_len: torch.Tensor,
    response_len: torch.Tensor,
    query_width: int,
    budget: int | None,
    max_rows: int,
) -> list[MicroBatch]:
    """`rows` (local row numbers) as micro-batches of at most `max_rows` rows whose trimmed size (rows x columns)
    stays within `budget` tokens (a row alone may exceed it). When `rows` fit in one pass they stay in their order
    (one pass: nothing to gain); otherwise they are grouped by length, longest first, so short rows share a pass."""
    if not len(rows):
        return []
    whole = trim(rows, query_len, response_len, query_width)
    if len(rows) <= max_rows and (budget is None or whole.tokens <= budget):
        return [whole]
    total = (query_len + response_len.clamp(min=1))[rows]
    ordered = rows[torch.sort(total, descending=True, stable=True).indices]
    parts, current = [], []
    for row in ordered.tolist():
        candidate = trim(torch.tensor(current + [row]), query_len, response_len, query_width)
        if current and (len(current) == max_rows or (budget is not None and candidate.tokens > budget)):
            parts.append(current)
            current = []
        current.append(row)
    parts.append(current)
    return [trim(torch.tensor(p), query_len, response_len, query_width) for p in parts]


def grouped_by_length(permutation: torch.Tensor, query_len: torch.Tensor, size: int) -> torch.Tensor:
    """`permutation` (of the step's rows) reordered so that each run of `size` rows, a mini-batch, holds queries of
    similar length: sorted by query length (ties keep the permutation's random order), cut into runs, the runs in
    the order their earliest row comes in `permutation`. Rows of equal length: `permutation` itself. Every row is
    still used once an epoch; what changes is which rows share a mini-batch (as transformers' group_by_length)."""
    ordered = permutation[torch.sort(query_len[permutation], stable=True).indices]
    position = torch.empty_like(permutation)
    position[permutation] = torch.arange(len(permutation))
    runs = sorted(ordered.split(size), key=lambda run: int(position[run].min()))
    return torch.cat(runs)


def epoch_layout(
    permutation: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor, cfg: Any
) -> list[tuple[torch.Tensor, list[MicroBatch]]]:
    """One epoch of a rank's rollout (`attention_mask`, response `mask`): the mini-batches of the global
    `permutation` (grouped by length when `cfg.group_by_length`), each with this rank's micro-batches of it."""
    n_local = mask.shape[0]
    query_len, response_len = (t.cpu() for t in row_lengths(attention_mask, mask))
    query_width, offset = attention_mask.shape[1] - mask.shape[1], distributed.rank() * n_local
    max_rows = min(cfg.mini_batch_size, cfg.forward_batch_size or cfg.mini_batch_size)
    if cfg.group_by_length:
        permutation = grouped_by_length(permutation, distributed.all_cat(query_len), cfg.mini_batch_size)
    return [
        (
            idx,
            pack(
                data_parallel.owned_rows(idx, offset, n_local),
                query_len,
                response_len,
                query_width,
                cfg.update_batch_tokens,
                max_rows,
            ),
        )
        for idx in permutation.split(cfg.mini_batch_size)
    ]


def padding_share(parts: Sequence[MicroBatch], query_len: torch.Tensor, response_len: torch.Tensor) -> tuple[int, int]:
    """(padding positions, all positions) the passes `parts` compute: what trimming and grouping leave."""
    total = sum(p.tokens for p in parts)
    valid = sum(int(query_len[p.rows].sum() + response_len[p.rows].sum()) for p in parts)
    return total - valid, total
