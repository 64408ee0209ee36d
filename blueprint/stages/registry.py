"""The stages, written once: name, module, config class, inputs, pipeline parameter, accelerator, profile defaults.

Everything else derives from this table: the CLI's stage names, the components, the pipeline's settings
parameters, the cluster settings (which stages get a GPU), the local runner, the API, the profiles and the tests.
A new stage is one new module plus one entry here.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from blueprint.config import ConfigError, did_you_mean, parse


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    config_class: str
    inputs: tuple[str, ...]
    param: str                                  # the pipeline parameter holding its settings (a dict)
    accelerator: bool = False                   # gets the accelerator when the cluster settings ask for GPUs
    figures: tuple[str, ...] = ()               # metrics a one-line summary of a finished task shows
    profiles: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # settings per profile name
    tasks: tuple[str, ...] = ()                 # the stage's fan-out tasks beside its own: "plan" -> "shard-plan"

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        return getattr(self.load(), self.config_class)

    def defaults(self, profile: str) -> dict[str, Any]:
        """A copy of the settings `profile` gives this stage."""
        return copy.deepcopy(self.profiles.get(profile, {}))


PROFILE_NAMES = ("smoke", "default")  # smoke: seconds, for tests; default: shows learning on 2 CPU cores (README)

STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("shard", "blueprint.stages.shard", "ShardConfig", (), "shard_settings",
              figures=("pairs", "inputs_parsed", "inputs_reused"), tasks=("plan", "part"), profiles={
                  "smoke": {"source": "stdlib", "num_shards": 2, "eval_fraction": 0.1, "max_pairs": 600},
                  "default": {"source": "stdlib", "num_shards": 4, "eval_fraction": 0.05, "partitions": 2}}),
    StageSpec("bootstrap", "blueprint.stages.bootstrap", "BootstrapConfig", ("shards",), "bootstrap_settings",
              figures=("parameters", "loss_start", "loss_end"), profiles={
                  "smoke": {"preset": "micro", "vocab_size": 512, "seq_len": 128, "batch_size": 8,
                            "max_tokens": 16_384, "max_pairs": 600},
                  "default": {"preset": "tiny", "max_tokens": 3_145_728, "batch_size": 4, "seq_len": 384}}),
    StageSpec("warmup", "blueprint.stages.warmup", "WarmupConfig", ("shards", "base"), "warmup_settings",
              accelerator=True, figures=("summarizer_eval_loss_after", "coder_eval_loss_after"), profiles={
                  "smoke": {"steps": 4, "batch_size": 4, "max_code_tokens": 128, "max_summary_tokens": 32},
                  "default": {"steps": 30, "coder_steps": 120, "lr": 5e-3}}),
    StageSpec("ppo-round", "blueprint.stages.ppo_round", "PPORoundConfig", ("shards", "base", "adapters"),
              "ppo_settings", accelerator=True, figures=("probe_reward_before", "probe_reward_after", "kl_mean"),
              profiles={
                  "smoke": {"ppo_steps": 2, "supervised_steps": 2, "batch_size": 4, "mini_batch_size": 2,
                            "ppo_epochs": 1, "samples_per_query": 2, "max_new_tokens": 16, "max_code_tokens": 128,
                            "probe_size": 4},
                  "default": {"ppo_steps": 16, "supervised_steps": 20, "batch_size": 32, "samples_per_query": 4,
                              "mini_batch_size": 8, "ppo_epochs": 4, "init_kl_coef": 0.1, "probe_samples": 4}}),
    StageSpec("evaluate", "blueprint.stages.evaluate", "EvaluateConfig", ("shards", "base", "adapters"),
              "evaluate_settings", accelerator=True, figures=("reward_gen_mean", "gain_gen_mean", "pairwise_accuracy"),
              profiles={"smoke": {"max_examples": 16, "max_new_tokens": 16, "max_code_tokens": 128},
                        "default": {"max_examples": 64}}),
    StageSpec("merge", "blueprint.stages.merge", "MergeConfig", ("base", "adapters"), "merge_settings",
              accelerator=True, figures=("saved_dtype", "max_abs_logit_diff_summarizer")),
    StageSpec("gate", "blueprint.stages.gate", "GateConfig", ("shards", "base", "adapters", "evaluation", "models"),
              "gate_settings", accelerator=True, figures=("promote", "challenger_reward_gen_mean",
                                                          "champion_reward_gen_mean"),
              profiles={"smoke": {"floor": 0.0}}),  # smoke models rank summaries near chance
    StageSpec("promote", "blueprint.stages.promote", "PromoteConfig", ("gate",), "promote_settings",
              figures=("promoted",)),
]}


def get(name: str) -> StageSpec:
    key = name.replace("_", "-")
    if key not in STAGES:
        raise ConfigError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[key]


def check_stage_names(names: Iterable[str]) -> None:
    """Refuse stage names the registry does not know (in a settings mapping, a config file, `--set`)."""
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) in settings: {', '.join(unknown)}{did_you_mean(unknown, STAGES)}; "
                          f"stages: {', '.join(STAGES)}")


def stage_configs(settings: Mapping[str, Mapping[str, Any]], label: Callable[[str], str] = lambda stage: stage,
                  here: bool = False) -> dict[str, Any]:
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


def param_of_stage() -> dict[str, str]:
    """{stage: its pipeline settings parameter}, e.g. {"ppo-round": "ppo_settings"}."""
    return {name: spec.param for name, spec in STAGES.items()}
