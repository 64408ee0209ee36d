"""Gate stage: is this run's model better than the promoted one? Only a challenger that wins is promoted.

The comparison means something only on the same eval split with the same evaluation settings, so when the data or
the settings changed since the champion was evaluated, the champion's adapters are evaluated again here, on this
run's split with this run's evaluation settings (an ordinary, cached evaluate output). The decision is a pure
function of the two sets of metrics (`blueprint.eval.promotion_rule`); the output records both sides, and the
promote stage (behind a `dsl.If` on the decision) writes the pointer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blueprint.config import parse, setting
from blueprint.errors import InputError
from blueprint.eval.promotion_rule import (
    KEEP,
    PROMOTE,
    SANITY_FLOORS,
    PromotionRule,
    comparable_config,
    decide,
    missed_floors,
    number,
)
from blueprint.eval.report import comparison_table, html_page
from blueprint.models.runtime import RuntimeSettings
from blueprint.progress import note
from blueprint.stages import profiles, registry
from blueprint.store import artifacts, promotion, storage

STAGE = registry.GATE
GATE_FILE = "gate.json"
RUNTIME_FIELDS = tuple(RuntimeSettings.model_fields)


class GateConfig(PromotionRule, RuntimeSettings):
    """The promotion rule, the name competed for, and where the champion's re-evaluation runs when one is needed."""

    error_prefix = ""

    name: str = setting(
        profiles.PROMOTION_NAME, "promotion name: the pointer promoted/{name}.json this run competes for"
    )


def champion_metrics(
    cfg: GateConfig, champion: dict[str, Any], shards: str, evaluation: dict[str, Any], root: str, progress: bool
) -> tuple[dict[str, Any], str]:
    """(metrics, evaluate URI) of the champion on this run's eval split with this run's evaluation settings."""
    from blueprint.stages import registry

    try:
        judged = artifacts.read_manifest(champion["evaluation"], verify="sizes")
    except (artifacts.ArtifactError, storage.StorageError) as exc:
        raise promotion.PointerError(
            f"the champion's evaluation named by promoted/{cfg.name}.json cannot be read ({exc}); not promoting"
        ) from None
    same_split = judged.get("input_manifests", {}).get("shards") == artifacts.manifest_digest(shards)
    if same_split and comparable_config(judged) == comparable_config(evaluation):
        return dict(judged.get("metrics", {})), champion["evaluation"]
    note(STAGE, f"the champion was evaluated on other data or settings: evaluating it on {shards}", progress)
    spec = registry.get(registry.EVALUATE)
    values = {**comparable_config(evaluation), **{k: getattr(cfg, k) for k in RUNTIME_FIELDS}}
    out = spec.load().run(
        parse(spec.config_type(), values),
        shards=shards,
        base=champion["base"],
        coder_base=champion.get("coder_base") or None,
        adapters=champion["adapters"],
        artifact_root=root,
        progress=progress,
    )
    return dict(out.metrics), out.uri


def compute(cfg: GateConfig, challenger: dict[str, Any], root: str, out_dir: Path, progress: bool) -> dict[str, Any]:
    champion, version = promotion.read_pointer(root, cfg.name)
    evaluation = artifacts.read_manifest(challenger["evaluation"], verify="sizes")
    theirs, judged = (
        champion_metrics(cfg, champion, challenger["shards"], evaluation, root, progress) if champion else (None, None)
    )
    ours = dict(evaluation.get("metrics", {}))
    promote, why = decide(ours, theirs, cfg)
    decision = PROMOTE if promote else KEEP
    note(STAGE, f"{PROMOTE if promote else 'keep the champion'}: {why}", progress)
    record = {
        "decision": decision,
        "why": why,
        "name": cfg.name,
        "missed_floors": missed_floors(ours, cfg),
        "challenger": {**challenger, "metrics": ours},
        "champion": None
        if champion is None
        else {"version": version, "evaluation": judged, "metrics": theirs, "run": champion.get("run")},
        "rule": cfg.rule(),
    }
    (out_dir / GATE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    text = gate_report(record)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    (out_dir / "report.html").write_text(html_page(text, f"BluePrint gate: {record['decision']}"), encoding="utf-8")
    return {
        PROMOTE: float(promote),
        f"challenger_{cfg.metric}": number(ours, cfg.metric),
        **({f"champion_{cfg.metric}": number(theirs, cfg.metric)} if theirs else {}),
    }


def gate_report(record: dict[str, Any]) -> str:
    """Markdown: the decision, then champion and challenger side by side."""
    runs = [("challenger", record["challenger"]["metrics"])]
    if record["champion"]:
        runs.insert(0, (f"champion ({record['champion'].get('run') or '?'})", record["champion"]["metrics"]))
    rule = record["rule"]
    sanity = ", ".join(f"`{name}` >= {least:g}" for name, (least, _) in SANITY_FLOORS.items())
    missed = "".join(f"- {m}\n" for m in record.get("missed_floors", []))
    return (
        f"# gate: {record['decision']}\n\n{record['why']}.\n\n"
        + (f"Floors the challenger missed:\n\n{missed}\n" if missed else "")
        + f"Rule: beat the champion on `{rule['metric']}` by more than {rule['margin']:g}, with "
        f"`{rule['floor_metric']}` >= {rule['floor']:g}, and the sanity floors every profile keeps: {sanity}.\n\n"
        + comparison_table(runs)
        + "\n"
    )


def run(  # noqa: PLR0913 - a stage's inputs by name, and where it commits: the launcher's keywords
    config: GateConfig,
    *,
    shards: str,
    base: str,
    adapters: str,
    evaluation: str,
    models: str,
    coder_base: str | None = None,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """The committed decision on the challenger (`models`, evaluated by `evaluation`) against the promoted model
    of `config.name`; keyed by the champion's pointer version, so a new champion means a new judgement."""
    from blueprint.models.bases import Bases

    if artifact_root is None:
        raise InputError("the gate reads the promoted pointer under the artifact root: give artifact_root")
    _, version = promotion.read_pointer(artifact_root, config.name)
    bases = Bases.of(base, coder_base)
    challenger = {
        "shards": shards,
        "base": base,
        "coder_base": "" if bases.shared else bases.coder,
        "adapters": adapters,
        "evaluation": evaluation,
        "models": models,
    }
    base_inputs, base_settings = bases.key_parts()
    inputs = {"shards": shards, "adapters": adapters, "evaluation": evaluation, "models": models, **base_inputs}
    settings = {**config.to_dict(), "champion_version": version or "none", **base_settings}
    return artifacts.reuse_or_commit(
        STAGE,
        settings,
        inputs,
        lambda d: compute(config, challenger, artifact_root, d, progress),
        artifact_root=artifact_root,
        out_uri=out_uri,
        force=force,
    )
