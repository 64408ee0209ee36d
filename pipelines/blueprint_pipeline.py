"""The DAG: shard -> bootstrap (tiny only) -> warmup -> ppo_round(1..N) -> merge, evaluate(e) beside round e+1.

`base` is the summarizer's base (and the coder's, unless `coder_base` names another model).

Epochs are unrolled at compile time. Every stage's settings are a pipeline parameter (a dict with the profile's
defaults) and the common knobs are flat parameters. Every task output is a content-addressed URI, so KFP's own
cache (which keys on parameter values) can only hit when the upstream content is the same; the shard task, whose
input is a source outside the store, is never KFP-cached and relies on its own manifest cache instead.
"""
import functools
from collections.abc import Callable
from typing import NamedTuple

from kfp import compiler, dsl

from blueprint.stages import profiles
from blueprint.config import ConfigError
from components import DEFAULT_IMAGE, build_components

PIPELINE_NAME = "blueprint"
DESCRIPTION = ("Round-trip PPO: a code summarizer and a code generator trained against each other as LoRA adapters "
               "on one base model (or one base each).")
Outputs = NamedTuple("Outputs", models=str, evaluation=str)


def build_pipeline(epochs: int = 2, profile: str = "default", image: str = DEFAULT_IMAGE,
                   artifact_root: str = "./artifacts", configure_task: Callable | None = None,
                   defaults: dict[str, dict] | None = None) -> Callable:
    """The pipeline function for `epochs` PPO rounds with `profile` defaults, on container `image`.
    `configure_task(stage, task)` may add cluster settings (resources, secrets, node selectors) to each task;
    `defaults` ({stage: {key: value}}, e.g. device=cuda) go over the profile's in the settings parameters."""
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
        ppo_steps: int = d["ppo-round"].get("ppo_steps", 10),
        supervised_steps: int = d["ppo-round"].get("supervised_steps", 10),
        shard_settings: dict = d["shard"],
        bootstrap_settings: dict = d["bootstrap"],
        warmup_settings: dict = d["warmup"],
        ppo_settings: dict = d["ppo-round"],
        evaluate_settings: dict = d["evaluate"],
        merge_settings: dict = d["merge"],
        force: bool = False,
        warm_start: bool = False,
    ) -> Outputs:
        shard = task("shard", comps["shard"](artifact_root=artifact_root, source=source, settings=shard_settings,
                                          force=force))
        shard.set_caching_options(False)  # its input lives outside the store; its own manifest cache applies
        boot = task("bootstrap", comps["bootstrap"](artifact_root=artifact_root, base=base, coder_base=coder_base,
                                                 shards=shard.outputs["uri"], settings=bootstrap_settings,
                                                 force=force))
        # the bases every model stage gets: the summarizer's, and the coder's ("" = the same one)
        bases = {"base": boot.outputs["uri"], "coder_base": boot.outputs["coder_base"]}
        warm = task("warmup", comps["warmup"](artifact_root=artifact_root, shards=shard.outputs["uri"], **bases,
                                           settings=warmup_settings, force=force, warm_start=warm_start))
        adapters = warm.outputs["uri"]
        evaluation = task("evaluate", comps["evaluate"](
            artifact_root=artifact_root, shards=shard.outputs["uri"], **bases, adapters=adapters,
            previous="", epoch=0, settings=evaluate_settings, force=force), "evaluate-0")
        for epoch in range(1, epochs + 1):
            rnd = task("ppo-round", comps["ppo-round"](
                artifact_root=artifact_root, shards=shard.outputs["uri"], **bases,
                adapters=adapters, round_index=epoch, ppo_steps=ppo_steps, supervised_steps=supervised_steps,
                settings=ppo_settings, force=force), f"ppo-round-{epoch}")
            adapters = rnd.outputs["uri"]
            evaluation = task("evaluate", comps["evaluate"](
                artifact_root=artifact_root, shards=shard.outputs["uri"], **bases,
                adapters=adapters, previous=evaluation.outputs["uri"], epoch=epoch, settings=evaluate_settings,
                force=force), f"evaluate-{epoch}")
        merged = task("merge", comps["merge"](artifact_root=artifact_root, **bases, adapters=adapters,
                                           evaluation=evaluation.outputs["uri"], settings=merge_settings,
                                           force=force))
        return Outputs(models=merged.outputs["uri"], evaluation=evaluation.outputs["uri"])

    return blueprint_pipeline


def _configured(configure: Callable, stage: str, task, label: str | None = None):
    """`task` named `label` (default: the stage) in the KFP graph, with the cluster settings of `stage` applied."""
    task.set_display_name(label or stage)
    return configure(stage, task) or task


def compile_pipeline(path: str, **kwargs) -> str:
    """Write the KFP IR YAML of `build_pipeline(**kwargs)` to `path`."""
    compiler.Compiler().compile(pipeline_func=build_pipeline(**kwargs), package_path=path)
    return path
