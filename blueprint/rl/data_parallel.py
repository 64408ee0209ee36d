"""What PPO does differently on N data-parallel ranks, each holding a contiguous slice of the step's rollouts.

Plain data parallelism over the trainable parameters only (the policy LoRA and the value head): after each
mini-batch's backward the gradients of exactly those tensors are summed across ranks in one flat all-reduce, which
is what DDP's reducer does. DDP itself does not fit here: the trainer calls the decoder directly (to skip the LM
head on query positions) and never the wrapped module's forward, and a mini-batch is a slice of the GLOBAL batch,
so a rank may own none of it and still has to take part in the step.

Mini-batches are drawn from one permutation of the global batch (rank 0's, broadcast), each rank backpropagating
the rows it owns, weighted by their share of the mini-batch's valid tokens across all ranks: the summed gradient is
the one a single process computes over the whole batch, up to the order of float additions.
"""

from __future__ import annotations

import torch

from blueprint import distributed


def reducer():
    """`distributed.all_sum` when there are several ranks, else None (the single-process maths, bit for bit)."""
    return distributed.all_sum if distributed.world_size() > 1 else None


def global_permutation(n: int) -> torch.Tensor:
    """A permutation of the global batch's `n` rows, the same on every rank (rank 0 draws it from its RNG, which
    is the single process's RNG stream)."""
    return distributed.from_main(torch.randperm(n))


def owned_rows(idx: torch.Tensor, offset: int, n_local: int) -> torch.Tensor:
    """The local row numbers of the global rows `idx` that this rank holds (rows offset .. offset+n_local-1)."""
    mine = idx[(idx >= offset) & (idx < offset + n_local)]
    return mine - offset


def sync_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of `params` over the ranks (a rank with no rows this mini-batch contributes zeros)."""
    if distributed.world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = distributed.all_sum(torch.cat([g.reshape(-1) for g in grads]))
    start = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[start : start + g.numel()].view_as(g).to(g.dtype)
        start += g.numel()


def summed_stats(stats: dict[str, float]) -> dict[str, float]:
    """Token-share-weighted statistics of one mini-batch summed over the ranks (keys missing on a rank that held
    no rows count as 0)."""
    if distributed.world_size() == 1:
        return stats
    merged: dict[str, float] = {}
    for part in distributed.all_objects(stats):
        for key, value in part.items():
            merged[key] = merged.get(key, 0.0) + value
    return merged


def all_finite(finite: bool) -> bool:
    """True when every rank's scores are finite: a batch is skipped on all ranks or on none."""
    if distributed.world_size() == 1:
        return finite
    return bool(distributed.all_sum(torch.tensor([0.0 if finite else 1.0])).item() == 0)


def in_step_order(items: list, per_step: int) -> list:
    """Every rank's `items` (`per_step` of them a step on each) in the order one process makes them: step by step,
    rank by rank within a step."""
    parts = distributed.all_objects(items)
    return [x for step in range(0, len(items), per_step) for part in parts for x in part[step : step + per_step]]


def rng_states() -> dict:
    """This process's RNG state; on N ranks also every rank's (a collective: every rank calls it), so a resumed
    round continues each rank's own stream."""
    own = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return own if distributed.world_size() == 1 else {**own, "ranks": distributed.all_objects(own)}


def restore_rng(rng: dict) -> None:
    """This rank's stream from `rng_states()` (the saved process's own when the rank counts differ)."""
    ranks = rng.get("ranks") or [rng]
    rng = ranks[distributed.rank()] if len(ranks) == distributed.world_size() else rng
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
