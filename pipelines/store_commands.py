"""`blueprint promoted`, `blueprint gc` and `blueprint tensorboard`: what is promoted under an artifact root,
freeing what nothing uses, and a run's training curves.

Both read and write the artifact root only (no cluster): a gc can run from a laptop, a second KFP schedule or a
Kubernetes CronJob with the image and the S3 credentials.
"""

from __future__ import annotations

import argparse
import json
import re

from blueprint.config import ConfigError
from blueprint.stages import profiles
from blueprint.store import promotion, retention, storage

DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s', '2w' -> seconds."""
    match = DURATION.match(text.strip())
    if not match:
        raise ConfigError(f"--older-than {text!r}: give a number and a unit, e.g. 7d, 12h, 30m")
    return float(match.group(1)) * SECONDS[match.group(2)]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_promoted(args: argparse.Namespace) -> int:
    pointer, _ = promotion.read_pointer(args.artifact_root, args.name)
    if pointer is None:
        raise ConfigError(
            f"nothing is promoted as {args.name!r} under {args.artifact_root} "
            f"({promotion.pointer_uri(args.artifact_root, args.name)} does not exist)"
        )
    chain = promotion.history(pointer)
    if args.json:
        print(json.dumps(chain, indent=2))
        return 0
    print(f"promoted {args.name!r}: {pointer['models']}")
    print(f"  summarizer {pointer['summarizer']}\n  coder      {pointer['coder']}")
    print(f"  evaluation {pointer['evaluation']}")
    for n, entry in enumerate(chain):
        metrics = entry.get("metrics", {})
        print(
            f"{'now' if n == 0 else f'-{n}':>4}  {entry['promoted_at']}  run {entry.get('run') or '-':<12} "
            f"reward_gen_mean {metrics.get('reward_gen_mean', float('nan')):.4f}  "
            f"pairwise_accuracy {metrics.get('pairwise_accuracy', float('nan')):.3f}  {entry.get('why', '')}"
        )
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    if args.keep_runs < 0:
        raise ConfigError(f"--keep-runs {args.keep_runs}: give 0 or more")
    root = storage.normalize(args.artifact_root)
    found = retention.plan(root, args.keep_runs, parse_duration(args.older_than))
    verb = "deleting" if args.yes else "would delete"
    for output in found.doomed:
        print(f"{verb} {output['stage']}/{output['key']} ({human_bytes(output['bytes'])}, created {output['created']})")
    for prefix in found.partial:
        print(
            f"{verb} partial {prefix['stage']}/{prefix['key']} ({human_bytes(prefix['bytes'])}, no manifest, "
            f"last written {prefix['changed']:%Y-%m-%dT%H:%M:%S%z})"
        )
    if args.yes:
        retention.collect(found)
    summary = (
        f"{'freed' if args.yes else 'would free'} {human_bytes(found.bytes)} in {len(found.doomed)} outputs, "
        f"{len(found.partial)} partial outputs and {len(found.records)} run records; kept {found.kept} outputs "
        f"reachable from the promoted models and the last {args.keep_runs} runs, and {found.young} used within "
        f"{args.older_than} (or read by one that was)"
    )
    print(summary + ("" if args.yes else " (dry run: pass --yes to delete)"))
    return 0


def cmd_tensorboard(args: argparse.Namespace) -> int:
    """Link a run's curves into one logdir, then start TensorBoard on it (or only print the command)."""
    import os
    import shutil
    from pathlib import Path

    from blueprint import tracking

    root = storage.normalize(args.artifact_root)
    into = (
        Path(args.logdir)
        if args.logdir
        else (
            Path(storage.local_path(root)) / ".tensorboard"
            if not storage.is_s3(root)
            else Path.home() / ".cache" / "blueprint" / "tensorboard"
        )
    )
    found = tracking.gather_logdir(root, into, args.run)
    for name, source in found.items():
        print(f"{name}: {source}")
    command = ["tensorboard", "--logdir", str(into), "--port", str(args.port)]
    if args.print_only or not shutil.which("tensorboard"):
        print(" ".join(command))
        return 0
    os.execvp(command[0], command)
    return 0  # not reached


def add_commands(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tensorboard", help="show a pipeline run's training curves side by side in TensorBoard")
    t.add_argument("artifact_root")
    t.add_argument("--run", default=None, help="the run record's name (default: the newest run)")
    t.add_argument("--logdir", default=None, help="where to gather the curves (default: ROOT/.tensorboard)")
    t.add_argument("--port", type=int, default=6006)
    t.add_argument("--print-only", action="store_true", help="gather and print the command, do not start it")
    t.set_defaults(func=cmd_tensorboard)

    p = sub.add_parser("promoted", help="show the promoted model of a name and its history")
    p.add_argument("artifact_root")
    p.add_argument("--name", default=profiles.PROMOTION_NAME, help="promotion name (the pipeline's promotion_name)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_promoted)

    g = sub.add_parser(
        "gc", help="delete stage outputs no promoted model and none of the last K runs reach (a dry run unless --yes)"
    )
    g.add_argument("artifact_root")
    g.add_argument("--keep-runs", type=int, required=True, help="keep everything the last K runs used")
    g.add_argument(
        "--older-than",
        default="1d",
        help="grace period: never delete outputs younger than this (they may belong to a running pipeline), e.g. 7d",
    )
    g.add_argument("--yes", action="store_true", help="delete (default: only list what would go)")
    g.set_defaults(func=cmd_gc)
