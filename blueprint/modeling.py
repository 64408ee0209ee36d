"""The base model and its LoRA roles: one copy of the base weights, several named adapters switched in place.

Roles: `summarizer` (the PPO policy), `coder` (summary -> code) and, after warmup, `reference` (a frozen copy of
the summarizer, the KL anchor). They are adapters of ONE `peft.PeftModel`; switching a role is `set_adapter`, so the
base weights are never copied. A base comes from a hub id, a local directory or an `s3://` directory.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from blueprint.config import ConfigError
from blueprint.errors import UserError


ROLES = ("summarizer", "coder")
REFERENCE = "reference"
MANIFEST_NAME = "_MANIFEST.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
HUB_PROBE_TIMEOUT_S = 3.0

# LoRA targets per architecture (config.model_type). `attention` adds the remaining attention projections.
TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"), "gpt2": ("c_attn",),
}
EXTRA_ATTENTION_MODULES: dict[str, tuple[str, ...]] = {
    "llama": ("k_proj", "o_proj"), "mistral": ("k_proj", "o_proj"), "qwen2": ("k_proj", "o_proj"),
    "qwen3": ("k_proj", "o_proj"),
}


class ModelLoadError(UserError, ValueError):
    """A base model or adapter could not be loaded; the message names the input and says why."""


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters shared by every role. `target_modules=None` picks them from the architecture
    (`TARGET_MODULES`, plus k/o projections when `all_attention`), else peft's own per-architecture default."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    all_attention: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraSettings.r={self.r!r}: must be a positive int")
        if not self.alpha > 0:
            raise ConfigError(f"LoraSettings.alpha={self.alpha!r}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraSettings.dropout={self.dropout!r}: must be in [0, 1)")
        if self.target_modules is not None:
            mods = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not mods or not all(isinstance(m, str) and m for m in mods):
                raise ConfigError(f"LoraSettings.target_modules={self.target_modules!r}: give non-empty module names")
            object.__setattr__(self, "target_modules", mods)

    def targets_for(self, model_type: str) -> list[str] | None:
        if self.target_modules is not None:
            return list(self.target_modules)
        if model_type not in TARGET_MODULES:
            return None  # peft falls back to its own table and names the model type if it has no entry
        extra = EXTRA_ATTENTION_MODULES.get(model_type, ()) if self.all_attention else ()
        return list(TARGET_MODULES[model_type] + extra)

    def peft_config(self, model_type: str) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                          target_modules=self.targets_for(model_type), task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------------------------------- base loading

def ensure_pad_token(tokenizer: Any, model: PreTrainedModel | None = None) -> Any:
    """Give a tokenizer without a pad token the EOS token as pad (GPT-2/Llama hub tokenizers ship without one).

    Padding is always masked out (attention mask, loss mask), so reusing EOS is safe and keeps the vocabulary, and
    therefore the embedding matrix, unchanged. The model's config follows so generation pads the same way.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an "
                                 "EOS token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable() -> tuple[bool, str]:
    """One TCP connect (to the HTTPS proxy when one is set), instead of huggingface_hub's minutes of retries."""
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy or constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True, url.geturl()
    except OSError:
        return False, url.geturl()


def _check_local_dir(path: Path, name: str) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"base model {name!r}: no such directory {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"base model {name!r}: directory {path} has no config.json (not a saved model)")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelLoadError(f"base model {name!r}: directory {path} has no weights "
                             f"(looked for {', '.join(WEIGHT_PATTERNS)})")


def default_cache_dir() -> Path:
    return Path(os.environ.get("BLUEPRINT_CACHE", Path.home() / ".cache" / "blueprint")) / "models"


def fetch_s3_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Download a committed `s3://` model directory once; later calls reuse the local copy.

    The cache key is the sha256 of the directory's `_MANIFEST.json`, so a new commit behind the same URI is a new
    download, and a prefix without a manifest (partial output) is refused. Files are checked against the manifest's
    sha256 and the directory appears atomically (rename), so a crashed download is never reused.
    """
    from blueprint import storage  # lazy: only the s3 branch needs it
    from blueprint.artifacts import sha256_file

    root = storage.join(uri, "")
    try:
        raw = storage.read_bytes(storage.join(root, MANIFEST_NAME))
    except storage.StorageError as exc:
        raise ModelLoadError(f"base model {uri!r}: cannot read its {MANIFEST_NAME} (missing = uncommitted or "
                             f"partial output): {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = target / digest[:32]
    if final.is_dir():
        return final
    try:
        files = json.loads(raw).get("files") or {}
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(f"base model {uri!r}: its {MANIFEST_NAME} is not a JSON object: {exc}") from None
    tmp = target / f".partial-{digest[:32]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        storage.download_dir(root, tmp, files=sorted(files) or None)
        (tmp / MANIFEST_NAME).unlink(missing_ok=True)
        for rel, meta in files.items():
            if "sha256" in meta and sha256_file(tmp / rel) != meta["sha256"]:
                raise ModelLoadError(f"base model {uri!r}: {rel} does not match its sha256 in {MANIFEST_NAME}")
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # another process won the race: its copy is as good as ours
                raise
    except storage.StorageError as exc:
        raise ModelLoadError(f"base model {uri!r}: download failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(name)


def load_base(name: str, *, dtype: torch.dtype | str = torch.float32,
              cache_dir: str | Path | None = None) -> tuple[PreTrainedModel, Any]:
    """(causal LM in eval mode, tokenizer) from a hub id, a local directory, or a committed `s3://` directory.

    Fails fast and names `name` on: a missing directory, a directory without config or weights, an unknown or
    unreachable hub id. Offline (HF_HUB_OFFLINE=1) hub ids are served from the local HF cache only. A tokenizer
    without a pad token gets pad = EOS (see `ensure_pad_token`). `cache_dir` is where s3 directories are cached.
    """
    name = str(name)
    if name.startswith("s3://"):
        path: str = str(fetch_s3_dir(name, cache_dir))
        source = dict(local_files_only=True)
    elif _is_local(name):
        local = Path(urlparse(name).path if name.startswith("file://") else name).expanduser()
        _check_local_dir(local, name)
        path, source = str(local), dict(local_files_only=True)
    else:
        path, source = name, _hub_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **source)
        config = AutoConfig.from_pretrained(path, **source)
        published = str(config.dtype or "float32").removeprefix("torch.")  # loading in `dtype` overwrites it
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, **source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"base model {name!r} could not be loaded: {exc}") from exc
    model.published_dtype = published  # what merge saves in by default
    ensure_pad_token(tokenizer, model)
    return model.eval(), tokenizer


def check_base(name: str) -> None:
    """Refuse, before any stage runs, a base `load_base` would refuse: a missing or incomplete directory, an s3://
    prefix that is not a committed model, a malformed hub id, or a hub id that cannot be had offline."""
    name = str(name)
    if name.startswith("s3://"):
        from blueprint import storage

        if not storage.exists(storage.join(name, MANIFEST_NAME)):
            raise ModelLoadError(f"base model {name!r} is not a committed model directory (no {MANIFEST_NAME})")
    elif _is_local(name):
        _check_local_dir(Path(urlparse(name).path if name.startswith("file://") else name).expanduser(), name)
    else:
        _hub_source(name)


def _hub_source(name: str) -> dict[str, Any]:
    """from_pretrained kwargs for hub id `name`: the local HF cache when offline or when the hub is unreachable."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = " (the embedded `tiny` base is built by the bootstrap stage: pass its output directory)" \
        if name == "tiny" else ""
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ModelLoadError(f"base model {name!r} is neither an existing directory nor a valid hub id: {exc}") \
            from None
    cached = _in_hf_cache(name)
    if _offline():
        if not cached:
            raise ModelLoadError(f"base model {name!r} is not a local directory and not in the local Hugging Face "
                                 f"cache, and HF_HUB_OFFLINE is set{hint}")
        return dict(local_files_only=True)
    reachable, where = _hub_reachable()
    if reachable:
        return {}
    if cached:
        return dict(local_files_only=True)
    raise ModelLoadError(f"base model {name!r} is not a local directory, not in the local Hugging Face cache, "
                         f"and the hub ({where}) is unreachable{hint}")


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)


# ---------------------------------------------------------------------------------------------------- adapters

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


def attach_adapters(base: PreTrainedModel, names: Sequence[str] = ROLES,
                    lora: LoraSettings | None = None) -> PeftModel:
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
    config = lora.peft_config(base.config.model_type)
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
        raise RuntimeError(f"copying adapter {source!r} into {name!r} failed: missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")
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


def save_adapters(model: PeftModel, out_dir: str | Path, names: Sequence[str] | None = None,
                  base_name: str | None = None) -> list[str]:
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


def load_adapters(base: PreTrainedModel, adapters_dir: str | Path, names: Sequence[str] | None = None,
                  frozen: Sequence[str] = (REFERENCE,)) -> PeftModel:
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
        model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0],
                                          is_trainable=names[0] not in frozen)
        for n in names[1:]:
            model.load_adapter(str(root / n), adapter_name=n, is_trainable=n not in frozen)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"adapters in {str(adapters_dir)!r} could not be loaded: {exc}") from exc
    model.set_adapter(names[0])
    for n in names:  # set_adapter made the active one trainable: reapply the frozen list
        model.set_requires_grad(n, requires_grad=n not in frozen)
    return model
