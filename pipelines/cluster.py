"""Cluster settings for the compiled pipeline: S3 secret, GPUs, resources, scheduling, caching, retries, nodes.

Everything here is decided at compile time and lands in the pipeline YAML, so it is validated here, once, with
errors that name the setting: a typo must fail on the laptop, not as a pod stuck in Pending an hour later.
Credentials never pass through this module: only the NAME of a Kubernetes secret does, and the pods read the keys
from it at run time (kfp-kubernetes `use_secret_as_env`). Without a secret, pods rely on the node's IAM role or
IRSA (a service account bound to an IAM role), which is why a missing secret is a warning, not an error.

A stage with `nodes` above 1 runs as a Kubeflow Trainer TrainJob (blueprint.runtime.trainjob): its own task only
creates and watches the job, so it gets LAUNCHER_RESOURCES and no accelerator, and the stage's resources and GPUs
go to each node, described in the task's environment (trainjob.ENV_NODE) by names only, like the secret here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from kubernetes.utils import parse_quantity
from pydantic import Field, StrictBool, field_validator, model_validator

from blueprint.config import ConfigError, Settings, load_file, setting
from blueprint.runtime import trainjob
from blueprint.stages import registry

STAGES = tuple(registry.STAGES)
GPU_STAGES = registry.accelerator_stages()  # shard and bootstrap (tiny base) are CPU work

_CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")  # the patterns kfp's set_cpu_* accept
_MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")  # and set_memory_*
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _quantity(value: Any, pattern: re.Pattern, example: str) -> str | None:
    if value is None:
        return None
    if not pattern.match(str(value)):
        raise ValueError(f"{value!r} is not a {example}")
    return str(value)


class Resources(Settings):
    """CPU/memory requests and limits of one stage's pod, in Kubernetes quantity syntax ("500m", "8Gi")."""

    cpu_request: str | None = setting(None, "CPU request, e.g. 2 or 500m")
    cpu_limit: str | None = setting(None, "CPU limit")
    memory_request: str | None = setting(None, "memory request, e.g. 8Gi or 512Mi")
    memory_limit: str | None = setting(None, "memory limit")

    @field_validator("cpu_request", "cpu_limit", mode="before")
    @classmethod
    def _cpu(cls, value: Any) -> str | None:
        return _quantity(value, _CPU, "CPU quantity like 2 or 500m")

    @field_validator("memory_request", "memory_limit", mode="before")
    @classmethod
    def _memory(cls, value: Any) -> str | None:
        return _quantity(value, _MEMORY, "memory quantity like 8Gi or 512Mi")

    def over(self, base: Resources) -> Resources:
        """`base` with this one's non-empty fields on top."""
        return base.model_copy(update=self.model_dump(exclude_none=True))

    def check_order(self, stage: str) -> None:
        """A request above its limit would leave the pod unschedulable: refuse it, naming the stage."""
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if request and limit and parse_quantity(request) > parse_quantity(limit):
                raise ConfigError(f"resources.{stage}: {kind}_request {request} exceeds {kind}_limit {limit}")


def _resources(cpu_request: str, cpu_limit: str, memory_request: str, memory_limit: str) -> Resources:
    return Resources(
        cpu_request=cpu_request, cpu_limit=cpu_limit, memory_request=memory_request, memory_limit=memory_limit
    )


DEFAULT_RESOURCES: dict[str, Resources] = {
    name: _resources(*spec.resources) for name, spec in registry.STAGES.items()
}  # from the registry
# The task of a multi-node stage creates its TrainJob, streams its log and finds the committed output afterwards.
LAUNCHER_RESOURCES = _resources("500m", "2", "2Gi", "4Gi")
SHM_VOLUME = "dshm"


class Toleration(Settings):
    """One pod toleration (kfp-kubernetes `add_toleration`), e.g. {key: nvidia.com/gpu, operator: Exists}."""

    key: str | None = setting(None, "taint key; empty matches every taint (operator Exists only)")
    operator: Literal["Equal", "Exists"] = setting("Equal", "Equal (key and value) or Exists (key only)")
    value: str | None = setting(None, "taint value (operator Equal)")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = setting(None, "taint effect to tolerate")
    toleration_seconds: int | None = setting(None, "NoExecute: how long the pod stays bound", ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ConfigError("operator Exists takes no value")
        if not self.key and self.operator != "Exists":
            raise ConfigError("an empty key matches every taint and needs operator Exists")
        return self


def _stage_key(name: Any) -> str:
    return registry.get(str(name)).name  # ppo_round -> ppo-round; an unknown stage is named


def _kubernetes_name(value: str | None, what: str = "Kubernetes name") -> str | None:
    if value is not None and (len(value) > 253 or not _DNS_SUBDOMAIN.match(value)):
        raise ValueError(f"{value!r} is not a {what} (lower-case letters, digits, '-' and '.')")
    return value


class ClusterSettings(Settings):
    """How each stage's pod runs on the cluster. Validated on construction; every field has a safe default.
    Credentials never pass through here: only the NAME of the Kubernetes secret that holds them."""

    unknown_label = "cluster setting(s)"

    s3_secret: str | None = setting(
        None,
        "Kubernetes secret whose keys become AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY in every pod (KFP's MinIO: mlpipeline-minio-"
        "artifact). None: pods use the node's IAM role / IRSA",
    )
    s3_access_key_field: str = setting(
        "AWS_ACCESS_KEY_ID",
        "the secret's key holding the access key id (MinIO: accesskey)",
        pattern=_SECRET_KEY.pattern,
    )
    s3_secret_key_field: str = setting(
        "AWS_SECRET_ACCESS_KEY",
        "the secret's key holding the secret key (MinIO: secretkey)",
        pattern=_SECRET_KEY.pattern,
    )
    s3_endpoint: str | None = setting(None, "AWS_ENDPOINT_URL of every pod (an endpoint is not a secret)")
    s3_region: str | None = setting(None, "AWS_DEFAULT_REGION of every pod", pattern=r"^[a-z0-9-]+$")
    gpu: StrictBool = setting(False, "request gpu_count x accelerator for gpu_stages")
    accelerator: str = setting("nvidia.com/gpu", "the accelerator's resource name", pattern=r"^\S+$")
    gpu_count: int = setting(1, "accelerators per GPU stage pod", ge=1)
    gpu_stages: tuple[str, ...] = setting(GPU_STAGES, "stages that get the accelerator")
    resources: dict[str, Resources] = setting({}, "per-stage overrides merged field by field onto DEFAULT_RESOURCES")
    node_selector: dict[str, str] = setting({}, "node labels every pod must match")
    tolerations: tuple[Toleration, ...] = setting((), "taints every pod tolerates")
    caching: dict[str, StrictBool] = setting(
        {},
        "per-stage KFP cache switch (unset: KFP's default, on; shard, "
        "gate and promote are always off, see the pipeline)",
    )
    retries: int = setting(0, "pod-level retries of every stage, with exponential backoff", ge=0, le=20)
    shard_parallelism: int = setting(
        0,
        "shard-part pods running at once (0: one per partition, all at once; the "
        "partitions are shard_settings.partitions)",
        ge=0,
    )
    retry_backoff: str = setting("30s", "first backoff, a duration like 30s, 5m or 1h")
    retry_backoff_factor: float = setting(2.0, "backoff growth per retry", ge=1)
    retry_backoff_max: str = setting("1h", "longest backoff")
    image_pull_secrets: tuple[str, ...] = setting((), "secrets the pods pull the image with")
    service_account: str | None = setting(None, "service account of the pods (e.g. one bound to an IAM role)")
    nodes: dict[str, Annotated[int, Field(ge=1)]] = setting(
        {},
        "per-stage node count, e.g. {ppo-round: 2}: above 1 the stage runs as a Kubeflow Trainer TrainJob "
        "(torch-distributed runtime) of that many nodes, each with the stage's resources (limits requested "
        "as well) and gpu_count accelerators; the stage's own task then only waits, on LAUNCHER_RESOURCES",
    )
    trainjob_timeout: str = setting(
        "24h",
        "how long a multi-node stage waits for its TrainJob (also the job's "
        "activeDeadlineSeconds), a duration like 90m or 24h",
    )

    @field_validator("s3_secret", "service_account")
    @classmethod
    def _names(cls, value: str | None, info) -> str | None:
        return _kubernetes_name(
            value, "Kubernetes secret name" if info.field_name == "s3_secret" else "Kubernetes name"
        )

    @field_validator("image_pull_secrets")
    @classmethod
    def _pull_secrets(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_kubernetes_name(n, "Kubernetes secret name") for n in names)

    @field_validator("s3_endpoint")
    @classmethod
    def _endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://([^/@?#\s]+)(/[^?#\s]*)?$", url):
            raise ValueError(
                "must be http(s)://host[:port] with no user:password@ (credentials belong in the secret) and no query"
            )
        return url

    @field_validator("gpu_stages", mode="before")
    @classmethod
    def _gpu_stages(cls, stages: Any) -> Any:
        return tuple(_stage_key(s) for s in stages) if isinstance(stages, (list, tuple)) else stages

    @field_validator("resources", "caching", "nodes", mode="before")
    @classmethod
    def _stage_keys(cls, per_stage: Any) -> Any:
        per_stage = {} if per_stage is None else per_stage  # an empty section in YAML
        return {_stage_key(k): v for k, v in per_stage.items()} if isinstance(per_stage, Mapping) else per_stage

    @field_validator("node_selector", "tolerations", "image_pull_secrets", mode="before")
    @classmethod
    def _empty_section(cls, value: Any, info) -> Any:
        return ({} if info.field_name == "node_selector" else ()) if value is None else value

    @field_validator("node_selector")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise ValueError(f"{key}={value} is not a valid Kubernetes label")
        return labels

    @field_validator("retry_backoff", "retry_backoff_max", "trainjob_timeout")
    @classmethod
    def _duration(cls, value: str) -> str:
        from kfp.dsl.structures import convert_duration_to_seconds

        try:
            convert_duration_to_seconds(value)
        except (ValueError, IndexError):
            raise ValueError(f"{value!r} is not a duration like 30s, 5m or 1h") from None
        return value

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ClusterSettings:
        for stage in STAGES:
            self.resources_for(stage).check_order(stage)
        return self

    def resources_for(self, stage: str) -> Resources:
        """DEFAULT_RESOURCES of `stage` with this configuration's non-empty fields on top."""
        over = self.resources.get(stage)
        return DEFAULT_RESOURCES[stage] if over is None else over.over(DEFAULT_RESOURCES[stage])

    def multi_node(self, stage: str) -> bool:
        return self.nodes.get(stage, 1) > 1

    def gpu_for(self, stage: str) -> bool:
        return self.gpu and stage in self.gpu_stages


def from_mapping(values: Mapping[str, Any]) -> ClusterSettings:
    """A ClusterSettings from a config-file mapping; unknown keys are named."""
    return ClusterSettings(**values)


def load(path: str | None = None, **overrides: Any) -> ClusterSettings:
    """Settings from a YAML/JSON file (optional) with command-line `overrides` (None = not given) on top."""
    values: dict[str, Any] = load_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(values)


def stage_defaults(settings: ClusterSettings) -> dict[str, dict[str, Any]]:
    """Stage settings the cluster settings imply. With `gpu`: device=cuda for every GPU stage that has a device, so a
    pod that was given a GPU never silently trains on its CPU, and with gpu_count > 1 nproc=gpu_count (one process
    per GPU). With `nodes`: the stage's `nodes`, which makes its task launch a TrainJob."""
    out: dict[str, dict[str, Any]] = {}
    for stage in settings.gpu_stages if settings.gpu else ():
        fields = registry.STAGES[stage].config_type().model_fields
        values = {"device": "cuda"} if "device" in fields else {}
        if settings.gpu_count > 1 and "nproc" in fields:
            values["nproc"] = str(settings.gpu_count)
        if values:
            out[stage] = values
    for stage, count in settings.nodes.items():
        if count > 1:
            if "nodes" not in registry.STAGES[stage].config_type().model_fields:
                raise ConfigError(f"nodes.{stage}: {stage} runs in one pod only (its settings have no nodes)")
            out.setdefault(stage, {})["nodes"] = count
    return out


def node_settings(settings: ClusterSettings, stage: str) -> trainjob.NodeSettings:
    """What each TrainJob node of `stage` gets: the stage's resources (limit, else request, requested and limited
    alike, as the SDK sets them), its accelerators, the S3 secret by name, the pods' scheduling."""
    from kfp.dsl.structures import convert_duration_to_seconds

    res = settings.resources_for(stage)
    per_node = {
        kind: value
        for kind, value in (
            ("cpu", res.cpu_limit or res.cpu_request),
            ("memory", res.memory_limit or res.memory_request),
        )
        if value
    }
    if settings.gpu_for(stage):
        per_node[settings.accelerator] = str(settings.gpu_count)
    secret_env = (
        {}
        if not settings.s3_secret
        else {
            "AWS_ACCESS_KEY_ID": {"secret": settings.s3_secret, "key": settings.s3_access_key_field},
            "AWS_SECRET_ACCESS_KEY": {"secret": settings.s3_secret, "key": settings.s3_secret_key_field},
        }
    )
    tolerations = [
        {
            "tolerationSeconds" if k == "toleration_seconds" else k: v
            for k, v in tol.model_dump(exclude_none=True).items()
        }
        for tol in settings.tolerations
    ]
    return trainjob.NodeSettings(
        resources=per_node,
        secret_env=secret_env,
        node_selector=settings.node_selector,
        tolerations=tolerations,
        image_pull_secrets=settings.image_pull_secrets,
        timeout_s=float(convert_duration_to_seconds(settings.trainjob_timeout)),
    )


def configure_task(settings: ClusterSettings) -> Callable[[str, Any], Any]:
    """The `configure_task(stage, task)` hook of `build_pipeline`, applying `settings` to every task."""
    from kfp import kubernetes

    def apply(stage: str, task: Any) -> Any:
        multi = settings.multi_node(stage)
        _set_resources(task, LAUNCHER_RESOURCES if multi else settings.resources_for(stage))
        if settings.gpu_for(stage) and not multi:
            task.set_accelerator_type(settings.accelerator)
            task.set_accelerator_limit(settings.gpu_count)
            if settings.gpu_count > 1:  # NCCL between the pod's processes: the default 64Mi /dev/shm is too small
                kubernetes.empty_dir_mount(task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory")
        if multi:
            _launches_trainjob(task, settings, stage)
        _s3_access(task, settings)
        _placement(task, settings)
        if stage in settings.caching:
            task.set_caching_options(settings.caching[stage])
        if settings.retries:
            task.set_retry(
                settings.retries,
                backoff_duration=settings.retry_backoff,
                backoff_factor=float(settings.retry_backoff_factor),
                backoff_max_duration=settings.retry_backoff_max,
            )
        return task

    return apply


def _s3_access(task: Any, settings: ClusterSettings) -> None:
    """The store's credentials (from a Kubernetes secret), endpoint and region as the AWS SDK's variables."""
    from kfp import kubernetes

    if settings.s3_secret:
        kubernetes.use_secret_as_env(
            task,
            secret_name=settings.s3_secret,
            secret_key_to_env={
                settings.s3_access_key_field: "AWS_ACCESS_KEY_ID",
                settings.s3_secret_key_field: "AWS_SECRET_ACCESS_KEY",
            },
        )
    if settings.s3_endpoint:
        task.set_env_variable("AWS_ENDPOINT_URL", settings.s3_endpoint)
    if settings.s3_region:
        task.set_env_variable("AWS_DEFAULT_REGION", settings.s3_region)


def _placement(task: Any, settings: ClusterSettings) -> None:
    """Where the pod may run and what it may pull: node selector, tolerations, image pull secrets."""
    from kfp import kubernetes

    for key, value in settings.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for tol in settings.tolerations:
        kubernetes.add_toleration(task, **tol.model_dump(exclude_none=True))
    if settings.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(settings.image_pull_secrets))


def _set_resources(task: Any, res: Resources) -> None:
    if res.cpu_request:
        task.set_cpu_request(res.cpu_request)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_request:
        task.set_memory_request(res.memory_request)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)


def _launches_trainjob(task: Any, settings: ClusterSettings, stage: str) -> None:
    """What the task needs to create its TrainJob: its own image, the nodes' settings, its namespace and service
    account (the downward API; the nodes run as the same account, so IRSA reaches S3 the same way), and its pod's
    name and uid, the job's owner."""
    from kfp import kubernetes

    task.set_env_variable(trainjob.ENV_IMAGE, task.component_spec.implementation.container.image)
    task.set_env_variable(trainjob.ENV_NODE, node_settings(settings, stage).model_dump_json())
    kubernetes.use_field_path_as_env(task, trainjob.ENV_NAMESPACE, "metadata.namespace")
    kubernetes.use_field_path_as_env(task, trainjob.ENV_SERVICE_ACCOUNT, "spec.serviceAccountName")
    kubernetes.use_field_path_as_env(task, trainjob.ENV_POD_NAME, "metadata.name")  # the TrainJob's owner
    kubernetes.use_field_path_as_env(task, trainjob.ENV_POD_UID, "metadata.uid")


def s3_credentials_warning(artifact_root: str, s3_secret: str | None) -> str | None:
    """The warning for an s3:// artifact root compiled without a secret, or None.

    A warning, not an error: on EKS with IRSA (or a node IAM role) a secret is neither needed nor wanted. On
    MinIO and anywhere else the pods will fail their first S3 call, which this line says before that happens.
    """
    if s3_secret or not str(artifact_root).startswith("s3://"):
        return None
    return (
        f"WARNING: artifact root {artifact_root} is on S3 but no --s3-secret is set: pods get no S3 "
        "credentials from a Kubernetes secret and rely on the node's IAM role / IRSA (service account). "
        "On KFP's MinIO: --s3-secret mlpipeline-minio-artifact --s3-secret-keys accesskey,secretkey "
        "--s3-endpoint http://minio-service.kubeflow:9000"
    )
