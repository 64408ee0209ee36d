"""A fake Kubeflow Pipelines v2beta1 REST server, shared by the Kubeflow tests: the real kfp.Client talks to it over
loopback HTTP.

Why a server and not a mocked client: the tests then check the wire contract a cluster would see (paths, query
strings, the JSON field names of kfp_server_api's models: recurring_run_id, display_name, trigger.cron_schedule,
status ENABLED/DISABLED, pipeline_version_reference, recurringRuns, next_page_token, ...), and the client's own
(de)serialisation runs. It keeps experiments, recurring runs, pipelines and pipeline versions in memory, so a test
can schedule, list and delete and then look at what remains. Nothing is ever run.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

API = "/apis/v2beta1"
RECURRING_RUN = re.compile(rf"^{API}/recurringruns/([^/:]+)$")
PIPELINE_VERSIONS = re.compile(rf"^{API}/pipelines/([^/]+)/versions$")
PIPELINE_VERSION = re.compile(rf"^{API}/pipelines/([^/]+)/versions/([^/]+)$")


class FakeKFP(ThreadingHTTPServer):
    """Serves the KFP v2beta1 REST endpoints kfp.Client 2.17 calls and records every request.

    `fail` maps "METHOD /path" (or "/path", any method) to the HTTP status to answer instead; tests may change it
    between commands. `gates` maps "METHOD /path" to a threading.Barrier each such request waits at before it is
    answered: two clients racing, made to meet at the same request. State: `experiments`, `recurring_runs`,
    `pipelines`, `versions`, each {id: JSON object}.
    """

    def __init__(self, fail: dict[str, int] | None = None):
        self.requests: list[dict] = []
        self.fail = fail or {}
        self.gates: dict[str, threading.Barrier] = {}
        self.experiments: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, dict] = {}
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def find(self, method: str, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def new_id(self, prefix: str) -> str:
        """exp-1, rr-1, rr-2, pl-1, pv-1, ...: one counter per kind of object, never reused."""
        with self._lock:
            self._counters[prefix] = self._counters.get(prefix, 0) + 1
            return f"{prefix}-{self._counters[prefix]}"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _matches(record: dict, filter_json: str | None) -> bool:
    """The EQUALS predicates of a KFP filter (operation 1 or "EQUALS", stringValue or string_value)."""
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        if predicate.get("operation") not in (1, "EQUALS"):
            raise ValueError(f"the fake implements EQUALS only, got {predicate}")
        key = {"name": "display_name"}.get(predicate["key"], predicate["key"])
        value = predicate.get("stringValue", predicate.get("string_value"))
        if record.get(key) != value:
            return False
    return True


def _page(records: list[dict], query: dict, field: str) -> dict:
    """One page of `records` as the real list endpoints answer: {} when empty, next_page_token while more remain."""
    if not records:
        return {}
    start = int(query.get("page_token", ["0"])[0] or 0)
    size = int(query.get("page_size", ["10"])[0] or 10)
    reply = {field: records[start : start + size], "total_size": len(records)}
    if start + size < len(records):
        reply["next_page_token"] = str(start + size)
    return reply


def _stored_spec(package: bytes):
    """What the API server stores as a version's pipeline_spec: the spec alone, or {pipeline_spec, platform_spec}."""
    docs = [d for d in yaml.safe_load_all(package) if d]
    if len(docs) == 1:
        return docs[0]
    return {"pipeline_spec": docs[0], "platform_spec": docs[1]}


class _Handler(BaseHTTPRequestHandler):
    server: FakeKFP

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        kind = self.headers.get("Content-Type") or ""
        if kind.startswith("multipart/form-data"):
            message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {kind}\r\n\r\n".encode() + raw)
            return {
                "files": {
                    part.get_param("name", header="content-disposition"): (
                        part.get_filename(),
                        part.get_payload(decode=True),
                    )
                    for part in message.iter_parts()
                }
            }
        return json.loads(raw) if raw else None

    def _answer(self, method: str) -> None:
        url = urlparse(self.path)
        query, body = parse_qs(url.query), self._body()
        self.server.requests.append(
            {
                "method": method,
                "path": url.path,
                "query": query,
                "body": body,
                "auth": self.headers.get("Authorization"),
            }
        )
        gate = self.server.gates.get(f"{method} {url.path}")
        if gate is not None:
            gate.wait(timeout=30)
        failing = self.server.fail.get(f"{method} {url.path}", self.server.fail.get(url.path))
        if failing:
            status, reply = failing, {"error": "denied by test", "code": 7, "message": "denied by test"}
        else:
            status, reply = self._route(method, url.path, query, body)
        data = json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, body) -> tuple[int, dict]:
        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if path == f"{API}/experiments":
            return self._experiments(method, query, body)
        if path == f"{API}/recurringruns" or RECURRING_RUN.match(path):
            return self._recurring_runs(method, path, query, body)
        if path.startswith(f"{API}/pipelines"):
            return self._pipelines(method, path, query, body)
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, {
                "run_id": "run-1",
                "display_name": body["display_name"],
                "experiment_id": body["experiment_id"],
            }
        return 404, {"error": f"no route {method} {path}", "code": 5, "message": f"no route {method} {path}"}

    def _experiments(self, method: str, query: dict, body) -> tuple[int, dict]:
        s = self.server
        if method == "GET":
            found = [e for e in s.experiments.values() if _matches(e, query.get("filter", [None])[0])]
            return 200, _page(found, query, "experiments")
        experiment = {
            "experiment_id": s.new_id("exp"),
            "display_name": body["display_name"],
            "namespace": body.get("namespace") or "",
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        s.experiments[experiment["experiment_id"]] = experiment
        return 200, experiment

    def _recurring_runs(self, method: str, path: str, query: dict, body) -> tuple[int, dict]:
        s = self.server
        one = RECURRING_RUN.match(path)
        if one:
            run_id = one.group(1)
            if run_id not in s.recurring_runs:
                return 404, {
                    "error": f"recurring run {run_id} not found",
                    "code": 5,
                    "message": f"recurring run {run_id} not found",
                }
            if method == "DELETE":
                del s.recurring_runs[run_id]
                return 200, {}
            return 200, s.recurring_runs[run_id]
        if method == "GET":
            experiment = query.get("experiment_id", [None])[0]
            found = [
                r
                for r in s.recurring_runs.values()
                if _matches(r, query.get("filter", [None])[0]) and experiment in (None, r["experiment_id"])
            ]
            # the one camelCase field of the API: recurring_run.proto declares `repeated RecurringRun recurringRuns`
            return 200, _page(found, query, "recurringRuns")
        reference = body.get("pipeline_version_reference")
        if reference and reference.get("pipeline_version_id") not in s.versions:
            return 404, {"error": "pipeline version not found", "code": 5, "message": "pipeline version not found"}
        run = {
            **body,
            "recurring_run_id": s.new_id("rr"),
            "created_at": _now(),
            "updated_at": _now(),
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
            "namespace": "",
        }
        s.recurring_runs[run["recurring_run_id"]] = run
        return 200, run

    def _pipelines(self, method: str, path: str, query: dict, body) -> tuple[int, dict]:
        s = self.server
        if (method, path) == ("GET", f"{API}/pipelines"):
            found = [p for p in s.pipelines.values() if _matches(p, query.get("filter", [None])[0])]
            return 200, _page(found, query, "pipelines")
        if (method, path) == ("POST", f"{API}/pipelines/upload"):
            name = query["name"][0]
            pipeline = {
                "pipeline_id": s.new_id("pl"),
                "display_name": name,
                "name": name,
                "created_at": _now(),
                "namespace": query.get("namespace", [""])[0],
            }
            s.pipelines[pipeline["pipeline_id"]] = pipeline
            self._add_version(pipeline["pipeline_id"], name, body)
            return 200, pipeline
        if (method, path) == ("POST", f"{API}/pipelines/upload_version"):
            pipeline_id = query["pipelineid"][0]
            if pipeline_id not in s.pipelines:
                return 404, {"error": "pipeline not found", "code": 5, "message": "pipeline not found"}
            return 200, self._add_version(pipeline_id, query["name"][0], body)
        versions, version = PIPELINE_VERSIONS.match(path), PIPELINE_VERSION.match(path)
        if method == "GET" and versions:
            found = [v for v in s.versions.values() if v["pipeline_id"] == versions.group(1)]
            newest_first = query.get("sort_by", [""])[0] == "created_at desc"
            return 200, _page(found[::-1] if newest_first else found, query, "pipeline_versions")
        if method == "GET" and version and s.versions.get(version.group(2), {}).get("pipeline_id") == version.group(1):
            return 200, s.versions[version.group(2)]
        return 404, {"error": f"no pipeline route {method} {path}", "code": 5, "message": "not found"}

    def _add_version(self, pipeline_id: str, name: str, body: dict) -> dict:
        ((_, package),) = body["files"].values()
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": self.server.new_id("pv"),
            "display_name": name,
            "name": name,
            "created_at": _now(),
            "pipeline_spec": _stored_spec(package),
        }
        self.server.versions[version["pipeline_version_id"]] = version
        return version

    def do_GET(self) -> None:
        self._answer("GET")

    def do_POST(self) -> None:
        self._answer("POST")

    def do_DELETE(self) -> None:
        self._answer("DELETE")


@pytest.fixture()
def kfp_server(monkeypatch):
    """`kfp_server(fail=None)` starts a FakeKFP; every one started is shut down when the test ends."""
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "test-token")
    monkeypatch.setattr("kfp.client.client.Client._LOCAL_KFP_CONTEXT", "/nonexistent/kfp/context.json")
    servers = []

    def start(fail: dict[str, int] | None = None) -> FakeKFP:
        server = FakeKFP(fail)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
