"""Kubeflow delivery: compile with cluster settings, `blueprint submit` one run, and what every KFP command shares
(the host, the client, the package to send, its checked run arguments).

Everything that can be checked without the cluster is checked before the first request (cron expression,
parameter names and types, every stage's settings, cluster settings), so a typo costs a second, not a failed
run. Network failures become one line naming the host (exit 2), never a traceback.

Recurring retraining (`schedule`, `schedules`, `unschedule`, by name) lives in `blueprint.pipelines.schedules`; cron
normalisation in `blueprint.pipelines.cron`; what a warm-started warmup pod does, in `blueprint.runtime.warm_start`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blueprint.config import ConfigError
from blueprint.errors import UserError
from blueprint.pipelines import cluster
from blueprint.pipelines.package import parse_params, pipeline_parameters, read_package, s3_secret_names
from blueprint.stages import registry
from blueprint.store import storage

TOKEN_ENV = "KF_PIPELINES_TOKEN"
HOST_ENV = "KF_PIPELINES_ENDPOINT"
DEFAULT_ARTIFACT_ROOT = "s3://blueprint/artifacts"
DEFAULT_EXPERIMENT = "blueprint"
# the flags that only matter when the package is compiled here (not with --package or a pinned pipeline version)
COMPILE_FLAGS = (
    "epochs",
    "profile",
    "image",
    "artifact_root",
    "cluster_config",
    "s3_secret",
    "s3_secret_keys",
    "s3_endpoint",
    "gpu",
    "accelerator",
    "gpu_count",
    "retries",
)


class KubeflowError(UserError, ValueError):
    """Kubeflow Pipelines cannot be reached or refused a request; the message names the host."""


# ---------------------------------------------------------------------------------------------- cluster flags


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """Cluster settings on the command line; a `--cluster-config` file gives the rest (flags win)."""
    g = p.add_argument_group("cluster settings (see README.md, section Run on Kubeflow)")
    g.add_argument("--cluster-config", default=None, help="YAML/JSON file of ClusterSettings fields")
    g.add_argument("--s3-secret", default=None, help="Kubernetes secret holding the S3 keys (its NAME only)")
    g.add_argument(
        "--s3-secret-keys",
        default=None,
        metavar="ACCESS_FIELD,SECRET_FIELD",
        help="data keys in that secret (default AWS_ACCESS_KEY_ID,AWS_SECRET_ACCESS_KEY; "
        "KFP's MinIO secret: accesskey,secretkey)",
    )
    g.add_argument(
        "--s3-endpoint", default=None, help="AWS_ENDPOINT_URL for the pods, e.g. http://minio-service.kubeflow:9000"
    )
    g.add_argument(
        "--gpu",
        action="store_true",
        default=None,
        help=f"request an accelerator for {'/'.join(registry.accelerator_stages())}",
    )
    g.add_argument("--accelerator", default=None, help="accelerator resource, default nvidia.com/gpu")
    g.add_argument("--gpu-count", type=int, default=None, help="accelerators per GPU stage (default 1)")
    g.add_argument("--retries", type=int, default=None, help="retries per stage, exponential backoff")


def cluster_settings(args: argparse.Namespace) -> cluster.ClusterSettings:
    """Validated ClusterSettings from `--cluster-config` and the cluster flags of `args`."""
    keys = {}
    if getattr(args, "s3_secret_keys", None):
        fields = [f.strip() for f in args.s3_secret_keys.split(",")]
        if len(fields) != 2 or not all(fields):
            raise ConfigError(f"--s3-secret-keys {args.s3_secret_keys!r}: give ACCESS_FIELD,SECRET_FIELD")
        keys = {"s3_access_key_field": fields[0], "s3_secret_key_field": fields[1]}
    return cluster.load(
        getattr(args, "cluster_config", None),
        s3_secret=getattr(args, "s3_secret", None),
        s3_endpoint=getattr(args, "s3_endpoint", None),
        gpu=getattr(args, "gpu", None),
        accelerator=getattr(args, "accelerator", None),
        gpu_count=getattr(args, "gpu_count", None),
        retries=getattr(args, "retries", None),
        **keys,
    )


def compile_package(
    path: str, *, epochs: int, profile: str, image: str, artifact_root: str, settings: cluster.ClusterSettings
) -> str:
    """Compile the pipeline with `settings` applied to every task; warn when S3 has no credentials secret."""
    from blueprint.pipelines import compile_pipeline
    from blueprint.stages import profiles

    profiles.stage_settings(profile, registry.SHARD)  # unknown profile -> ValueError naming it
    storage.refuse_credentials(artifact_root, setting="--artifact-root")  # it becomes a YAML default
    compile_pipeline(
        path,
        epochs=epochs,
        profile=profile,
        image=image,
        artifact_root=artifact_root,
        configure_task=cluster.configure_task(settings),
        defaults=cluster.stage_defaults(settings),
        shard_parallelism=settings.shard_parallelism,
    )
    # after compiling, so that a compile that fails says only why
    warning = cluster.s3_credentials_warning(artifact_root, settings.s3_secret)
    if warning:
        print(warning, file=sys.stderr)
    if settings.service_account:  # KFP sets it per run, not per task: a package cannot carry it
        print(
            f"NOTE: service_account {settings.service_account!r} is not part of the compiled package; "
            "submit/schedule use it when they compile, or pass --service-account with --package",
            file=sys.stderr,
        )
    return path


# ------------------------------------------------------------------------------------------------ parameters


def _reason(exc: BaseException) -> str:
    """A one-line cause out of urllib3's nested connection errors (object reprs dropped)."""
    inner = getattr(exc, "reason", None)
    text = str(inner if isinstance(inner, BaseException) else exc)
    return re.sub(r"<[^>]*>:?\s*", "", text).strip() or type(exc).__name__


@contextlib.contextmanager
def talking_to(host: str) -> Iterator[None]:
    """Turn whatever the KFP client raises on the wire into one KubeflowError line naming `host`."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if not exc.status:
            raise KubeflowError(f"cannot reach Kubeflow Pipelines at {host}: {exc.reason}") from None
        body = re.sub(r"\s+", " ", str(exc.body or ""))[:300]
        hint = f" (set {TOKEN_ENV} to a valid token)" if exc.status in (401, 403) else ""
        raise KubeflowError(f"Kubeflow Pipelines at {host} answered {exc.status} {exc.reason}{hint}: {body}") from None
    except (urllib3.exceptions.HTTPError, OSError, TimeoutError) as exc:
        raise KubeflowError(f"cannot reach Kubeflow Pipelines at {host}: {_reason(exc)}") from None


def connect(host: str, namespace: str | None = None):
    """A kfp.Client for `host`, after one quick health probe so a dead host fails in seconds, not retries.

    The token comes from $KF_PIPELINES_TOKEN (never a flag: it would land in shell history).
    """
    import kfp
    import kfp_server_api
    import urllib3

    token = os.environ.get(TOKEN_ENV) or None
    config = kfp_server_api.Configuration(host=host.rstrip("/"))
    config.retries = urllib3.Retry(total=1, backoff_factor=0.2)
    if token:
        config.api_key["authorization"], config.api_key_prefix["authorization"] = token, "Bearer"
    with talking_to(host):
        kfp_server_api.HealthzServiceApi(kfp_server_api.ApiClient(config)).healthz_service_get_healthz(
            _request_timeout=(5, 20)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2": we target v2
            return kfp.Client(host=host.rstrip("/"), namespace=namespace or "kubeflow", existing_token=token)


# -------------------------------------------------------------------------------------------------- commands


def host_of(args: argparse.Namespace) -> str:
    """The checked KFP endpoint: --host, else $KF_PIPELINES_ENDPOINT; never one carrying credentials."""
    host = args.host or os.environ.get(HOST_ENV)
    where = "--host" if args.host else f"${HOST_ENV}"
    if not host:
        raise ConfigError(
            f"give --host URL (or set {HOST_ENV}), e.g. http://localhost:8080 after "
            "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`"
        )
    if re.search(r"[@?#]", host):  # never echo it: user:password@ or ?token= would land in logs
        raise ConfigError(
            f"{where}: the URL must not carry user:password@, a query or a fragment; the token goes in ${TOKEN_ENV}"
        )
    if not re.match(r"^https?://[^\s/]+", host):
        raise ConfigError(f"{where} {host!r} must start with http:// or https://")
    return host


def compile_flags_given(args: argparse.Namespace) -> list[str]:
    """The compile flags set on the command line, as typed (`--gpu`, `--epochs`, ...)."""
    return [f"--{f.replace('_', '-')}" for f in COMPILE_FLAGS if getattr(args, f, None) is not None]


@contextlib.contextmanager
def pipeline_package(args: argparse.Namespace, warm_start: bool = False) -> Iterator[str]:
    """The pipeline YAML to send: `--package` as given, or compiled now from the compile flags."""
    if args.package:
        given = compile_flags_given(args)
        if given:
            raise ConfigError(
                f"--package is compiled already; {', '.join(given)} would be ignored: drop them or drop --package"
            )
        if warm_start:
            raise ConfigError(
                "--warm-start needs the warmup task's KFP cache off, decided at compile time: "
                "drop --package and let schedule compile"
            )
        yield args.package
        return
    from blueprint.components import DEFAULT_IMAGE

    settings = cluster_settings(args)
    if warm_start:  # same parameters every run: a KFP cache hit would hand back last run's warmup forever
        settings = settings.model_copy(update={"caching": {**settings.caching, registry.WARMUP: False}})
    with tempfile.TemporaryDirectory(prefix="blueprint-kfp-") as tmp:
        yield compile_package(
            str(Path(tmp) / "pipeline.yaml"),
            epochs=2 if args.epochs is None else args.epochs,
            profile="default" if args.profile is None else args.profile,
            image=DEFAULT_IMAGE if args.image is None else args.image,
            artifact_root=DEFAULT_ARTIFACT_ROOT if args.artifact_root is None else args.artifact_root,
            settings=settings,
        )


def run_arguments(
    args: argparse.Namespace,
    spec: dict[str, Any],
    platform: dict[str, Any],
    extra: dict[str, Any] | None = None,
    compiled_elsewhere: bool = False,
) -> dict[str, Any]:
    """Typed run arguments for the pipeline `spec`, plus a warning when S3 artifacts have no credentials secret.

    `compiled_elsewhere`: the spec is not what this command just compiled (`--package`, a pinned pipeline
    version), so the effective artifact root and the secrets are read from the spec itself.
    """
    arguments = parse_params(args.param, spec)
    if "warm_start" in arguments:  # as a plain parameter it would leave the warmup task KFP-cached
        raise ConfigError(
            "--param warm_start: use `schedule --warm-start`, which also turns the warmup task's "
            "KFP cache off (a cache hit would hand back the same warmup on every run)"
        )
    arguments.update(extra or {})
    for name in ("artifact_root", "base", "coder_base"):  # run arguments are stored by KFP and shown in its UI
        if isinstance(arguments.get(name), str):
            storage.refuse_credentials(arguments[name], setting=f"--param {name}")
    if isinstance(arguments.get("source"), str):
        from blueprint.data.sources import parse_source

        storage.refuse_credentials(parse_source(arguments["source"]).target, setting="--param source")
    if compiled_elsewhere:  # read the effective root and the secrets from the YAML itself
        root = arguments.get("artifact_root", pipeline_parameters(spec).get("artifact_root", {}).get("defaultValue"))
        warning = cluster.s3_credentials_warning(str(root), ",".join(s3_secret_names(platform)) or None)
        if warning:
            print(warning, file=sys.stderr)
    return arguments


def service_account(args: argparse.Namespace) -> str | None:
    """--service-account, else the cluster config's service_account (KFP sets it per run, not per task)."""
    if args.service_account:
        return args.service_account
    return cluster.load(args.cluster_config).service_account if args.cluster_config else None


def cmd_submit(args: argparse.Namespace) -> int:
    host = host_of(args)
    with pipeline_package(args) as package:
        arguments = run_arguments(args, *read_package(package), compiled_elsewhere=bool(args.package))
        account = service_account(args)
        run_name = args.run_name or f"blueprint {dt.datetime.now():%Y-%m-%d %H:%M:%S}"
        client = connect(host, args.namespace)
        with talking_to(host):
            result = client.create_run_from_pipeline_package(
                package,
                arguments=arguments,
                run_name=run_name,
                experiment_name=args.experiment,
                namespace=args.namespace,
                service_account=account,
            )
    print(f"submitted run {result.run_id} ({run_name!r}) to {host}, experiment {args.experiment!r}")
    return 0


def add_host_flags(p: argparse.ArgumentParser) -> None:
    """--host and --namespace: where every KFP command talks to."""
    p.add_argument("--host", default=None, help=f"KFP API endpoint (default ${HOST_ENV}); token from ${TOKEN_ENV}")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user installs)")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every command that sends a pipeline: host, experiment, parameters, package or compile flags."""
    add_host_flags(p)
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="experiment name (created when missing)")
    p.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="pipeline parameter (repeatable): epochs are compile-time, e.g. ppo_steps=20, "
        "warmup_settings.steps=40, warmup_settings='{\"steps\": 40}'",
    )
    p.add_argument("--service-account", default=None, help="Kubernetes service account of the run's pods (IRSA)")
    p.add_argument("--package", default=None, help="send this compiled pipeline YAML instead of compiling")
    p.add_argument("--epochs", type=int, default=None, help="PPO rounds (compile time, default 2)")
    p.add_argument("--profile", default=None, help="settings bundle: default | smoke")
    p.add_argument("--image", default=None, help="component image (default: $BLUEPRINT_IMAGE or the release tag)")
    p.add_argument("--artifact-root", default=None, help=f"default artifact_root (default {DEFAULT_ARTIFACT_ROOT})")
    add_cluster_flags(p)


def add_commands(sub: argparse._SubParsersAction, compile_parser: argparse.ArgumentParser) -> None:
    """Register `submit` and the cluster flags on `compile` (the schedule commands, `blueprint.pipelines.schedules`,
    build on this module; the command line registers them)."""
    add_cluster_flags(compile_parser)

    s = sub.add_parser("submit", help="compile and start one run on Kubeflow Pipelines")
    add_run_flags(s)
    s.add_argument("--run-name", default=None)
    s.set_defaults(func=cmd_submit)
