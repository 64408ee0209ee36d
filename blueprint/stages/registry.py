"""The stages, written once: name, module, config class, inputs (required and optional), outputs, pipeline
parameter, default pod resources, accelerator, profile overrides.

Everything else derives from this table: the CLI's stage names and inputs, the components (each stage's body in
components/stages.py is found by its name), the pipeline's settings parameters and their descriptions, the cluster
settings (which stages get a GPU, what each pod asks for), the local runner, the API, the profiles and the tests.
A new stage is one new module, one component body plus one entry here. Code outside this table and the DAG
(pipelines/blueprint_pipeline.py) names a stage through the constants below, never as a string literal
(tests/stages/test_registry.py).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

from blueprint.config import ConfigError, did_you_mean, parse

# The stage names: the one place they are spelled.
SHARD = "shard"
BOOTSTRAP = "bootstrap"
WARMUP = "warmup"
PPO_ROUND = "ppo-round"
EVALUATE = "evaluate"
MERGE = "merge"
GATE = "gate"
PROMOTE = "promote"
SHARD_PLAN, SHARD_PART = f"{SHARD}-plan", f"{SHARD}-part"  # the shard stage's fan-out tasks (`tasks` below)
STAGE_RESULT = ("uri", "key")  # what a stage's component returns: its output's URI and cache key


class PodResources(NamedTuple):
    """A stage pod's CPU/memory requests and limits on a cluster, in Kubernetes quantity syntax."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    config_class: str
    inputs: tuple[str, ...]  # the input URIs it needs
    param: str  # the pipeline parameter holding its settings (a dict)
    resources: PodResources  # its pod's default resources on a cluster (cluster settings add)
    summary: str  # what it does, in a few words (the parameter's description)
    optional_inputs: tuple[str, ...] = ()  # input URIs it can take besides those
    outputs: tuple[str, ...] = STAGE_RESULT  # its component's named results
    accelerator: bool = False  # gets the accelerator when the cluster settings ask for GPUs
    figures: tuple[str, ...] = ()  # metrics a one-line summary of a finished task shows
    profiles: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # overrides per profile name
    tasks: tuple[str, ...] = ()  # the stage's fan-out tasks beside its own: "plan" -> "shard-plan"

    @property
    def body(self) -> str:
        """The name of its component body in components/stages.py (`ppo-round` -> `ppo_round`)."""
        return self.name.replace("-", "_")

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        return getattr(self.load(), self.config_class)

    def defaults(self, profile: str) -> dict[str, Any]:
        """A copy of the settings `profile` gives this stage: only those it sets other than the config's defaults."""
        return copy.deepcopy(self.profiles.get(profile, {}))


PROFILE_NAMES = ("smoke", "default")  # smoke: seconds, for tests; default: shows learning on 2 CPU cores (README)

# The smoke profile's model must clear the gate's sanity floors (finished, non-empty summaries; code that parses) so
# a smoke run checks promotion end to end: short functions (max_code_chars) a micro base can learn in half a million
# pre-training tokens, and warmup summaries clipped (with their EOS) below the 16 tokens evaluate and PPO generate.

# Pod resources are sized for the default profile (a tiny base) on a modest cluster; a real base needs more
# (cluster settings override them per stage). Memory limits guard the node against a runaway pod; CPU limits are
# generous because throttling only slows.
STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec(
            SHARD,
            "blueprint.stages.shard",
            "ShardConfig",
            (),
            "shard_settings",
            PodResources("1", "4", "2Gi", "8Gi"),
            "extracts (code, summary) pairs into Parquet shards",
            figures=("pairs", "inputs_parsed", "inputs_reused"),
            tasks=("plan", "part"),
            profiles={
                "smoke": {"num_shards": 2, "eval_fraction": 0.1, "max_pairs": 600, "max_code_chars": 200},
                "default": {"partitions": 2},
            },
        ),
        StageSpec(
            BOOTSTRAP,
            "blueprint.stages.bootstrap",
            "BootstrapConfig",
            ("shards",),
            "bootstrap_settings",
            PodResources("2", "4", "4Gi", "8Gi"),
            "builds the tiny base model when base is tiny",
            outputs=(*STAGE_RESULT, "coder_base"),
            figures=("parameters", "loss_start", "loss_end"),
            profiles={
                "smoke": {
                    "preset": "micro",
                    "vocab_size": 512,
                    "seq_len": 128,
                    "batch_size": 8,
                    "lr": 1e-2,
                    "max_tokens": 524_288,
                    "max_pairs": 600,
                }
            },
        ),
        StageSpec(
            WARMUP,
            "blueprint.stages.warmup",
            "WarmupConfig",
            ("shards", "base"),
            "warmup_settings",
            PodResources("2", "8", "8Gi", "16Gi"),
            "supervised warmup of both LoRA adapters",
            optional_inputs=("coder_base",),
            accelerator=True,
            figures=("summarizer_eval_loss_after", "coder_eval_loss_after"),
            profiles={
                "smoke": {"steps": 40, "lr": 1e-2, "max_code_tokens": 128, "max_summary_tokens": 12},
                "default": {"steps": 30, "coder_steps": 120, "lr": 5e-3},
            },
        ),
        StageSpec(
            PPO_ROUND,
            "blueprint.stages.ppo_round",
            "PPORoundConfig",
            ("shards", "base", "adapters"),
            "ppo_settings",
            PodResources("2", "8", "8Gi", "16Gi"),
            "one round-trip PPO round on the summarizer and supervised steps on the coder",
            optional_inputs=("coder_base",),
            accelerator=True,
            figures=("probe_reward_before", "probe_reward_after", "kl_mean"),
            profiles={
                "smoke": {
                    "ppo_steps": 2,
                    "supervised_steps": 2,
                    "batch_size": 4,
                    "mini_batch_size": 2,
                    "ppo_epochs": 1,
                    "samples_per_query": 2,
                    "max_new_tokens": 16,
                    "max_code_tokens": 128,
                    "probe_size": 4,
                },
                "default": {
                    "ppo_steps": 16,
                    "supervised_steps": 20,
                    "batch_size": 32,
                    "mini_batch_size": 8,
                    "init_kl_coef": 0.1,
                    "probe_samples": 4,
                },
            },
        ),
        StageSpec(
            EVALUATE,
            "blueprint.stages.evaluate",
            "EvaluateConfig",
            ("shards", "base", "adapters"),
            "evaluate_settings",
            PodResources("2", "8", "8Gi", "16Gi"),
            "scores both adapters on the held-out split, after warmup and after each round",
            optional_inputs=("previous", "coder_base"),
            accelerator=True,
            figures=("reward_gen_mean", "gain_gen_mean", "pairwise_accuracy"),
            profiles={"smoke": {"max_examples": 16, "max_new_tokens": 16, "max_code_tokens": 128}},
        ),
        StageSpec(
            MERGE,
            "blueprint.stages.merge",
            "MergeConfig",
            ("base", "adapters"),
            "merge_settings",
            PodResources("1", "4", "8Gi", "16Gi"),
            "merges each adapter into its base as a standalone model",
            optional_inputs=("evaluation", "coder_base"),
            accelerator=True,
            figures=("saved_dtype", "max_abs_logit_diff_summarizer"),
        ),
        # the gate may evaluate the champion again, as evaluate does
        StageSpec(
            GATE,
            "blueprint.stages.gate",
            "GateConfig",
            ("shards", "base", "adapters", "evaluation", "models"),
            "gate_settings",
            PodResources("2", "8", "8Gi", "16Gi"),
            "judges the run's models against the promoted ones: promote or keep",
            optional_inputs=("coder_base",),
            outputs=("Output",),
            accelerator=True,
            figures=("promote", "challenger_reward_gen_mean", "champion_reward_gen_mean"),
            profiles={"smoke": {"floor": 0.0}},
        ),  # smoke: sanity floors only (pairwise accuracy on 65 pairs is noise)
        StageSpec(
            PROMOTE,
            "blueprint.stages.promote",
            "PromoteConfig",
            ("gate",),
            "promote_settings",
            PodResources("250m", "1", "512Mi", "1Gi"),
            "points the promotion name at the gate's winner",
            figures=("promoted",),
        ),
    ]
}


def get(name: str) -> StageSpec:
    key = name.replace("_", "-")
    if key not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[key]


def check_stage_names(names: Iterable[str]) -> None:
    """Refuse stage names the registry does not know (in a settings mapping, a config file, `--set`)."""
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ConfigError(
            f"unknown stage(s) in settings: {', '.join(unknown)}{did_you_mean(unknown, STAGES)}; "
            f"stages: {', '.join(STAGES)}"
        )


def stage_configs(
    settings: Mapping[str, Mapping[str, Any]], label: Callable[[str], str] = lambda stage: stage, here: bool = False
) -> dict[str, Any]:
    """Each stage's config from `settings` ({stage: {key: value}}): the one place a run's settings are validated
    (by the API, `blueprint run` and `blueprint submit`), before any stage runs. An error names `label(stage)`.
    `here`: the stages will run on this machine, so a `device=cuda` or `engine=vllm` it cannot honour fails now too."""
    check_stage_names(settings)
    configs = {}
    for stage, values in settings.items():
        try:
            configs[stage] = parse(STAGES[stage].config_type(), values)
            if here and str(getattr(configs[stage], "device", "")).startswith("cuda"):
                from blueprint.models.runtime import resolve_device

                resolve_device(configs[stage].device)
            if here and getattr(configs[stage], "engine", None) == "vllm":
                from blueprint.engines.settings import require

                require(configs[stage])
        except ConfigError as exc:
            raise ConfigError(f"{label(stage)}: {exc}") from None
    return configs


def task_names() -> tuple[str, ...]:
    """Every pipeline task kind: each stage, and its fan-out tasks (`shard-plan`, `shard-part`)."""
    return tuple(f"{name}-{t}" for name, spec in STAGES.items() for t in spec.tasks) + tuple(STAGES)


def accelerator_stages() -> tuple[str, ...]:
    return tuple(name for name, spec in STAGES.items() if spec.accelerator)


def stage_of_task(task: str) -> str:
    """The stage a pipeline task kind belongs to: `shard-plan` -> `shard`."""
    for name, spec in STAGES.items():
        if task == name or task in (f"{name}-{t}" for t in spec.tasks):
            return name
    raise ConfigError(f"unknown task {task!r}; tasks: {', '.join(task_names())}")


def param_of_stage() -> dict[str, str]:
    """{stage: its pipeline settings parameter}, e.g. {"ppo-round": "ppo_settings"}."""
    return {name: spec.param for name, spec in STAGES.items()}
