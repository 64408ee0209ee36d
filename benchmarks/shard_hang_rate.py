"""How often the shard stage hangs when it starts its workers in a process that already runs threads.

The Python API shards after pyarrow, torch and tokenizers have started thread pools; the old worker pool forked
there (fork after threads: a child can inherit a lock another thread held, forever). Each repetition is a fresh
subprocess that starts those threads (a pyarrow read on its thread pool, a torch matmul on OpenMP threads, a
tokenizers batch on its rayon pool), optionally keeps them busy (--busy), then shards the stdlib with workers=2,
stopping at --max-pairs like the tiny profile (so the pool is also torn down with work in flight). A repetition
that has not finished within --timeout seconds counts as hung; its process group is killed.

    .venv/bin/python benchmarks/shard_hang_rate.py --pool both --repeats 30      # old fork pool vs the new one
    .venv/bin/python benchmarks/shard_hang_rate.py --pool fork --busy            # threads busy while forking

`--pool fork` swaps in the pool as it was before the fix (a copy of the old `shard.ordered_map`), `--pool new`
uses the code in this checkout. The last line is one JSON object: {pool: {runs, hung, failed, median_s}}.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def fork_ordered_map(
    fn: Callable[[list[Any]], list[Any]], items: Iterable[Any], workers: int, batch: int = 8, window: int = 4
) -> Iterator[Any]:
    """The shard pool before the fix (`git show 4c35161^:blueprint/stages/shard.py`), kept to measure against."""
    from blueprint.stages.shard import _batched

    if workers <= 1:
        for chunk in _batched(items, batch):
            yield from fn(chunk)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _batched(items, batch):
            pending.append(pool.apply_async(fn, (chunk,)))
            while len(pending) >= workers * window:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def start_threads(tmp: Path) -> None:
    """What the API has running before it shards: pyarrow's thread pools, OpenMP threads, a tokenizers pool."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    path = tmp / "t.parquet"
    pq.write_table(
        pa.table({"x": list(range(200_000)), "s": [str(i) for i in range(200_000)]}), path, row_group_size=10_000
    )
    pq.read_table(path, use_threads=True)
    a = torch.randn(512, 512)
    (a @ a).sum().item()
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(2000)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.encode_batch(texts)


def keep_busy(tmp: Path, stop: threading.Event) -> threading.Thread:
    """A thread that keeps those pools working (locks taken and released) while the shard pool starts."""
    import pyarrow.parquet as pq
    import torch

    def loop() -> None:
        a = torch.randn(256, 256)
        while not stop.is_set():
            pq.read_table(tmp / "t.parquet", use_threads=True)
            (a @ a).sum().item()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def child(pool: str, busy: bool, limit_mb: float, max_pairs: int) -> None:
    """One repetition, in this process: threads first, then a shard with workers=2."""
    from blueprint.stages import shard

    if pool == "fork":
        shard.ordered_map = fork_ordered_map
    with tempfile.TemporaryDirectory(prefix="bp-hang-") as tmp:
        start_threads(Path(tmp))
        stop = threading.Event()
        busy_thread = keep_busy(Path(tmp), stop) if busy else None
        cfg = shard.ShardConfig(source="stdlib", workers=2, max_source_mb=limit_mb or None, max_pairs=max_pairs or None)
        metrics = shard.compute(cfg, Path(tmp) / "out", progress=False)
        stop.set()
        if busy_thread:
            busy_thread.join()
    print(json.dumps({k: metrics[k] for k in ("pairs", "workers", "stopped_at_max_pairs")}), flush=True)


def group_states(pgid: int) -> list[str]:
    """'pid:state' of every process in a group (Z = defunct), to show what a hung repetition looked like."""
    states = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            states.append(f"{stat.parent.name}:{fields[0]}")
    return sorted(states)


def repetition(pool: str, args: argparse.Namespace) -> tuple[str, float, str]:
    """('ok' | 'hung' | 'failed', seconds, detail) for one fresh subprocess."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--pool",
        pool,
        "--limit-mb",
        str(args.limit_mb),
        "--max-pairs",
        str(args.max_pairs),
    ]
    cmd += ["--busy"] if args.busy else []
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        detail = " ".join(group_states(proc.pid))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "hung", time.perf_counter() - start, f"processes {detail}"
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        return "failed", seconds, err.strip().splitlines()[-1] if err.strip() else f"rc {proc.returncode}"
    return "ok", seconds, out.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pool", choices=("fork", "new", "both"), default="both")
    p.add_argument("--repeats", type=int, default=30, help="repetitions per pool")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a repetition counts as hung")
    p.add_argument("--budget-s", type=float, default=600.0, help="start no repetition after this many seconds")
    p.add_argument("--limit-mb", type=float, default=0.0, help="MB of stdlib source to read (0 = all)")
    p.add_argument("--max-pairs", type=int, default=600, help="stop at this many pairs, as the tiny profile (0 = all)")
    p.add_argument("--busy", action="store_true", help="keep the pyarrow/torch threads working while sharding")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.pool, args.busy, args.limit_mb, args.max_pairs)
    pools = ["fork", "new"] if args.pool == "both" else [args.pool]
    outcomes: dict[str, list[tuple[str, float]]] = {pool: [] for pool in pools}
    began = time.perf_counter()
    for i in range(args.repeats):  # interleaved, so both pools see the same machine load
        for pool in pools:
            if time.perf_counter() - began > args.budget_s:
                break
            status, seconds, detail = repetition(pool, args)
            outcomes[pool].append((status, seconds))
            print(f"{i + 1:3d} {pool:4s} {status:6s} {seconds:5.1f} s  {detail}", flush=True)
    summary = {
        pool: {
            "runs": len(r),
            "hung": sum(s == "hung" for s, _ in r),
            "failed": sum(s == "failed" for s, _ in r),
            "median_s": round(statistics.median([t for _, t in r]), 2) if r else None,
        }
        for pool, r in outcomes.items()
    }
    print(
        ", ".join(f"{pool}: {m['hung']}/{m['runs']} hung ({m['failed']} failed)" for pool, m in summary.items())
        + (" [busy threads]" if args.busy else "")
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
