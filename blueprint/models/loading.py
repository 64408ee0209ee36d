"""Opening a base model: a hub id, a local directory or an `s3://` directory, checked before a stage
spends time on it, with a tokenizer that can pad."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from blueprint.errors import UserError

MANIFEST_NAME = "_MANIFEST.json"
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")
HUB_PROBE_TIMEOUT_S = 3.0


class ModelLoadError(UserError, ValueError):
    """A base model or adapter could not be loaded; the message names the input and says why."""


def ensure_pad_token(tokenizer: Any, model: PreTrainedModel | None = None) -> Any:
    """Give a tokenizer without a pad token the EOS token as pad (GPT-2/Llama hub tokenizers ship without one).

    Padding is always masked out (attention mask, loss mask), so reusing EOS is safe and keeps the vocabulary, and
    therefore the embedding matrix, unchanged. The model's config follows so generation pads the same way.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an "
                "EOS token; cannot pad batches"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def _offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


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
        raise ModelLoadError(
            f"base model {name!r}: directory {path} has no weights (looked for {', '.join(WEIGHT_PATTERNS)})"
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("BLUEPRINT_CACHE", Path.home() / ".cache" / "blueprint")) / "models"


def fetch_s3_dir(uri: str, cache_dir: str | Path | None = None) -> Path:
    """Download a committed `s3://` model directory once; later calls reuse the local copy.

    The cache key is the sha256 of the directory's `_MANIFEST.json`, so a new commit behind the same URI is a new
    download, and a prefix without a manifest (partial output) is refused. Files are checked against the manifest's
    sha256 and the directory appears atomically (rename), so a crashed download is never reused.
    """
    from blueprint.store import storage  # lazy: only the s3 branch needs it
    from blueprint.store.artifacts import sha256_file

    root = storage.join(uri, "")
    try:
        raw = storage.read_bytes(storage.join(root, MANIFEST_NAME))
    except storage.StorageError as exc:
        raise ModelLoadError(
            f"base model {uri!r}: cannot read its {MANIFEST_NAME} (missing = uncommitted or partial output): {exc}"
        ) from exc
    digest = hashlib.sha256(raw).hexdigest()
    target = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = target / digest[:32]
    if final.is_dir():
        return final
    try:
        files = json.loads(raw).get("files") or {}
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(f"base model {uri!r}: its {MANIFEST_NAME} is not a JSON object: {exc}") from None
    target.mkdir(parents=True, exist_ok=True)
    # One download per machine: the ranks of a node (and pods sharing the cache) wait on one lock file, the first
    # downloads, the others find its copy; 8 ranks never fetch 8 copies of a 15 GB base.
    with open(target / f".lock-{digest[:32]}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        print(f"base model {uri}: downloading {len(files)} files to {final}", flush=True)
        tmp = target / f".partial-{digest[:32]}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            storage.download_dir(root, tmp, files=sorted(files) or None)
            (tmp / MANIFEST_NAME).unlink(missing_ok=True)
            for rel, meta in files.items():
                if "sha256" in meta and sha256_file(tmp / rel) != meta["sha256"]:
                    raise ModelLoadError(f"base model {uri!r}: {rel} does not match its sha256 in {MANIFEST_NAME}")
            os.replace(tmp, final)
        except storage.StorageError as exc:
            raise ModelLoadError(f"base model {uri!r}: download failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", "file://")) or os.path.exists(name)


def load_base(
    name: str,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | Path | None = None,
    attn_implementation: str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """(causal LM in eval mode, tokenizer) from a hub id, a local directory, or a committed `s3://` directory.

    Fails fast and names `name` on: a missing directory, a directory without config or weights, an unknown or
    unreachable hub id. Offline (HF_HUB_OFFLINE=1) hub ids are served from the local HF cache only. A tokenizer
    without a pad token gets pad = EOS (see `ensure_pad_token`). `cache_dir` is where s3 directories are cached.
    `device`: the weights are loaded straight onto it (a device map of one device), never first to host memory,
    where 8 ranks converting a checkpoint would hold 8 copies at once.
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
    from safetensors import SafetensorError

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **source)
        config = AutoConfig.from_pretrained(path, **source)
        if source.get("local_files_only"):
            check_sizes(name, Path(path), config)
        published = str(config.dtype or "float32").removeprefix("torch.")  # loading in `dtype` overwrites it
        attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
        placement = {"device_map": {"": torch.device(device)}} if device is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, **attention, **placement, **source
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"base model {name!r} could not be loaded: {exc}") from exc
    except SafetensorError as exc:  # a copy cut short, or not a safetensors file at all
        broken = _broken_safetensors(Path(path)) if source.get("local_files_only") else "a weights file"
        raise ModelLoadError(f"base model {name!r}: {broken} is truncated or corrupt ({exc})") from None
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc):
            raise
        raise ModelLoadError(
            f"base model {name!r}: its weights do not fit its config.json (tensor shapes differ "
            "from the sizes it gives: a config from another model?)"
        ) from None
    model.published_dtype = published  # what merge saves in by default
    ensure_pad_token(tokenizer, model)
    check_vocabulary(name, model, tokenizer)
    return model.eval(), tokenizer


def check_sizes(name: str, path: Path, config: Any) -> None:
    """Refuse a config.json whose sizes its weights cannot hold, before a model of those sizes is built: the input
    embedding alone has vocab_size x hidden_size parameters, which take at least half a byte each (4-bit), so a
    `vocab_size` of 2e9 beside a few megabytes of weights is refused here, not by the allocator."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab, hidden = getattr(text, "vocab_size", None), getattr(text, "hidden_size", None)
    stored = sum(f.stat().st_size for pattern in WEIGHT_PATTERNS[:2] for f in path.glob(pattern))
    if not isinstance(vocab, int) or not isinstance(hidden, int) or not stored:
        return
    if vocab <= 0 or hidden <= 0 or vocab * hidden > 2 * stored:
        raise ModelLoadError(
            f"base model {name!r}: its weights do not fit its config.json (vocab_size {vocab} x "
            f"hidden_size {hidden} = {vocab * hidden:.3g} embedding parameters, but the weights "
            f"hold {stored} bytes)"
        )


def _broken_safetensors(path: Path) -> str:
    """The name of the first safetensors file in `path` whose header cannot be read (else "a weights file")."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            return file.name
    return "a weights file"


def check_vocabulary(name: str, model: PreTrainedModel, tokenizer: Any) -> None:
    """A tokenizer with ids beyond the embedding matrix would index out of range mid-run (a device-side assert on
    a GPU): refuse the pair now, naming the base. Fewer tokens than rows is fine (padded vocabularies)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"base model {name!r}: its tokenizer has {len(tokenizer)} tokens but the model's "
            f"embedding has {rows} rows: they are not one model's pair"
        )


def check_base(name: str) -> None:
    """Refuse, before any stage runs, a base `load_base` would refuse: a missing or incomplete directory, an s3://
    prefix that is not a committed model, a malformed hub id, or a hub id that cannot be had offline."""
    name = str(name)
    if name.startswith("s3://"):
        from blueprint.store import storage

        if not storage.exists(storage.join(name, MANIFEST_NAME)):
            raise ModelLoadError(f"base model {name!r} is not a committed model directory (no {MANIFEST_NAME})")
    elif _is_local(name):
        _check_local_dir(Path(urlparse(name).path if name.startswith("file://") else name).expanduser(), name)
    else:
        _hub_source(name)


def _hub_source(name: str) -> dict[str, Any]:
    """from_pretrained kwargs for hub id `name`: the local HF cache when offline or when the hub is unreachable."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hint = (
        " (the embedded `tiny` base is built by the bootstrap stage: pass its output directory)"
        if name == "tiny"
        else ""
    )
    try:
        validate_repo_id(name)
    except HFValidationError as exc:
        raise ModelLoadError(
            f"base model {name!r} is neither an existing directory nor a valid hub id: {exc}"
        ) from None
    cached = _in_hf_cache(name)
    if _offline():
        if not cached:
            raise ModelLoadError(
                f"base model {name!r} is not a local directory and not in the local Hugging Face "
                f"cache, and HF_HUB_OFFLINE is set{hint}"
            )
        return dict(local_files_only=True)
    reachable, where = _hub_reachable()
    if reachable:
        return {}
    if cached:
        return dict(local_files_only=True)
    raise ModelLoadError(
        f"base model {name!r} is not a local directory, not in the local Hugging Face cache, "
        f"and the hub ({where}) is unreachable{hint}"
    )


def _in_hf_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, "config.json"), str)
