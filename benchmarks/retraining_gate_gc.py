"""Two smoke runs under one artifact root, the second with settings that cannot improve (learning rates 1e-9):
the first is promoted, the second loses its gate; then gc keeping no recent run, dry and for real.

    python benchmarks/retraining_gate_gc.py [--root /tmp/retrain]

Prints each run's wall time and decision, the losing gate's report and gc's lines (README, Leaving it running).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blueprint.pipelines import cli, local_run
from blueprint.stages import registry
from blueprint.store import storage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/blueprint-retrain")
    args = parser.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    root = f"file://{args.root}/art"
    runs = {"promoted": {}, "worse": {registry.PPO_ROUND: {"lr": 1e-9, "coder_lr": 1e-9}}}
    for name, overrides in runs.items():
        start = time.time()
        plan = local_run.plan(profile="smoke", epochs=1, artifact_root=root, overrides=overrides)
        out = local_run.run(plan, local_root=f"{args.root}/kfp")["outputs"]
        print(f"run {name}: {time.time() - start:.1f} s, decision {out['decision']}")
    record = sorted(storage.list_files(f"{root}/gate"))
    reports = [r for r in record if r.endswith("report.md")]
    for rel in reports:
        text = storage.read_text(f"{root}/gate/{rel}")
        if text.startswith("# gate: keep"):
            print(text)
    cli.main(["gc", root, "--keep-runs", "0", "--older-than", "0s"])
    cli.main(["gc", root, "--keep-runs", "0", "--older-than", "0s", "--yes"])
    left = sum(storage.list_files(root).values())
    print(f"left under the root: {left / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
