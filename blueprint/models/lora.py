"""The base model and its LoRA roles: one copy of the base weights, several named adapters switched in place.

Roles: `summarizer` (the PPO policy), `coder` (summary -> code) and, after warmup, `reference` (a frozen copy of
the summarizer, the KL anchor). They are adapters of ONE `peft.PeftModel`; switching a role is `set_adapter`, so the
base weights are never copied (the base itself is opened by `blueprint.models.loading`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import field_validator
from transformers import PreTrainedModel

from blueprint.config import ConfigError, Settings, setting
from blueprint.models.loading import ModelLoadError
from blueprint.models.targets import discover_targets

ROLES = ("summarizer", "coder")
REFERENCE = "reference"


class LoraSettings(Settings):
    """LoRA hyper-parameters shared by every role. `target_modules=None` finds the attention projections in the
    model itself (`blueprint.models.targets`): query and value, plus key and output when `all_attention`."""

    error_prefix = "LoraSettings."

    r: int = setting(16, "rank", gt=0)
    alpha: float = setting(32.0, "scale numerator (the update is scaled by alpha / r)", gt=0)
    dropout: float = setting(0.05, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: tuple[str, ...] | None = setting(
        None, "module names to adapt; None = the model's attention projections"
    )
    all_attention: bool = setting(False, "also adapt the k and o projections")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _names(cls, mods: Any) -> Any:
        mods = (mods,) if isinstance(mods, str) else mods
        if mods is not None and (not mods or not all(isinstance(m, str) and m for m in mods)):
            raise ConfigError(f"give non-empty module names, not {mods!r}")
        return mods

    def targets_for(self, model: PreTrainedModel) -> list[str]:
        if self.target_modules is not None:
            return list(self.target_modules)
        return discover_targets(model, self.all_attention, getattr(model, "name_or_path", "") or "the base")

    def peft_config(self, model: PreTrainedModel) -> LoraConfig:
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            bias="none",
            target_modules=self.targets_for(model),
            task_type="CAUSAL_LM",
        )


def _check_names(names: Sequence[str]) -> None:
    if not names or len(set(names)) != len(names):
        raise ValueError(f"adapter names {list(names)!r}: give at least one, without duplicates")
    for n in names:
        if not isinstance(n, str) or not n.isidentifier() or n == "default":
            # peft saves an adapter called "default" at the root instead of in its own subdirectory
            raise ValueError(f"adapter name {n!r}: use a Python identifier other than 'default'")


def _require_adapter(model: PeftModel, name: str) -> None:
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(model).__name__}")
    if name not in model.peft_config:
        raise ValueError(f"adapter {name!r} not found; the model has {sorted(model.peft_config)}")


def attach_adapters(base: PreTrainedModel, names: Sequence[str] = ROLES, lora: LoraSettings | None = None) -> PeftModel:
    """Wrap `base` in ONE PeftModel holding a fresh LoRA adapter per name; the first one is active.

    Base weights are frozen and shared by every adapter. Only the active adapter's weights require grad at first
    (peft's rule); use `trainable_only` to choose explicitly. The wrapper keeps the base's train/eval mode.
    """
    if isinstance(base, PeftModel):
        raise TypeError("base already is a PeftModel; add adapters to it with add_adapter/load_adapters")
    names = tuple(names)
    _check_names(names)
    was_training = base.training
    lora = lora or LoraSettings()
    config = lora.peft_config(base)
    model = get_peft_model(base, copy.deepcopy(config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, copy.deepcopy(config))
    model.set_adapter(names[0])
    return model.train(was_training)  # new LoRA dropout modules start in train mode: follow the base


def add_reference_adapter(model: PeftModel, source: str = "summarizer", name: str = REFERENCE) -> None:
    """Copy adapter `source` into a new, frozen adapter `name` (the PPO reference); the active adapter is kept.

    A LoRA copy costs a few MB, not a second base: the reference is the base plus the copied low-rank deltas.
    """
    _require_adapter(model, source)
    if name in model.peft_config:
        raise ValueError(f"adapter {name!r} already exists; delete it first to take a new reference")
    _check_names([name])
    config = copy.deepcopy(model.peft_config[source])
    config.inference_mode = True
    model.add_adapter(name, config)
    source_state = get_peft_model_state_dict(model, adapter_name=source, save_embedding_layers=False)
    state = {k: v.detach().clone() for k, v in source_state.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"copying adapter {source!r} into {name!r} failed: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.set_requires_grad(name, requires_grad=False)


def adapter_parameters(model: PeftModel, name: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter `name`, by qualified name (peft names them `...lora_A.<name>.weight`)."""
    _require_adapter(model, name)
    return {k: p for k, p in model.named_parameters() if f".{name}." in k and "lora_" in k}


def trainable_only(model: PeftModel, adapter: str) -> list[torch.nn.Parameter]:
    """Make exactly `adapter`'s parameters require grad (base and every other adapter frozen); returns them.

    Trainability is separate from activation: make the adapter active too (`use_adapter`) before the forward.
    """
    _require_adapter(model, adapter)
    if adapter == REFERENCE:
        raise ValueError(f"adapter {REFERENCE!r} is the frozen PPO anchor and must not be trained")
    for p in model.parameters():
        p.requires_grad_(False)
    params = adapter_parameters(model, adapter)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())


@contextlib.contextmanager
def use_adapter(model: PeftModel, name: str) -> Iterator[PeftModel]:
    """Run the block with adapter `name` active, then restore the previous adapter.

    peft's `set_adapter` also makes the activated adapter trainable (and the others frozen); this context manager
    undoes that, so switching roles never changes what is trainable (the reference stays frozen).
    """
    _require_adapter(model, name)
    previous = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)
    try:
        yield model
    finally:
        model.set_adapter(previous)
        for p, flag in flags:
            p.requires_grad_(flag)


def save_adapters(
    model: PeftModel, out_dir: str | Path, names: Sequence[str] | None = None, base_name: str | None = None
) -> list[str]:
    """Save adapters as `out_dir/<name>/{adapter_config.json, adapter_model.safetensors}`; returns the names.

    Each subdirectory loads with plain `peft.PeftModel.from_pretrained(base, out_dir/<name>)`. `base_name` is what
    adapter_config.json records as the base (peft would record the path the base was loaded from).
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a peft.PeftModel, got {type(model).__name__}")
    names = list(names) if names is not None else list(model.peft_config)
    for n in names:
        _require_adapter(model, n)
    _check_names(names)
    if base_name is not None:
        for n in names:
            model.peft_config[n].base_model_name_or_path = base_name
    # Embeddings are never LoRA targets here: no lookup of the base's config (a hub call for a non-local name)
    model.save_pretrained(str(out_dir), selected_adapters=names, safe_serialization=True, save_embedding_layers=False)
    (Path(out_dir) / "README.md").unlink(missing_ok=True)  # peft's model card: boilerplate naming the base's path
    return names


def load_adapters(
    base: PreTrainedModel,
    adapters_dir: str | Path,
    names: Sequence[str] | None = None,
    frozen: Sequence[str] = (REFERENCE,),
) -> PeftModel:
    """Load the adapters saved by `save_adapters` onto `base`: one PeftModel, first name active.

    `names` default: every subdirectory with an adapter_config.json (roles first, in ROLES order). Adapters in
    `frozen` load without grad; the others load trainable. peft leaves the model in eval mode.
    """
    root = Path(adapters_dir)
    found = sorted(p.parent.name for p in root.glob("*/adapter_config.json")) if root.is_dir() else []
    if names is None:
        names = sorted(found, key=lambda n: (ROLES.index(n) if n in ROLES else len(ROLES), n))
    names = list(names)
    if not names:
        raise ModelLoadError(f"adapters directory {str(adapters_dir)!r} holds no adapters (no */adapter_config.json)")
    missing = [n for n in names if n not in found]
    if missing:
        raise ModelLoadError(f"adapters {missing} not found in {str(adapters_dir)!r} (it has {found})")
    try:
        model = PeftModel.from_pretrained(
            base, str(root / names[0]), adapter_name=names[0], is_trainable=names[0] not in frozen
        )
        for n in names[1:]:
            model.load_adapter(str(root / n), adapter_name=n, is_trainable=n not in frozen)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"adapters in {str(adapters_dir)!r} could not be loaded: {exc}") from exc
    model.set_adapter(names[0])
    for n in names:  # set_adapter made the active one trainable: reapply the frozen list
        model.set_requires_grad(n, requires_grad=n not in frozen)
    return model
