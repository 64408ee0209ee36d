"""Sandbox throughput: candidates per second through the sandbox for model-written code, each mode available.

Every candidate is a trivial function plus its tests (one program, one subprocess); the example tasks' canonical
solutions are run too, as the evaluate stage runs them (reference_pass_rate). Workers = the cores this process may
use, as in the stage. The last line printed is one JSON object.

    python benchmarks/sandbox_throughput.py [--candidates 200] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blueprint.data import tasks
from blueprint.eval.sandbox import SandboxError, SandboxSettings, cores, open_sandbox

TRIVIAL = (
    "def add(a, b):\n    return a + b\n\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n\n\ncheck(add)\n"
)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tasks.jsonl"


def rate(box, programs: list[str]) -> tuple[float, int]:
    box.run_many(programs[:4])  # warm: the interpreter's files in the page cache
    start = time.perf_counter()
    outcomes = box.run_many(programs)
    return len(programs) / (time.perf_counter() - start), sum(o.passed for o in outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="0 = the cores this process may use")
    args = parser.parse_args()
    references = [tasks.reference_program(tasks.normalize(r, str(n))) for n, r in tasks.read_lines(str(EXAMPLES))]
    figures = {"cores": cores(), "candidates": args.candidates}
    for mode in ("namespace", "limits"):
        try:
            box = open_sandbox(SandboxSettings(sandbox=mode, sandbox_workers=args.workers))
        except SandboxError as exc:
            print(f"{mode}: unavailable ({exc})")
            continue
        trivial, passed = rate(box, [TRIVIAL] * args.candidates)
        example, example_passed = rate(box, references)
        print(
            f"{mode}: {box.why}; {box.workers()} workers: {trivial:.1f} trivial candidates/s ({passed} passed), "
            f"{example:.1f} example tasks/s ({example_passed}/{len(references)} passed)"
        )
        figures[f"{mode}_candidates_per_s"] = round(trivial, 1)
        figures[f"{mode}_example_tasks_per_s"] = round(example, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
