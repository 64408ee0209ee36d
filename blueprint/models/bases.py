"""The bases a model stage runs on: resolving one, its identity and cache-key part, which base each role uses
(`Bases`), and opening it on its device.

Heavy libraries (torch, transformers, peft) are imported inside the functions that use them, here and in every
stage module, so that a cache hit (the common case on a rerun) answers without loading them.

A base that is a committed artifact (the bootstrap output, or any folder committed with a manifest) is a stage
*input*, so its manifest enters the cache key; a hub id or a plain directory is a *setting* named by itself.
An adapter set (`blueprint.models.adapter_set`) records the identity of its bases, so adapters are never silently
applied to another.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from blueprint.errors import InputError
from blueprint.store import artifacts, storage

CODER = "coder"  # the role that lives on `coder_base`


def quiet_libraries(progress: bool) -> None:
    """Keep a stage's log to its own progress and summary: no per-map or loading bars, deprecation notes or log
    dicts (library bars only in a terminal, where they redraw in place)."""
    import warnings

    import datasets
    import huggingface_hub
    import transformers

    from blueprint.progress import interactive

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    if not (progress and interactive()):
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()


def resolve_base(base: str) -> str:
    """A base as typed, made absolute once: a local directory (relative, ~ or file://) becomes its absolute path;
    `tiny`, hub ids and s3:// URIs stay as they are."""
    base = storage.refuse_credentials(str(base), setting="base")
    if base == "tiny" or storage.is_s3(base):
        return base
    if base.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(base):
        return str(storage.local_path(base).expanduser().resolve())
    return base


def checked_base(base: str) -> str:
    """`resolve_base`, then refused now (not after an hour) when `load_base` would refuse it; `tiny` is built."""
    base = resolve_base(base)
    if base != "tiny":
        from blueprint.models.loading import check_base

        check_base(base)
    return base


def checked_bases(base: str, coder_base: str = "") -> tuple[str, str]:
    """(base, coder_base) each `checked_base`d, an error naming the parameter; coder_base "" when it is the same."""
    from blueprint.config import ConfigError
    from blueprint.errors import UserError

    checked = []
    for name, value in (("base", base), ("coder_base", coder_base)):
        try:
            checked.append(checked_base(value) if value else "")
        except UserError as exc:
            raise ConfigError(f"parameter {name}: {exc}") from None
    try:
        bases = Bases.of(*checked)
    except UserError as exc:
        raise ConfigError(f"parameter {exc}") from None
    return bases.summarizer, "" if bases.shared else bases.coder


def resolve_input(name: str, uri: str) -> str:
    """A stage input as typed (relative path, file://, s3://) -> the absolute URI the stage reads."""
    return resolve_base(uri) if name in ("base", "coder_base") else storage.normalize(uri)


def is_artifact(uri: str) -> bool:
    return (storage.is_s3(uri) or uri.startswith("file://") or "/" in uri) and storage.exists(
        artifacts.manifest_uri(uri)
    )


def base_identity(base: str) -> str:
    """Stable identity of a base: the manifest digest of a committed artifact, else its name as given."""
    return f"sha256:{artifacts.manifest_digest(base)}" if is_artifact(base) else base


def split_base(base: str) -> tuple[dict[str, str], dict[str, str]]:
    """(inputs, settings) contribution of `base` to a stage's cache key."""
    return ({"base": base}, {}) if is_artifact(base) else ({}, {"base_name": base})


@dataclasses.dataclass(frozen=True)
class Bases:
    """The summarizer's base and the coder's (the same string when the roles share one base)."""

    summarizer: str
    coder: str

    @classmethod
    def of(cls, base: str, coder_base: str | None = None) -> Bases:
        """`coder_base` empty or None means the summarizer's own base."""
        coder_base = coder_base or base
        if coder_base == "tiny" and base != "tiny":
            raise InputError(
                "coder_base 'tiny': the tiny base is built from the corpus for both roles; name a model "
                "for coder_base, or leave it empty to share the summarizer's base"
            )
        return cls(base, coder_base)

    @property
    def shared(self) -> bool:
        return self.summarizer == self.coder

    def of_adapter(self, name: str) -> str:
        return self.coder if name == CODER else self.summarizer

    def key_parts(self) -> tuple[dict[str, str], dict[str, str]]:
        """(inputs, settings) contribution to a stage's cache key: a second base adds its own, one base nothing."""
        inputs, settings = split_base(self.summarizer)
        if not self.shared:
            coder_inputs, coder_settings = split_base(self.coder)
            inputs.update({f"coder_{k}": v for k, v in coder_inputs.items()})
            settings.update({f"coder_{k}": v for k, v in coder_settings.items()})
        return inputs, settings


def open_base(base: str, cfg: Any = None, progress: bool = True, task: str = "") -> tuple[Any, Any]:
    """The base model and tokenizer (a committed artifact, verified, or anything `load_base` accepts), placed by
    the stage's runtime settings: on its device, in its dtype, with its attention, checkpointing when asked."""
    import torch

    from blueprint.models import loading, runtime
    from blueprint.progress import note

    cfg = cfg or runtime.RuntimeSettings()
    quiet_libraries(progress)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    where = runtime.place(cfg)
    if is_artifact(base) and not storage.is_s3(base):
        artifacts.read_manifest(base, verify="full")
        base = str(storage.local_path(base))
    model, tokenizer = loading.load_base(
        base, dtype=where.dtype, attn_implementation=where.attn_implementation, device=where.device
    )
    runtime.put(model, where)
    dtype, attention = str(where.dtype).removeprefix("torch."), model.config._attn_implementation
    note(
        task or "base",
        f"on {where.device} in {dtype} ({attention} attention"
        f"{', gradient checkpointing' if where.gradient_checkpointing else ''})",
        progress,
    )
    return model, tokenizer
