"""Warm start: a recurring retraining continues from the newest committed `ppo-round` adapters instead of warmup.

`warmup_task` is the body of the warmup component (it runs in the pod); `latest_adapters` is the lookup behind
it. Only adapters trained on the very same bases count, so a corpus change that rebuilt the tiny base starts over.
"""
from __future__ import annotations

import json
from typing import Any

from blueprint.store import artifacts, storage


def latest_adapters(artifact_root: str, base: str | None = None, coder_base: str | None = None) -> str | None:
    """URI of the newest committed `ppo-round` output under `artifact_root` (by manifest `created`), or None.

    With `base` (and `coder_base`, empty: the same), only adapters whose roles were trained on those very bases
    count (the identity check the stages make when they load adapters): a new corpus that rebuilt the tiny base
    starts again from warmup, as it must.
    """
    rows = [r for r in artifacts.cached_outputs(artifact_root) if r["stage"] == "ppo-round"]
    if base is not None and rows:
        from blueprint.stages.adapter_set import BASE_FILE, Bases, trained_on
        from blueprint.stages.common import base_identity

        bases = Bases.of(base, coder_base)
        identity = (base_identity(bases.summarizer), base_identity(bases.coder))
        rows = [r for r in rows if trained_on(storage.read_json(storage.join(r["uri"], BASE_FILE))) == identity]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["created"], r["key"]))["uri"]


def warmup_task(settings: dict[str, Any], shards: str, base: str, artifact_root: str, force: bool,
                warm_start: bool, metrics: Any = None, report_path: str | None = None,
                coder_base: str = "") -> tuple[str, str]:
    """The warmup component's body: on `warm_start`, hand on the newest compatible ppo-round adapters.

    Otherwise (or when no earlier round exists) the warmup stage runs as always. Returns (uri, key) like
    `blueprint.stages.task.run_stage_task`.
    """
    from blueprint.stages.task import run_stage_task

    previous = latest_adapters(artifact_root, base, coder_base) if warm_start and not force else None
    if previous is None:
        inputs = {"shards": shards, "base": base, **({"coder_base": coder_base} if coder_base else {})}
        return run_stage_task("warmup", settings, inputs, artifact_root, force, metrics, report_path)
    manifest = artifacts.read_manifest(previous, verify="sizes")
    print(json.dumps({"stage": "warmup", "warm_start": previous}))
    if metrics is not None:
        metrics.log_metric("warm_start", 1.0)
        metrics.log_metric("cache_hit", 1.0)
    if report_path is not None:
        with open(report_path, "w", encoding="utf-8") as f:
            f.write(f"# warmup (warm start)\n\nContinuing from `{previous}`: the newest committed ppo-round "
                    f"on these bases (created {manifest.get('created', '?')}), instead of training from scratch.\n")
    return previous, manifest.get("key") or ""
