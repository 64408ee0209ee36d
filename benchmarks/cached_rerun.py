"""`blueprint run --profile smoke` twice into one artifact root: the first run, then the fully cached rerun.

A cached rerun starts no task process (pipelines/cache_hits.py answers each hit in `blueprint run`'s own process),
so what it takes is one interpreter start, the imports every stage's settings need (torch, transformers, kfp), and
reading manifests. Printed per run: the process's wall time and the pipeline's own (the summary's `wall time`),
then the import floor (an interpreter importing what a run imports, nothing else). The last line is one JSON object.

    .venv/bin/python benchmarks/cached_rerun.py [--root DIR] [--reruns 3]   # --root: reuse a root already run
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time

RUN = [sys.executable, "-m", "blueprint.pipelines.cli", "run", "--profile", "smoke"]
IMPORTS = (
    "import kfp.local, blueprint.pipelines.cli, blueprint.pipelines.local_run; from blueprint.stages import registry; "
    "[spec.config_type() for spec in registry.STAGES.values()]"
)  # what a run imports before its first task


def timed(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout


def pipeline_seconds(stdout: str) -> float:
    return float(re.search(r"^wall time:\s+([\d.]+) s", stdout, re.M).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="an artifact root a smoke run already filled (skips the first run)")
    p.add_argument("--reruns", type=int, default=3)
    args = p.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="blueprint-cached-rerun-")
    figures = {}
    if args.root is None:
        seconds, out = timed([*RUN, "--artifact-root", root])
        figures["first_run_s"], figures["first_run_pipeline_s"] = round(seconds, 1), pipeline_seconds(out)
        print(f"first run: {seconds:.1f} s (pipeline {figures['first_run_pipeline_s']} s)")
    reruns = []
    for _ in range(args.reruns):
        seconds, out = timed([*RUN, "--artifact-root", root])
        computed = re.findall(r"^(?!shard-plan)[\w-]+: finished in", out, re.M)  # shard-plan has no output
        assert not computed, f"a rerun computed {computed}: the root is not fully cached"
        reruns.append((round(seconds, 2), pipeline_seconds(out)))
        print(f"cached rerun: {seconds:.2f} s (pipeline {reruns[-1][1]} s)")
    floor, _ = timed([sys.executable, "-c", IMPORTS])
    print(f"import floor: {floor:.2f} s")
    figures.update(
        cached_rerun_s=min(r[0] for r in reruns),
        cached_rerun_pipeline_s=min(r[1] for r in reruns),
        import_floor_s=round(floor, 2),
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
