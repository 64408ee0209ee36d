"""Partitions of a source: what one shard task of the fan-out reads, so a corpus bigger than a pod is parsed by
many pods at once.

A tree's sorted files (or a data-file source's files) are cut into contiguous ranges of about equal bytes, as
half-open name ranges whose ends are open, so every file falls in exactly one partition; a streamed hub dataset
(or a source cut by `max_source_mb`, a budget only one reader can keep) is one partition. Contiguous in the
source's own order, so the fan-in sees every input in the order a single task would, and the dataset it commits is
the same.
"""

from __future__ import annotations

import itertools
from typing import Any

from blueprint.data.sources import FILE_KINDS, TASKS, Source


def balanced(sizes: list[int], count: int) -> list[tuple[int, int]]:
    """At most `count` contiguous, non-empty [start, end) ranges over `sizes`, each near an equal share of the total."""
    n = max(1, min(count, len(sizes)))
    cumulative = list(itertools.accumulate(max(s, 1) for s in sizes))
    total, bounds = cumulative[-1] if cumulative else 0, [0]
    for k in range(1, n):
        target = total * k / n
        cut = next((i + 1 for i, c in enumerate(cumulative) if c >= target), len(sizes))
        bounds.append(min(max(cut, bounds[-1] + 1), len(sizes) - (n - k)))  # every range keeps one input at least
    bounds.append(len(sizes))
    return list(itertools.pairwise(bounds))


def normalized(partition: dict[str, Any] | None) -> dict[str, Any] | None:
    """A partition as the planner made it: KFP hands dict parameters over with every number a float."""
    if not partition:
        return partition
    return {**partition, **{k: int(partition[k]) for k in ("index", "of") if k in partition}}


def plan(source: Source, count: int) -> list[dict[str, Any]]:
    """The partitions of `source` for `count` shard tasks (fewer when it has fewer inputs)."""
    kind = source.spec.kind
    if kind in ("stdlib", "dir"):
        names, sizes = [f.rel_path for f in source.files()], [f.size for f in source.files()]
    elif (
        kind in FILE_KINDS + (TASKS,) and source.max_source_mb is None
    ):  # a byte budget is one reader's: no fan-out then
        if source.on_s3:
            names, sizes = [o.uri for o in source.objects()], [o.size for o in source.objects()]
        else:
            import os

            names = source.data_files()
            sizes = [os.stat(p).st_size for p in names]
    elif kind == "hf" and source.hf_data_files and source.max_source_mb is None:  # the hub's files, e.g. 1,126
        names, sizes = map(list, zip(*source.hub_files(), strict=True))  # Parquet files of codeparrot/github-code
    else:
        return [{"index": 0, "of": 1}]  # a streamed dataset: one reader
    ranges = balanced(sizes, count)
    # Half-open name ranges with open ends (a missing key: KFP parameters hold no None): a file that appears after
    # planning still falls in exactly one part.
    return [
        {
            "index": i,
            "of": len(ranges),
            **({"from": names[a]} if i else {}),
            **({"until": names[b]} if b < len(names) else {}),
        }
        for i, (a, b) in enumerate(ranges)
    ]
