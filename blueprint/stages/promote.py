"""Promote stage: make the gate's winner the promoted model of its name, by compare-and-swap on the pointer.

It runs only when the gate said "promote" (a `dsl.If` in the pipeline). The pointer is written last, in one
conditional write, naming the version the gate judged against. When another run promoted in between, its model
is the new champion: the decision is taken again against it (on the same eval split its metrics compare directly),
so neither run's decision is lost and the worse model never replaces the better one.
"""

from __future__ import annotations

import time
from typing import Any

from blueprint.config import Settings, setting
from blueprint.errors import InputError
from blueprint.eval.promotion_rule import PROMOTE, PromotionRule, comparable_config, decide
from blueprint.progress import note
from blueprint.stages import registry
from blueprint.store import artifacts, promotion, storage

STAGE = registry.PROMOTE


class PromoteConfig(Settings):
    """Writing the promoted pointer."""

    attempts: int = setting(5, "compare-and-swap attempts when other runs promote at the same time", ge=1)
    run: str = setting("", "the pipeline run that promotes (its id), recorded in the pointer")
    history: int = setting(
        20, "replaced pointers the pointer keeps, newest first; gc may delete what only older ones named", ge=0
    )


def gate_record(gate: str) -> dict[str, Any]:
    manifest = artifacts.read_manifest(gate, verify="sizes")
    if manifest.get("stage") != registry.GATE:
        raise InputError(f"gate {gate} is a {manifest.get('stage')!r} output, not a gate output")
    return dict(storage.read_json(storage.join(gate, "gate.json")))


def new_pointer(
    record: dict[str, Any], previous: dict[str, Any] | None, run: str, gate: str, keep: int
) -> dict[str, Any]:
    """The pointer naming the gate's challenger; the one it replaces heads its history, cut to `keep` entries."""
    ours = record["challenger"]
    return {
        "name": record["name"],
        "models": ours["models"],
        "summarizer": storage.join(ours["models"], "summarizer"),
        "coder": storage.join(ours["models"], "coder"),
        "evaluation": ours["evaluation"],
        "adapters": ours["adapters"],
        "base": ours["base"],
        "coder_base": ours.get("coder_base", ""),
        "shards": ours["shards"],
        "metrics": ours["metrics"],
        "why": record["why"],
        registry.GATE: gate,
        "run": run,
        "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "history": promotion.history(previous)[:keep],
    }


def rejudge(record: dict[str, Any], champion: dict[str, Any]) -> tuple[bool, str]:
    """The gate's rule against a champion promoted after the gate ran; its metrics compare only when it was
    evaluated on the same split with the same evaluation settings."""
    ours = artifacts.read_manifest(record["challenger"]["evaluation"], verify="none")
    theirs = artifacts.read_manifest(champion["evaluation"], verify="none")
    same = ours.get("input_manifests", {}).get("shards") == theirs.get("input_manifests", {}).get(
        "shards"
    ) and comparable_config(ours) == comparable_config(theirs)
    if not same:
        return False, (
            f"run {champion.get('run')!r} promoted a model evaluated on other data or settings while "
            "this run was gated; rerun the gate to compare them"
        )
    return decide(record["challenger"]["metrics"], champion.get("metrics"), PromotionRule(**record["rule"]))


def promote(config: PromoteConfig, gate: str, artifact_root: str, progress: bool = True) -> dict[str, Any]:
    """Write the pointer (or, when a newer champion wins, leave it); returns what happened."""
    record = gate_record(gate)
    if record["decision"] != PROMOTE:
        raise InputError(f"gate {gate} decided {record['decision']!r}: {record['why']}; nothing to promote")
    name, expected = record["name"], (record.get("champion") or {}).get("version")
    for attempt in range(config.attempts):
        champion, version = promotion.read_pointer(artifact_root, name)
        if champion is not None and champion.get(registry.GATE) == gate:  # a retried task whose write went through
            return {"promoted": 1.0, "why": champion["why"], "attempts": attempt + 1}
        if version != expected:  # another run promoted since the gate: decide again, against its model
            wins, why = rejudge(record, champion) if champion else (True, record["why"])
            if not wins:
                note(STAGE, f"not promoted: {why}", progress)
                return {"promoted": 0.0, "why": why}
            record, expected = {**record, "why": why}, version
        try:
            pointer = new_pointer(record, champion, config.run, gate, config.history)
            promotion.write_pointer(artifact_root, name, pointer, version)
        except promotion.PointerConflict:
            continue
        uri = promotion.pointer_uri(artifact_root, name)
        note(STAGE, f"promoted {record['challenger']['models']} as {name!r} ({uri}, attempt {attempt + 1})", progress)
        return {"promoted": 1.0, "why": record["why"], "attempts": attempt + 1}
    raise promotion.PointerConflict(f"promoted/{name}.json kept changing: {config.attempts} attempts failed")


def run(
    config: PromoteConfig,
    *,
    gate: str,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """The promoted pointer of the gate's name, as a StageOutput (its URI, and `promoted` = 1 or 0)."""
    if artifact_root is None:
        raise InputError("promotion writes the pointer under the artifact root: give artifact_root")
    metrics = promote(config, gate, artifact_root, progress)
    name = gate_record(gate)["name"]
    return artifacts.StageOutput(
        promotion.pointer_uri(artifact_root, name), {"metrics": metrics, "key": ""}, cached=False
    )
