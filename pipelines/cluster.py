"""Cluster settings for the compiled pipeline: S3 secret, GPUs, resources, scheduling, caching, retries.

Everything here is decided at compile time and lands in the pipeline YAML, so it is validated here, once, with
errors that name the setting: a typo must fail on the laptop, not as a pod stuck in Pending an hour later.
Credentials never pass through this module: only the NAME of a Kubernetes secret does, and the pods read the keys
from it at run time (kfp-kubernetes `use_secret_as_env`). Without a secret, pods rely on the node's IAM role or
IRSA (a service account bound to an IAM role), which is why a missing secret is a warning, not an error.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from blueprint.config import ConfigError, load_file
from blueprint.stages import registry

STAGES = tuple(registry.STAGES)
GPU_STAGES = registry.accelerator_stages()  # shard and bootstrap (tiny base) are CPU work

_CPU = re.compile(r"^([0-9]*[.])?[0-9]+m?$")                       # the patterns kfp's set_cpu_* accept
_MEMORY = re.compile(r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$")  # and set_memory_*
_MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
                 "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def _cpu_cores(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _memory_bytes(value: str) -> int:
    digits = re.match(r"^[0-9]+", value).group(0)
    return int(digits) * _MEMORY_UNITS[value[len(digits):]]


@dataclasses.dataclass(frozen=True)
class Resources:
    """CPU/memory requests and limits of one stage's pod, in Kubernetes quantity syntax ("500m", "8Gi")."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None

    def check(self, stage: str) -> None:
        for name in ("cpu_request", "cpu_limit"):
            value = getattr(self, name)
            if value is not None and not _CPU.match(str(value)):
                raise ConfigError(f"resources.{stage}.{name}: {value!r} is not a CPU quantity like 2 or 500m")
        for name in ("memory_request", "memory_limit"):
            value = getattr(self, name)
            if value is not None and not _MEMORY.match(str(value)):
                raise ConfigError(f"resources.{stage}.{name}: {value!r} is not a memory quantity like 8Gi or 512Mi")
        if self.cpu_request and self.cpu_limit and _cpu_cores(self.cpu_request) > _cpu_cores(self.cpu_limit):
            raise ConfigError(f"resources.{stage}: cpu_request {self.cpu_request} exceeds cpu_limit {self.cpu_limit}")
        if self.memory_request and self.memory_limit and \
                _memory_bytes(self.memory_request) > _memory_bytes(self.memory_limit):
            raise ConfigError(f"resources.{stage}: memory_request {self.memory_request} exceeds "
                              f"memory_limit {self.memory_limit}")


# Sized for the default profile (a tiny base) on a modest cluster; a real base needs more (override per stage).
# Memory limits guard the node against a runaway pod; CPU limits are generous because throttling only slows.
DEFAULT_RESOURCES: dict[str, Resources] = {
    "shard": Resources("1", "4", "2Gi", "8Gi"),
    "bootstrap": Resources("2", "4", "4Gi", "8Gi"),
    "warmup": Resources("2", "8", "8Gi", "16Gi"),
    "ppo-round": Resources("2", "8", "8Gi", "16Gi"),
    "evaluate": Resources("2", "8", "8Gi", "16Gi"),
    "merge": Resources("1", "4", "8Gi", "16Gi"),
}

_TOLERATION_FIELDS = ("key", "operator", "value", "effect", "toleration_seconds")


def _check_toleration(i: int, tol: Mapping[str, Any]) -> dict[str, Any]:
    where = f"tolerations[{i}]"
    if not isinstance(tol, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{key: nvidia.com/gpu, operator: Exists, "
                          f"effect: NoSchedule}}, got {tol!r}")
    unknown = sorted(set(tol) - set(_TOLERATION_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_TOLERATION_FIELDS)}")
    out = {k: tol[k] for k in _TOLERATION_FIELDS if tol.get(k) is not None}
    for k in ("key", "operator", "value", "effect"):
        if k in out and not isinstance(out[k], str):  # YAML reads `value: true` as a bool: quote it
            raise ConfigError(f"{where}.{k}: {out[k]!r} must be a string (quote it in YAML)")
    operator = out.setdefault("operator", "Equal")
    if operator not in ("Equal", "Exists"):
        raise ConfigError(f"{where}.operator: {operator!r} must be Equal or Exists")
    if operator == "Exists" and out.get("value"):
        raise ConfigError(f"{where}: operator Exists takes no value")
    if not out.get("key") and operator != "Exists":
        raise ConfigError(f"{where}: an empty key matches every taint and needs operator Exists")
    if out.get("effect") not in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ConfigError(f"{where}.effect: {out['effect']!r} must be NoSchedule, PreferNoSchedule or NoExecute")
    if "toleration_seconds" in out:
        if not isinstance(out["toleration_seconds"], int) or out["toleration_seconds"] < 0:
            raise ConfigError(f"{where}.toleration_seconds: must be a non-negative integer")
    return out


def _stage_key(name: str, where: str) -> str:
    stage = str(name).replace("_", "-")
    if stage not in STAGES:
        raise ConfigError(f"{where}: unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return stage


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How each stage's pod runs on the cluster. Validated on construction; every field has a safe default.

    s3_secret: name of a Kubernetes secret whose keys `s3_access_key_field` / `s3_secret_key_field` become
      AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in every pod (KFP's MinIO: secret mlpipeline-minio-artifact,
      fields accesskey / secretkey). None: pods use the node's IAM role / IRSA.
    s3_endpoint / s3_region: plain env values AWS_ENDPOINT_URL / AWS_DEFAULT_REGION (an endpoint is not a secret).
    gpu: request `gpu_count` x `accelerator` for `gpu_stages`.
    resources: per-stage overrides merged field by field onto DEFAULT_RESOURCES.
    caching: per-stage KFP cache switch (unset: KFP's default, on; shard is always off, see the pipeline).
    retries: pod-level retries of every stage, with exponential backoff (KFP RetryPolicy).
    """

    s3_secret: str | None = None
    s3_access_key_field: str = "AWS_ACCESS_KEY_ID"
    s3_secret_key_field: str = "AWS_SECRET_ACCESS_KEY"
    s3_endpoint: str | None = None
    s3_region: str | None = None
    gpu: bool = False
    accelerator: str = "nvidia.com/gpu"
    gpu_count: int = 1
    gpu_stages: tuple[str, ...] = GPU_STAGES
    resources: Mapping[str, Resources] = dataclasses.field(default_factory=dict)
    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    caching: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    retries: int = 0
    retry_backoff: str = "30s"
    retry_backoff_factor: float = 2.0
    retry_backoff_max: str = "1h"
    image_pull_secrets: tuple[str, ...] = ()
    service_account: str | None = None

    def __post_init__(self) -> None:
        for name in ("s3_secret", "s3_endpoint", "s3_region", "accelerator", "service_account",
                     "s3_access_key_field", "s3_secret_key_field", "retry_backoff", "retry_backoff_max"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name}: {value!r} must be a string")
        if self.s3_secret is not None and (len(self.s3_secret) > 253 or not _DNS_SUBDOMAIN.match(self.s3_secret)):
            raise ConfigError(f"s3_secret: {self.s3_secret!r} is not a Kubernetes secret name "
                              "(lower-case letters, digits, '-' and '.')")
        for name in ("s3_access_key_field", "s3_secret_key_field"):
            if not _SECRET_KEY.match(getattr(self, name) or ""):
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not a valid secret data key")
        if self.s3_endpoint is not None:
            m = re.match(r"^https?://([^/@?#\s]+)(/[^?#\s]*)?$", self.s3_endpoint)
            if not m:
                raise ConfigError(f"s3_endpoint: {self.s3_endpoint!r} must be http(s)://host[:port] with no "
                                  "user:password@ (credentials belong in the secret) and no query")
        if self.s3_region is not None and not re.match(r"^[a-z0-9-]+$", self.s3_region):
            raise ConfigError(f"s3_region: {self.s3_region!r} is not a region name like us-east-1")
        if not self.accelerator or re.search(r"\s", self.accelerator):
            raise ConfigError(f"accelerator: {self.accelerator!r} must be a resource name like nvidia.com/gpu")
        if not isinstance(self.gpu_count, int) or isinstance(self.gpu_count, bool) or self.gpu_count < 1:
            raise ConfigError(f"gpu_count: {self.gpu_count!r} must be an integer >= 1")
        object.__setattr__(self, "gpu_stages", tuple(_stage_key(s, "gpu_stages") for s in self.gpu_stages))
        resources = {}
        for stage, res in dict(self.resources).items():
            key = _stage_key(stage, "resources")
            if isinstance(res, Mapping):
                unknown = sorted(set(res) - {f.name for f in dataclasses.fields(Resources)})
                if unknown:
                    raise ConfigError(f"resources.{key}: unknown field(s) {', '.join(unknown)}; known: "
                                      "cpu_request, cpu_limit, memory_request, memory_limit")
                res = Resources(**{k: None if v is None else str(v) for k, v in res.items()})
            resources[key] = res
        object.__setattr__(self, "resources", resources)
        for stage in STAGES:
            self.resources_for(stage).check(stage)
        for key, value in dict(self.node_selector).items():
            if not isinstance(value, str):  # YAML `true` would become the label value "True": never matches
                raise ConfigError(f"node_selector.{key}: {value!r} must be a string (quote it in YAML)")
            if not _LABEL_KEY.match(str(key)) or not _LABEL_VALUE.match(str(value)):
                raise ConfigError(f"node_selector: {key}={value} is not a valid Kubernetes label")
        object.__setattr__(self, "node_selector", {str(k): str(v) for k, v in dict(self.node_selector).items()})
        if isinstance(self.tolerations, Mapping):
            raise ConfigError("tolerations: expected a list of mappings")
        object.__setattr__(self, "tolerations", tuple(_check_toleration(i, t) for i, t in enumerate(self.tolerations)))
        caching = {}
        for stage, enabled in dict(self.caching).items():
            if not isinstance(enabled, bool):
                raise ConfigError(f"caching.{stage}: {enabled!r} must be true or false")
            caching[_stage_key(stage, "caching")] = enabled
        object.__setattr__(self, "caching", caching)
        if not isinstance(self.retries, int) or isinstance(self.retries, bool) or not 0 <= self.retries <= 20:
            raise ConfigError(f"retries: {self.retries!r} must be an integer from 0 to 20")
        from kfp.dsl.structures import convert_duration_to_seconds

        for name in ("retry_backoff", "retry_backoff_max"):
            try:
                convert_duration_to_seconds(str(getattr(self, name)))
            except (ValueError, IndexError):
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not a duration like 30s, 5m or 1h") from None
        if not isinstance(self.retry_backoff_factor, (int, float)) or self.retry_backoff_factor < 1:
            raise ConfigError(f"retry_backoff_factor: {self.retry_backoff_factor!r} must be a number >= 1")
        for name in self.image_pull_secrets:
            if not _DNS_SUBDOMAIN.match(str(name)):
                raise ConfigError(f"image_pull_secrets: {name!r} is not a Kubernetes secret name")
        object.__setattr__(self, "image_pull_secrets", tuple(self.image_pull_secrets))
        if self.service_account is not None and not _DNS_SUBDOMAIN.match(self.service_account):
            raise ConfigError(f"service_account: {self.service_account!r} is not a Kubernetes name")

    def resources_for(self, stage: str) -> Resources:
        """DEFAULT_RESOURCES of `stage` with this configuration's non-empty fields on top."""
        base = DEFAULT_RESOURCES[stage]
        over = self.resources.get(stage)
        if over is None:
            return base
        return dataclasses.replace(base, **{k: v for k, v in dataclasses.asdict(over).items() if v is not None})


_FIELDS = {f.name for f in dataclasses.fields(ClusterSettings)}


def from_mapping(values: Mapping[str, Any]) -> ClusterSettings:
    """A ClusterSettings from a config-file mapping; unknown keys are named, YAML lists become tuples."""
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown cluster setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELDS))}")
    values = dict(values)
    for name in ("resources", "node_selector", "caching"):
        if name in values and not isinstance(values[name] or {}, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {type(values[name]).__name__}")
        values[name] = dict(values.get(name) or {})
    for name in ("gpu_stages", "tolerations", "image_pull_secrets"):
        if name in values:
            if isinstance(values[name], (str, Mapping)) or not isinstance(values[name], (list, tuple)):
                raise ConfigError(f"{name}: expected a list, got {values[name]!r}")
            values[name] = tuple(values[name])
    if "gpu" in values and not isinstance(values["gpu"], bool):
        raise ConfigError(f"gpu: {values['gpu']!r} must be true or false")
    return ClusterSettings(**values)


def load(path: str | None = None, **overrides: Any) -> ClusterSettings:
    """Settings from a YAML/JSON file (optional) with command-line `overrides` (None = not given) on top."""
    values: dict[str, Any] = load_file(path) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(values)


def configure_task(settings: ClusterSettings) -> Callable[[str, Any], Any]:
    """The `configure_task(stage, task)` hook of `build_pipeline`, applying `settings` to every task."""
    from kfp import kubernetes

    def apply(stage: str, task: Any) -> Any:
        res = settings.resources_for(stage)
        if res.cpu_request:
            task.set_cpu_request(res.cpu_request)
        if res.cpu_limit:
            task.set_cpu_limit(res.cpu_limit)
        if res.memory_request:
            task.set_memory_request(res.memory_request)
        if res.memory_limit:
            task.set_memory_limit(res.memory_limit)
        if settings.gpu and stage in settings.gpu_stages:
            task.set_accelerator_type(settings.accelerator)
            task.set_accelerator_limit(settings.gpu_count)
        if settings.s3_secret:
            kubernetes.use_secret_as_env(task, secret_name=settings.s3_secret, secret_key_to_env={
                settings.s3_access_key_field: "AWS_ACCESS_KEY_ID",
                settings.s3_secret_key_field: "AWS_SECRET_ACCESS_KEY"})
        if settings.s3_endpoint:
            task.set_env_variable("AWS_ENDPOINT_URL", settings.s3_endpoint)
        if settings.s3_region:
            task.set_env_variable("AWS_DEFAULT_REGION", settings.s3_region)
        for key, value in settings.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in settings.tolerations:
            kubernetes.add_toleration(task, **tol)
        if settings.image_pull_secrets:
            kubernetes.set_image_pull_secrets(task, list(settings.image_pull_secrets))
        if stage in settings.caching:
            task.set_caching_options(settings.caching[stage])
        if settings.retries:
            task.set_retry(settings.retries, backoff_duration=settings.retry_backoff,
                           backoff_factor=float(settings.retry_backoff_factor),
                           backoff_max_duration=settings.retry_backoff_max)
        return task

    return apply


def s3_credentials_warning(artifact_root: str, s3_secret: str | None) -> str | None:
    """The warning for an s3:// artifact root compiled without a secret, or None.

    A warning, not an error: on EKS with IRSA (or a node IAM role) a secret is neither needed nor wanted. On
    MinIO and anywhere else the pods will fail their first S3 call, which this line says before that happens.
    """
    if s3_secret or not str(artifact_root).startswith("s3://"):
        return None
    return (f"WARNING: artifact root {artifact_root} is on S3 but no --s3-secret is set: pods get no S3 "
            "credentials from a Kubernetes secret and rely on the node's IAM role / IRSA (service account). "
            "On KFP's MinIO: --s3-secret mlpipeline-minio-artifact --s3-secret-keys accesskey,secretkey "
            "--s3-endpoint http://minio-service.kubeflow:9000")
