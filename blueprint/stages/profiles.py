"""Named bundles of stage settings: `smoke` (seconds, for tests) and `default` (shows learning on 2 CPU cores).

The values live with each stage in the registry (`StageSpec.profiles`); pipeline parameters, `--set` flags and
config files override them.
"""
from __future__ import annotations

from typing import Any

from blueprint.config import ConfigError
from blueprint.stages.registry import PROFILE_NAMES, STAGES


def stage_settings(profile: str, stage: str) -> dict[str, Any]:
    """A copy of the settings `profile` gives `stage` (unknown profile -> ValueError naming it)."""
    if profile not in PROFILE_NAMES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILE_NAMES)}")
    return STAGES[stage].defaults(profile) if stage in STAGES else {}


def profile_settings(profile: str) -> dict[str, dict[str, Any]]:
    """{stage: settings} of every stage under `profile`."""
    return {stage: stage_settings(profile, stage) for stage in STAGES}
