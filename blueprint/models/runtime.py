"""One device and precision policy for every model stage, decided in one place: where a base is opened.

Each model stage's config inherits `RuntimeSettings`, so `device`, `dtype`, `attn_implementation` and
`gradient_checkpointing` have the same names on the CLI (`--set ppo-round.dtype=bfloat16`), in config files, in
`BluePrint(settings=...)` and in the pipeline's settings parameters. `place` resolves them on the machine that
runs the stage: `device=cuda` where there is no CUDA fails there at once, naming the setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import field_validator

from blueprint.config import ConfigError, Settings, setting
from blueprint.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")


class RuntimeSettings(Settings):
    """Where and in what precision a model stage runs (fields shared by every model stage's config)."""

    device: str = setting("auto", "auto (CUDA when visible, else CPU) | cpu | cuda | cuda:N")
    dtype: str = setting(
        "auto",
        "weights' dtype: auto (bf16 on a GPU that has it, else fp16 on a GPU, fp32 on "
        "CPU) | float32 | bfloat16 | float16. LoRA weights and optimizer state stay fp32",
    )
    attn_implementation: str = setting(
        "auto",
        "auto (flash_attention_2 on CUDA in bf16/fp16 when installed, else what "
        "transformers picks: sdpa where the architecture has it) | sdpa | "
        "eager | flash_attention_2",
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory for long code, about a third more time"
    )
    threads: int = setting(0, "torch threads; 0 = all cores", ge=0)

    @field_validator("device")
    @classmethod
    def _runtime_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"{device!r}: choose auto, cpu, cuda or cuda:N")
        return device

    @field_validator("dtype", "attn_implementation")
    @classmethod
    def _runtime_choice(cls, value: str, info) -> str:
        choices = {"dtype": DTYPES, "attn_implementation": ATTENTION}[info.field_name]
        if value not in choices:
            raise ValueError(f"{value!r}: choose one of {', '.join(choices)}")
        return value


@dataclasses.dataclass(frozen=True)
class Placement:
    """The resolved policy: a torch device and dtype, and the attention implementation transformers gets."""

    device: Any
    dtype: Any
    attn_implementation: str | None  # None: transformers' own choice for the architecture
    gradient_checkpointing: bool


def resolve_device(device: str) -> Any:
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))  # a data-parallel rank's own GPU (torchrun sets it)
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device!r}: this machine has no CUDA device (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); set device=cpu or device=auto"
            )
        index = int(device.partition(":")[2] or local_rank)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    import torch

    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def resolve_attention(attn: str, device: Any, dtype: Any, flash_installed: bool | None = None) -> str | None:
    """The attention transformers gets: flash-attention 2 only on CUDA, installed, with 16-bit weights (it rejects
    fp32, the merge stage's default); `flash_installed` None = look for the flash-attn package."""
    import torch

    if flash_installed is None:
        flash_installed = importlib.util.find_spec("flash_attn") is not None
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    if attn == "auto":
        return "flash_attention_2" if device.type == "cuda" and flash_installed and sixteen_bit else None
    if attn == "flash_attention_2" and (not flash_installed or device.type != "cuda" or not sixteen_bit):
        raise ConfigError(
            f"attn_implementation='flash_attention_2': needs CUDA, the flash-attn package and "
            f"dtype bfloat16 or float16 (here {str(dtype).removeprefix('torch.')} on {device.type}); "
            "use sdpa"
        )
    return attn


def place(settings: RuntimeSettings) -> Placement:
    """Resolve `settings` on this machine (once per stage, before the base is loaded); a CUDA device becomes the
    current one, which the HF Trainer and peft then use as "cuda"."""
    device = resolve_device(settings.device)
    if device.type == "cuda":
        import torch

        torch.cuda.set_device(device)
    dtype = resolve_dtype(settings.dtype, device)
    return Placement(
        device, dtype, resolve_attention(settings.attn_implementation, device, dtype), settings.gradient_checkpointing
    )


def put(model: Any, where: Placement) -> Any:
    """`model` on `where.device`, with gradient checkpointing when asked (its dtype and attention are chosen when
    it is built or loaded)."""
    model.to(where.device)
    if where.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def checkpointing_without_dropout(model: Any) -> int:
    """Dropout off (Huang et al.: ratios must be 1 before the first step) with gradient checkpointing still live.

    transformers checkpoints a decoder layer only while that layer is in training mode, so `eval()` alone turns
    checkpointing off. Everything goes to eval, then the checkpointing layers themselves (not their children: the
    attention and LoRA dropouts stay off) are flagged as training. Returns how many layers checkpoint.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.eval()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer.training = True
    return len(layers)


class OutOfMemory(UserError, RuntimeError):
    """A stage ran out of accelerator (or host) memory; the message names the settings that bound its memory."""


@contextlib.contextmanager
def named_out_of_memory(stage: str, budgets: Sequence[str]) -> Iterator[None]:
    """Turn an out-of-memory error into one line saying which settings to lower (torch is not imported for it:
    a cache hit answers without it)."""
    try:
        yield
    except Exception as exc:
        torch = sys.modules.get("torch")
        if torch is None or not isinstance(exc, torch.OutOfMemoryError):
            raise
        hint = ", ".join(f"{stage}.{b}" for b in budgets)
        raise OutOfMemory(
            f"{stage}: out of memory ({str(exc).splitlines()[0][:160]}): lower {hint}, or set "
            f"{stage}.dtype=bfloat16 or {stage}.gradient_checkpointing=true"
        ) from None


def release_memory() -> None:
    """Free what a finished stage left in reference cycles (a model patched by accelerate refers to itself, so only
    a full collection frees it), and the allocator's cached blocks: the next stage in this process (the API, the
    CLI's `run`) starts with the accelerator empty instead of beside a second copy of the base."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
