"""Running a data-parallel stage on several processes: torchrun inside one pod (or on this machine), or a Kubeflow
Trainer TrainJob across nodes (`trainjob`); both start `worker` on every rank.

The launcher is the process the user (or the KFP component) started: it starts the ranks and waits. Each rank runs
the very same stage function with the same settings; rank 0 alone writes to the artifact store, so when the
launcher runs the stage function itself afterwards it finds the committed output, a cache hit, and reports it as
any stage does. Nothing but the artifact root is shared between the launcher and the ranks.

    torchrun --standalone --nproc_per_node N -m blueprint.runtime.worker '<request JSON>'
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import subprocess
import sys
from typing import Any

from blueprint import distributed
from blueprint.errors import TASK_ERROR_PREFIX, UserError
from blueprint.models.runtime import release_memory
from blueprint.runtime import stopping, trainjob
from blueprint.runtime.worker import worker_module_args
from blueprint.stages import registry
from blueprint.store import artifacts, hits_only


class LaunchError(UserError, RuntimeError):
    """The stage's processes failed (a rank's error, a dead rank, a collective timeout)."""


def processes(cfg: Any) -> int:
    """Processes per node `cfg` asks for on this machine (1 for a stage without parallel settings)."""
    if not isinstance(cfg, distributed.ParallelSettings):
        return 1
    return distributed.resolve_nproc(cfg.nproc, getattr(cfg, "device", "auto"))


def wants_launch(cfg: Any) -> bool:
    """More than one process or node, and this process is not already one of the ranks."""
    if os.environ.get(distributed.WORKER_ENV) or not isinstance(cfg, distributed.ParallelSettings):
        return False
    return cfg.nodes > 1 or processes(cfg) > 1


def request(
    stage: str,
    settings: dict[str, Any],
    inputs: dict[str, str],
    artifact_root: str | None,
    force: bool,
    out_uri: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """What every rank needs to run the stage: plain JSON, so it fits a command line and a TrainJob spec."""
    return {
        "stage": stage,
        "settings": settings,
        "inputs": inputs,
        "artifact_root": artifact_root,
        "force": force,
        "out_uri": out_uri,
        "progress": progress,
    }


def torchrun_command(n: int, req: dict[str, Any]) -> list[str]:
    """torchrun on this machine: `n` ranks on a free local rendezvous port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        "--max_restarts=0",
        *worker_module_args(req),
    ]


def launch(stage: str, cfg: Any, req: dict[str, Any]) -> None:
    """Run the stage on its ranks and wait: a TrainJob when `cfg.nodes > 1`, else torchrun here. Raises
    LaunchError naming the stage, the process count and the ranks' last lines when they fail."""
    if cfg.nodes > 1:  # this pod only watches the job: the nodes' GPUs, not its own, decide nproc
        per_node = trainjob.node_processes(cfg.nproc)
        cfg.check_world(cfg.nodes * per_node)
        trainjob.run_trainjob(stage, req, nodes=cfg.nodes, nproc_per_node=per_node)
        return
    n = processes(cfg)
    cfg.check_world(n)
    if req.get("progress", True):
        print(f"{stage}: starting {n} processes (torchrun --standalone --nproc_per_node {n})", flush=True)
    env = {
        **os.environ,
        distributed.WORKER_ENV: "1",
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(distributed.threads_per_process(os.cpu_count() or 1, n))
        ),
    }
    tail: collections.deque[str] = collections.deque(maxlen=20)
    errors: list[str] = []  # the ranks' own one-line errors, raised as this stage's error below
    # torchrun in a process group of its own: a signal to this process reaches it once, passed on below, and
    # torchrun stops its ranks (each in a group of its own) before it exits; this process waits for that
    with (
        subprocess.Popen(
            torchrun_command(n, req),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            start_new_session=True,
        ) as proc,
        stopping.passing_on(lambda signum: _signal_group(proc.pid, signum)),
    ):
        for line in proc.stdout:  # ranks' progress lines, as they come (a terminal and `kubectl logs` both)
            if line.startswith(TASK_ERROR_PREFIX):
                errors.append(line.strip())
                continue
            tail.append(line.rstrip("\n"))
            print(line, end="", flush=True)
        proc.wait()
    if proc.returncode:
        raise LaunchError(_failure(n, proc.returncode, errors, list(tail)))


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # it has just exited
        pass


def _failure(n: int, code: int, errors: list[str], tail: list[str]) -> str:
    """One line: the first rank error line when there is one (what follows `stage: `), else the last lines."""
    if errors:
        return f"{errors[0][len(TASK_ERROR_PREFIX) :].partition(': ')[2]} (on {n} processes; exit {code})"
    last = " | ".join(line.strip() for line in tail[-5:] if line.strip())
    return f"{n} processes under torchrun failed (exit {code}): {last}"


def run_stage(
    stage: str,
    cfg: Any,
    inputs: dict[str, str],
    *,
    artifact_root: str | None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Any:
    """The stage's committed output, computed on as many processes as `cfg` asks for (`nproc`, `nodes`)."""
    module = registry.get(stage).load()
    if hits_only.active():  # a hit is read here, without launching; no model was loaded, none to free
        return module.run(cfg, **inputs, artifact_root=artifact_root, out_uri=out_uri, force=force, progress=progress)
    if not wants_launch(cfg):
        try:
            return module.run(
                cfg, **inputs, artifact_root=artifact_root, out_uri=out_uri, force=force, progress=progress
            )
        finally:
            release_memory()  # stages of `blueprint run` share this process: free this one's model first
    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    launch(stage, cfg, request(stage, cfg.model_dump(), inputs, artifact_root, force, out_uri, progress))
    with artifacts.committed_only():  # what the ranks committed, never a computation in this process
        out = module.run(cfg, **inputs, artifact_root=artifact_root, out_uri=out_uri, progress=progress)
    return dataclasses.replace(out, cached=out.manifest.get("created", "") < started)
