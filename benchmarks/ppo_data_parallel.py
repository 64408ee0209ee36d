"""Throughput of a PPO round on 1 process against N data-parallel ranks (torchrun; gloo on CPU, NCCL on GPUs).

    python benchmarks/ppo_data_parallel.py [--nproc 2] [--root /tmp/blueprint-dp] [--steps 4] [--batch-size 32]

Builds the smoke chain (stdlib shards, the micro base, a warmup), then runs the same round at nproc=1 and
nproc=N with per-query seeds (the same rollouts on both), and prints rollouts/s of the PPO steps (generate, score,
forwards, update), the wall time, the scaling efficiency (throughput ratio / N) and how far the two summarizer
adapters are apart. On a 2-core CPU, N=2 means 1 thread per rank against 2 threads in one process: it measures
the data-parallel overhead, not what GPUs gain.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blueprint.config import parse
from blueprint.runtime import launch
from blueprint.stages import bootstrap, ppo_round, registry, shard, warmup
from blueprint.stages.profiles import stage_settings

PHASES = ("generate", "score", "forward", "update")


def chain(root: str) -> dict[str, str]:
    shards = shard.run(
        parse(shard.ShardConfig, stage_settings("smoke", registry.SHARD)), artifact_root=root, progress=False
    ).uri
    base = bootstrap.run(
        parse(bootstrap.BootstrapConfig, stage_settings("smoke", registry.BOOTSTRAP)),
        shards=shards,
        artifact_root=root,
        progress=False,
    ).uri
    adapters = warmup.run(
        parse(warmup.WarmupConfig, stage_settings("smoke", registry.WARMUP)),
        shards=shards,
        base=base,
        artifact_root=root,
        progress=False,
    ).uri
    return {"shards": shards, "base": base, "adapters": adapters}


def round_at(n: int, inputs: dict[str, str], out: Path, args) -> tuple[dict, float]:
    settings = {
        **stage_settings("smoke", registry.PPO_ROUND),
        "ppo_steps": args.steps,
        "batch_size": args.batch_size,
        "mini_batch_size": args.batch_size // 4,
        "samples_per_query": 2,
        "ppo_epochs": 2,
        "max_new_tokens": 24,
        "supervised_steps": 0,
        "rollout_seeds": "query",
        "nproc": n,
        "probe_size": 4,
    }
    cfg = parse(ppo_round.PPORoundConfig, settings)
    start = time.time()
    result = launch.run_stage(
        registry.PPO_ROUND, cfg, inputs, artifact_root=None, out_uri=f"file://{out}", progress=False
    )
    return result.metrics, time.time() - start


def adapter_gap(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    rel = "adapters/summarizer/adapter_model.safetensors"
    left, right = load_file(a / rel), load_file(b / rel)
    return max((left[k] - right[k]).abs().max().item() for k in left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--root", default="/tmp/blueprint-dp")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    inputs = chain(f"file://{root / 'chain'}")
    rates = {}
    for n in (1, args.nproc):
        metrics, wall = round_at(n, inputs, root / f"n{n}", args)
        busy = sum(metrics.get(f"seconds_{p}", 0.0) for p in PHASES)
        rates[n] = args.steps * args.batch_size / busy
        phases = ", ".join(f"{p} {metrics.get(f'seconds_{p}', 0.0):.2f} s" for p in PHASES)
        print(
            f"nproc={n}: {rates[n]:.1f} rollouts/s in the PPO steps ({phases}); wall {wall:.1f} s (start-up included)"
        )
    print(
        f"scaling efficiency 1 -> {args.nproc}: {rates[args.nproc] / rates[1] / args.nproc:.0%}; summarizer "
        f"adapters differ by at most {adapter_gap(root / 'n1', root / f'n{args.nproc}'):.2g}"
    )


if __name__ == "__main__":
    main()
