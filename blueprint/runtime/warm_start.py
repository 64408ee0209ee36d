"""Warm start: a recurring retraining continues from the promoted model's adapters instead of warmup.

`warmup_task` is the body of the warmup component (it runs in the pod); `promoted_adapters` is the lookup behind
it. It reads the promoted pointer, not "the newest ppo-round": a run that lost its gate never becomes the starting
point of the next one. Only adapters trained on the very same bases count, so a corpus change that rebuilt the
tiny base starts over.
"""

from __future__ import annotations

import json
from typing import Any

from blueprint.errors import user_errors_exit
from blueprint.models.adapter_set import BASE_FILE, trained_on
from blueprint.models.bases import Bases, base_identity
from blueprint.runtime.task import run_stage_task
from blueprint.stages import registry
from blueprint.store import artifacts, promotion, storage


def promoted_adapters(artifact_root: str, name: str, base: str, coder_base: str | None = None) -> str | None:
    """URI of the adapters of the promoted model `name` under `artifact_root` when they were trained on `base`
    (and `coder_base`, empty: the same), else None (nothing promoted yet, or promoted on other bases)."""
    pointer, _ = promotion.read_pointer(artifact_root, name)
    if pointer is None:
        return None
    bases = Bases.of(base, coder_base)
    recorded = trained_on(storage.read_json(storage.join(pointer["adapters"], BASE_FILE)))
    return pointer["adapters"] if recorded == (base_identity(bases.summarizer), base_identity(bases.coder)) else None


def warmup_task(  # noqa: PLR0913 - the warmup component's parameters, passed on
    settings: dict[str, Any],
    shards: str,
    base: str,
    artifact_root: str,
    force: bool,
    warm_start: bool,
    metrics: Any = None,
    report_path: str | None = None,
    coder_base: str = "",
    promotion_name: str = "blueprint",
) -> tuple[str, str]:
    """The warmup component's body: on `warm_start`, hand on the promoted model's adapters.

    Otherwise (or when nothing compatible is promoted) the warmup stage runs as always. Returns (uri, key) like
    `task.run_stage_task`.
    """
    with user_errors_exit(registry.WARMUP):  # a corrupted pointer: one line naming it
        previous = (
            promoted_adapters(artifact_root, promotion_name, base, coder_base) if warm_start and not force else None
        )
    if previous is None:
        inputs = {"shards": shards, "base": base, **({"coder_base": coder_base} if coder_base else {})}
        return run_stage_task(registry.WARMUP, settings, inputs, artifact_root, force, metrics, report_path)
    manifest = artifacts.read_manifest(previous, verify="sizes")
    artifacts.mark_used(previous)
    print(json.dumps({"stage": registry.WARMUP, "warm_start": previous, "promoted": promotion_name}))
    if metrics is not None:
        metrics.log_metric("warm_start", 1.0)
        metrics.log_metric("cache_hit", 1.0)
    if report_path is not None:
        with open(report_path, "w", encoding="utf-8") as f:
            f.write(
                f"# warmup (warm start)\n\nContinuing from `{previous}`: the adapters of the promoted model "
                f"`{promotion_name}` (created {manifest.get('created', '?')}), instead of training from "
                "scratch.\n"
            )
    return previous, manifest.get("key") or ""
