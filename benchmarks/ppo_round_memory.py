"""Peak RSS of a PPO round against corpus size: the round samples its codes by row group, so memory should not
grow with the train split (issue: a corpus bigger than a pod).

    python benchmarks/ppo_round_memory.py [--copies 8] [--root /tmp/blueprint-rss]

Shards the whole stdlib, builds a micro base and warm adapters on it (smoke settings), writes a second shard
artifact holding `copies` distinct variants of every row (the code gets a `# variant k` line, so no row repeats),
then runs the same smoke PPO round on each, every run in a fresh process, and prints rows and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROUND = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from blueprint.config import parse
from blueprint.stages import ppo_round, profiles, registry
cfg = parse(ppo_round.PPORoundConfig, profiles.stage_settings("smoke", registry.PPO_ROUND))
out = ppo_round.run(cfg, shards={shards!r}, base={base!r}, adapters={adapters!r}, artifact_root={root!r},
                    progress=False, force=True)
print(json.dumps({{"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": out.metrics["seconds"]}}))
"""


def variants(shards: str, copies: int, out_uri: str) -> int:
    """A committed shard artifact with `copies` distinct variants of every train row (eval rows as they are)."""
    from blueprint.data.readers import read_pairs
    from blueprint.data.shard_writer import SCHEMA, ShardWriter
    from blueprint.stages import registry
    from blueprint.store import artifacts

    with tempfile.TemporaryDirectory() as tmp:
        writer = ShardWriter(Path(tmp), 4)
        for split in ("train", "eval"):
            for i, row in enumerate(read_pairs(shards, split)):
                for k in range(copies if split == "train" else 1):
                    code = row["code"] + (f"# variant {k}\n" if k else "")
                    values = {**row, "code": code, "id": f"{row['id'][:28]}{k:04x}", "n_code_chars": len(code)}
                    writer.add(split, i % 4, tuple(values[f.name] for f in SCHEMA))
        rows = writer.close()
        artifacts.commit(
            Path(tmp),
            out_uri,
            stage=registry.SHARD,
            config={"variants_of": shards, "copies": copies},
            inputs={},
            metrics={"rows_per_shard": rows},
        )
    return sum(n for rel, n in rows.items() if rel.startswith("train/"))


def main() -> None:
    from blueprint.config import parse
    from blueprint.data.readers import read_pairs
    from blueprint.stages import bootstrap, profiles, registry, shard, warmup

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--root", default="/tmp/blueprint-rss")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    root = f"file://{args.root}/art"
    one = shard.run(parse(shard.ShardConfig, {"source": "stdlib"}), artifact_root=root, progress=False).uri
    base = bootstrap.run(
        parse(bootstrap.BootstrapConfig, profiles.stage_settings("smoke", registry.BOOTSTRAP)),
        shards=one,
        artifact_root=root,
        progress=False,
    ).uri
    adapters = warmup.run(
        parse(warmup.WarmupConfig, profiles.stage_settings("smoke", registry.WARMUP)),
        shards=one,
        base=base,
        artifact_root=root,
        progress=False,
    ).uri
    many = f"{root}/shard-variants"
    sizes = {
        "stdlib": len(read_pairs(one, "train", columns=["id"])),
        f"{args.copies}x": variants(one, args.copies, many),
    }
    for label, shards in (("stdlib", one), (f"{args.copies}x", many)):
        code = ROUND.format(
            repo=str(Path(__file__).resolve().parent.parent), shards=shards, base=base, adapters=adapters, root=root
        )
        figures = json.loads(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        print(
            f"{label:>7}: {sizes[label]:>7} train rows, peak RSS {figures['peak_rss_mib']:.0f} MiB, "
            f"round {figures['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
