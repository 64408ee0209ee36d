"""One rank of a stage run on several processes: what torchrun (`launch`) or a TrainJob's nodes (`trainjob`) start
on every rank. It joins the process group and runs the very same stage function with the same settings; rank 0
alone commits to the artifact store and prints progress.

    torchrun --standalone --nproc_per_node N -m blueprint.runtime.worker '<request JSON>'
"""

from __future__ import annotations

import json
import sys
from typing import Any

from blueprint import distributed
from blueprint.config import parse
from blueprint.errors import user_errors_exit
from blueprint.stages import registry

WORKER_MODULE = "blueprint.runtime.worker"


def worker_module_args(req: dict[str, Any]) -> list[str]:
    """The arguments after torchrun's own options: the worker module and its request."""
    return ["-m", WORKER_MODULE, json.dumps(req, sort_keys=True)]


def run_worker(req: dict[str, Any]) -> None:
    """One rank: join the process group, run the stage (rank 0 commits, only rank 0 prints progress)."""
    stage = req["stage"]
    spec = registry.get(stage)
    with user_errors_exit(stage):
        cfg = parse(spec.config_type(), req["settings"])
        distributed.init_from_env(cfg.collective_timeout, getattr(cfg, "device", "auto"))
        cfg.check_world(distributed.world_size())
        try:
            spec.load().run(
                cfg,
                **req["inputs"],
                artifact_root=req["artifact_root"],
                out_uri=req.get("out_uri"),
                force=req["force"],
                progress=req.get("progress", True) and distributed.is_main(),
            )
        finally:
            distributed.shutdown()


if __name__ == "__main__":
    run_worker(json.loads(sys.argv[1]))
