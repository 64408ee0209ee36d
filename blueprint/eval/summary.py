"""The few lines a person reads when a run ends: how good the models are, epoch by epoch, against what the true
docstrings earn; the gate's decision and why; what looks wrong; and where the report, plots, curves and log are.

Pure functions of the evaluation's history and the gate's record, so `blueprint run` and `BluePrint.train()` print
the same summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# (column header, history key): the figures that say how good the pair is; execution columns show when present
COLUMNS: tuple[tuple[str, str], ...] = (
    ("epoch", "epoch"),
    ("reward", "reward_gen_mean"),
    ("ceiling", "reward_true_mean"),
    ("pairwise", "pairwise_accuracy"),
    ("finished", "eos_rate"),
    ("parses", "code_parse_rate"),
    ("pass@1 round-trip", "pass_at_1_roundtrip"),
    ("pass@1 docstring", "pass_at_1_docstring"),
)
MIN_EXAMPLES = 50  # fewer held-out functions than this and a difference between epochs is mostly chance


def cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def epoch_table(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Aligned text rows: one per epoch, the columns any epoch has, plus the reward as a share of the ceiling."""
    columns = [(h, k) for h, k in COLUMNS if any(k in row for row in history)]
    header = [h for h, _ in columns] + ["of ceiling"]
    rows = []
    for row in sorted(history, key=lambda r: r.get("epoch", 0)):
        gen, true = row.get("reward_gen_mean"), row.get("reward_true_mean")
        share = f"{gen / true:.0%}" if isinstance(gen, float) and isinstance(true, float) and true > 0 else "-"
        rows.append([cell(row.get(k)) for _, k in columns] + [share])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header] + rows
    ]


def warnings(last: Mapping[str, Any]) -> list[str]:
    """What is off in the final evaluation, in plain words."""
    out = []
    if last.get("summary_tokens_mean") == 0:
        out.append("the summaries are empty (summary_tokens_mean 0): the summarizer says nothing about the code")
    elif isinstance(last.get("eos_rate"), float) and last["eos_rate"] < 0.5:
        out.append(
            f"most summaries never finished (eos_rate {last['eos_rate']:.2f}): raise max_new_tokens or train longer"
        )
    if last.get("code_parse_rate") == 0:
        out.append("no code the coder rebuilt parses (code_parse_rate 0)")
    reward, ceiling = last.get("reward_gen_mean"), last.get("reward_true_mean")
    if isinstance(reward, float) and isinstance(ceiling, float) and reward <= 0 < ceiling:
        out.append(f"the summaries help the coder less than no summary at all (reward {reward:.3f})")
    examples = last.get("examples")
    if isinstance(examples, int) and examples < MIN_EXAMPLES:
        out.append(
            f"the evaluation ran on {examples} held-out functions (fewer than {MIN_EXAMPLES}): differences "
            "between epochs are mostly chance; raise evaluate.max_examples"
        )
    return out


def floor_verdict(metrics: Mapping[str, Any], gate_settings: Mapping[str, Any]) -> str:
    """Whether the final model clears every floor of the gate's rule (the sanity floors included), and if not,
    which it missed."""
    from blueprint.config import parse
    from blueprint.eval.promotion_rule import PromotionRule, missed_floors

    rule = parse(PromotionRule, {k: v for k, v in gate_settings.items() if k in PromotionRule.model_fields})
    missed = missed_floors(dict(metrics), rule)
    if not missed:
        return "the final model clears every floor"
    return "THE FINAL MODEL FAILED A FLOOR, do not use it: " + "; ".join(missed)


def run_summary(
    history: Sequence[Mapping[str, Any]],
    gate: Mapping[str, Any] | None,
    paths: Mapping[str, str],
    verdict: str | None = None,
) -> str:
    """The end-of-run text: the epoch table, the gate's decision and the floor verdict, warnings, then the paths
    (name: where)."""
    lines = [
        "",
        "How good the models are (held-out functions, greedy decoding; the ceiling is the reward the true "
        "docstrings earn):",
        "",
    ]
    lines += epoch_table(history)
    if gate:
        from blueprint.eval.promotion_rule import PROMOTE

        decision = "promoted" if gate.get("decision") == PROMOTE else "not promoted"
        lines += ["", f"gate: {decision}: {gate.get('why', '')}"]
    if verdict:
        verdict_head, _, missed = verdict.partition(": ")
        if gate and missed and missed == gate.get("why"):  # the gate refused it for these very floors: said once
            verdict = f"{verdict_head} (the floors on the gate's line)"
        lines += ([] if gate else [""]) + [f"final model: {verdict}"]
    found = warnings(history[-1]) if history else ["no evaluation was recorded"]
    lines += [""] + [f"warning: {w}" for w in found]
    width = max((len(k) for k in paths), default=0) + 1
    lines += [""] + [f"{(name + ':').ljust(width)} {where}" for name, where in paths.items() if where]
    return "\n".join(lines).rstrip() + "\n"
