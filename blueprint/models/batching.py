"""Ragged token lists as one padded batch: the one padding helper for generation, scoring and the merge check."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(
    ids: Sequence[Sequence[int]], pad_id: int, side: str = "left", device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ragged token lists, padded to the longest on `side`.

    Left padding for generation (every continuation starts at the same column), right padding for scoring.
    """
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, tokens in enumerate(ids):
        cols = slice(width - len(tokens), width) if side == "left" else slice(0, len(tokens))
        input_ids[row, cols] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, cols] = 1
    return input_ids.to(device), mask.to(device)
