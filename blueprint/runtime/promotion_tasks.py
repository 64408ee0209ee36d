"""The gate and promote components' bodies: the decision between the run record that names what a run ended
with (so retention keeps it, and the promote task finds the gate output it acts on) and the pointer it moves."""

from __future__ import annotations

from typing import Any

from blueprint.errors import InputError, user_errors_exit
from blueprint.runtime.task import run_stage_task
from blueprint.stages import gate, promote, registry
from blueprint.store import runs, storage


def gate_task(
    settings: dict[str, Any],
    inputs: dict[str, str],
    run_id: str,
    artifact_root: str,
    force: bool = False,
    metrics: Any = None,
    report_path: str | None = None,
    page_path: str | None = None,
) -> str:
    """The gate component's body: write the run record (what the run ended with, for retention), then judge.
    Returns the decision; the record names the gate's output, for the promote task."""
    with user_errors_exit(gate.STAGE):
        if run_id:  # first without the gate, so a run whose gate fails is still known
            runs.write_record(artifact_root, run_id, inputs)
        uri, _ = run_stage_task(gate.STAGE, settings, inputs, artifact_root, force, metrics, report_path, page_path)
        record = storage.read_json(storage.join(uri, gate.GATE_FILE))
        if run_id:  # the champion's re-evaluation too, so gc keeps what this judgement read
            judged = (record.get("champion") or {}).get("evaluation")
            runs.write_record(
                artifact_root,
                run_id,
                {**inputs, registry.GATE: uri, "champion_evaluation": judged or ""},
                {"decision": record["decision"]},
            )
    return record["decision"]


def promote_task(
    settings: dict[str, Any],
    run_id: str,
    artifact_root: str,
    force: bool = False,
    metrics: Any = None,
    report_path: str | None = None,
) -> tuple[str, str]:
    """The promote component's body: the gate output of run `run_id` is the one its run record names."""
    with user_errors_exit(promote.STAGE):
        gate_uri = storage.read_json(runs.record_uri(artifact_root, run_id))["outputs"].get(registry.GATE)
        if not gate_uri:
            raise InputError(f"run record {runs.record_uri(artifact_root, run_id)} names no gate output")
    return run_stage_task(
        promote.STAGE,
        {**settings, "run": run_id},
        {registry.GATE: gate_uri},
        artifact_root,
        force,
        metrics,
        report_path,
    )
