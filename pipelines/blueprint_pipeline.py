"""The DAG: shard-plan -> shard-part(p) for each partition (ParallelFor) -> shard (Collected) -> bootstrap (tiny
only) -> warmup -> ppo_round(1..N) -> merge -> gate -> [promote], evaluate(e) beside round e+1.

`base` is the summarizer's base (and the coder's, unless `coder_base` names another model). The gate compares
the run's final evaluation with the promoted model of `promotion_name`; promote runs only when the challenger
wins (a `dsl.If` on the gate's decision, visible in the KFP graph).

Epochs are unrolled at compile time. Every stage's settings are a pipeline parameter (a dict with the profile's
defaults) and the common knobs are flat parameters. Every task output is a content-addressed URI, so KFP's own
cache (which keys on parameter values) can only hit when the upstream content is the same; the shard-plan and
shard-part tasks, whose input is a source outside the store, are never KFP-cached and rely on their own manifest
cache instead, and the gate and promote tasks, which read the promoted pointer, are never KFP-cached either.
"""
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

from kfp import compiler, dsl

from blueprint.config import ConfigError
from blueprint.stages import profiles
from components import DEFAULT_IMAGE, build_components

PIPELINE_NAME = "blueprint"
DESCRIPTION = ("Round-trip PPO: a code summarizer and a code generator trained against each other as LoRA adapters "
               "on one base model (or one base each), promoted only when they beat the promoted model.")
class Outputs(NamedTuple):
    models: str
    evaluation: str
    decision: str


def build_pipeline(epochs: int = 2, profile: str = "default", image: str = DEFAULT_IMAGE,
                   artifact_root: str = "./artifacts", configure_task: Callable | None = None,
                   defaults: dict[str, dict] | None = None, shard_parallelism: int = 0) -> Callable:
    """The pipeline function for `epochs` PPO rounds with `profile` defaults, on container `image`.
    `configure_task(stage, task)` may add cluster settings (resources, secrets, node selectors) to each task;
    `defaults` ({stage: {key: value}}, e.g. device=cuda) go over the profile's in the settings parameters;
    `shard_parallelism` caps the shard-part tasks running at once (0: all partitions at once)."""
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    comps = build_components(image)
    d = {stage: {**values, **(defaults or {}).get(stage, {})}
         for stage, values in profiles.profile_settings(profile).items()}
    task = functools.partial(_configured, configure_task or (lambda stage, t: t))

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def blueprint_pipeline(
        artifact_root: str = artifact_root,
        source: str = d["shard"].get("source", "stdlib"),
        base: str = "tiny",
        coder_base: str = "",
        promotion_name: str = "blueprint",
        ppo_steps: int = d["ppo-round"].get("ppo_steps", 10),
        supervised_steps: int = d["ppo-round"].get("supervised_steps", 10),
        shard_settings: dict = d["shard"],
        bootstrap_settings: dict = d["bootstrap"],
        warmup_settings: dict = d["warmup"],
        ppo_settings: dict = d["ppo-round"],
        evaluate_settings: dict = d["evaluate"],
        merge_settings: dict = d["merge"],
        gate_settings: dict = d["gate"],
        promote_settings: dict = d["promote"],
        force: bool = False,
        warm_start: bool = False,
    ) -> Outputs:
        p = dict(locals())
        shard = _shard(comps, task, p, shard_parallelism)
        boot = task("bootstrap", comps["bootstrap"](artifact_root=artifact_root, base=base, coder_base=coder_base,
                                                 shards=shard.outputs["uri"], settings=bootstrap_settings,
                                                 force=force))
        # what every model stage gets: the shards, the summarizer's base and the coder's ("" = the same one)
        common = {"artifact_root": artifact_root, "force": force, "shards": shard.outputs["uri"],
                  "base": boot.outputs["uri"], "coder_base": boot.outputs["coder_base"]}
        adapters, evaluation = _train(comps, task, epochs, p, common)
        merged = task("merge", comps["merge"](**{k: v for k, v in common.items() if k != "shards"},
                                           adapters=adapters, evaluation=evaluation, settings=merge_settings))
        decision = _gate(comps, task, p, common, adapters, evaluation, merged.outputs["uri"])
        return Outputs(models=merged.outputs["uri"], evaluation=evaluation, decision=decision)

    return blueprint_pipeline


def _shard(comps: dict, task: Callable, p: dict[str, Any], parallelism: int) -> Any:
    """Plan the source's partitions, parse each in its own task, commit one dataset over all of them."""
    plan = task("shard", comps["shard-plan"](source=p["source"], settings=p["shard_settings"]), "shard-plan")
    plan.set_caching_options(False)  # they read the source, outside the store: their own manifest cache applies
    with dsl.ParallelFor(plan.output, parallelism=parallelism or None, name="partitions") as partition:
        part = task("shard", comps["shard-part"](artifact_root=p["artifact_root"], source=p["source"],
                                              partition=partition, settings=p["shard_settings"], force=p["force"]),
                    "shard-part")
        part.set_caching_options(False)
    return task("shard", comps["shard"](artifact_root=p["artifact_root"], source=p["source"],
                                        parts=dsl.Collected(part.outputs["uri"]), settings=p["shard_settings"],
                                        force=p["force"]))


def _train(comps: dict, task: Callable, epochs: int, p: dict[str, Any], common: dict[str, Any]) -> tuple[Any, Any]:
    """warmup, evaluate-0, then per epoch a PPO round and its evaluation: (final adapters, final evaluation)."""
    warm = task("warmup", comps["warmup"](**common, settings=p["warmup_settings"], warm_start=p["warm_start"],
                                       promotion_name=p["promotion_name"]))
    adapters = warm.outputs["uri"]
    evaluation = task("evaluate", comps["evaluate"](**common, adapters=adapters, previous="", epoch=0,
                                                 settings=p["evaluate_settings"]), "evaluate-0")
    for epoch in range(1, epochs + 1):
        rnd = task("ppo-round", comps["ppo-round"](
            **common, adapters=adapters, round_index=epoch, ppo_steps=p["ppo_steps"],
            supervised_steps=p["supervised_steps"], settings=p["ppo_settings"]), f"ppo-round-{epoch}")
        adapters = rnd.outputs["uri"]
        evaluation = task("evaluate", comps["evaluate"](**common, adapters=adapters,
                                                     previous=evaluation.outputs["uri"], epoch=epoch,
                                                     settings=p["evaluate_settings"]), f"evaluate-{epoch}")
    return adapters, evaluation.outputs["uri"]


def _gate(comps: dict, task: Callable, p: dict[str, Any], common: dict[str, Any], adapters: Any, evaluation: Any,
          models: Any) -> Any:
    """The gate against the promoted model, then promote behind `dsl.If`; returns the gate's decision."""
    gate = task("gate", comps["gate"](**common, adapters=adapters, evaluation=evaluation, models=models,
                                   promotion_name=p["promotion_name"], run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                   settings=p["gate_settings"]))
    gate.set_caching_options(False)  # it reads the promoted pointer, which lives outside the task's inputs
    with dsl.If(gate.outputs["Output"] == "promote", name="challenger-wins"):
        promote = task("promote", comps["promote"](artifact_root=p["artifact_root"],
                                                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                                settings=p["promote_settings"], force=p["force"]))
        promote.set_caching_options(False)
    return gate.outputs["Output"]


def _configured(configure: Callable, stage: str, task, label: str | None = None):
    """`task` named `label` (default: the stage) in the KFP graph, with the cluster settings of `stage` applied."""
    task.set_display_name(label or stage)
    return configure(stage, task) or task


def compile_pipeline(path: str, **kwargs) -> str:
    """Write the KFP IR YAML of `build_pipeline(**kwargs)` to `path`."""
    compiler.Compiler().compile(pipeline_func=build_pipeline(**kwargs), package_path=path)
    return path
