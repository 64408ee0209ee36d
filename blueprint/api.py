"""The seed's Python API, run in-process over the same stage functions as the pipeline (no KFP needed).

    bp = BluePrint("tiny", "tiny")
    bp.train(num_epochs=3, ppo_steps=10, supervised_steps=10)
    bp.save_models("./summarizer", "./coder")

Both roles are LoRA adapters. When both names name one model, they share ONE copy of it; when they differ, the
summarizer (and its PPO reference and value head) lives on the first, the coder on the second, and the summaries
pass between them as text, so their tokenizers may differ. Each distinct base is loaded once per stage.
Every stage output is committed under `artifact_root`, so a second `train` with the same settings is a cache hit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from blueprint.config import ConfigError, parse
from blueprint.data.sources import resolve_source
from blueprint.errors import UserError
from blueprint.models.bases import checked_bases
from blueprint.runtime import launch
from blueprint.stages import profiles, registry
from blueprint.store import artifacts, storage


class BluePrint:
    """Round-trip training of a code summarizer and a code generator, on one shared base or one base each."""

    def __init__(
        self,
        code_to_summary_model: str = profiles.DEFAULT_BASE,
        summary_to_code_model: str | None = None,
        *,
        dataset: str = "stdlib",
        artifact_root: str = profiles.ARTIFACT_ROOT,
        profile: str = profiles.DEFAULT_PROFILE,
        settings: dict[str, dict[str, Any]] | None = None,
        progress: bool = True,
    ) -> None:
        # paths as the user typed them (relative ones included) are resolved here, once; "" = the same base
        self.base_name, self.coder_base = checked_bases(code_to_summary_model, summary_to_code_model or "")
        self.dataset, self.progress = resolve_source(dataset), progress
        self.artifact_root = storage.normalize(artifact_root)
        self.profile = profile
        self.settings = profiles.merged_settings(profile, settings)
        self.settings[registry.SHARD]["source"] = self.dataset
        registry.stage_configs(self.settings, here=True)  # fail now, not after an hour
        self.shards: str | None = None
        self.base: str | None = None
        self.adapters: str | None = None
        self.evaluation: str | None = None
        self.history: list[dict[str, Any]] = []

    def _stage(self, name: str, extra: dict[str, Any] | None = None, **inputs: str) -> artifacts.StageOutput:
        """The stage through the launcher `blueprint stage` and the components use: its `nproc`/`nodes` hold."""
        cfg = parse(registry.get(name).config_type(), {**self.settings[name], **(extra or {})})
        return launch.run_stage(name, cfg, inputs, artifact_root=self.artifact_root, progress=self.progress)

    def prepare(self) -> None:
        """Shard the dataset, build the `tiny` base when asked for, and warm both adapters up (cached)."""
        self.shards = self._stage(registry.SHARD).uri
        self.base = (
            self._stage(registry.BOOTSTRAP, shards=self.shards).uri if self.base_name == "tiny" else self.base_name
        )
        self.adapters = self._stage(registry.WARMUP, shards=self.shards, **self._bases()).uri
        self._evaluate(0)

    def _bases(self) -> dict[str, str]:
        return {"base": self.base, **({"coder_base": self.coder_base} if self.coder_base else {})}

    def _evaluate(self, epoch: int) -> None:
        inputs = {"shards": self.shards, **self._bases(), "adapters": self.adapters}
        if self.evaluation:
            inputs["previous"] = self.evaluation
        out = self._stage(registry.EVALUATE, {"epoch": epoch}, **inputs)
        self.evaluation = out.uri
        self.history.append(out.metrics)

    def train(
        self, num_epochs: int = 3, ppo_steps: int | None = None, supervised_steps: int | None = None
    ) -> list[dict[str, Any]]:
        """Warmup, then per epoch `ppo_steps` PPO steps on the summarizer and `supervised_steps` on the coder,
        with an evaluation after each; returns the evaluation metrics, warmup first. Steps left out are the
        ppo-round settings' (the profile's, under `settings`), as `blueprint run` takes them."""
        steps = {
            name: value
            for name, value in (("ppo_steps", ppo_steps), ("supervised_steps", supervised_steps))
            if value is not None
        }
        for name, value in (("num_epochs", num_epochs), *steps.items()):
            if not isinstance(value, int) or value < (1 if name == "num_epochs" else 0):
                raise ConfigError(f"{name} must be an integer >= {1 if name == 'num_epochs' else 0}, got {value!r}")
        self.history, self.evaluation = [], None
        self.prepare()
        for epoch in range(1, num_epochs + 1):
            self.adapters = self._stage(
                registry.PPO_ROUND,
                {"round_index": epoch, **steps},
                shards=self.shards,
                **self._bases(),
                adapters=self.adapters,
            ).uri
            self._evaluate(epoch)
        if self.progress:
            print(self.summary(), end="", flush=True)
        return self.history

    def summary(self) -> str:
        """How good the models are after `train`, epoch by epoch, with warnings and where the reports are."""
        from blueprint.eval.summary import run_summary

        history = storage.read_json(storage.join(self.evaluation, "history.json")) if self.evaluation else []
        paths = {
            "report": storage.join(self.evaluation, "report.html") if self.evaluation else "",
            "curves": f"tensorboard/ under each warmup and ppo-round output of {self.artifact_root}",
        }
        return run_summary(history, None, paths)

    def save_models(self, code_to_summary_path: str, summary_to_code_path: str, overwrite: bool = False) -> None:
        """Write the two merged models (standalone Hugging Face folders, each on its own base) to local paths or
        s3:// URIs.

        A target that already holds a different model is refused unless `overwrite=True`.
        """
        if self.adapters is None:
            raise UserError("nothing trained yet: call train() first")
        merged = self._stage(registry.MERGE, **self._bases(), adapters=self.adapters, evaluation=self.evaluation)
        for role, target in (("summarizer", code_to_summary_path), ("coder", summary_to_code_path)):
            _publish(storage.join(merged.uri, role), merged.manifest, role, storage.normalize(str(target)), overwrite)


def _publish(source: str, manifest: dict[str, Any], role: str, target: str, overwrite: bool) -> None:
    """Copy one merged model folder to `target`, refusing to replace a different model silently."""
    files = {rel[len(role) + 1 :]: meta for rel, meta in manifest["files"].items() if rel.startswith(f"{role}/")}
    existing = storage.list_files(target) if storage.is_s3(target) or Path(storage.local_path(target)).exists() else {}
    if existing and not overwrite:
        same = set(existing) == set(files) and all(existing[r] == files[r]["size"] for r in files)
        if not same:
            raise FileExistsError(
                f"{target} already holds another model ({len(existing)} files); pass overwrite=True to replace it"
            )
        return
    if not storage.is_s3(target):
        storage.check_writable(storage.local_path(target).parent.as_uri())
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download_dir(source, Path(tmp), files=list(files))
        if existing:
            storage.delete_prefix(target)
        storage.upload_dir(local, target)
