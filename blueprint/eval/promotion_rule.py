"""When a new model replaces the promoted one: beat it on one evaluation metric by a margin, and clear a floor.

Besides the rule's own floor, every challenger must clear the SANITY_FLOORS, which no profile or setting lowers: a
model whose summaries are empty or never end, or whose code (almost) never parses, is useless whatever it scores.

A pure function of two sets of evaluate metrics, shared by the gate (which judges) and the promote stage (which
judges again when another run promoted in between).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import field_validator

from blueprint.config import ConfigError, Settings, setting
from blueprint.eval.report import DESCRIPTIONS, SAMPLED
from blueprint.models.runtime import RuntimeSettings

PROMOTE, KEEP = "promote", "keep"  # the gate's decisions (also its 0/1 figure, named PROMOTE)
NOT_SCORES = ("epoch", "examples", "seconds", "tested_examples", "sandbox")  # figures that do not judge the model
# metric -> (the least every promoted model reaches, what falling short means). Not settings: no profile lowers them.
SANITY_FLOORS: dict[str, tuple[float, str]] = {
    "summary_nonempty_rate": (0.5, "most of its summaries are empty"),
    "eos_rate": (0.5, "most of its summaries never end"),
    "code_parse_rate": (0.05, "the code it writes (almost) never parses"),
}


class PromotionRule(Settings):
    """Beat the champion on `metric` by more than `margin`, and reach `floor` on `floor_metric`."""

    metric: str = setting(
        "reward_gen_mean",
        "evaluate metric the challenger must beat the champion on (higher "
        "is better): the held-out reward of generated summaries",
    )
    margin: float = setting(0.0, "the challenger must beat the champion by more than this", ge=0)
    floor_metric: str = setting("pairwise_accuracy", "evaluate metric every promoted model must reach")
    floor: float = setting(0.5, "the floor: at 0.5 pairwise accuracy the coder cannot rank summaries at all")

    @field_validator("metric", "floor_metric")
    @classmethod
    def _known_metric(cls, name: str) -> str:
        if (name not in DESCRIPTIONS and not SAMPLED.match(name)) or name in NOT_SCORES:
            raise ConfigError(
                f"{name!r} is not an evaluate metric; choose one of "
                f"{', '.join(k for k in DESCRIPTIONS if k not in NOT_SCORES)}"
            )
        return name

    def rule(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in PromotionRule.model_fields}


def comparable_config(manifest: dict[str, Any]) -> dict[str, Any]:
    """An evaluate output's settings that decide its numbers (not its epoch label, placement or bases): two
    evaluations compare only when these and their eval split agree."""
    skip = {"epoch", "base_name", "coder_base_name", "sandbox_workers", *RuntimeSettings.model_fields}
    return {k: v for k, v in manifest.get("config", {}).items() if k not in skip}


def number(metrics: dict[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def missed_floors(metrics: dict[str, Any], rule: PromotionRule | None = None) -> list[str]:
    """Each floor the evaluation `metrics` fall short of, in words: the sanity floors, then the rule's own."""
    missed = []
    for name, (least, meaning) in SANITY_FLOORS.items():
        value = number(metrics, name)
        if value is None or value < least:
            missed.append(f"sanity floor {name} >= {least:g} missed ({name} {_shown(value)}: {meaning})")
    if rule is not None:
        value = number(metrics, rule.floor_metric)
        if value is None or value < rule.floor:
            missed.append(f"floor {rule.floor_metric} >= {rule.floor:g} missed ({rule.floor_metric} {_shown(value)})")
    return missed


def _shown(value: float | None) -> str:
    return "missing" if value is None else f"{value:.4g}"


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, rule: PromotionRule) -> tuple[bool, str]:
    """(promote?, why) from the challenger's and the champion's evaluation metrics (None: no champion yet)."""
    score, floor = number(challenger, rule.metric), number(challenger, rule.floor_metric)
    if score is None:
        return False, f"the challenger's evaluation has no {rule.metric}"
    if missed := missed_floors(challenger, rule):
        return False, "; ".join(missed)
    if champion is None:
        return True, f"no champion yet, and {rule.floor_metric} {floor:.4f} clears the floor {rule.floor:g}"
    best = number(champion, rule.metric)
    if best is None:
        return True, f"the champion's evaluation has no {rule.metric}"
    verb = "beats" if score > best + rule.margin else "does not beat"
    return verb == "beats", f"{rule.metric} {score:.4f} {verb} the champion's {best:.4f} by more than {rule.margin:g}"
