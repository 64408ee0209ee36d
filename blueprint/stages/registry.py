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

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def config_type(self) -> type:
        return getattr(self.load(), self.config_class)


STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("shard", "blueprint.stages.shard", "ShardConfig", ()),
    StageSpec("bootstrap", "blueprint.stages.bootstrap", "BootstrapConfig", ("shards",)),
    StageSpec("warmup", "blueprint.stages.warmup", "WarmupConfig", ("shards", "base")),
    StageSpec("ppo-round", "blueprint.stages.ppo_round", "PPORoundConfig", ("shards", "base", "adapters")),
    StageSpec("evaluate", "blueprint.stages.evaluate", "EvaluateConfig", ("shards", "base", "adapters")),
    StageSpec("merge", "blueprint.stages.merge", "MergeConfig", ("base", "adapters")),
]}


def get(name: str) -> StageSpec:
    key = name.replace("_", "-")
    if key not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[key]
