"""Incremental re-shard against a full one: a tree of the stdlib plus site-packages, less 1% of its files,
sharded; then the held-out 1% added back and sharded again.

    python benchmarks/shard_incremental.py [--root /tmp/blueprint-incremental] [--grow 0.01]

Prints the full and the incremental wall time, inputs_parsed / inputs_reused, and whether the incremental output
holds exactly the files (sha256) of a full re-shard of the grown tree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blueprint.config import parse
from blueprint.data.sources import list_python_files, stdlib_root
from blueprint.stages import shard


def timed(src: Path, root: Path, **settings):
    cfg = parse(shard.ShardConfig, {"source": f"dir:{src}", **settings})
    start = time.time()
    out = shard.run(cfg, artifact_root=f"file://{root}", progress=False)
    return out, time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/blueprint-incremental")
    parser.add_argument("--grow", type=float, default=0.01)
    args = parser.parse_args()
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    corpus = [(f, "stdlib") for f in list_python_files(stdlib_root())] + [
        (f, "site") for f in list_python_files(Path(sysconfig.get_paths()["purelib"]))
    ]
    step = max(1, round(1 / args.grow))
    held_out = [pair for i, pair in enumerate(corpus) if i % step == step // 2]
    out = {(tree, f.rel_path) for f, tree in held_out}
    for f, tree in corpus:
        if (tree, f.rel_path) not in out:
            (src / tree / f.rel_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f.abs_path, src / tree / f.rel_path)
    files = list_python_files(src)
    full, full_s = timed(src, root / "art")
    extra = held_out
    for f, tree in extra:
        (src / tree / f.rel_path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f.abs_path, src / tree / f.rel_path)
    grown, grown_s = timed(src, root / "art")
    fresh, fresh_s = timed(src, root / "fresh", incremental=False)
    same = {r: m["sha256"] for r, m in grown.manifest["files"].items()} == {
        r: m["sha256"] for r, m in fresh.manifest["files"].items()
    }
    print(f"tree: {len(files)} files; full shard {full_s:.2f} s ({full.metrics['pairs']} pairs)")
    print(
        f"grown by {len(extra)} files: incremental {grown_s:.2f} s ({grown_s / fresh_s:.1%} of a full re-shard's "
        f"{fresh_s:.2f} s), inputs_parsed {grown.metrics['inputs_parsed']}, "
        f"inputs_reused {grown.metrics['inputs_reused']}; identical to the full re-shard: {same}"
    )


if __name__ == "__main__":
    main()
