"""A stage across nodes: a Kubeflow Trainer TrainJob on the `torch-distributed` runtime, created and watched by the
stage's own KFP task through the `kubeflow` SDK (0.5: TrainerClient, CustomTrainerContainer, trainer options).

Why a TrainJob and not pods of our own: the Trainer operator starts the nodes together (a JobSet) and hands torchrun
its rendezvous in PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT. Each node runs the task's own image
and `torchrun --nproc-per-node N -m blueprint.runtime.worker '<request>'`; rank 0 commits the output to the artifact
store, the only state the nodes share, where the task then finds it as a cache hit. What the task's pod cannot know
by itself (the image, per-node resources, the S3 secret's NAME, scheduling) the compile puts in its environment
(ENV_IMAGE, ENV_NODE); credentials reach the nodes as secret references, never as values. The SDK is imported
inside the functions only, so importing a stage stays fast.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from blueprint.config import Settings, setting
from blueprint.errors import TASK_ERROR_PREFIX, UserError
from blueprint.runtime import stopping
from blueprint.runtime.worker import worker_module_args

RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime the Trainer operator installs
ENV_IMAGE = "BLUEPRINT_IMAGE"  # the component's image: the nodes run the same one
ENV_NODE = "BLUEPRINT_TRAINJOB_NODE"  # NodeSettings as JSON, written by the compile
ENV_NAMESPACE = "BLUEPRINT_NAMESPACE"  # the pod's namespace (downward API)
ENV_SERVICE_ACCOUNT = "BLUEPRINT_SERVICE_ACCOUNT"  # the pod's service account (downward API)
ENV_POD_NAME = "BLUEPRINT_POD_NAME"  # the pod's name and uid (downward API): the TrainJob's owner
ENV_POD_UID = "BLUEPRINT_POD_UID"
PASSED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")  # plain values the nodes get as the task has them
TAIL_LINES = 20
POLL_S = 5.0
LOG_JOIN_S = 30.0  # how long the last log lines may take to arrive after the job ends
SHM = "dshm"
NO_TOKEN = "no-api-token"  # an empty volume where Kubernetes would mount the API token
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
RBAC_HINT = "see README.md, section Multi-node stages, for the Role to bind"
_FORBIDDEN = re.compile(
    r'User "(?P<user>[^"]+)" cannot (?P<verb>\w+) resource "(?P<resource>[^"]+)"'
    r'(?: in API group "(?P<group>[^"]*)")?'
)


class TrainJobError(UserError):
    """A TrainJob could not be created, failed or did not finish; the message names the job (and the fix)."""


class SecretRef(Settings):
    """One key of a Kubernetes secret, by name: what the nodes read an environment variable from."""

    secret: str = setting(..., "the secret's NAME (never its value)")
    key: str = setting(..., "the data key in it")


class NodeSettings(Settings):
    """What every TrainJob node gets beside the image, decided at compile time (the cluster settings)."""

    resources: dict[str, str] = setting(
        {}, "per-node resources, requested and limited alike, e.g. {cpu: '8', memory: 16Gi, nvidia.com/gpu: '4'}"
    )
    secret_env: dict[str, SecretRef] = setting({}, "environment variable -> secret key (the S3 keys)")
    node_selector: dict[str, str] = setting({}, "node labels every node must match")
    tolerations: tuple[dict[str, Any], ...] = setting((), "taints the nodes tolerate (Kubernetes' field names)")
    image_pull_secrets: tuple[str, ...] = setting((), "secrets the nodes pull the image with")
    timeout_s: float = setting(86_400.0, "how long the task waits for the job; also its activeDeadlineSeconds", gt=0)


@dataclasses.dataclass(frozen=True)
class JobPlan:
    """Everything one TrainJob is made of; `trainjob_spec` turns it into the object the API receives."""

    stage: str
    request: dict[str, Any]
    nodes: int
    nproc_per_node: int
    image: str
    node: NodeSettings
    name: str
    namespace: str
    service_account: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    owner: tuple[str, str, str] | None = None  # (namespace, name, uid) of the task's pod: the job goes with it

    def owner_references(self) -> list[dict[str, str]]:
        """The task's pod as the job's owner, so Kubernetes' garbage collector deletes the job (and its nodes) when
        the pod goes. Only in the pod's own namespace: an owner elsewhere counts as gone, and the job would be
        deleted at once. Not blockOwnerDeletion: that needs a permission on pods the task's account lacks."""
        if self.owner is None or self.owner[0] != self.namespace:
            return []
        _, name, uid = self.owner
        return [{"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}]

    def command(self) -> list[str]:
        """torchrun takes --nnodes, --node-rank and the master's address from the PET_* variables the runtime sets;
        --nproc-per-node is given here, so it never depends on what the runtime guesses from the resources."""
        return ["torchrun", f"--nproc-per-node={self.nproc_per_node}", *worker_module_args(self.request)]

    def sdk_arguments(self) -> tuple[Any, list]:
        """(trainer, options) for `TrainerClient.train`."""
        from kubeflow.trainer import CustomTrainerContainer
        from kubeflow.trainer import options as o

        trainer = CustomTrainerContainer(
            image=self.image,
            num_nodes=self.nodes,
            resources_per_node=dict(self.node.resources) or None,
            env=dict(self.env) or None,
        )
        labels = {"app.kubernetes.io/part-of": "blueprint", "blueprint-rt/stage": self.stage}
        opts = [
            o.Name(self.name),
            o.Labels(labels),
            o.TrainerCommand(self.command()),
            o.ActiveDeadlineSeconds(max(1, int(self.node.timeout_s))),
        ]
        opts.append(
            o.RuntimePatch(
                training_runtime_spec=o.TrainingRuntimeSpecPatch(
                    template=o.JobSetTemplatePatch(
                        spec=o.JobSetSpecPatch(
                            replicated_jobs=[
                                o.ReplicatedJobPatch(
                                    name="node",
                                    template=o.JobTemplatePatch(
                                        spec=o.JobSpecPatch(template=o.PodTemplatePatch(spec=self._pod_patch(o)))
                                    ),
                                )
                            ]
                        )
                    )
                )
            )
        )
        return trainer, opts

    def _pod_patch(self, o: Any) -> Any:
        """What CustomTrainerContainer cannot carry: secret references, /dev/shm, service account, scheduling, and
        no Kubernetes API token. The nodes need no API, but the task's account may create TrainJobs: the Trainer's
        runtime patch has no automountServiceAccountToken (API 2.3), so an empty read-only volume takes the
        token's path, and the service-account admission mounts no token into a container with a mount there."""
        node = self.node
        env = [
            {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.secret, "key": ref.key}}}
            for name, ref in sorted(node.secret_env.items())
        ]
        shm = self.nproc_per_node > 1  # NCCL between the processes of one node needs more than 64Mi of /dev/shm
        mounts = [{"name": NO_TOKEN, "mountPath": TOKEN_PATH, "readOnly": True}]
        volumes = [{"name": NO_TOKEN, "emptyDir": {}}]
        if shm:
            mounts.append({"name": SHM, "mountPath": "/dev/shm"})
            volumes.append({"name": SHM, "emptyDir": {"medium": "Memory"}})
        return o.PodSpecPatch(
            service_account_name=self.service_account,
            node_selector=dict(node.node_selector) or None,
            tolerations=[dict(t) for t in node.tolerations] or None,
            image_pull_secrets=[{"name": s} for s in node.image_pull_secrets] or None,
            volumes=volumes,
            containers=[o.ContainerPatch(name="node", env=env or None, volume_mounts=mounts)],
        )


class _Capture:
    """Takes the place of the Kubernetes API in `trainjob_spec`: keeps the body the SDK would POST."""

    body: dict | None = None

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict
    ) -> dict:
        self.body = body
        return body


class _Owned:
    """The SDK's Kubernetes API with the plan's owner references added to the TrainJob it creates (the SDK's
    options set only the name, labels and annotations of its metadata); every other call goes through as it is."""

    def __init__(self, api: Any, plan: JobPlan):
        self._api, self._plan = api, plan

    def create_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, body: dict, **kwargs: Any
    ) -> Any:
        owners = self._plan.owner_references()
        if owners:
            body = {**body, "metadata": {**body.get("metadata", {}), "ownerReferences": owners}}
        return self._api.create_namespaced_custom_object(group, version, namespace, plural, body, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)


def trainjob_spec(plan: JobPlan) -> dict[str, Any]:
    """The TrainJob object `run_trainjob` creates for `plan`, built by the SDK's own `KubernetesBackend.train` (with
    a locally described ClusterTrainingRuntime), so a golden file pins what the cluster receives."""
    from kubeflow.trainer.backends.kubernetes.backend import KubernetesBackend
    from kubeflow.trainer.types import types

    backend = object.__new__(KubernetesBackend)  # no kubeconfig and no cluster: nothing is sent
    capture = _Capture()
    backend.namespace, backend.custom_api = plan.namespace, _Owned(capture, plan)
    runtime = types.Runtime(
        name=RUNTIME,
        kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        trainer=types.RuntimeTrainer(
            trainer_type=types.TrainerType.CUSTOM_TRAINER, framework="torch", image=plan.image
        ),
    )
    trainer, options = plan.sdk_arguments()
    backend.train(runtime=runtime, trainer=trainer, options=options)
    return capture.body


def plan_from_env(
    stage: str,
    request: dict[str, Any],
    *,
    nodes: int,
    nproc_per_node: int,
    timeout_s: float | None = None,
    environ: Mapping[str, str] = os.environ,
    name: str | None = None,
) -> JobPlan:
    """The plan for this task's pod, from what the compile put in its environment."""
    if not environ.get(ENV_IMAGE) or not environ.get(ENV_NODE):
        raise TrainJobError(
            f"nodes={nodes} runs {stage} as a Kubeflow Trainer TrainJob, which needs the pipeline "
            f"compiled with `nodes: {{{stage}: {nodes}}}` in its cluster settings ({ENV_IMAGE} and "
            f"{ENV_NODE} are not set here)"
        )
    node = NodeSettings(**json.loads(environ[ENV_NODE]))
    if timeout_s is not None:
        node = node.model_copy(update={"timeout_s": float(timeout_s)})
    return JobPlan(
        stage=stage,
        request=request,
        nodes=nodes,
        nproc_per_node=nproc_per_node,
        image=environ[ENV_IMAGE],
        node=node,
        namespace=environ.get(ENV_NAMESPACE, ""),
        name=name or f"blueprint-{stage}-{secrets.token_hex(4)}",  # per attempt: a retry starts afresh
        service_account=environ.get(ENV_SERVICE_ACCOUNT) or None,
        env=_node_env(request, node, nproc_per_node, environ),
        owner=(environ.get(ENV_NAMESPACE, ""), environ[ENV_POD_NAME], environ[ENV_POD_UID])
        if environ.get(ENV_POD_NAME) and environ.get(ENV_POD_UID)
        else None,
    )


def _node_env(request: dict[str, Any], node: NodeSettings, nproc: int, environ: Mapping[str, str]) -> dict[str, str]:
    """What the ranks of a node see beside torchrun's variables, as `launch` gives the ranks it starts itself: the
    worker mark, the device (gloo or NCCL), a share of the node's cores per process, the S3 endpoint and region."""
    from kubernetes.utils import parse_quantity

    from blueprint.distributed import WORKER_ENV, threads_per_process

    env = {WORKER_ENV: "1"}
    if node.resources.get("cpu"):
        env["OMP_NUM_THREADS"] = str(threads_per_process(int(parse_quantity(node.resources["cpu"])), nproc))
    return {**env, **{k: environ[k] for k in PASSED_ENV if environ.get(k)}}


def node_processes(nproc: str, environ: Mapping[str, str] = os.environ) -> int:
    """Processes per TrainJob node for a stage's `nproc` setting, decided by the nodes' resources, not by this pod
    (which has no GPU of its own): auto = the accelerators per node, 1 without."""
    if nproc != "auto":
        return int(nproc)
    resources = NodeSettings(**json.loads(environ[ENV_NODE])).resources if environ.get(ENV_NODE) else {}
    return max([int(v) for k, v in resources.items() if "gpu" in k.lower() and v.isdigit()] or [1])


def run_trainjob(
    stage: str,
    request: dict[str, Any],
    *,
    nodes: int,
    nproc_per_node: int,
    timeout_s: float | None = None,
    log: Callable[[str], Any] = print,
    poll_s: float = POLL_S,
    environ: Mapping[str, str] = os.environ,
) -> str:
    """Create the TrainJob of `stage` on `nodes` nodes x `nproc_per_node` processes, stream node 0's log into
    `log` and return the job's name once it completed; a failure or timeout raises TrainJobError."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    plan = plan_from_env(
        stage, request, nodes=nodes, nproc_per_node=nproc_per_node, timeout_s=timeout_s, environ=environ
    )
    try:  # KUBECONFIG: a kubeconfig outside a cluster; in a pod, its service account
        client = TrainerClient(
            KubernetesBackendConfig(namespace=plan.namespace or None, config_file=environ.get("KUBECONFIG") or None)
        )
        plan = dataclasses.replace(plan, namespace=client.backend.namespace.strip())
        client.backend.custom_api = _Owned(client.backend.custom_api, plan)
        trainer, options = plan.sdk_arguments()
        client.train(runtime=RUNTIME, trainer=trainer, options=options)
    except Exception as exc:  # the SDK wraps every API error in RuntimeError/ValueError
        raise _api_error(exc, plan, "create") from exc
    log(f"{stage}: TrainJob {plan.namespace}/{plan.name}: {nodes} node(s) x {nproc_per_node} process(es)")
    with stopping.passing_on(stopping.raise_stopped):  # a terminated KFP run: the job goes now, not at its deadline
        _wait(client, plan, log, poll_s)
    return plan.name


def _wait(client: Any, plan: JobPlan, log: Callable[[str], Any], poll_s: float) -> None:
    """Wait for Complete or Failed while a thread streams node 0's log; raise on failure or timeout."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    done = threading.Event()
    follower = threading.Thread(target=_follow, args=(client, plan.name, tail, log, done, poll_s), daemon=True)
    follower.start()
    timeout = plan.node.timeout_s
    try:
        job = client.wait_for_job_status(
            plan.name, status={"Complete", "Failed"}, timeout=timeout, polling_interval=min(poll_s, timeout / 2)
        )
    except stopping.Stopped as exc:
        done.set()
        log(f"{plan.stage}: {exc}: deleting TrainJob {plan.namespace}/{plan.name}")
        _delete(client, plan.name, log)
        raise
    except TimeoutError as exc:
        done.set()
        if "waiting for" not in str(exc):  # an API call timed out, not the job
            raise _api_error(exc, plan, "get") from exc
        _delete(client, plan.name, log)
        raise TrainJobError(_failure(plan, f"did not finish within {timeout:g}s (deleted)", tail)) from None
    except Exception as exc:  # RuntimeError from the SDK, whatever the API said
        done.set()
        _delete(client, plan.name, log)  # the task gives up on it: its nodes must not stay held for a day
        raise _api_error(exc, plan, "get") from exc
    done.set()
    follower.join(LOG_JOIN_S)
    if job.status == "Failed":
        if not tail:  # it ended before a stream started: read what it left
            tail.extend(_logs(client, plan.name))
        raise TrainJobError(_failure(plan, "failed", tail))


def _follow(
    client: Any, name: str, tail: collections.deque, log: Callable[[str], Any], done: threading.Event, poll_s: float
) -> None:
    """Stream node 0's log once its pod runs (retrying while it is pending), keeping the last lines in `tail`."""
    while True:
        lines = 0
        try:
            for line in client.get_job_logs(name, follow=True):
                lines += 1
                tail.append(line)
                log(f"[{name} node-0] {line}")
        except Exception as exc:  # noqa: BLE001 - no pod yet, or it is gone: the wait decides the outcome
            if done.is_set():
                return
            forbidden = _forbidden(exc)
            if forbidden:
                log(f"cannot stream the logs of TrainJob {name}: {forbidden[1]} {forbidden[2]} is forbidden")
                return
        if lines or done.wait(poll_s):
            return


def _logs(client: Any, name: str) -> list[str]:
    try:
        return list(client.get_job_logs(name, follow=False))
    except Exception:  # noqa: BLE001 - the failure is reported either way
        return []


def _delete(client: Any, name: str, log: Callable[[str], Any]) -> None:
    """Free the nodes of a job the task gave up on (activeDeadlineSeconds would end it too, later)."""
    try:
        client.delete_job(name)
    except Exception as exc:  # noqa: BLE001 - the timeout is the error to report
        log(f"could not delete TrainJob {name}: {exc}")


def _failure(plan: JobPlan, what: str, tail: Iterable[str]) -> str:
    """The job's name, what happened and its last lines, led by a rank's own error line when node 0 printed one."""
    lines = list(tail)[-TAIL_LINES:]
    errors = [line.split(TASK_ERROR_PREFIX, 1)[1] for line in lines if TASK_ERROR_PREFIX in line]
    what = f"{what}: {errors[0]}" if errors else what
    shown = "\n".join(f"  | {line}" for line in lines) if lines else "  (no log lines)"
    return (
        f"TrainJob {plan.namespace}/{plan.name} {what}; last {len(lines)} log line(s) of node-0 "
        f"(all nodes: kubectl logs -n {plan.namespace} -l jobset.sigs.k8s.io/jobset-name={plan.name}):\n{shown}"
    )


def _api_cause(exc: BaseException) -> Any:
    """The kubernetes ApiException under the SDK's RuntimeError, if there is one."""
    from kubernetes.client import ApiException

    seen = exc
    while seen is not None:
        if isinstance(seen, ApiException):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _forbidden(exc: BaseException) -> tuple[str, str, str] | None:
    """(user, verb, resource.group) of a 403 under `exc`, from the API's own message."""
    api = _api_cause(exc)
    if api is None or api.status != 403:
        return None
    try:
        message = json.loads(api.body or "{}").get("message", "")
    except (TypeError, ValueError):
        message = str(api.body or "")
    found = _FORBIDDEN.search(message)
    if not found:
        return "", "", message or "forbidden"
    resource = found["resource"] + (f".{found['group']}" if found["group"] else "")
    return found["user"], found["verb"], resource


def _api_error(exc: BaseException, plan: JobPlan, verb: str) -> TrainJobError:
    """One line: for a 403 the service account and the verb it lacks, else what the API or the SDK said."""
    forbidden = _forbidden(exc)
    where = f"namespace {plan.namespace or '(default)'}"
    if forbidden:
        user, denied, resource = forbidden
        account = (
            user.removeprefix("system:serviceaccount:").replace(":", "/", 1)
            if user
            else (plan.service_account or "of this pod")
        )
        if not denied:
            denied, resource = verb, "trainjobs.trainer.kubeflow.org"
        return TrainJobError(
            f"service account {account} may not {denied} {resource} in {where} (TrainJob of {plan.stage}): {RBAC_HINT}"
        )
    api = _api_cause(exc)
    detail = f"{exc}" + (f": HTTP {api.status} {api.reason}" if api is not None else "")
    if api is not None and api.status == 404:
        detail += " (are the Kubeflow Trainer operator and its torch-distributed runtime installed?)"
    return TrainJobError(f"TrainJob {plan.name} of {plan.stage} in {where}: {detail}")
