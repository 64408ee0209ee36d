"""Multi-node stages: the compile gives a `nodes > 1` task what it needs to create a Kubeflow Trainer TrainJob, the
TrainJob the SDK builds is pinned by a golden file, and creating and watching it runs against a loopback
Kubernetes API (tests/pipelines/k8s_fake.py): logs streamed, failure, timeout and missing RBAC each one clear error."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from blueprint.config import ConfigError
from blueprint.pipelines import cli, cluster, golden
from blueprint.runtime import trainjob
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.pipelines import k8s_fake

IMAGE = "registry.example.com/ml/blueprint:1.2.3"
SERVICE_ACCOUNT = "system:serviceaccount:team-a:pipeline-runner"
REQUEST = {
    "stage": "ppo-round",
    "settings": {"device": "cuda", "nodes": 2},
    "inputs": {"shards": "s3://b/shards/1"},
    "artifact_root": "s3://b",
    "force": False,
    "out_uri": None,
}
CLUSTER_YAML = """
gpu: true
gpu_count: 4
nodes: {ppo_round: 2}
s3_secret: mlpipeline-minio-artifact
s3_access_key_field: accesskey
s3_secret_key_field: secretkey
s3_endpoint: http://minio-service.kubeflow:9000
trainjob_timeout: 90m
"""


# ------------------------------------------------------------------------------------------- the compile side


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainjob")
    (tmp / "cluster.yaml").write_text(CLUSTER_YAML)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        assert (
            cli.main(
                [
                    "compile",
                    "--out",
                    str(tmp / "p.yaml"),
                    "--epochs",
                    "1",
                    "--image",
                    IMAGE,
                    "--cluster-config",
                    str(tmp / "cluster.yaml"),
                ]
            )
            == 0
        )
    text = (tmp / "p.yaml").read_text()
    spec, platform = yaml.safe_load_all(text)
    return {
        "text": text,
        "executors": spec["deploymentSpec"]["executors"],
        "k8s": platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"],
        "params": spec["root"]["inputDefinitions"]["parameters"],
    }


def test_a_multi_node_task_waits_without_a_gpu_and_carries_the_nodes_settings(compiled):
    ppo = compiled["executors"]["exec-ppo-round"]["container"]
    assert "accelerator" not in ppo["resources"]
    assert ppo["resources"]["resourceMemoryLimit"] == cluster.LAUNCHER_RESOURCES.memory_limit
    env = {e["name"]: e["value"] for e in ppo["env"]}
    assert env[trainjob.ENV_IMAGE] == IMAGE
    node = trainjob.NodeSettings(**json.loads(env[trainjob.ENV_NODE]))
    assert node.resources == {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "4"} and node.timeout_s == 5400
    assert node.secret_env["AWS_SECRET_ACCESS_KEY"] == trainjob.SecretRef(
        secret="mlpipeline-minio-artifact", key="secretkey"
    )
    fields = {f["name"]: f["fieldPath"] for f in compiled["k8s"]["exec-ppo-round"]["fieldPathAsEnv"]}
    assert fields == {
        trainjob.ENV_NAMESPACE: "metadata.namespace",
        trainjob.ENV_SERVICE_ACCOUNT: "spec.serviceAccountName",
        trainjob.ENV_POD_NAME: "metadata.name",
        trainjob.ENV_POD_UID: "metadata.uid",
    }
    assert compiled["params"]["ppo_settings"]["defaultValue"]["nodes"] == 2


def test_gpu_count_above_one_gives_single_pod_stages_nproc_and_a_memory_backed_dev_shm(compiled):
    warmup = compiled["executors"]["exec-warmup"]["container"]
    assert warmup["resources"]["accelerator"]["resourceCount"] == "4"
    assert trainjob.ENV_NODE not in {e["name"] for e in warmup.get("env", [])}
    assert compiled["k8s"]["exec-warmup"]["emptyDirMounts"] == [
        {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory"}
    ]
    assert "emptyDirMounts" not in compiled["k8s"]["exec-ppo-round"]  # its nodes get theirs in the TrainJob
    assert compiled["params"]["warmup_settings"]["defaultValue"]["nproc"] == "4"
    assert "nproc" not in compiled["params"]["merge_settings"]["defaultValue"]  # merge runs one process


def test_no_credential_value_reaches_the_yaml_of_a_multi_node_stage(compiled):
    assert TEST_ACCESS_KEY not in compiled["text"] and TEST_SECRET_KEY not in compiled["text"]


def test_one_gpu_per_pod_adds_neither_nproc_nor_dev_shm():
    settings = cluster.from_mapping({"gpu": True})
    assert all("nproc" not in values for values in cluster.stage_defaults(settings).values())
    assert all("nodes" not in values for values in cluster.stage_defaults(settings).values())


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nodes": {"ppo-round": 0}}, "nodes.ppo-round"),
        ({"nodes": {"ppo_rnd": 2}}, "unknown stage 'ppo_rnd'"),
        ({"trainjob_timeout": "a while"}, "trainjob_timeout"),
    ],
)
def test_bad_nodes_settings_are_named(values, message):
    with pytest.raises(ConfigError, match=message):
        cluster.from_mapping(values)


def test_nodes_for_a_stage_that_runs_in_one_pod_is_refused_naming_it():
    with pytest.raises(ConfigError, match="nodes.promote: promote runs in one pod only"):
        cluster.stage_defaults(cluster.from_mapping({"nodes": {"promote": 2}}))


def test_auto_processes_per_node_are_the_nodes_gpus_not_this_pods():
    node = cluster.node_settings(cluster.from_mapping({"gpu": True, "gpu_count": 8}), "ppo-round")
    assert trainjob.node_processes("auto", {trainjob.ENV_NODE: node.model_dump_json()}) == 8
    assert trainjob.node_processes("auto", {}) == 1 and trainjob.node_processes("3", {}) == 3


# ------------------------------------------------------------------------------------------- the TrainJob itself


def test_trainjob_matches_golden_snapshot():
    expected = yaml.safe_load((golden.GOLDEN_DIR / golden.TRAINJOB_CASE).read_text())
    assert golden.trainjob_case() == expected, (
        "the TrainJob differs from tests/golden/trainjob_ppo_round.yaml: "
        "review the diff, then regenerate with `python -m blueprint.pipelines.golden`"
    )


def test_trainjob_runs_the_stage_under_torchrun_on_the_torch_distributed_runtime():
    job = golden.trainjob_case()
    command = job["spec"]["trainer"]["command"]
    assert command[:4] == ["torchrun", "--nproc-per-node=4", "-m", "blueprint.runtime.worker"]
    assert json.loads(command[4])["stage"] == "ppo-round"
    assert job["spec"]["runtimeRef"] == {"kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert not any(e["name"].startswith("PET_") for e in job["spec"]["trainer"]["env"])  # the runtime's own


def test_node_pods_get_no_service_account_token_of_the_task():
    """The Trainer's runtime patch has no automountServiceAccountToken; Kubernetes' service-account admission mounts
    no token into a container that already has a mount at the token's path, so the nodes get an empty one there."""
    pod = golden.trainjob_case()["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
        "replicatedJobs"
    ][0]["template"]["spec"]["template"]["spec"]
    (node,) = pod["containers"]
    (mount,) = [m for m in node["volumeMounts"] if m["mountPath"] == trainjob.TOKEN_PATH]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True and set(volume) == {"name", "emptyDir"}


def _environ(server: k8s_fake.FakeKube, tmp_path, **extra: str) -> dict[str, str]:
    node = cluster.node_settings(cluster.from_mapping({"s3_secret": "s3-creds"}), "ppo-round")
    return {
        trainjob.ENV_IMAGE: IMAGE,
        trainjob.ENV_NODE: node.model_dump_json(),
        trainjob.ENV_NAMESPACE: server.namespace,
        "KUBECONFIG": str(server.kubeconfig(tmp_path)),
        "AWS_ENDPOINT_URL": "http://minio:9000",
        **extra,
    }


@pytest.fixture()
def kube():
    server = k8s_fake.FakeKube()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _run(server, tmp_path, log=None, **kwargs):
    lines = [] if log is None else log
    name = trainjob.run_trainjob(
        "ppo-round",
        REQUEST,
        nodes=2,
        nproc_per_node=1,
        log=lines.append,
        poll_s=0.05,
        environ=_environ(server, tmp_path),
        **kwargs,
    )
    return name, lines


def test_a_completed_job_streams_node_0s_log_and_sends_the_golden_path_body(kube, tmp_path):
    kube.log_lines = ["rank 0: step 1", "rank 0: step 2", "committed"]
    name, lines = _run(kube, tmp_path)
    assert lines[0] == f"ppo-round: TrainJob team-a/{name}: 2 node(s) x 1 process(es)"
    assert [line for line in lines if "node-0]" in line] == [f"[{name} node-0] {x}" for x in kube.log_lines]
    plan = trainjob.plan_from_env(
        "ppo-round", REQUEST, nodes=2, nproc_per_node=1, name=name, environ=_environ(kube, tmp_path)
    )
    sent = {k: v for k, v in kube.jobs[name].items()}
    sent["metadata"] = {k: v for k, v in sent["metadata"].items() if k not in ("namespace", "creationTimestamp")}
    assert sent == trainjob.trainjob_spec(plan) and kube.deleted == []


def test_the_trainjob_is_owned_by_the_tasks_pod_so_it_goes_when_the_pod_goes(kube, tmp_path):
    environ = _environ(
        kube,
        tmp_path,
        **{
            trainjob.ENV_POD_NAME: "retrain-ppo-round-1234",
            trainjob.ENV_POD_UID: "6f0e8a1c-0000-4000-8000-000000000001",
        },
    )
    name = trainjob.run_trainjob(
        "ppo-round", REQUEST, nodes=2, nproc_per_node=1, log=lambda line: None, poll_s=0.05, environ=environ
    )
    assert kube.jobs[name]["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "retrain-ppo-round-1234",
            "uid": "6f0e8a1c-0000-4000-8000-000000000001",
        }
    ]
    name = trainjob.run_trainjob(
        "ppo-round",
        REQUEST,
        nodes=2,
        nproc_per_node=1,
        log=lambda line: None,
        poll_s=0.05,
        environ=_environ(kube, tmp_path),
    )  # outside a pod: nothing to be owned by
    assert "ownerReferences" not in kube.jobs[name]["metadata"]
    # the pod's namespace unknown, the job's the client's default: an owner in another namespace counts as gone to
    # the garbage collector, which would delete the job at once
    unknown = {k: v for k, v in environ.items() if k != trainjob.ENV_NAMESPACE}
    name = trainjob.run_trainjob(
        "ppo-round", REQUEST, nodes=2, nproc_per_node=1, log=lambda line: None, poll_s=0.05, environ=unknown
    )
    assert "ownerReferences" not in kube.jobs[name]["metadata"]


def test_sigterm_to_the_waiting_task_deletes_its_trainjob(kube, tmp_path):
    import os
    import signal

    from blueprint.runtime.stopping import Stopped

    kube.outcome = None  # it would run until its deadline
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))  # not pytest's death

    def terminate_once_created():
        while not kube.jobs:
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # as the kubelet does when the KFP run is terminated

    threading.Thread(target=terminate_once_created, daemon=True).start()
    try:
        with pytest.raises(Stopped):
            _run(kube, tmp_path, timeout_s=20)
    finally:
        signal.signal(signal.SIGTERM, previous)
    (name,) = kube.jobs
    assert kube.deleted == [name] and received == [signal.SIGTERM]  # and the signal went on to the handler before


def test_a_failed_job_fails_the_task_naming_the_job_and_its_last_log_lines(kube, tmp_path):
    kube.outcome = "Failed"
    kube.log_lines = [f"step {i}" for i in range(30)] + ["RuntimeError: NCCL timeout on rank 5"]
    with pytest.raises(trainjob.TrainJobError) as info:
        _run(kube, tmp_path)
    message = str(info.value)
    (name,) = kube.jobs
    assert message.startswith(f"TrainJob team-a/{name} failed; last 20 log line(s)")
    assert "  | RuntimeError: NCCL timeout on rank 5" in message and "  | step 11" in message
    assert "step 10\n" not in message + "\n"  # only the last 20 lines


def test_a_job_that_never_finishes_times_out_and_is_deleted(kube, tmp_path):
    kube.outcome = None
    kube.log_lines = ["rank 0: waiting for rank 1"]
    with pytest.raises(trainjob.TrainJobError, match=r"did not finish within 0.5s \(deleted\)") as info:
        _run(kube, tmp_path, timeout_s=0.5)
    (name,) = kube.jobs
    assert kube.deleted == [name] and "rank 0: waiting for rank 1" in str(info.value)
    assert kube.jobs[name]["spec"]["activeDeadlineSeconds"] == 1  # the cluster ends it even without the task


@pytest.mark.parametrize(
    "method, path, body, account, verb",
    [
        (
            "POST",
            "/trainjobs",
            k8s_fake.forbidden(SERVICE_ACCOUNT, "create", "trainjobs", "team-a"),
            "team-a/pipeline-runner",
            "create trainjobs.trainer.kubeflow.org",
        ),
        (
            "GET",
            "/trainingruntimes/torch-distributed",
            k8s_fake.forbidden(SERVICE_ACCOUNT, "get", "trainingruntimes", "team-a"),
            "team-a/pipeline-runner",
            "get trainingruntimes.trainer.kubeflow.org",
        ),
        ("POST", "/trainjobs", k8s_fake.status(403, "forbidden"), "runner-sa", "create trainjobs.trainer.kubeflow.org"),
    ],
)
def test_missing_rbac_is_one_line_naming_the_service_account_and_the_verb(
    kube, tmp_path, method, path, body, account, verb
):
    kube.fail[f"{method} {k8s_fake.TRAINER}/namespaces/team-a{path}"] = (403, body)
    with pytest.raises(trainjob.TrainJobError) as info:
        trainjob.run_trainjob(
            "ppo-round",
            REQUEST,
            nodes=2,
            nproc_per_node=1,
            log=lambda line: None,
            environ=_environ(kube, tmp_path, **{trainjob.ENV_SERVICE_ACCOUNT: "runner-sa"}),
        )
    message = str(info.value)
    assert "\n" not in message and f"service account {account} may not {verb} in namespace team-a" in message
    assert "README.md" in message and kube.jobs == {}


def test_a_missing_runtime_says_what_to_install(kube, tmp_path):
    kube.fail[f"GET {k8s_fake.TRAINER}/clustertrainingruntimes/torch-distributed"] = (
        404,
        k8s_fake.status(404, "not found"),
    )
    with pytest.raises(trainjob.TrainJobError, match="torch-distributed runtime installed"):
        _run(kube, tmp_path)


def test_a_pod_compiled_without_nodes_is_told_to_compile_with_them():
    with pytest.raises(trainjob.TrainJobError, match=r"compiled with `nodes: \{ppo-round: 2\}`"):
        trainjob.run_trainjob("ppo-round", REQUEST, nodes=2, nproc_per_node=1, environ={})


def test_importing_the_module_leaves_the_sdk_unimported():
    import subprocess
    import sys

    code = "import sys, blueprint.runtime.trainjob, blueprint.pipelines.cluster; print('kubeflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
