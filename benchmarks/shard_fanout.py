"""Fan-out sharding against one task: the stdlib plus site-packages parsed by 1 part task, then by 2 partitions in
2 processes at once (as 2 pods would), each with one parsing worker; then the dataset task over the parts.

    python benchmarks/shard_fanout.py [--root /tmp/blueprint-fanout] [--partitions 2]

Prints the wall time of each and whether the two datasets are identical (every file's sha256).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blueprint.config import parse
from blueprint.data.sources import list_python_files, stdlib_root
from blueprint.runtime import shard_fanout
from blueprint.stages import shard

PART = """
import json, sys
sys.path.insert(0, {repo!r})
from blueprint.config import parse
from blueprint.runtime import shard_fanout
from blueprint.stages import shard
cfg = parse(shard.ShardConfig, {settings!r})
print(shard_fanout.run_part(cfg, {partition!r}, artifact_root={root!r}, progress=False).uri)
"""


def fan_out(settings: dict, root: str, count: int) -> tuple[list[str], float]:
    """The parts of `count` partitions, each in its own process, all at once; their URIs and the wall time."""
    cfg = parse(shard.ShardConfig, {**settings, "partitions": count})
    repo = str(Path(__file__).resolve().parent.parent)
    start = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                PART.format(repo=repo, settings={**settings, "partitions": count}, partition=p, root=root),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in shard_fanout.plan(cfg)
    ]
    uris = [p.communicate()[0].strip().splitlines()[-1] for p in procs]
    return uris, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/blueprint-fanout")
    parser.add_argument("--partitions", type=int, default=2)
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    src = Path(args.root) / "src"
    for tree, top in (("stdlib", stdlib_root()), ("site", Path(sysconfig.get_paths()["purelib"]))):
        for f in list_python_files(top):
            (src / tree / f.rel_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f.abs_path, src / tree / f.rel_path)
    settings = {"source": f"dir:{src}", "workers": 1, "incremental": False}
    datasets = {}
    for count in (1, args.partitions):
        root = f"file://{args.root}/art-{count}"
        parts, parse_s = fan_out(settings, root, count)
        start = time.time()
        out = shard_fanout.run_dataset(
            parse(shard.ShardConfig, {**settings, "partitions": count}), parts, artifact_root=root, progress=False
        )
        datasets[count] = {r: m["sha256"] for r, m in out.manifest["files"].items()}
        print(
            f"{count} partition(s): parse {parse_s:.1f} s, dataset {time.time() - start:.1f} s, "
            f"{out.metrics['pairs']} pairs from {out.metrics['files_seen']} files"
        )
    print(f"identical datasets: {datasets[1] == datasets[args.partitions]}")


if __name__ == "__main__":
    main()
