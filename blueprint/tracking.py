"""Per-step metrics while a stage trains: TensorBoard event files always, MLflow when the user has one.

Event files go under the stage's output (`tensorboard/<role>/`), committed with it, and are copied to the output's
location as training goes (`sync_seconds`), so `tensorboard --logdir` on the artifact root shows a stage that is
still running. MLflow gets the same scalars from a background thread: a tracking server that is down or slow costs
one warning line and never the training (a bounded queue, bounded waits, tracking off after the first failure).
"""

from __future__ import annotations

import os
import queue
import re
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from blueprint.stages import registry

TENSORBOARD_DIR = "tensorboard"
RUN_ENV = "BLUEPRINT_PIPELINE_RUN"  # the pipeline run a stage belongs to, for its MLflow tags
EXPERIMENT = "blueprint"  # the MLflow experiment when neither KFP's run nor MLFLOW_EXPERIMENT_NAME names one
# the MLflow client retries for minutes by default; a stage's run should not wait that long on a dead server
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(uri: str) -> str:
    """`https://user:secret@host/x` -> `https://***@host/x`: a tracking URI as it may appear in a line."""
    return _USERINFO.sub("***@", uri)


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite-or-not numbers of `values` as floats (bools, strings and None left out); '/' keeps TensorBoard's
    grouping, MLflow accepts it too."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[str(key)] = float(value)
    return out


def flat_params(settings: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Settings as MLflow params: nested keys joined by '.', values as text (cut to MLflow's 6000 characters)."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def warn(message: str) -> None:
    print(f"tracking: {message}", file=sys.stderr, flush=True)


class MlflowSink:
    """Sends (role, step, scalars) to an MLflow run of this stage from a daemon thread.

    The run is nested under `MLFLOW_RUN_ID` (the task's run when Kubeflow Pipelines' MLflow integration is on) and
    tagged with the stage, the output's key and the pipeline run. The first failure prints one line naming the
    (redacted) server and ends tracking; `close` waits at most `close_seconds`.
    """

    def __init__(
        self, uri: str, run_name: str, params: Mapping[str, str], tags: Mapping[str, str], max_queue: int = 100_000
    ):
        self.uri, self.run_name, self.params, self.tags = uri, run_name, dict(params), dict(tags)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.failed = threading.Event()
        self.dropped = 0
        self.run_id: str | None = None
        self.thread = threading.Thread(target=self._work, name="blueprint-mlflow", daemon=True)
        self.thread.start()

    def log(self, key_prefix: str, step: int, values: Mapping[str, float]) -> None:
        if self.failed.is_set():
            return
        stamp = int(time.time() * 1000)
        try:
            self.queue.put_nowait([(f"{key_prefix}/{k}", v, stamp, step) for k, v in values.items()])
        except queue.Full:
            self.dropped += 1

    def close(self, status: str = "FINISHED", close_seconds: float = 15.0) -> None:
        deadline = time.monotonic() + close_seconds
        while not self.failed.is_set() and self.thread.is_alive():
            try:  # waits only while the queue is full and the thread drains it
                self.queue.put((None, status), timeout=0.5)
                break
            except queue.Full:
                if time.monotonic() > deadline:
                    break
        self.thread.join(max(deadline - time.monotonic(), 0.0))
        if self.thread.is_alive() and not self.failed.is_set():
            warn(
                f"MLflow server {redact(self.uri)} did not take the last points within {close_seconds:.0f} s; "
                "training is unaffected"
            )
        elif self.dropped and not self.failed.is_set():
            warn(f"{self.dropped} step(s) not sent to MLflow (the queue was full)")

    def _work(self) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient

            for name, value in CLIENT_DEFAULTS.items():
                os.environ.setdefault(name, value)
            # the client prints the run's URL built from the tracking URI, credentials included: never
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
            client = MlflowClient(tracking_uri=self.uri)
            parent = os.environ.get("MLFLOW_RUN_ID")
            tags = dict(self.tags)
            if parent:
                experiment_id = client.get_run(parent).info.experiment_id
                tags["mlflow.parentRunId"] = parent
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
                found = client.get_experiment_by_name(name)
                experiment_id = found.experiment_id if found else client.create_experiment(name)
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            print(f"tracking: MLflow run {self.run_id} ({self.run_name}) on {redact(self.uri)}", flush=True)
            params = [Param(k, v) for k, v in self.params.items()]
            for i in range(0, len(params), 100):
                client.log_batch(self.run_id, params=params[i : i + 100])
            while True:
                item = self.queue.get()
                if isinstance(item, tuple):  # (None, status): the stage ended
                    client.set_terminated(self.run_id, item[1])
                    return
                batch = [Metric(k, v, t, s) for k, v, t, s in item]
                while not self.queue.empty() and len(batch) < 900:  # one request for what piled up
                    more = self.queue.queue[0]
                    if isinstance(more, tuple):
                        break
                    batch += [Metric(k, v, t, s) for k, v, t, s in self.queue.get()]
                client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:  # noqa: BLE001 - any failure of tracking is one line, never the training's
            self.failed.set()
            reason = redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
            warn(
                f"MLflow server {redact(self.uri)} failed ({type(exc).__name__}: {reason}); training goes on without it"
            )


class Tracker:
    """One stage's per-step scalars: `log(role, step, values)` after each step, `close()` at the end.

    Only the main process tracks (the others' calls are ignored), so N ranks write one set of curves.
    """

    def __init__(  # noqa: PLR0913 - where curves go, keyword-only with defaults
        self,
        stage: str,
        out_dir: Path,
        *,
        settings: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        live_uri: str | None = None,
        sync_seconds: float = 30.0,
        mlflow_uri: str | None = None,
        enabled: bool = True,
        committed_uri: str | None = None,
    ):
        self.stage, self.enabled = stage, enabled
        self.logdir = Path(out_dir) / TENSORBOARD_DIR
        self.live_uri, self.sync_seconds, self.last_sync = live_uri, sync_seconds, time.monotonic()
        self.committed_uri = committed_uri  # the output's manifest: once it exists, the live copy stops
        self.writers: dict[str, Any] = {}
        self.points = 0
        self.mlflow = None
        if enabled and mlflow_uri:
            self.mlflow = MlflowSink(
                mlflow_uri, stage, flat_params(settings or {}), {"blueprint.stage": stage, **(tags or {})}
            )

    def writer(self, role: str):
        if role not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            self.writers[role] = SummaryWriter(log_dir=str(self.logdir / role), flush_secs=10)
        return self.writers[role]

    def log(self, role: str, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        numbers = scalars(values)
        writer = self.writer(role)
        for key, value in numbers.items():
            writer.add_scalar(key, value, global_step=step)
        self.points += 1
        if self.mlflow is not None:
            self.mlflow.log(role, step, numbers)
        if self.live_uri and time.monotonic() - self.last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Copy the event files to the output's location, where `tensorboard --logdir` finds them mid-stage; never
        into an output already committed there (another writer of the same key, or the one a --force replaces)."""
        from blueprint.store import storage

        for writer in self.writers.values():
            writer.flush()
        self.last_sync = time.monotonic()
        try:
            if self.committed_uri and storage.exists(self.committed_uri):
                self.live_uri = None  # its manifest lists its own event files: leave them as they are
            elif self.logdir.exists():
                storage.upload_dir(self.logdir, self.live_uri)
        except Exception as exc:  # noqa: BLE001 - curves are a view; the committed output holds them anyway
            warn(
                f"could not copy the TensorBoard files to {self.live_uri} ({type(exc).__name__}); they are "
                "committed with the output"
            )
            self.live_uri = None

    def close(self, failed: bool = False) -> None:
        for writer in self.writers.values():
            writer.close()
        if self.mlflow is not None:
            self.mlflow.close("FAILED" if failed else "FINISHED")

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


def stage_tracker(stage: str, out_dir: Path, settings: Mapping[str, Any], out_uri: str | None) -> Tracker:
    """The tracker a training stage opens: MLflow when MLFLOW_TRACKING_URI is set, main process only, tagged with
    the output's key and (under Kubeflow) the pipeline run."""
    from blueprint import distributed
    from blueprint.store import artifacts, storage

    tags = {}
    if out_uri:
        tags["blueprint.output_key"] = storage.normalize(out_uri).rstrip("/").rsplit("/", 1)[-1]
    run = os.environ.get(RUN_ENV)
    if run:
        tags["blueprint.pipeline_run"] = run
    return Tracker(
        stage,
        out_dir,
        settings=settings,
        tags=tags,
        live_uri=storage.join(out_uri, TENSORBOARD_DIR) if out_uri else None,
        committed_uri=artifacts.manifest_uri(out_uri) if out_uri else None,
        mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI") or None,
        enabled=distributed.is_main(),
    )


def run_name(stage: str, manifest: Mapping[str, Any]) -> str:
    """A training output's name in a combined view: `warmup`, `ppo-round-2`."""
    index = (manifest.get("config") or {}).get("round_index")
    return f"{stage}-{index}" if stage == registry.PPO_ROUND and index is not None else stage


def gather_logdir(root: str, into: Path, run: str | None = None) -> dict[str, str]:
    """One TensorBoard logdir for a pipeline run's training stages, side by side: `into/<task>/<role>` links to
    (or, on S3, a copy of) each output's event files. `run` names a run record (default: the newest); the outputs
    are those it reached through their inputs. Returns {task/role: where the files came from}."""
    from blueprint.errors import InputError
    from blueprint.store import artifacts, retention, runs, storage

    root = storage.normalize(root)
    records = runs.list_records(root)
    record = next((r for r in records if r.get("run") == run), None) if run else (records[-1] if records else None)
    if record is None:
        raise InputError(
            f"no run record {'named ' + repr(run) + ' ' if run else ''}under {root}/{runs.RUNS_DIR}: "
            "a pipeline run writes one when it reaches its gate"
        )
    outputs = {artifacts.portable_name(o["uri"]): o for o in artifacts.cached_outputs(root)}
    used = retention.reachable(list(record["outputs"].values()), outputs)
    into.mkdir(parents=True, exist_ok=True)
    found: dict[str, str] = {}
    for ref in sorted(used):
        uri = outputs[ref]["uri"]
        manifest = artifacts.read_manifest(uri, verify="sizes")
        roles = sorted(
            {
                rel.split("/")[1]
                for rel in manifest.get("files", {})
                if rel.startswith(f"{TENSORBOARD_DIR}/") and rel.count("/") >= 2
            }
        )
        for role in roles:
            name = f"{run_name(manifest['stage'], manifest)}/{role}"
            source = storage.join(uri, TENSORBOARD_DIR, role)
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                import shutil

                target.unlink() if target.is_symlink() else shutil.rmtree(target)
            if storage.is_s3(source):
                storage.download_dir(source, target)
            else:
                target.symlink_to(storage.local_path(source), target_is_directory=True)
            found[name] = source
    return found
