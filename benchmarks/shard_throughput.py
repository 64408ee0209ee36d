"""Shard-stage throughput on the standard-library corpus: 1 worker vs all cores, and peak memory.

Each measurement runs in a fresh subprocess, so its peak RSS is its own (ru_maxrss never goes down). The full
compute is timed: listing, parsing, de-duplication, Parquet writing, worker start-up. Memory should stay flat in
corpus size: the run at a quarter of the corpus is there to compare against.

    .venv/bin/python benchmarks/shard_throughput.py --limit-mb 12

The last line is one JSON object: mb_per_s_1, mb_per_s_all, functions_per_s_all, workers, peak_rss_mib, ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def child(workers: int, limit_mb: float, num_shards: int) -> dict:
    """One shard compute in this process; its numbers (RSS in MiB: this process, and the largest worker)."""
    from blueprint.stages import shard

    cfg = shard.ShardConfig(source="stdlib", workers=workers, max_source_mb=limit_mb, num_shards=num_shards)
    with tempfile.TemporaryDirectory(prefix="bp-bench-") as tmp:
        start = time.perf_counter()
        m = shard.compute(cfg, Path(tmp), progress=False)
        seconds = time.perf_counter() - start
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "cpu_main_s": me.ru_utime + me.ru_stime,
        "cpu_workers_s": kids.ru_utime + kids.ru_stime,
        "workers": workers,
        "limit_mb": limit_mb,
        "seconds": seconds,
        "mb": m["source_bytes"] / 1e6,
        "files": m["files_seen"],
        "functions": m["functions_seen"],
        "pairs": m["pairs"],
        "rss_main_mib": me.ru_maxrss / 1024,
        "rss_worker_mib": kids.ru_maxrss / 1024,
    }


def measure(workers: int, limit_mb: float, num_shards: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--workers",
        str(workers),
        "--limit-mb",
        str(limit_mb),
        "--num-shards",
        str(num_shards),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmark run {' '.join(cmd[2:])} failed:\n{proc.stderr}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # all processes at once, bounded above: the main process plus every worker at its own peak
    r["peak_rss_mib"] = r["rss_main_mib"] + (r["rss_worker_mib"] * workers if workers > 1 else 0)
    r["mb_per_s"], r["functions_per_s"] = r["mb"] / r["seconds"], r["functions"] / r["seconds"]
    print(
        f"workers={workers:<2} {r['mb']:6.2f} MB  {r['files']:5d} files  {r['seconds']:6.2f} s  "
        f"{r['mb_per_s']:5.2f} MB/s  {r['functions_per_s']:7.0f} functions/s  {r['pairs']:6d} pairs  "
        f"peak RSS {r['peak_rss_mib']:.0f} MiB (main {r['rss_main_mib']:.0f}, worker {r['rss_worker_mib']:.0f})  "
        f"CPU s main {r['cpu_main_s']:.2f} workers {r['cpu_workers_s']:.2f}",
        flush=True,
    )
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit-mb", type=float, default=12.0, help="MB of stdlib source to shard (about 12 in all)")
    p.add_argument("--workers", type=int, default=0, help="the all-cores run's workers (0 = os.cpu_count())")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.workers, args.limit_mb, args.num_shards)))
        return
    workers = args.workers or os.cpu_count() or 1
    print(f"shard throughput on the stdlib corpus, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    one = measure(1, args.limit_mb, args.num_shards)
    full = measure(workers, args.limit_mb, args.num_shards)
    quarter = measure(workers, args.limit_mb / 4, args.num_shards)
    print(
        json.dumps(
            {
                "mb_per_s_1": round(one["mb_per_s"], 2),
                "mb_per_s_all": round(full["mb_per_s"], 2),
                "speedup": round(full["mb_per_s"] / one["mb_per_s"], 2),
                "functions_per_s_1": round(one["functions_per_s"]),
                "functions_per_s_all": round(full["functions_per_s"]),
                "workers": workers,
                "mb": round(full["mb"], 2),
                "peak_rss_mib": round(full["peak_rss_mib"], 1),
                "peak_rss_mib_quarter_corpus": round(quarter["peak_rss_mib"], 1),
                "load_average": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
