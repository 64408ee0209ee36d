"""What per-step tracking costs: the smoke profile's training stages (warmup and two PPO rounds) with every call into
the tracker timed (TensorBoard writes, the live copy, MLflow queueing and the final wait), against the stages' wall
time. Target: under 5%.

With `--mlflow` a real `mlflow server` (sqlite backend) is started on loopback and every stage also logs to it.
The last line is one JSON object: wall_s, tracking_s, overhead_pct, mlflow.

    .venv/bin/python benchmarks/tracking_overhead.py [--mlflow]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.loopback: the tests' own server

from blueprint import tracking
from blueprint.config import parse
from blueprint.stages import bootstrap, ppo_round, registry, shard, warmup
from blueprint.stages.profiles import stage_settings
from tests.loopback import start_mlflow, stop_session

SPENT = {"seconds": 0.0}


def timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT["seconds"] += time.perf_counter() - start

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlflow", action="store_true", help="also log to a loopback MLflow server")
    args = ap.parse_args()
    for name in ("log", "close", "sync"):
        setattr(tracking.Tracker, name, timed(getattr(tracking.Tracker, name)))
    with tempfile.TemporaryDirectory() as tmp:
        proc = None
        if args.mlflow:
            uri, proc = start_mlflow(Path(tmp))
            os.environ["MLFLOW_TRACKING_URI"] = uri
        root = f"file://{tmp}/art"

        def s(stage: str) -> dict:
            return stage_settings("smoke", stage)

        shards = shard.run(parse(shard.ShardConfig, s(registry.SHARD)), artifact_root=root, progress=False).uri
        base = bootstrap.run(
            parse(bootstrap.BootstrapConfig, s(registry.BOOTSTRAP)), shards=shards, artifact_root=root, progress=False
        ).uri
        start = time.perf_counter()
        adapters = warmup.run(
            parse(warmup.WarmupConfig, s(registry.WARMUP)), shards=shards, base=base, artifact_root=root, progress=False
        ).uri
        for index in (1, 2):
            cfg = parse(ppo_round.PPORoundConfig, {**s(registry.PPO_ROUND), "round_index": index})
            adapters = ppo_round.run(
                cfg, shards=shards, base=base, adapters=adapters, artifact_root=root, progress=False
            ).uri
        wall = time.perf_counter() - start
        if proc is not None:
            stop_session(proc)
    print(
        json.dumps(
            {
                "wall_s": round(wall, 2),
                "tracking_s": round(SPENT["seconds"], 3),
                "overhead_pct": round(100 * SPENT["seconds"] / wall, 2),
                "mlflow": args.mlflow,
            }
        )
    )


if __name__ == "__main__":
    main()
