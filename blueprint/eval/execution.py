"""Execution-based quality on eval rows that carry tests: does the code run and pass them?

- `reference_pass_rate`: the canonical solutions through the same sandbox. It must be 1.0 on a sound task file;
  below that, the failing task ids are named: a missing import or a broken harness shows before any model is judged;
- `pass_at_1_docstring`: the coder's greedy code from the true docstring;
- `pass_at_1_roundtrip`: the coder's greedy code from the summarizer's greedy summary: round-trip correctness
  (Allamanis, Panthaplackel & Yin, ICML 2024);
- `sampled_pass_at_{k}_{docstring|roundtrip}`: the unbiased pass@k over sampled codes, when there are samples.

Every program of an evaluation goes to the sandbox in one batch, so all its workers stay busy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from blueprint.data import tasks as task_format
from blueprint.eval.pass_at_k import mean_pass_at_k
from blueprint.eval.sandbox import Outcome, Sandbox

SOURCES = ("docstring", "roundtrip")  # what the coder's code was written from


def _share(outcomes: Sequence[Outcome]) -> float:
    return sum(o.passed for o in outcomes) / len(outcomes) if outcomes else 0.0


def _brief(outcome: Outcome) -> dict[str, Any]:
    return {"status": outcome.status, "reason": outcome.reason}


def execute(
    sandbox: Sandbox,
    tasks: Sequence[dict[str, str]],
    greedy: dict[str, Sequence[str]],
    sampled: dict[str, Sequence[Sequence[str]]] | None = None,
    ks: Sequence[int] = (),
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one result row per task) of the reference solutions, the greedy codes per source and the sampled
    codes per source (each task's list of samples), all run in `sandbox`."""
    sampled = sampled or {}
    programs = [task_format.reference_program(t) for t in tasks]
    for source in SOURCES:
        programs += [task_format.program(t, code) for t, code in zip(tasks, greedy[source], strict=True)]
    for per_task in sampled.values():
        programs += [task_format.program(t, code) for t, codes in zip(tasks, per_task, strict=True) for code in codes]
    outcomes = iter(sandbox.run_many(programs))
    n = len(tasks)
    reference = [next(outcomes) for _ in range(n)]
    by_source = {source: [next(outcomes) for _ in range(n)] for source in SOURCES}
    by_sample = {
        source: [[next(outcomes) for _ in codes] for codes in per_task] for source, per_task in sampled.items()
    }
    failures = [t["task_id"] for t, o in zip(tasks, reference, strict=True) if not o.passed]
    values: dict[str, Any] = {
        "tested_examples": n,
        "sandbox": sandbox.mode,
        "reference_pass_rate": _share(reference),
        "reference_failures": failures,
        **{f"pass_at_1_{source}": _share(by_source[source]) for source in SOURCES},
    }
    for source, per_task in by_sample.items():
        for k in ks:
            if per_task and all(len(s) >= k for s in per_task):
                values[f"sampled_pass_at_{k}_{source}"] = mean_pass_at_k([[o.passed for o in s] for s in per_task], k)
    rows = [
        {
            "task_id": t["task_id"],
            "reference": _brief(reference[i]),
            **{source: _brief(by_source[source][i]) for source in SOURCES},
            **{f"{source}_samples_passed": sum(o.passed for o in by_sample[source][i]) for source in by_sample},
        }
        for i, t in enumerate(tasks)
    ]
    return values, rows


def reference_note(values: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str | None:
    """One line naming the tasks whose canonical solution fails its own tests (None when every one passes)."""
    failed = [r for r in rows if r["reference"]["status"] != "pass"]
    if not failed:
        return None
    named = "; ".join(
        f"{r['task_id']} ({r['reference']['status']}: {r['reference']['reason'][:80]})" for r in failed[:5]
    )
    more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
    return (
        f"reference_pass_rate {values['reference_pass_rate']:.3f}: the canonical solution fails its own tests "
        f"in {named}{more}: check the task file and that its imports exist in the sandbox's interpreter"
    )
