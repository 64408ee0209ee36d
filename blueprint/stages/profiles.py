"""Named sets of overrides over the config classes' defaults: `smoke` (minutes, for tests) and `default` (shows
learning on 2 CPU cores), and the run defaults every entry point shares (API, `blueprint run`/`stage`/`compile`).

The values live with each stage in the registry (`StageSpec.profiles`); pipeline parameters, `--set` flags and
config files override them, merged in one place (`merged_settings`).
"""

from __future__ import annotations

from typing import Any

from blueprint.config import ConfigError
from blueprint.stages.registry import PROFILE_NAMES, STAGES, check_stage_names

DEFAULT_PROFILE = "default"
EPOCHS = 2  # PPO rounds of a run
ARTIFACT_ROOT = "./artifacts"  # where a local run commits its outputs
PROMOTION_NAME = "blueprint"  # the name a run's gate compares against and promote points
DEFAULT_BASE = "tiny"  # the base model: the tiny one bootstrap builds


def stage_settings(profile: str, stage: str) -> dict[str, Any]:
    """A copy of the settings `profile` gives `stage` (unknown profile -> ValueError naming it)."""
    if profile not in PROFILE_NAMES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILE_NAMES)}")
    return STAGES[stage].defaults(profile) if stage in STAGES else {}


def profile_settings(profile: str) -> dict[str, dict[str, Any]]:
    """{stage: settings} of every stage under `profile`."""
    return {stage: stage_settings(profile, stage) for stage in STAGES}


def merged_settings(profile: str, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """{stage: settings} of every stage: `profile`'s values with `overrides` ({stage: {key: value}}) on top; the one
    merge the API, `blueprint run` and the compiled pipeline share. An unknown stage in `overrides` is named."""
    overrides = overrides or {}
    check_stage_names(overrides)
    return {stage: {**stage_settings(profile, stage), **overrides.get(stage, {})} for stage in STAGES}
