"""Data parallelism across the processes torchrun starts: which process this is, the few collectives the stages
use, and the settings that ask for it.

One process (no process group) is world size 1, and every helper then returns its input untouched, so the
single-process path computes exactly what it computed before data parallelism existed. Collectives run on gloo on
CPU and NCCL on GPUs, with a timeout, so a rank that dies or hangs takes the job down instead of stalling it.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any, ClassVar, Literal

from pydantic import field_validator

from blueprint.config import ConfigError, Settings, setting

WORKER_ENV = "BLUEPRINT_WORKER"  # set in every process a launcher starts: a worker never launches again


class ParallelSettings(Settings):
    """How many processes (and machines) a data-parallel stage runs on."""

    nproc: str = setting(
        "auto",
        "processes on this machine, each with its share of the batch: auto (one per "
        "visible GPU, 1 on CPU) or a number (on CPU: gloo, for tests); >1 launches the "
        "stage under torchrun --standalone",
    )
    nodes: int = setting(
        1,
        ">1: the stage runs as a Kubeflow Trainer TrainJob of this many nodes, each with nproc "
        "processes (needs the Trainer operator; see README, Multi-node stages)",
        ge=1,
    )
    collective_timeout: int = setting(
        600, "seconds a collective waits for the other ranks before the job fails (a dead or stuck rank)", ge=10
    )
    batch_scope: Literal["rank", "global"] = setting(
        "rank",
        "what the stage's batch sizes count: \"rank\" (each process's own: the step's totals grow with "
        'nproc x nodes, so any process count works and each rank keeps full batches) or "global" (the '
        "step's totals, split evenly over the processes, refused where they do not split: a run that must "
        "equal the one-process run)",
    )

    # the settings that count rows of a step (a stage's own): per rank or totals, as batch_scope says
    scaled_batches: ClassVar[tuple[str, ...]] = ()

    def split_over_ranks(self) -> dict[str, int]:
        """{setting: count} of the batches each rank takes an equal share of (a stage's own)."""
        return {}

    def totals(self, world: int) -> Any:
        """This config with the step's totals in `scaled_batches` (per-rank sizes x `world` under batch_scope=rank):
        what the stage computes with, written for totals."""
        if self.batch_scope == "global" or world == 1:
            return self
        return self.model_copy(update={k: getattr(self, k) * world for k in self.scaled_batches})

    def check_world(self, world: int) -> None:
        """Refuse, before any work, a batch that does not split evenly over `world` processes, naming it."""
        for name, count in self.totals(world).split_over_ranks().items():
            if count % world:
                raise ConfigError(
                    f"{name}={count} does not split evenly over {world} processes (nproc x nodes)"
                    + (" (batch_scope=global; batch_scope=rank scales it)" if self.batch_scope == "global" else "")
                )

    def to_dict(self) -> dict[str, Any]:
        """As Settings.to_dict, less collective_timeout: how long a collective may wait decides nothing in the
        output, so it stays out of the cache key."""
        return {k: v for k, v in super().to_dict().items() if k != "collective_timeout"}

    @field_validator("nproc", mode="before")
    @classmethod
    def _nproc(cls, value: Any) -> str:
        text = str(value).strip()
        if text != "auto" and not (re.fullmatch(r"\d+", text) and int(text) >= 1):
            raise ValueError(f"{value!r}: auto or a whole number >= 1")
        return text


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_nproc(nproc: str, device: str = "auto") -> int:
    """Processes to start for `nproc` on this machine: auto = the visible GPUs (1 without). A number above the
    visible GPUs is refused on a GPU stage; on CPU (device=cpu, or no GPU) it may go up to the cores."""
    gpus = 0 if device == "cpu" else visible_gpus()
    if nproc == "auto":
        return max(gpus, 1)
    n = int(nproc)
    if n > 1 and re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(
            f"nproc={n} with device={device}: every process would use that one GPU; set device=cuda "
            "(each process takes its own) or nproc=1"
        )
    if n > gpus and (gpus or device.startswith("cuda")):
        raise ConfigError(
            f"nproc={n}: only {gpus} GPU(s) visible on this machine; set nproc=auto or at most {gpus}"
            + ("" if device.startswith("cuda") else ", or device=cpu to run CPU processes")
        )
    if not gpus and n > (os.cpu_count() or 1):
        raise ConfigError(f"nproc={n}: this machine has {os.cpu_count()} CPU core(s) and no GPU")
    return n


def threads_per_process(cores: int, n: int) -> int:
    """OMP threads of each of `n` processes sharing `cores` (torch would otherwise give each all of them)."""
    return max(1, cores // n)


def _group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    """Rank 0: the one process that writes to the artifact store and prints progress."""
    return rank() == 0


def init_from_env(timeout_s: int, device: str = "auto") -> None:
    """Join the process group torchrun described in the environment (no-op for a single process). On GPUs the
    group has both backends: NCCL for CUDA tensors, gloo for the CPU ones (scores, counts, pickled objects)."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available() and device != "cpu"
    gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    if cuda:
        torch.cuda.set_device(gpu)
    # device_id binds NCCL to the rank's GPU at once (no guessing it at the first collective, no stray context)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        **({"device_id": gpu} if cuda else {}),
    )


def shutdown() -> None:
    dist = _group()
    if dist:
        dist.destroy_process_group()


def barrier() -> None:
    dist = _group()
    if dist:
        dist.barrier()


def all_sum(tensor: Any) -> Any:
    """`tensor` summed over the ranks (a new tensor; the input itself for one process)."""
    dist = _group()
    if not dist:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def all_cat(tensor: Any) -> Any:
    """Every rank's `tensor` (the same shape on each), concatenated along dim 0 in rank order."""
    import torch

    dist = _group()
    if not dist:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    dist = _group()
    if not dist:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a decision only rank 0 may take, e.g. after reading the store)."""
    dist = _group()
    if not dist:
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def my_share(n: int) -> range:
    """This rank's contiguous slice of `n` items (n must divide evenly: every rank gets the same work)."""
    size, me = world_size(), rank()
    if n % size:
        raise ConfigError(f"{n} items do not split evenly over {size} processes")
    step = n // size
    return range(me * step, (me + 1) * step)


def mine(batches: list[Any]) -> list[tuple[int, Any]]:
    """(index, batch) of the batches this rank runs: batch j on rank j mod world size, so the batches
    themselves (and so their padding and numerics) are those of one process."""
    size, me = world_size(), rank()
    return [(j, b) for j, b in enumerate(batches) if j % size == me]
