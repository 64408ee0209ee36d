"""What a KFP component does inside its container: run one stage and report it to the Kubeflow UI.

Components stay thin wrappers (their source is shipped inside the compiled YAML); everything they do lives here,
in the package installed in the image, so it is tested without KFP.
"""

from __future__ import annotations

import json
from typing import Any

from blueprint.config import parse
from blueprint.errors import user_errors_exit
from blueprint.models.bases import Bases
from blueprint.runtime import launch
from blueprint.stages import registry
from blueprint.store import artifacts, storage


def numeric_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics to `a.b` keys, keeping only finite numbers (what KFP Metrics can show)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(numeric_metrics(value, f"{name}."))
        elif (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value == value
            and abs(value) != float("inf")
        ):
            flat[name] = float(value)
    return flat


def markdown_report(stage: str, out: artifacts.StageOutput) -> str:
    """The stage's own report.md when it wrote one, else a table of its metrics."""
    if "report.md" in out.manifest.get("files", {}):
        return storage.read_text(storage.join(out.uri, "report.md"))
    rows = "\n".join(f"| {k} | {v:.6g} |" for k, v in numeric_metrics(out.metrics).items())
    status = "cache hit" if out.cached else "computed"
    return f"# {stage}\n\nOutput: `{out.uri}` ({status})\n\n| metric | value |\n|---|---|\n{rows}\n"


def run_stage_task(
    stage: str,
    settings: dict[str, Any],
    inputs: dict[str, str],
    artifact_root: str,
    force: bool = False,
    metrics_path: Any = None,
    report_path: str | None = None,
    page_path: str | None = None,
) -> tuple[str, str]:
    """Run `stage` with `settings` on `inputs` under `artifact_root`; return (output URI, content key).

    `metrics_path` is a KFP `Metrics` artifact (anything with log_metric), `report_path` the path of a
    `Markdown` artifact and `page_path` that of an `HTML` one; all optional so the function is usable outside KFP.
    """
    spec = registry.get(stage)
    with user_errors_exit(stage):
        cfg = parse(spec.config_type(), settings)
        # progress lines (not bars: no terminal here), which kfp.local streams and `kubectl logs` shows
        out = launch.run_stage(stage, cfg, inputs, artifact_root=artifact_root, force=force, progress=True)
    return report_task(stage, out, metrics_path, report_path, page_path)


def html_report(stage: str, out: artifacts.StageOutput) -> str:
    """The stage's own report.html (plots embedded) when it wrote one, else its Markdown report as a page."""
    from blueprint.eval.report import html_page

    if "report.html" in out.manifest.get("files", {}):
        return storage.read_text(storage.join(out.uri, "report.html"))
    return html_page(markdown_report(stage, out), stage)


def report_task(
    stage: str,
    out: artifacts.StageOutput,
    metrics_path: Any = None,
    report_path: str | None = None,
    page_path: str | None = None,
) -> tuple[str, str]:
    """A finished task's JSON line, its KFP Metrics, Markdown report and HTML page; (output URI, content key)."""
    print(json.dumps({"stage": stage, "uri": out.uri, "cached": out.cached, "metrics": out.metrics}, default=str))
    if metrics_path is not None:
        for key, value in numeric_metrics(out.metrics).items():
            metrics_path.log_metric(key, value)
        metrics_path.log_metric("cache_hit", float(out.cached))
    if report_path is not None:
        with open(report_path, "w", encoding="utf-8") as f:
            f.write(markdown_report(stage, out))
    if page_path is not None:
        with open(page_path, "w", encoding="utf-8") as f:
            f.write(html_report(stage, out))
    return out.uri, out.manifest.get("key") or ""


def model_inputs(base: str, coder_base: str, **uris: str) -> dict[str, str]:
    """A model stage's inputs from a component's arguments: "" (KFP's "none") leaves an optional input out."""
    return {"base": base, **{name: uri for name, uri in {"coder_base": coder_base, **uris}.items() if uri}}


def bootstrap_task(
    base: str,
    coder_base: str,
    shards: str,
    settings: dict[str, Any],
    artifact_root: str,
    force: bool = False,
    metrics: Any = None,
    report_path: str | None = None,
) -> tuple[str, str, str]:
    """The bootstrap component's body: (base URI, key, coder base). The `tiny` base is built; any other base passes
    through. The coder base comes back "" when the coder shares the summarizer's base."""
    with user_errors_exit(registry.BOOTSTRAP):
        bases = Bases.of(base, coder_base)
    coder = "" if bases.shared else bases.coder
    if base != "tiny":
        if report_path is not None:
            with open(report_path, "w", encoding="utf-8") as f:
                f.write(f"# bootstrap\n\nBase `{base}` is used as given; nothing to build.\n")
        return base, "", coder
    uri, key = run_stage_task(
        registry.BOOTSTRAP, settings, {"shards": shards}, artifact_root, force, metrics, report_path
    )
    return uri, key, coder
