"""A fake Kubernetes API server with the Kubeflow Trainer subset the `kubeflow` SDK (0.5) uses: the real
TrainerClient and kubernetes client talk to it over loopback HTTP through a kubeconfig.

Why a server and not a mocked client: the SDK's own requests, (de)serialisation and error wrapping run, so a test
checks what a cluster would see (paths, the TrainJob body, label selectors, the log stream) and what the SDK makes
of a 403 or a Failed condition. It keeps the TrainJobs it was sent; each job ends as `outcome` says ("Complete",
"Failed", or None: it runs forever) after `polls` reads of it, and node 0's pod logs `log_lines`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
JOB = re.compile(rf"^{TRAINER}/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
RUNTIME_IMAGE = "pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, message: str) -> dict:
    """A Kubernetes Status object, as the API server answers an error."""
    reason = {403: "Forbidden", 404: "NotFound", 409: "AlreadyExists"}.get(code, "Invalid")
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def forbidden(user: str, verb: str, resource: str, namespace: str) -> dict:
    return status(
        403,
        f'{resource}.trainer.kubeflow.org is forbidden: User "{user}" cannot {verb} resource '
        f'"{resource}" in API group "trainer.kubeflow.org" in the namespace "{namespace}"',
    )


def cluster_runtime() -> dict:
    """The torch-distributed ClusterTrainingRuntime as the Trainer's manifests install it (the fields read)."""
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "ClusterTrainingRuntime",
        "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": "node",
                            "template": {
                                "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                "spec": {
                                    "template": {
                                        "spec": {
                                            "containers": [
                                                {"name": "node", "image": RUNTIME_IMAGE, "command": ["/bin/bash", "-c"]}
                                            ]
                                        }
                                    }
                                },
                            },
                        }
                    ]
                }
            },
        },
    }


class FakeKube(ThreadingHTTPServer):
    """`fail` maps "METHOD /path" to (status code, Status body) to answer instead of the normal reply."""

    def __init__(self, namespace: str = "team-a"):
        self.namespace = namespace
        self.outcome: str | None = "Complete"
        self.polls = 2
        self.log_lines: list[str] = []
        self.fail: dict[str, tuple[int, dict]] = {}
        self.requests: list[tuple[str, str]] = []
        self.jobs: dict[str, dict] = {}
        self.reads: dict[str, int] = {}
        self.deleted: list[str] = []
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def kubeconfig(self, directory: Path) -> Path:
        path = directory / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace}}
                    ],
                }
            )
        )
        return path

    def phase(self, name: str) -> str:
        """Node 0's pod phase: Running until the job ends."""
        done = self.outcome and self.reads.get(name, 0) >= self.polls
        return {"Complete": "Succeeded", "Failed": "Failed"}[self.outcome] if done else "Running"

    def job(self, name: str) -> dict:
        with self._lock:
            self.reads[name] = self.reads.get(name, 0) + 1
            body = json.loads(json.dumps(self.jobs[name]))
        if self.outcome and self.reads[name] > self.polls:
            body["status"] = {
                "conditions": [
                    {
                        "type": self.outcome,
                        "status": "True",
                        "reason": self.outcome,
                        "message": f"TrainJob is {self.outcome.lower()}",
                        "lastTransitionTime": _now(),
                    }
                ]
            }
        return body

    def pods(self, name: str) -> dict:
        pod = {
            "metadata": {
                "name": f"{name}-node-0-0-x7k2p",
                "namespace": self.namespace,
                "creationTimestamp": _now(),
                "labels": {
                    "jobset.sigs.k8s.io/jobset-name": name,
                    "jobset.sigs.k8s.io/replicatedjob-name": "node",
                    "batch.kubernetes.io/job-completion-index": "0",
                },
            },
            "spec": {"containers": [{"name": "node", "image": RUNTIME_IMAGE}]},
            "status": {"phase": self.phase(name)},
        }
        return {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": [pod] if name in self.jobs else []}


class _Handler(BaseHTTPRequestHandler):
    server: FakeKube

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _send(self, code: int, body: dict | str) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, method: str) -> None:
        url = urlparse(self.path)
        self.server.requests.append((method, url.path))
        failure = self.server.fail.get(f"{method} {url.path}")
        if failure:
            return self._send(*failure)
        body = None
        if method == "POST":
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self._send(*self._route(method, url.path, parse_qs(url.query), body))

    def _route(self, method: str, path: str, query: dict, body: dict | None) -> tuple[int, dict | str]:
        s = self.server
        if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return 200, {
                "kind": "ConfigMap",
                "apiVersion": "v1",
                "metadata": {"name": "kubeflow-trainer-public"},
                "data": {"kubeflow_trainer_version": "2.1.0"},
            }
        if path == f"{TRAINER}/clustertrainingruntimes/torch-distributed":
            return 200, cluster_runtime()
        if path.startswith(f"{TRAINER}/namespaces/") and "/trainingruntimes/" in path:
            return 404, status(404, "trainingruntimes.trainer.kubeflow.org not found")
        if (m := JOB.match(path)) and method == "POST":
            name = body["metadata"]["name"]
            body["metadata"].update(namespace=m.group(1), creationTimestamp=_now())
            s.jobs[name] = body
            return 201, body
        if (m := JOB.match(path)) and m.group(2) in s.jobs:
            if method == "DELETE":
                s.deleted.append(m.group(2))
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
            return 200, s.job(m.group(2))
        if PODS.match(path):
            selector = query.get("labelSelector", [""])[0]
            found = re.search(r"jobset-name=([^,]+)", selector)
            return 200, s.pods(found.group(1) if found else "")
        if POD_LOG.match(path):
            return 200, "".join(f"{line}\n" for line in s.log_lines)
        return 404, status(404, f"{path} not found")

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_DELETE(self) -> None:
        self._answer("DELETE")
