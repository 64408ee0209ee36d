"""Warm start: a recurring retraining continues from the newest committed `ppo-round` adapters instead of warmup.

`warmup_task` is the body of the warmup component (it runs in the pod); `latest_adapters` is the lookup behind
it. Only adapters trained on the very same base count, so a corpus change that rebuilt the tiny base starts over.
"""
from __future__ import annotations

import json
from typing import Any

from blueprint.store import artifacts, storage


def latest_adapters(artifact_root: str, base: str | None = None) -> str | None:
    """URI of the newest committed `ppo-round` output under `artifact_root` (by manifest `created`), or None.

    With `base`, only adapters trained on that very base count (the identity check the stages make when they
    load adapters): a new corpus that rebuilt the tiny base starts again from warmup, as it must.
    """
    rows = [r for r in artifacts.cached_outputs(artifact_root) if r["stage"] == "ppo-round"]
    if base is not None and rows:
        from blueprint.stages.common import BASE_FILE, base_identity

        identity = base_identity(base)
        rows = [r for r in rows if storage.read_json(storage.join(r["uri"], BASE_FILE)).get("base_identity")
                == identity]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["created"], r["key"]))["uri"]


def warmup_task(settings: dict[str, Any], shards: str, base: str, artifact_root: str, force: bool,
                warm_start: bool, metrics: Any = None, report_path: str | None = None) -> tuple[str, str]:
    """The warmup component's body: on `warm_start`, hand on the newest compatible ppo-round adapters.

    Otherwise (or when no earlier round exists) the warmup stage runs as always. Returns (uri, key) like
    `blueprint.stages.task.run_stage_task`.
    """
    from blueprint.stages.task import run_stage_task

    previous = latest_adapters(artifact_root, base) if warm_start and not force else None
    if previous is None:
        return run_stage_task("warmup", settings, {"shards": shards, "base": base}, artifact_root, force,
                              metrics, report_path)
    manifest = artifacts.read_manifest(previous, verify="sizes")
    print(json.dumps({"stage": "warmup", "warm_start": previous}))
    if metrics is not None:
        metrics.log_metric("warm_start", 1.0)
        metrics.log_metric("cache_hit", 1.0)
    if report_path is not None:
        with open(report_path, "w", encoding="utf-8") as f:
            f.write(f"# warmup (warm start)\n\nContinuing from `{previous}`: the newest committed ppo-round "
                    f"on this base (created {manifest.get('created', '?')}), instead of training from scratch.\n")
    return previous, manifest.get("key") or ""
