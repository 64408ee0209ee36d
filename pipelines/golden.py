"""Regenerate the golden snapshots the tests compare against: `python -m blueprint.pipelines.golden` (the compiled
pipeline, and the TrainJob a multi-node stage creates).

Like the KFP SDK's own compiler tests, a change to the DAG, a component or a default shows up as a YAML diff
that a reviewer reads; regenerate the snapshots on purpose, never to make a test pass blindly.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

from blueprint.pipelines import cluster, compile_pipeline
from blueprint.stages import registry

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
GOLDEN_IMAGE = "ghcr.io/blueprint-rt/blueprint:golden"
CASES = {"pipeline_epochs1.yaml": {"epochs": 1}, "pipeline_epochs3.yaml": {"epochs": 3}}
TRAINJOB_CASE = "trainjob_ppo_round.yaml"
GOLDEN_POD_UID = "00000000-0000-4000-8000-000000000000"  # the task's pod, as the downward API would give it
TRAINJOB_CLUSTER = {
    "gpu": True,
    "gpu_count": 4,
    "nodes": {registry.PPO_ROUND: 2},
    "s3_secret": "mlpipeline-minio-artifact",
    "s3_access_key_field": "accesskey",
    "s3_secret_key_field": "secretkey",
    "s3_endpoint": "http://minio-service.kubeflow:9000",
    "node_selector": {"pool": "gpu"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def _sorted_header_defaults(text: str) -> str:
    """The compiler's header comment lists dict defaults in a run-dependent key order (they pass through a protobuf
    Struct); sorting them keeps regenerated snapshots free of diffs that mean nothing."""

    def fix(m: re.Match) -> str:
        value = ast.literal_eval(m.group(2))
        return m.group(1) + repr(dict(sorted(value.items()))) + "]"

    return re.sub(r"^(#\s+\w+: dict \[Default: )(\{.*\})\]$", fix, text, flags=re.M)


def compile_case(name: str, out_dir: Path) -> Path:
    path = out_dir / name
    compile_pipeline(
        str(path), image=GOLDEN_IMAGE, profile="default", artifact_root="s3://blueprint/artifacts", **CASES[name]
    )
    path.write_text(_sorted_header_defaults(path.read_text()))
    return path


def trainjob_case() -> dict:
    """The TrainJob of a ppo-round on 2 nodes x 4 GPUs, from the cluster settings through the environment the
    compile gives its task (what the task's pod reads) to the body the SDK sends."""
    from blueprint.runtime import launch, trainjob

    settings = cluster.from_mapping(TRAINJOB_CLUSTER)
    environ = {
        trainjob.ENV_IMAGE: GOLDEN_IMAGE,
        trainjob.ENV_NAMESPACE: "kubeflow",
        trainjob.ENV_NODE: cluster.node_settings(settings, registry.PPO_ROUND).model_dump_json(),
        trainjob.ENV_SERVICE_ACCOUNT: "pipeline-runner",
        "AWS_ENDPOINT_URL": settings.s3_endpoint,
        trainjob.ENV_POD_NAME: "blueprint-ppo-round-task",
        trainjob.ENV_POD_UID: GOLDEN_POD_UID,
    }
    root = "s3://blueprint/artifacts"
    inputs = {name: f"{root}/{name}/0123abcd" for name in ("shards", "base", "adapters")}
    round_settings = {**cluster.stage_defaults(settings)[registry.PPO_ROUND], "round_index": 1}
    request = launch.request(registry.PPO_ROUND, round_settings, inputs, root, False)
    plan = trainjob.plan_from_env(
        registry.PPO_ROUND, request, nodes=2, nproc_per_node=4, environ=environ, name="blueprint-ppo-round-golden"
    )
    return trainjob.trainjob_spec(plan)


def write_trainjob_case(out_dir: Path) -> Path:
    path = out_dir / TRAINJOB_CASE
    path.write_text(yaml.safe_dump(trainjob_case(), sort_keys=True, width=120))
    return path


def main() -> int:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        print(f"wrote {compile_case(name, GOLDEN_DIR)}")
    print(f"wrote {write_trainjob_case(GOLDEN_DIR)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
