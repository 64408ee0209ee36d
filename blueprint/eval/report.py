"""Human-facing output of the evaluate stage: the Markdown report, the metrics-over-epochs plot, comparison tables.

Kept apart from the stage so the numbers (blueprint.stages.evaluate) and their presentation change independently.
The plot uses matplotlib's object API with the Agg canvas: no pyplot global state, no display needed, and the
backend of a host program (a notebook importing blueprint) is left alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Headline metrics, in table order, with what each one says (the report explains its own numbers).
DESCRIPTIONS: dict[str, str] = {
    "epoch": "PPO rounds done (0 = after warmup)",
    "examples": "held-out functions evaluated",
    "reward_gen_mean": "round-trip reward of the generated summaries (gain - length term)",
    "reward_gen_std": "its standard deviation over functions",
    "reward_true_mean": "the same reward for the true docstrings (what a good summary earns)",
    "gain_gen_mean": "CE(code | empty) - CE(code | generated summary), nats/token",
    "gain_true_mean": "CE(code | empty) - CE(code | true docstring), nats/token",
    "ce_gen_mean": "coder CE of the code given the generated summary",
    "ce_true_mean": "coder CE of the code given the true docstring",
    "ce_empty_mean": "coder CE of the code given an empty summary",
    "pairwise_accuracy": "share of functions whose own docstring beats another function's (0.5 = chance)",
    "bleu_summary": "corpus BLEU of generated summary vs docstring (sacrebleu, 0-100)",
    "rougeL_summary": "ROUGE-L F1 of generated summary vs docstring (0-100)",
    "code_parse_rate": "share of code rebuilt from the docstring that ast.parse accepts",
    "code_bleu": "corpus BLEU of rebuilt code vs the original (0-100)",
    "code_exact_match": "share of rebuilt code equal to the original (whitespace-normalised)",
    "copy_rate": "share of summary 4-grams copied verbatim from the code",
    "eos_rate": "share of generated summaries that ended (EOS) within max_new_tokens",
    "summary_nonempty_rate": "share of generated summaries with any text in them",
    "tested_examples": "evaluated functions that carry tests (a tasks: source)",
    "reference_pass_rate": "share of canonical solutions passing their own tests (1.0 on a sound task file)",
    "pass_at_1_docstring": "share of code rebuilt (greedy) from the true docstring that passes the tests",
    "pass_at_1_roundtrip": "share of code rebuilt (greedy) from the generated summary that passes the tests "
    "(round-trip correctness)",
    "sandbox": "how the tests ran: namespace (bubblewrap) or limits (resource limits only)",
    "summary_tokens_mean": "generated summary length, tokens",
    "summary_true_tokens_mean": "docstring length, tokens",
    "code_tokens_mean": "code length, tokens",
    "length_ratio_mean": "generated summary tokens / code tokens",
    "seconds": "wall time of the evaluation",
}

# The sampled pass@k metrics, e.g. sampled_pass_at_5_roundtrip (k is a setting, so they are named by pattern).
SAMPLED = re.compile(r"^sampled_pass_at_(\d+)_(docstring|roundtrip)$")

# (panel title, metrics plotted in it)
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("round-trip reward (nats/token)", ("reward_gen_mean", "reward_true_mean", "gain_gen_mean")),
    (
        "shares",
        ("pairwise_accuracy", "code_parse_rate", "eos_rate", "copy_rate", "pass_at_1_docstring", "pass_at_1_roundtrip"),
    ),
    ("text similarity (0-100)", ("bleu_summary", "rougeL_summary", "code_bleu")),
    ("lengths (tokens)", ("summary_tokens_mean", "summary_true_tokens_mean")),
)


def fmt(value: Any) -> str:
    """A metric value for a table cell: 4 significant digits, '-' when missing or not a number."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def cell(v: Any) -> str:
        return fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def fenced(text: str, lang: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside `text` (code may contain ```)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def markdown_report(
    headline: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    examples: Sequence[Mapping[str, str]],
    context: Mapping[str, str],
    plots: Sequence[tuple[str, str]] = (),
) -> str:
    """report.md: what was evaluated, the headline table, the plots ((caption, file) beside the report), the
    history across epochs, and example rows."""
    parts = [f"# BluePrint evaluation, epoch {headline.get('epoch', '?')}", ""]
    parts += [f"- {k}: `{v}`" for k, v in context.items()]
    parts += [
        "",
        "Greedy decoding on the held-out (eval) split. Summaries come from the summarizer; code is rebuilt "
        "by the coder from the true docstring (and, where rows carry tests, from the generated summary too, "
        "then run against the tests).",
        "",
        "## Metrics",
        "",
    ]
    parts.append(
        table(
            ["metric", "value", "meaning"],
            [(k, headline[k], DESCRIPTIONS.get(k, "")) for k in DESCRIPTIONS if k in headline],
        )
    )
    if plots:
        parts += ["", "## Plots"]
        parts += [line for caption, name in plots for line in ("", f"![{caption}]({name})")]
    if len(history) > 1:
        keys = ["epoch"] + [k for _, ks in PANELS for k in ks if k != "summary_true_tokens_mean"]
        parts += ["", "## History", "", table(keys, [[h.get(k) for k in keys] for h in history])]
    if examples:
        parts += ["", "## Examples"]
    for i, ex in enumerate(examples, 1):
        parts += [
            "",
            f"### {i}. {ex.get('name') or ex.get('id', '')}",
            "",
            f"- reference summary: {ex['summary']!r}",
            f"- generated summary: {ex['generated_summary']!r}",
            "",
            "Code:",
            "",
            fenced(ex["code"], "python"),
            "",
            "Code rebuilt by the coder from the reference summary:",
            "",
            fenced(ex["rebuilt_code"], "python"),
        ]
    return "\n".join(parts) + "\n"


def plot_history(history: Sequence[Mapping[str, Any]], path: Path) -> None:
    """metrics.png: the key metrics against epoch, one panel per scale (a single epoch shows as points)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(history, key=lambda h: h.get("epoch", 0))
    epochs = [h.get("epoch", i) for i, h in enumerate(rows)]
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, keys) in zip(fig.subplots(2, 2).flat, PANELS, strict=True):
        for key in keys:
            points = [(e, h[key]) for e, h in zip(epochs, rows, strict=True) if isinstance(h.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle("BluePrint evaluation across epochs")
    fig.savefig(path, format="png")


def comparison_table(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Metrics of several runs side by side: one row per metric, one column per (label, metrics) run."""
    keys = [k for k in DESCRIPTIONS if any(k in m for _, m in runs)]
    keys += sorted({k for _, m in runs for k in m} - set(keys))
    return table(["metric"] + [label for label, _ in runs], [[k] + [m.get(k) for _, m in runs] for k in keys])


# (panel title, per-step statistics plotted in it) for a PPO round's curves
STEP_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward (whitened score, raw gain)", ("score/mean", "score/gain")),
    ("KL to the reference (nats/summary)", ("kl",)),
    ("policy", ("entropy", "clipfrac", "approxkl")),
    ("summaries", ("response_length", "no_eos_rate", "copy_rate")),
)


def plot_steps(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """curves.png: a PPO round's per-step statistics (steps.jsonl), one panel per scale; skipped batches left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in rows if not r.get("skipped")]
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (panel, keys) in zip(fig.subplots(2, 2).flat, STEP_PANELS, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points, strict=True), marker=".", label=key)
        ax.set_title(panel)
        ax.set_xlabel("PPO step (the trainer's, across rounds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, format="png")


PAGE_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left;vertical-align:top}pre{background:#f6f8fa;padding:.75rem;overflow-x:auto}"
    "img{max-width:100%}"
)


def html_page(markdown_text: str, title: str, images: Mapping[str, Path] | None = None) -> str:
    """A self-contained HTML page of a Markdown report: the images it links (`![..](name.png)`) embedded as data
    URIs, so the page shows the same wherever it is opened (the KFP UI's HTML viewer, a browser, an S3 console).

    Raw HTML in the Markdown (a model-written summary may hold any text) is escaped, never rendered. A link to an
    image not in `images` is a bug in the report and raises.
    """
    import base64
    import html
    import re

    import markdown

    md = markdown.Markdown(extensions=["tables", "fenced_code"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    body = md.convert(markdown_text)
    images = images or {}

    def embed(match: re.Match) -> str:
        name = html.unescape(match.group(1))
        if name not in images:
            raise ValueError(f"the report links {name!r}, which is not among its images {sorted(images)}")
        data = base64.b64encode(Path(images[name]).read_bytes()).decode("ascii")
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]*)"', embed, body)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
