"""mkdocs hook: the settings reference, generated from the configs at build time so it can never drift.

A page holding the marker `<!-- settings -->` gets one section per stage of the registry (each setting's name,
type, default and help, read from the stage's pydantic config), then the cluster settings.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout, when the package is not installed

MARKER = "<!-- settings -->"


def type_name(annotation: Any) -> str:
    """`int`, `str | None`, `Literal['hf', 'vllm', 'auto']`: how a field's type reads in prose."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def cell(text: str) -> str:
    """Text that stays inside one cell of a Markdown table."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def fields_table(config: type) -> str:
    """One row per field of a pydantic config: name, type, default, help."""
    rows = ["| setting | type | default | what it does |", "|---|---|---|---|"]
    for name, field in config.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = cell(repr(default))
        rows.append(
            f"| **{name}** | {cell(type_name(field.annotation))} | {shown if '|' in shown else f'`{shown}`'} "
            f"| {cell(field.description or '')} |"
        )
    return "\n".join(rows)


def settings_reference() -> str:
    """Every stage's settings in registry order, then the cluster settings."""
    from blueprint.pipelines.cluster import ClusterSettings
    from blueprint.stages.registry import STAGES

    parts = []
    for spec in STAGES.values():
        parts.append(
            f"## {spec.name}\n\n`blueprint stage {spec.name} --help` prints the same list; "
            f"`--set {spec.name}.KEY=VALUE` sets one.\n\n{fields_table(spec.config_type())}\n"
        )
    parts.append(
        "## Cluster settings\n\nThe keys of `--cluster-config cluster.yaml` "
        f"([Run on Kubeflow](../kubeflow.md#3-cluster-settings)).\n\n{fields_table(ClusterSettings)}\n"
    )
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARKER, settings_reference()) if MARKER in markdown else markdown
