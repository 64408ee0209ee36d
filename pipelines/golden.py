"""Regenerate the golden compiled-pipeline snapshots the tests compare against: `python -m pipelines.golden`.

Like the KFP SDK's own compiler tests, a change to the DAG, a component or a default shows up as a YAML diff
that a reviewer reads; regenerate the snapshots on purpose, never to make a test pass blindly.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

from pipelines import compile_pipeline

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
GOLDEN_IMAGE = "ghcr.io/blueprint-rt/blueprint:golden"
CASES = {"pipeline_epochs1.yaml": {"epochs": 1}, "pipeline_epochs3.yaml": {"epochs": 3}}


def _sorted_header_defaults(text: str) -> str:
    """The compiler's header comment lists dict defaults in a run-dependent key order (they pass through a protobuf
    Struct); sorting them keeps regenerated snapshots free of diffs that mean nothing."""
    def fix(m: re.Match) -> str:
        value = ast.literal_eval(m.group(2))
        return m.group(1) + repr(dict(sorted(value.items()))) + "]"

    return re.sub(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", fix, text, flags=re.M)


def compile_case(name: str, out_dir: Path) -> Path:
    path = out_dir / name
    compile_pipeline(str(path), image=GOLDEN_IMAGE, profile="default", artifact_root="s3://blueprint/artifacts",
                     **CASES[name])
    path.write_text(_sorted_header_defaults(path.read_text()))
    return path


def main() -> int:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        print(f"wrote {compile_case(name, GOLDEN_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
