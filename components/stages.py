"""One lightweight Python component per stage, on the project image (no `from __future__ import annotations`:
KFP reads the annotations as types).

Each component is a thin wrapper: its body only imports `blueprint` (installed in the image) and calls the stage.
Inputs and outputs are URIs; each also emits KFP `Metrics` and `Markdown` so the Kubeflow UI shows its figures,
and evaluate and the gate an `HTML` page with their plots and tables.
The same definitions run on Kubeflow and under `kfp.local` (SubprocessRunner runs lightweight components only).
"""

import inspect
import os
from typing import Any, NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Markdown, Metrics, Output

from blueprint import __version__
from blueprint.config import ConfigError
from blueprint.stages import registry

DEFAULT_IMAGE = os.environ.get("BLUEPRINT_IMAGE", f"ghcr.io/blueprint-rt/blueprint:{__version__}")


# The component bodies: KFP ships each function's source in the compiled YAML and runs it in the image.


def shard_plan(source: str, settings: dict) -> list:
    """The source's partitions (settings.partitions of them, fewer for a small source)."""
    from blueprint.runtime.shard_fanout import plan_task

    return plan_task({**settings, "source": source})


def shard_part(
    artifact_root: str,
    source: str,
    partition: dict,
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("StageResult", uri=str, key=str):
    """One partition parsed: its inputs' pairs, before de-duplication (a cache hit when they are unchanged)."""
    from blueprint.runtime.shard_fanout import part_task

    return part_task({**settings, "source": source}, partition, artifact_root, force, metrics, report.path)


def shard(
    artifact_root: str,
    source: str,
    parts: list[str],
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("StageResult", uri=str, key=str):
    """The dataset over every part: de-duplicated, split and sharded as one task would."""
    from blueprint.runtime.shard_fanout import dataset_task

    return dataset_task({**settings, "source": source}, parts, artifact_root, force, metrics, report.path)


def bootstrap(
    artifact_root: str,
    base: str,
    coder_base: str,
    shards: str,
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("BootstrapResult", uri=str, key=str, coder_base=str):
    """Builds the `tiny` base when base == "tiny"; any other base (hub id, dir, s3://) passes through. Its
    coder_base output is "" when the coder shares the summarizer's base, else the coder's own base."""
    from blueprint.runtime.task import bootstrap_task

    return bootstrap_task(base, coder_base, shards, settings, artifact_root, force, metrics, report.path)


def warmup(
    artifact_root: str,
    shards: str,
    base: str,
    coder_base: str,
    settings: dict,
    force: bool,
    warm_start: bool,
    promotion_name: str,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("StageResult", uri=str, key=str):
    """warm_start: continue from the adapters of the promoted model of `promotion_name`, when they were trained on
    these bases, instead of training (retraining)."""
    from blueprint.runtime.warm_start import warmup_task

    return warmup_task(
        settings, shards, base, artifact_root, force, warm_start, metrics, report.path, coder_base, promotion_name
    )


def ppo_round(
    artifact_root: str,
    shards: str,
    base: str,
    coder_base: str,
    adapters: str,
    round_index: int,
    ppo_steps: int,
    supervised_steps: int,
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("StageResult", uri=str, key=str):
    from blueprint.runtime.task import model_inputs, run_stage_task
    from blueprint.stages import registry

    settings = {**settings, "round_index": round_index, "ppo_steps": ppo_steps, "supervised_steps": supervised_steps}
    return run_stage_task(
        registry.PPO_ROUND,
        settings,
        model_inputs(base, coder_base, shards=shards, adapters=adapters),
        artifact_root,
        force,
        metrics,
        report.path,
    )


def evaluate(
    artifact_root: str,
    shards: str,
    base: str,
    coder_base: str,
    adapters: str,
    previous: str,
    epoch: int,
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
    page: Output[HTML],
) -> NamedTuple("StageResult", uri=str, key=str):
    """The report and its plots also as an HTML page (the KFP UI's HTML viewer)."""
    from blueprint.runtime.task import model_inputs, run_stage_task
    from blueprint.stages import registry

    inputs = model_inputs(base, coder_base, shards=shards, adapters=adapters, previous=previous)
    return run_stage_task(
        registry.EVALUATE, {**settings, "epoch": epoch}, inputs, artifact_root, force, metrics, report.path, page.path
    )


def merge(
    artifact_root: str,
    base: str,
    coder_base: str,
    adapters: str,
    evaluation: str,
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
) -> NamedTuple("StageResult", uri=str, key=str):
    from blueprint.runtime.task import model_inputs, run_stage_task
    from blueprint.stages import registry

    return run_stage_task(
        registry.MERGE,
        settings,
        model_inputs(base, coder_base, adapters=adapters, evaluation=evaluation),
        artifact_root,
        force,
        metrics,
        report.path,
    )


def gate(
    artifact_root: str,
    shards: str,
    base: str,
    coder_base: str,
    adapters: str,
    evaluation: str,
    models: str,
    promotion_name: str,
    run_id: str,
    settings: dict,
    force: bool,
    metrics: Output[Metrics],
    report: Output[Markdown],
    page: Output[HTML],
) -> NamedTuple("GateResult", Output=str):
    """Records the run, then judges its model against the promoted one: "promote" or "keep". The decision is
    named `Output`, KFP's name for a single result: kfp.local (2.17) resolves a `dsl.If` on a task's parameter
    only under that name."""
    from blueprint.runtime.promotion_tasks import gate_task
    from blueprint.runtime.task import model_inputs

    inputs = model_inputs(base, coder_base, shards=shards, adapters=adapters, evaluation=evaluation, models=models)
    return (
        gate_task(
            {**settings, "name": promotion_name}, inputs, run_id, artifact_root, force, metrics, report.path, page.path
        ),
    )


def promote(
    artifact_root: str, run_id: str, settings: dict, force: bool, metrics: Output[Metrics], report: Output[Markdown]
) -> NamedTuple("StageResult", uri=str, key=str):
    """Promotes the model of run `run_id`, which its gate judged (the run record names the gate's output)."""
    from blueprint.runtime.promotion_tasks import promote_task

    return promote_task(settings, run_id, artifact_root, force, metrics, report.path)


def body(task: str) -> Any:
    """The component body of pipeline task kind `task` (a registry stage or one of its fan-out tasks), found by
    name: `ppo-round` -> `ppo_round` above; a stage of the registry without one is named."""
    fn = globals().get(task.replace("-", "_"))
    if fn is None:
        raise AssertionError(f"stage task {task!r} of the registry has no component body in {__name__}")
    return fn


def build_components(image: str = DEFAULT_IMAGE) -> dict[str, Any]:
    """{task kind: its component} for every stage of the registry and its fan-out tasks, bound to container
    `image` (an empty tag is refused). A stage's component returns the outputs its registry entry names."""
    if not image or image.endswith(":") or image.strip() != image:
        raise ConfigError(f"component image {image!r} is not a valid image reference")
    component = dsl.component(base_image=image, install_kfp_package=False)
    comps = {task: component(body(task)) for task in registry.task_names()}
    for name, spec in registry.STAGES.items():
        outputs = inspect.signature(body(name)).return_annotation._fields
        if outputs != spec.outputs:
            raise AssertionError(f"component {name} returns {outputs}, its registry entry says {spec.outputs}")
    return comps
