"""Kubeflow delivery: cluster settings in the compiled YAML, `submit` and `schedule` against the KFP REST API,
clear errors before and at the wire, and the warm-start lookup of recurring retraining."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2

from blueprint.config import ConfigError
from blueprint.pipelines import cli, cluster
from blueprint.pipelines import cron as cron_module
from blueprint.runtime import warm_start
from blueprint.stages import profiles
from blueprint.store import artifacts
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.pipelines import kfp_fake

IMAGE = "registry.example.com/ml/blueprint:1.2.3"
GPU_STAGES = {"warmup", "ppo-round", "evaluate", "merge", "gate"}  # the gate may evaluate the champion again
CLUSTER_YAML = """
s3_secret: mlpipeline-minio-artifact
s3_access_key_field: accesskey
s3_secret_key_field: secretkey
s3_endpoint: http://minio-service.kubeflow:9000
gpu: true
node_selector: {pool: training}
tolerations:
  - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
retries: 2
retry_backoff: 45s
caching: {evaluate: false}
resources:
  ppo_round: {memory_request: 12Gi, memory_limit: 24Gi}
"""


def _compile(tmp_path: Path, *flags: str) -> Path:
    out = tmp_path / "pipeline.yaml"
    assert cli.main(["compile", "--out", str(out), "--epochs", "1", "--image", IMAGE, *flags]) == 0
    return out


def _container_tasks(spec: pipeline_spec_pb2.PipelineSpec, dag=None) -> dict:
    """{task name: task spec} of every container task, inside the condition sub-DAGs too (promote)."""
    tasks = {}
    for name, task in (dag or spec.root.dag).tasks.items():
        component = spec.components[task.component_ref.name]
        tasks.update(_container_tasks(spec, component.dag) if component.HasField("dag") else {name: task})
    return tasks


def _executor_of(spec: pipeline_spec_pb2.PipelineSpec, task: str) -> str:
    component = _container_tasks(spec)[task].component_ref.name
    return spec.components[component].executor_label


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """A pipeline compiled with a full cluster config while real-looking AWS keys sit in the environment."""
    tmp_path = tmp_path_factory.mktemp("compiled")
    config = tmp_path / "cluster.yaml"
    config.write_text(CLUSTER_YAML)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        path = _compile(tmp_path, "--cluster-config", str(config))
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    k8s = {
        name: json_format.ParseDict(cfg, k8s_pb.KubernetesExecutorConfig())
        for name, cfg in json_format.MessageToDict(platform.platforms["kubernetes"].deployment_spec)[
            "executors"
        ].items()
    }
    return {"text": path.read_text(), "spec": spec, "executors": executors, "k8s": k8s}


def test_compiled_yaml_carries_images_resources_accelerators_and_retries(compiled):
    spec, executors = compiled["spec"], compiled["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    tasks = _container_tasks(spec)
    assert "promote" in tasks and "promote" not in spec.root.dag.tasks  # behind the gate's dsl.If
    for task, task_spec in tasks.items():
        stage = task.rsplit("-", 1)[0] if task[-1].isdigit() else task
        resources = executors[_executor_of(spec, task)]["container"]["resources"]
        assert (resources.get("accelerator", {}).get("resourceType") == "nvidia.com/gpu") == (stage in GPU_STAGES)
        assert task_spec.retry_policy.max_retry_count == 2 and task_spec.retry_policy.backoff_duration.seconds == 45
        assert resources["cpuRequest"] > 0 and resources["memoryLimit"] >= resources["memoryRequest"] > 0
    ppo = executors[_executor_of(spec, "ppo-round")]["container"]
    assert ppo["resources"]["resourceMemoryRequest"] == "12Gi" and ppo["resources"]["resourceMemoryLimit"] == "24Gi"
    assert ppo["resources"]["accelerator"]["resourceCount"] == "1"
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://minio-service.kubeflow:9000"} in ppo["env"]
    assert not spec.root.dag.tasks["evaluate"].caching_options.enable_cache
    assert spec.root.dag.tasks["warmup"].caching_options.enable_cache
    for task in ("shard-plan", "shard-part", "gate", "promote"):  # never KFP-cached, whatever the config
        assert not _container_tasks(spec)[task].caching_options.enable_cache


def test_platform_spec_maps_the_secret_by_name_and_schedules_on_the_pool(compiled):
    spec, k8s = compiled["spec"], compiled["k8s"]
    assert set(k8s) == {_executor_of(spec, t) for t in _container_tasks(spec)}
    for cfg in k8s.values():
        (secret,) = cfg.secret_as_env
        assert secret.secret_name_parameter.runtime_value.constant.string_value == "mlpipeline-minio-artifact"
        assert {(m.secret_key, m.env_var) for m in secret.key_to_env} == {
            ("accesskey", "AWS_ACCESS_KEY_ID"),
            ("secretkey", "AWS_SECRET_ACCESS_KEY"),
        }
        assert dict(cfg.node_selector.labels) == {"pool": "training"}
        assert [(t.key, t.operator, t.effect) for t in cfg.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]


def test_no_credential_value_reaches_the_yaml(compiled):
    assert TEST_ACCESS_KEY not in compiled["text"] and TEST_SECRET_KEY not in compiled["text"]


def test_s3_artifact_root_without_a_secret_warns_about_irsa(tmp_path, capsys):
    _compile(tmp_path, "--artifact-root", "s3://bucket/art")
    err = capsys.readouterr().err
    assert "WARNING" in err and "s3://bucket/art" in err and "IRSA" in err and "--s3-secret" in err
    _compile(tmp_path, "--artifact-root", "s3://bucket/art", "--s3-secret", "s3-creds")
    _compile(tmp_path, "--artifact-root", str(tmp_path / "art"))
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "registry.example.com/ml/blueprint:"], "not a valid image reference"),
        (["--image", ""], "not a valid image reference"),
        (["--s3-secret", "Bad_Name"], "s3_secret"),
        (["--s3-endpoint", "http://key:secret@minio:9000"], "s3_endpoint"),
        (["--gpu-count", "0"], "gpu_count"),
        (["--profile", "huge"], "unknown profile"),
    ],
)
def test_bad_compile_input_is_one_clear_line_and_exit_2(flags, message, tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("blueprint compile: error:")
    assert not out.exists()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tolerations": [{"key": "gpu", "operator": "Sometimes"}]}, "tolerations[0].operator"),
        ({"tolerations": [{"operator": "Equal", "value": "x"}]}, "needs operator Exists"),
        ({"resources": {"warmup": {"memory_request": "32Gi", "memory_limit": "16Gi"}}}, "memory_request 32Gi exceeds"),
        ({"resources": {"warmpu": {"cpu_request": "1"}}}, "unknown stage 'warmpu'"),
        ({"resources": {"merge": {"cpu_request": "two"}}}, "resources.merge.cpu_request"),
        ({"node_selector": {"pool": "not valid!"}}, "node_selector"),
        (
            {"node_selector": {"nvidia.com/gpu.present": True}},
            "node_selector.nvidia.com/gpu.present: True must be a string",
        ),
        ({"tolerations": [{"key": "dedicated", "value": True}]}, "tolerations[0].value: True must be a string"),
        ({"s3_secret": 123}, "s3_secret: 123 must be a string"),
        ({"accelerator": 5}, "accelerator: 5 must be a string"),
        ({"caching": {"evaluate": "no"}}, "caching.evaluate"),
        ({"retry_backoff": "soon"}, "retry_backoff"),
        ({"gpus": True}, "unknown cluster setting(s) gpus"),
    ],
)
def test_cluster_settings_are_validated_naming_the_setting(values, message):
    with pytest.raises(ConfigError) as info:
        cluster.from_mapping(values)
    assert message in str(info.value)


# ------------------------------------------------------------------------------------------ KFP API contract

kfp_server = kfp_fake.kfp_server  # the fake KFP REST server (tests/pipelines/kfp_fake.py), as this module's fixture


def _params(spec_body: dict) -> dict:
    return spec_body["runtime_config"]["parameters"]


def test_submit_creates_a_run_with_the_compiled_spec_and_typed_parameters(kfp_server, capsys):
    server = kfp_server()
    rc = cli.main(
        [
            "submit",
            "--host",
            server.url,
            "--experiment",
            "nightly",
            "--run-name",
            "r1",
            "--epochs",
            "1",
            "--image",
            IMAGE,
            "--s3-secret",
            "s3-creds",
            "--service-account",
            "pipeline-runner",
            "--param",
            "ppo_steps=20",
            "--param",
            "force=true",
            "--param",
            "warmup_settings.steps=40",
            "--param",
            'evaluate_settings={"max_examples": 8}',
            "--param",
            "artifact_root=s3://b/art",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert [(r["method"], r["path"]) for r in server.requests] == [
        ("GET", "/apis/v2beta1/healthz"),
        ("GET", "/apis/v2beta1/healthz"),
        ("GET", "/apis/v2beta1/experiments"),
        ("POST", "/apis/v2beta1/experiments"),
        ("POST", "/apis/v2beta1/runs"),
    ]
    assert all(r["auth"] == "Bearer test-token" for r in server.requests)
    assert "nightly" in server.find("GET", "/apis/v2beta1/experiments")[0]["query"]["filter"][0]
    (run,) = server.find("POST", "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "r1" and body["experiment_id"] == "exp-1"
    assert body["service_account"] == "pipeline-runner"
    params = _params(body)
    assert params["ppo_steps"] == 20 and params["force"] is True and params["artifact_root"] == "s3://b/art"
    # one key overridden, the profile's other warmup defaults kept
    assert params["warmup_settings"] == {**profiles.stage_settings("default", "warmup"), "steps": 40}
    assert params["evaluate_settings"] == {"max_examples": 8}
    spec = json_format.ParseDict(body["pipeline_spec"]["pipeline_spec"], pipeline_spec_pb2.PipelineSpec())
    assert spec.pipeline_info.name == "blueprint" and "ppo-round" in spec.root.dag.tasks
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    platform = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert {cfg["secretAsEnv"][0]["secretName"] for cfg in platform.values()} == {"s3-creds"}
    assert "submitted run run-1" in capsys.readouterr().out


def test_schedule_creates_a_recurring_run_with_a_six_field_cron(kfp_server, tmp_path, capsys):
    server = kfp_server()
    package = tmp_path / "pipeline.yaml"
    assert (
        cli.main(["compile", "--out", str(package), "--epochs", "1", "--image", IMAGE, "--s3-secret", "s3-creds"]) == 0
    )
    rc = cli.main(
        [
            "schedule",
            "--host",
            server.url,
            "--cron",
            "0 3 * * 1",
            "--package",
            str(package),
            "--max-concurrency",
            "2",
            "--no-catchup",
            "--name",
            "weekly",
            "--param",
            "ppo_steps=5",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    (job,) = server.find("POST", "/apis/v2beta1/recurringruns")
    body = job["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"
    assert int(body["max_concurrency"]) == 2 and body["no_catchup"] is True and body["mode"] == "ENABLE"
    assert body["display_name"] == "weekly" and body["experiment_id"] == "exp-1"
    assert _params(body) == {"ppo_steps": 5}
    sent = body["pipeline_spec"]["pipeline_spec"]
    assert sent == yaml.safe_load_all(package.read_text()).__next__()
    assert "scheduled recurring run rr-1" in capsys.readouterr().out


def test_schedule_warm_start_turns_the_warmup_cache_off_and_sets_the_parameter(kfp_server, capsys):
    server = kfp_server()
    rc = cli.main(
        [
            "schedule",
            "--host",
            server.url,
            "--cron",
            "@daily",
            "--warm-start",
            "--epochs",
            "1",
            "--image",
            IMAGE,
            "--artifact-root",
            "s3://b/art",
            "--s3-secret",
            "s3-creds",
        ]
    )
    from blueprint.pipelines import build_pipeline

    wired = "warm_start" in build_pipeline(epochs=1, image=IMAGE).pipeline_spec.root.input_definitions.parameters
    if not wired:  # until the warmup component takes warm_start: a clear refusal, and nothing sent
        assert rc == 2 and "no warm_start parameter" in capsys.readouterr().err and not server.requests
        return
    assert rc == 0, capsys.readouterr().err
    body = server.find("POST", "/apis/v2beta1/recurringruns")[0]["body"]
    assert _params(body)["warm_start"] is True
    tasks = body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert not tasks["warmup"].get("cachingOptions", {}).get("enableCache", False)


@pytest.mark.parametrize(
    "cron",
    [
        "0 3 * *",
        "61 * * * *",
        "* 25 * * *",
        "0 3 * * 8",
        "0 3 * * MON-FOO",
        "5-1 * * * *",
        "*/0 * * * *",
        "0 3 32 * *",
        "0 0 3 * * * *",
        "@sometimes",
        "",
        "@every 500ms",
        "@every 59s",
    ],
)
def test_invalid_cron_is_rejected_before_any_request(cron, kfp_server, capsys):
    server = kfp_server()
    assert cli.main(["schedule", "--host", server.url, "--cron", cron, "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blueprint schedule: error: invalid cron expression") and repr(cron) in err
    assert server.requests == []


@pytest.mark.parametrize(
    "cron, kfp",
    [
        ("0 3 * * 1", "0 0 3 * * 1"),
        ("*/15 9-17 * * MON-FRI", "0 */15 9-17 * * MON-FRI"),
        ("0 0 9 ? * 2-6", "0 0 9 ? * 2-6"),
        ("30 0 3 1,15 JAN,jul *", "30 0 3 1,15 JAN,jul *"),
        ("@weekly", "@weekly"),
        ("@every 6h", "@every 6h"),
        ("@every 1m", "@every 1m"),
        ("@every 30s30s", "@every 30s30s"),
    ],
)
def test_cron_is_normalised_to_kfps_six_fields(cron, kfp):
    assert cron_module.kfp_cron(cron) == kfp


def test_unreachable_host_is_one_line_naming_it_and_exit_2(kfp_server, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: nothing listens
    assert cli.main(["submit", "--host", dead, "--image", IMAGE, "--artifact-root", "file:///tmp/a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blueprint submit: error: cannot reach Kubeflow Pipelines at {dead}")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("host", ["http://admin:s3cr3t@127.0.0.1:9", "http://127.0.0.1:9/?token=s3cr3t"])
def test_a_host_url_with_credentials_is_refused_without_echoing_them(host, kfp_server, capsys, monkeypatch):
    assert cli.main(["submit", "--host", host, "--image", IMAGE, "--artifact-root", "file:///tmp/a"]) == 2
    err = capsys.readouterr().err
    assert "--host: the URL must not carry user:password@" in err and "s3cr3t" not in err
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", host)
    assert cli.main(["submit", "--image", IMAGE, "--artifact-root", "file:///tmp/a"]) == 2
    err = capsys.readouterr().err
    assert "$KF_PIPELINES_ENDPOINT: the URL" in err and "s3cr3t" not in err


def test_refused_request_names_host_and_status(kfp_server, capsys):
    server = kfp_server(fail={"/apis/v2beta1/runs": 403})
    assert cli.main(["submit", "--host", server.url, "--image", IMAGE, "--artifact-root", "file:///tmp/a"]) == 2
    err = capsys.readouterr().err
    assert f"Kubeflow Pipelines at {server.url} answered 403" in err and "KF_PIPELINES_TOKEN" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "param, message",
    [
        ("epochs=3", "no such parameter"),
        ("ppo_steps=many", "not a number_integer"),
        ("warmup_settings.stepz=3", "--param warmup_settings: unknown setting(s) stepz"),
        ("warmup_settings=[1]", "not a struct"),
        ("source", "expects NAME=VALUE"),
        ("warm_start=true", "use `schedule --warm-start`"),
    ],
)
def test_bad_parameters_fail_before_any_request(param, message, kfp_server, capsys):
    server = kfp_server()
    assert (
        cli.main(
            ["submit", "--host", server.url, "--image", IMAGE, "--artifact-root", "file:///tmp/a", "--param", param]
        )
        == 2
    )
    assert message in capsys.readouterr().err and server.requests == []


def test_submitting_a_package_without_a_secret_warns_from_the_yaml_itself(kfp_server, tmp_path, capsys):
    server = kfp_server()
    package = _compile(tmp_path, "--artifact-root", str(tmp_path / "art"))
    assert "WARNING" not in capsys.readouterr().err
    assert (
        cli.main(
            ["submit", "--host", server.url, "--package", str(package), "--param", "artifact_root=s3://elsewhere/art"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "WARNING: artifact root s3://elsewhere/art" in err and "IRSA" in err
    assert server.find("POST", "/apis/v2beta1/runs")


def test_package_plus_compile_flags_is_refused(tmp_path, kfp_server, capsys):
    server = kfp_server()
    assert cli.main(["submit", "--host", server.url, "--package", str(tmp_path / "p.yaml"), "--gpu"]) == 2
    assert "--gpu would be ignored" in capsys.readouterr().err and server.requests == []


def test_a_package_that_is_not_compiled_yaml_is_refused_naming_it(tmp_path, kfp_server, capsys):
    server = kfp_server()
    archive = tmp_path / "pipeline.tar.gz"
    archive.write_bytes(b"\x1f\x8b\x08\x00binary")
    bad_yaml = tmp_path / "pipeline.yaml"
    bad_yaml.write_bytes(b"\x1f\x8b\x08\x00binary")
    for package, message in [(archive, "expected the compiled .yaml"), (bad_yaml, "cannot be read")]:
        assert cli.main(["submit", "--host", server.url, "--package", str(package)]) == 2
        err = capsys.readouterr().err
        assert f"pipeline package {package}" in err and message in err and "Traceback" not in err
    assert server.requests == []


def test_epochs_zero_is_refused_by_submit_not_turned_into_the_default(kfp_server, capsys):
    server = kfp_server()
    assert (
        cli.main(
            ["submit", "--host", server.url, "--image", IMAGE, "--artifact-root", "file:///tmp/a", "--epochs", "0"]
        )
        == 2
    )
    assert "epochs" in capsys.readouterr().err and server.requests == []


# ------------------------------------------------------------------------------------------------ warm start


def _commit(root: str, stage: str, files: dict[str, str], created: str, inputs: dict | None = None) -> str:
    """A committed stage output with a chosen `created` stamp (the manifest is the commit record)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for rel, text in files.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_text(text)
        key = "".join(c for c in created[:19] if c.isdigit())
        uri = f"{root}/{stage}/{key}"
        artifacts.commit(Path(tmp), uri, stage=stage, config={}, inputs=inputs or {}, metrics={}, key=key)
    manifest = Path(uri[len("file://") :]) / artifacts.MANIFEST_NAME
    data = json.loads(manifest.read_text())
    data["created"] = created
    manifest.write_text(json.dumps(data))
    return uri


def _promote(root: str, adapters: str, base: str) -> None:
    from blueprint.store import promotion

    pointer = {k: f"{root}/elsewhere" for k in promotion.REQUIRED} | {
        "name": "blueprint",
        "adapters": adapters,
        "base": base,
        "metrics": {},
    }
    promotion.write_pointer(root, "blueprint", pointer, promotion.read_pointer(root, "blueprint")[1])


def test_warm_start_continues_from_the_promoted_adapters_not_the_newest_round(tmp_path):
    from blueprint.models.bases import base_identity

    root = f"file://{tmp_path}/art"
    base = _commit(root, "bootstrap", {"config.json": "{}"}, "2026-01-01T00:00:00+00:00")
    other = _commit(root, "bootstrap", {"config.json": '{"x": 1}'}, "2026-01-01T00:00:01+00:00")
    assert warm_start.promoted_adapters(root, "blueprint", base) is None  # nothing promoted yet

    def meta(b: str) -> str:
        return json.dumps({"base": b, "base_identity": base_identity(b)})

    promoted = _commit(root, "ppo-round", {"base.json": meta(base)}, "2026-02-01T00:00:00+00:00", {"base": base})
    _commit(root, "ppo-round", {"base.json": meta(base)}, "2026-03-01T00:00:00+00:00", {"base": base})  # lost its gate
    _promote(root, promoted, base)
    assert warm_start.promoted_adapters(root, "blueprint", base) == promoted
    assert warm_start.promoted_adapters(root, "blueprint", other) is None  # a rebuilt base starts over
    assert warm_start.promoted_adapters(root, "blueprint", base, coder_base="org/other-coder") is None
    assert warm_start.promoted_adapters(root, "other-name", base) is None


def test_warmup_task_hands_on_the_promoted_adapters_and_reports_it(tmp_path):
    from blueprint.models.bases import base_identity

    root = f"file://{tmp_path}/art"
    base = _commit(root, "bootstrap", {"config.json": "{}"}, "2026-01-01T00:00:00+00:00")
    meta = json.dumps({"base": base, "base_identity": base_identity(base)})
    previous = _commit(root, "ppo-round", {"base.json": meta}, "2026-02-01T00:00:00+00:00", {"base": base})
    _promote(root, previous, base)

    class Metrics:
        logged: dict[str, float] = {}

        def log_metric(self, key, value):
            self.logged[key] = value

    metrics, report = Metrics(), tmp_path / "report.md"
    uri, key = warm_start.warmup_task({}, "unused-shards", base, root, False, True, metrics, str(report))
    assert uri == previous and key == "20260201000000"
    assert metrics.logged["warm_start"] == 1.0 and previous in report.read_text()


def test_warm_start_in_a_copied_root_continues_from_the_copy_once_the_original_is_gone(tmp_path):
    import shutil

    from blueprint.models.bases import base_identity

    root, copy = f"file://{tmp_path}/art", f"file://{tmp_path}/copy"
    base = _commit(root, "bootstrap", {"config.json": "{}"}, "2026-01-01T00:00:00+00:00")
    meta = json.dumps({"base": "bootstrap/20260101000000", "base_identity": base_identity(base)})
    promoted = _commit(root, "ppo-round", {"base.json": meta}, "2026-02-01T00:00:00+00:00", {"base": base})
    _promote(root, promoted, base)
    shutil.copytree(tmp_path / "art", tmp_path / "copy")
    shutil.rmtree(tmp_path / "art")
    copied = warm_start.promoted_adapters(copy, "blueprint", base.replace(root, copy))
    assert copied == promoted.replace(root, copy)


def test_empty_sections_of_a_cluster_file_mean_none():
    settings = cluster.from_mapping(
        {"resources": None, "node_selector": None, "caching": None, "tolerations": None, "image_pull_secrets": None}
    )
    assert (settings.resources, settings.node_selector, settings.caching, settings.tolerations) == ({}, {}, {}, ())


@pytest.mark.parametrize(
    "values",
    [{"retries": "s3://AKIAEXAMPLE:hunter2@bucket"}, {"s3_endpoint": ["http://AKIAEXAMPLE:hunter2@minio:9000"]}],
)
def test_a_setting_error_never_echoes_credentials(values):
    with pytest.raises(ConfigError) as info:
        cluster.from_mapping(values)
    assert "hunter2" not in str(info.value) and "AKIAEXAMPLE" not in str(info.value) and "***@" in str(info.value)
