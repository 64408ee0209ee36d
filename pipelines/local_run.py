"""`blueprint run`: the very same pipeline definition, executed by `kfp.local` on this machine.

Everything a run needs is checked before the first stage starts (settings of every stage, epochs, the source,
a writable artifact root), so a typo fails in a second, naming the parameter, not after an hour of training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from blueprint.config import ConfigError
from blueprint.models.bases import checked_bases
from blueprint.stages import profiles, registry
from blueprint.store import runs, storage
from blueprint.tracking import RUN_ENV

PIPELINE_STAGES = tuple(registry.STAGES)
PARAM_OF_STAGE = registry.param_of_stage()


@dataclasses.dataclass
class RunPlan:
    """Validated inputs of one pipeline run: pipeline arguments plus the compile-time epochs and profile."""

    profile: str
    epochs: int
    arguments: dict[str, Any]


def plan(
    profile: str = profiles.DEFAULT_PROFILE,
    epochs: int = profiles.EPOCHS,
    artifact_root: str = profiles.ARTIFACT_ROOT,
    source: str | None = None,
    base: str = profiles.DEFAULT_BASE,
    overrides: dict[str, dict[str, Any]] | None = None,
    force: bool = False,
    coder_base: str = "",
) -> RunPlan:
    """Merge profile defaults with `overrides` ({stage: {key: value}}) and validate every stage's settings."""
    if epochs < 1:
        raise ConfigError(f"parameter 'epochs' must be at least 1, got {epochs}")
    settings = profiles.merged_settings(profile, overrides)  # an unknown stage is named before anything else
    if source is not None:
        settings[registry.SHARD]["source"] = source
    base, coder_base = checked_bases(base, coder_base)
    configs = registry.stage_configs(settings, lambda stage: f"parameter {PARAM_OF_STAGE[stage]}", here=True)
    from blueprint.data.sources import Source, parse_source, resolve_source

    try:
        shard_settings = settings[registry.SHARD]
        source_spec = shard_settings["source"] = resolve_source(shard_settings.get("source", "stdlib"))
        if parse_source(source_spec).kind == "dir":
            Source(source_spec).root()
    except ValueError as exc:
        raise ConfigError(f"parameter source: {exc}") from None
    if not storage.is_s3(artifact_root):
        artifact_root = storage.normalize(artifact_root)
    storage.check_writable(artifact_root)
    # the seed's knobs and the source are also flat pipeline parameters; the components let those win
    ppo = configs[registry.PPO_ROUND]
    args = {
        "artifact_root": artifact_root,
        "source": source_spec,
        "base": base,
        "coder_base": coder_base,
        "ppo_steps": ppo.ppo_steps,
        "supervised_steps": ppo.supervised_steps,
        "force": force,
    }
    args.update({PARAM_OF_STAGE[s]: settings[s] for s in PIPELINE_STAGES})
    return RunPlan(profile, epochs, args)


@contextlib.contextmanager
def condensed_output(verbose: bool, labels: dict[str, str], log_path: Path):
    """kfp.local's output as one line per task plus the stages' own lines (all of it when `verbose`), all of it
    in `log_path`; a failed task raises TaskFailed with its own error line instead of kfp's RuntimeError."""
    from blueprint.pipelines.run_log import TaskLogFilter

    log = TaskLogFilter(sys.stdout, labels, verbose=verbose, log_path=log_path)
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.closing(log):
        if not verbose:
            # Per task, kfp warns that the image is not a python:* image (ours is a Python image,
            # docker/Dockerfile) and that display names do nothing locally (the filter shows them instead).
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image", category=RuntimeWarning)
            warnings.filterwarnings(
                "ignore", message=".*have no effect in the current local runner", category=UserWarning
            )
        try:
            yield log
        except RuntimeError:
            failed = log.task_failed()
            if failed is None:
                raise
            raise failed from None


def display_names(pipeline: Any) -> dict[str, str]:
    """{kfp task name: the display name the pipeline gave it} from the compiled pipeline spec."""
    tasks = pipeline.pipeline_spec.root.dag.tasks
    return {name: task.task_info.name for name, task in tasks.items() if task.task_info.name}


def run(
    plan_: RunPlan,
    *,
    runner: str = "subprocess",
    image: str | None = None,
    local_root: str | Path | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """Execute the pipeline through kfp.local; returns its outputs and wall time."""
    from kfp import local

    from blueprint.pipelines import build_pipeline
    from blueprint.pipelines.cache_hits import answering_hits

    root = plan_.arguments["artifact_root"]
    local_root = Path(local_root or default_local_root(root)).resolve()
    local_root.mkdir(parents=True, exist_ok=True)
    if runner == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(local_root))
    elif runner == "docker":
        from blueprint.pipelines.docker_runner import docker_runner

        docker, image = docker_runner(image, plan_.arguments["artifact_root"])
        local.init(runner=docker, pipeline_root=str(local_root))
    else:
        raise ConfigError(f"unknown runner {runner!r}; choose subprocess or docker")
    kwargs = {"image": image} if image else {}
    pipeline = build_pipeline(epochs=plan_.epochs, profile=plan_.profile, **kwargs)
    start = time.time()
    name = f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path = local_root / name
    if not storage.is_s3(root):  # the log lives with the run records, under the artifact root
        log_path = storage.local_path(storage.join(storage.normalize(root), runs.RUNS_DIR, name))
        log_path.parent.mkdir(parents=True, exist_ok=True)
    before = os.environ.get(RUN_ENV)
    os.environ[RUN_ENV] = name[: -len(".log")]  # the stages tag their MLflow runs with it
    try:
        # the subprocess runner runs this very code: a cache hit is answered here, without starting a process
        hits = answering_hits() if runner == "subprocess" else contextlib.nullcontext()
        with condensed_output(verbose, display_names(pipeline), log_path), hits:
            task = pipeline(**plan_.arguments)
    finally:
        log = keep_log(log_path, root)
        os.environ.pop(RUN_ENV) if before is None else os.environ.__setitem__(RUN_ENV, before)
    outputs = {name: value for name, value in task.outputs.items()}
    return {"outputs": outputs, "seconds": round(time.time() - start, 1), "log": log}


def default_local_root(artifact_root: str) -> Path:
    """Where kfp.local keeps its own task outputs: beside the artifacts for a local root (never the current
    directory), a temporary folder for an s3:// one."""
    root = storage.normalize(artifact_root)
    if storage.is_s3(root):
        return Path(tempfile.gettempdir()) / "blueprint-kfp-local"
    return storage.local_path(root) / ".kfp-local"


def keep_log(log_path: Path, artifact_root: str) -> str:
    """The run log's place under the artifact root (`runs/run-<time>.log`): uploaded there for an s3:// root."""
    root = storage.normalize(artifact_root)
    if not storage.is_s3(root) or not log_path.exists():
        return str(log_path)
    uri = storage.join(root, runs.RUNS_DIR, log_path.name)
    try:
        storage.write_bytes(uri, log_path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - the run's outcome stands; say where the log stayed instead
        print(
            f"blueprint run: could not copy the log to {uri} ({type(exc).__name__}); it is at {log_path}",
            file=sys.stderr,
        )
        return str(log_path)
    return uri


def summary(plan_: RunPlan, result: dict[str, Any]) -> str:
    """What `blueprint run` prints at the end: how good the models are, the gate's decision, warnings, paths."""
    from blueprint.eval.summary import floor_verdict, run_summary

    root = storage.normalize(plan_.arguments["artifact_root"])
    models, evaluation = result["outputs"]["models"], result["outputs"]["evaluation"]
    history = storage.read_json(storage.join(evaluation, "history.json"))
    gate = None
    record = runs.latest_record(root, evaluation=evaluation)
    if record and record["outputs"].get(registry.GATE):
        gate = storage.read_json(storage.join(record["outputs"][registry.GATE], "gate.json"))
    paths = {
        "merged models": f"{storage.join(models, 'summarizer')} and {storage.join(models, 'coder')}",
        "report": storage.join(evaluation, "report.html"),
        "plots": f"{storage.join(evaluation, 'metrics.png')}, curves.png beside it",
        "curves": f"blueprint tensorboard {plan_.arguments['artifact_root']}",
        "log": result.get("log", ""),
        "wall time": f"{result['seconds']} s",
    }
    metrics = storage.read_json(storage.join(evaluation, "metrics.json"))
    return run_summary(history, gate, paths, floor_verdict(metrics, plan_.arguments["gate_settings"]))
