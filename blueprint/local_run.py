"""`blueprint run`: the very same pipeline definition, executed by `kfp.local` on this machine.

Everything a run needs is checked before the first stage starts (settings of every stage, epochs, the source,
a writable artifact root), so a typo fails in a second, naming the parameter, not after an hour of training.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from blueprint import profiles, storage
from blueprint.config import ConfigError, build
from blueprint.stages import registry

PIPELINE_STAGES = ("shard", "bootstrap", "warmup", "ppo-round", "evaluate", "merge")
PARAM_OF_STAGE = {"shard": "shard_settings", "bootstrap": "bootstrap_settings", "warmup": "warmup_settings",
                  "ppo-round": "ppo_settings", "evaluate": "evaluate_settings", "merge": "merge_settings"}


@dataclasses.dataclass
class RunPlan:
    """Validated inputs of one pipeline run: pipeline arguments plus the compile-time epochs and profile."""

    profile: str
    epochs: int
    arguments: dict[str, Any]


def plan(profile: str = "default", epochs: int = 2, artifact_root: str = "./artifacts", source: str | None = None,
         base: str = "tiny", overrides: dict[str, dict[str, Any]] | None = None, force: bool = False) -> RunPlan:
    """Merge profile defaults with `overrides` ({stage: {key: value}}) and validate every stage's settings."""
    if epochs < 1:
        raise ConfigError(f"parameter 'epochs' must be at least 1, got {epochs}")
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(PIPELINE_STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) in settings: {', '.join(unknown)}; stages: {', '.join(PIPELINE_STAGES)}")
    settings = {s: {**profiles.stage_settings(profile, s), **overrides.get(s, {})} for s in PIPELINE_STAGES}
    if source is not None:
        settings["shard"]["source"] = source
    for stage, values in settings.items():
        probe = dict(values)
        if stage == "ppo-round":
            probe.setdefault("round_index", 1)
        try:
            build(registry.get(stage).config_type(), probe)
        except ConfigError as exc:
            raise ConfigError(f"parameter {PARAM_OF_STAGE[stage]}: {exc}") from None
    from blueprint.sources import Source, parse_source

    source_spec = settings["shard"].get("source", "stdlib")
    try:
        if parse_source(source_spec).kind == "dir":
            Source(source_spec).root()
    except ValueError as exc:
        raise ConfigError(f"parameter source: {exc}") from None
    if not storage.is_s3(artifact_root):
        artifact_root = storage.normalize(artifact_root)
    storage.check_writable(artifact_root)
    ppo = settings["ppo-round"]
    args = {"artifact_root": artifact_root, "source": settings["shard"].pop("source", "stdlib"), "base": base,
            "ppo_steps": ppo.pop("ppo_steps", 10), "supervised_steps": ppo.pop("supervised_steps", 10),
            "force": force}
    args.update({PARAM_OF_STAGE[s]: settings[s] for s in PIPELINE_STAGES})
    return RunPlan(profile, epochs, args)


def run(plan_: RunPlan, *, runner: str = "subprocess", image: str | None = None,
        local_root: str | Path | None = None) -> dict[str, Any]:
    """Execute the pipeline through kfp.local; returns its outputs and wall time."""
    from kfp import local

    from pipelines import build_pipeline

    local_root = Path(local_root or Path.cwd() / ".kfp-local").resolve()
    local_root.mkdir(parents=True, exist_ok=True)
    if runner == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(local_root))
    elif runner == "docker":
        from blueprint.docker_runner import docker_runner

        docker, image = docker_runner(image, plan_.arguments["artifact_root"])
        local.init(runner=docker, pipeline_root=str(local_root))
    else:
        raise ConfigError(f"unknown runner {runner!r}; choose subprocess or docker")
    kwargs = {"image": image} if image else {}
    pipeline = build_pipeline(epochs=plan_.epochs, profile=plan_.profile, **kwargs)
    start = time.time()
    task = pipeline(**plan_.arguments)
    outputs = {name: value for name, value in task.outputs.items()}
    return {"outputs": outputs, "seconds": round(time.time() - start, 1)}
