"""The stages by name: module, config class and named inputs, for the CLI, the components and the API."""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    config_class: str
    inputs: tuple[str, ...]
    figures: tuple[str, ...] = ()  # metrics a one-line summary of a finished task shows (`blueprint run`)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        return getattr(self.load(), self.config_class)


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("shard", "blueprint.stages.shard", "ShardConfig", (), ("pairs", "mb_per_s")),
    StageSpec("bootstrap", "blueprint.stages.bootstrap", "BootstrapConfig", ("shards",),
              ("parameters", "loss_start", "loss_end")),
    StageSpec("warmup", "blueprint.stages.warmup", "WarmupConfig", ("shards", "base"),
              ("summarizer_eval_loss_after", "coder_eval_loss_after")),
    StageSpec("ppo-round", "blueprint.stages.ppo_round", "PPORoundConfig", ("shards", "base", "adapters"),
              ("probe_reward_before", "probe_reward_after", "kl_mean")),
    StageSpec("evaluate", "blueprint.stages.evaluate", "EvaluateConfig", ("shards", "base", "adapters"),
              ("reward_gen_mean", "gain_gen_mean", "pairwise_accuracy")),
    StageSpec("merge", "blueprint.stages.merge", "MergeConfig", ("base", "adapters"),
              ("saved_dtype", "max_abs_logit_diff_summarizer")),
]}


def get(name: str) -> StageSpec:
    key = name.replace("_", "-")
    if key not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[key]
