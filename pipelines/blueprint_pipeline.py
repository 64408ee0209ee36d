"""The DAG: shard-plan -> shard-part(p) for each partition (ParallelFor) -> shard (Collected) -> bootstrap (tiny
only) -> warmup -> ppo_round(1..N) -> merge -> gate -> [promote], evaluate(e) beside round e+1.

`base` is the summarizer's base (and the coder's, unless `coder_base` names another model). The gate compares
the run's final evaluation with the promoted model of `promotion_name`; promote runs only when the challenger
wins (a `dsl.If` on the gate's decision, visible in the KFP graph).

Epochs are unrolled at compile time. Every stage's settings are a pipeline parameter (a dict holding the profile's
overrides of its config's defaults), derived from the stage registry with its description, and the common knobs are
flat parameters. Every task output is a content-addressed URI, so KFP's own cache (which keys on parameter values)
can only hit when the upstream content is the same; the shard-plan and shard-part tasks, whose input is a source
outside the store, are never KFP-cached and rely on their own manifest cache instead, and the gate and promote tasks,
which read the promoted pointer, are never KFP-cached either.
"""

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from kfp import compiler, dsl

from blueprint.components import DEFAULT_IMAGE, build_components
from blueprint.config import ConfigError
from blueprint.stages import profiles, registry

PIPELINE_NAME = "blueprint"
DESCRIPTION = (
    "Round-trip PPO: a code summarizer and a code generator trained against each other as LoRA adapters "
    "on one base model (or one base each), promoted only when they beat the promoted model."
)


class Outputs(NamedTuple):
    models: str
    evaluation: str
    decision: str


# The flat parameters: (type, description); their defaults come from build_pipeline's arguments and the profile.
FLAT_PARAMETERS: dict[str, tuple[type, str]] = {
    "artifact_root": (str, "Root of the content-addressed artifact store (s3://bucket/prefix or a path)."),
    "source": (str, "The corpus: stdlib | dir:PATH | hf:ID[:CONFIG] | jsonl:/parquet:/csv:PATH | tasks:PATH."),
    "base": (str, "The summarizer's base model (and the coder's): tiny | hub id | dir | s3:// dir."),
    "coder_base": (str, "The coder's own base model when it is another model; empty: the summarizer's base."),
    "promotion_name": (str, "The promotion name the gate compares against and promote points at the winner."),
    "ppo_steps": (int, "PPO steps on the summarizer per round (wins over ppo_settings)."),
    "supervised_steps": (int, "Optimizer steps of the coder per round (wins over ppo_settings)."),
}
SWITCHES: dict[str, str] = {
    "force": "Recompute every stage even when its output is committed.",
    "warm_start": "Warmup continues from the promoted model's adapters when they were trained on these bases.",
}


def settings_description(spec: registry.StageSpec) -> str:
    """A settings parameter's description, from the stage's registry entry."""
    return (
        f"Settings of {spec.name} ({spec.summary}): {spec.config_class} fields over the profile's values "
        f"(blueprint stage {spec.name} --help lists them)."
    )


def pipeline_signature(settings: dict[str, dict], artifact_root: str) -> inspect.Signature:
    """The pipeline function's parameters: the flat ones, each stage's settings dict (from the registry, in its
    order), then the switches; defaults from `settings` ({stage: merged settings})."""
    ppo = registry.STAGES[registry.PPO_ROUND]
    steps = {
        k: settings[ppo.name].get(k, ppo.config_type().model_fields[k].default)
        for k in ("ppo_steps", "supervised_steps")
    }
    source = settings[registry.SHARD].get(
        "source", registry.STAGES[registry.SHARD].config_type().model_fields["source"].default
    )
    flat = {
        "artifact_root": artifact_root,
        "source": source,
        "base": profiles.DEFAULT_BASE,
        "coder_base": "",
        "promotion_name": profiles.PROMOTION_NAME,
        **steps,
    }
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter(name, kind, default=flat[name], annotation=t) for name, (t, _) in FLAT_PARAMETERS.items()
    ]
    params += [
        inspect.Parameter(spec.param, kind, default=settings[name], annotation=dict)
        for name, spec in registry.STAGES.items()
    ]
    params += [inspect.Parameter(name, kind, default=False, annotation=bool) for name in SWITCHES]
    return inspect.Signature(params, return_annotation=Outputs)


def pipeline_docstring() -> str:
    """The Google-style docstring KFP reads the parameters' descriptions from."""
    helps = {
        **{name: h for name, (_, h) in FLAT_PARAMETERS.items()},
        **{spec.param: settings_description(spec) for spec in registry.STAGES.values()},
        **SWITCHES,
    }
    return DESCRIPTION + "\n\nArgs:\n" + "".join(f"    {name}: {h}\n" for name, h in helps.items())


def build_pipeline(
    epochs: int = profiles.EPOCHS,
    profile: str = profiles.DEFAULT_PROFILE,
    image: str = DEFAULT_IMAGE,
    artifact_root: str = profiles.ARTIFACT_ROOT,
    configure_task: Callable | None = None,
    defaults: dict[str, dict] | None = None,
    shard_parallelism: int = 0,
) -> Callable:
    """The pipeline function for `epochs` PPO rounds with `profile` defaults, on container `image`.
    `configure_task(stage, task)` may add cluster settings (resources, secrets, node selectors) to each task;
    `defaults` ({stage: {key: value}}, e.g. device=cuda) go over the profile's in the settings parameters;
    `shard_parallelism` caps the shard-part tasks running at once (0: all partitions at once).
    Its parameters are derived from the registry (`pipeline_signature`); KFP passes them positionally."""
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    comps = build_components(image)
    signature = pipeline_signature(profiles.merged_settings(profile, defaults), artifact_root)
    task = functools.partial(_configured, configure_task or (lambda stage, t: t))

    def blueprint_pipeline(*args: Any) -> Outputs:
        p = dict(zip(signature.parameters, args, strict=True))
        p.update({name: p[spec.param] for name, spec in registry.STAGES.items()})  # settings by stage name
        shard = _shard(comps, task, p, shard_parallelism)
        boot = task(
            "bootstrap",
            comps["bootstrap"](
                artifact_root=p["artifact_root"],
                base=p["base"],
                coder_base=p["coder_base"],
                shards=shard.outputs["uri"],
                settings=p["bootstrap"],
                force=p["force"],
            ),
        )
        # what every model stage gets: the shards, the summarizer's base and the coder's ("" = the same one)
        common = {
            "artifact_root": p["artifact_root"],
            "force": p["force"],
            "shards": shard.outputs["uri"],
            "base": boot.outputs["uri"],
            "coder_base": boot.outputs["coder_base"],
        }
        adapters, evaluation = _train(comps, task, epochs, p, common)
        merged = task(
            "merge",
            comps["merge"](
                **{k: v for k, v in common.items() if k != "shards"},
                adapters=adapters,
                evaluation=evaluation,
                settings=p["merge"],
            ),
        )
        decision = _gate(comps, task, p, common, adapters, evaluation, merged.outputs["uri"])
        return Outputs(models=merged.outputs["uri"], evaluation=evaluation, decision=decision)

    blueprint_pipeline.__signature__ = signature
    blueprint_pipeline.__doc__ = pipeline_docstring()
    return dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)(blueprint_pipeline)


def _shard(comps: dict, task: Callable, p: dict[str, Any], parallelism: int) -> Any:
    """Plan the source's partitions, parse each in its own task, commit one dataset over all of them."""
    plan = task("shard", comps["shard-plan"](source=p["source"], settings=p["shard"]), "shard-plan")
    plan.set_caching_options(False)  # they read the source, outside the store: their own manifest cache applies
    with dsl.ParallelFor(plan.output, parallelism=parallelism or None, name="partitions") as partition:
        part = task(
            "shard",
            comps["shard-part"](
                artifact_root=p["artifact_root"],
                source=p["source"],
                partition=partition,
                settings=p["shard"],
                force=p["force"],
            ),
            "shard-part",
        )
        part.set_caching_options(False)
    return task(
        "shard",
        comps["shard"](
            artifact_root=p["artifact_root"],
            source=p["source"],
            parts=dsl.Collected(part.outputs["uri"]),
            settings=p["shard"],
            force=p["force"],
        ),
    )


def _train(comps: dict, task: Callable, epochs: int, p: dict[str, Any], common: dict[str, Any]) -> tuple[Any, Any]:
    """warmup, evaluate-0, then per epoch a PPO round and its evaluation: (final adapters, final evaluation)."""
    warm = task(
        "warmup",
        comps["warmup"](**common, settings=p["warmup"], warm_start=p["warm_start"], promotion_name=p["promotion_name"]),
    )
    adapters = warm.outputs["uri"]
    evaluation = task(
        "evaluate",
        comps["evaluate"](**common, adapters=adapters, previous="", epoch=0, settings=p["evaluate"]),
        "evaluate-0",
    )
    for epoch in range(1, epochs + 1):
        rnd = task(
            "ppo-round",
            comps["ppo-round"](
                **common,
                adapters=adapters,
                round_index=epoch,
                ppo_steps=p["ppo_steps"],
                supervised_steps=p["supervised_steps"],
                settings=p["ppo-round"],
            ),
            f"ppo-round-{epoch}",
        )
        adapters = rnd.outputs["uri"]
        evaluation = task(
            "evaluate",
            comps["evaluate"](
                **common, adapters=adapters, previous=evaluation.outputs["uri"], epoch=epoch, settings=p["evaluate"]
            ),
            f"evaluate-{epoch}",
        )
    return adapters, evaluation.outputs["uri"]


def _gate(
    comps: dict, task: Callable, p: dict[str, Any], common: dict[str, Any], adapters: Any, evaluation: Any, models: Any
) -> Any:
    """The gate against the promoted model, then promote behind `dsl.If`; returns the gate's decision."""
    gate = task(
        "gate",
        comps["gate"](
            **common,
            adapters=adapters,
            evaluation=evaluation,
            models=models,
            promotion_name=p["promotion_name"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            settings=p["gate"],
        ),
    )
    gate.set_caching_options(False)  # it reads the promoted pointer, which lives outside the task's inputs
    with dsl.If(gate.outputs["Output"] == "promote", name="challenger-wins"):
        promote = task(
            "promote",
            comps["promote"](
                artifact_root=p["artifact_root"],
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                settings=p["promote"],
                force=p["force"],
            ),
        )
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
