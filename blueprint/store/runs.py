"""Run records: `{artifact_root}/runs/{run}.json`, the outputs a pipeline run ended with.

Stage outputs are content-addressed and shared between runs, so nothing in the store says which runs still use
an output. A record names a run's final outputs; their manifests name their inputs, so everything the run used is
reachable from it (`blueprint.store.retention`).
"""

from __future__ import annotations

import re
import time
from typing import Any

from blueprint.errors import InputError
from blueprint.store import storage

RUNS_DIR = "runs"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def record_uri(root: str, run: str) -> str:
    if not RUN_ID.match(run):
        raise InputError(f"run id {run!r}: use letters, digits, '.', '_' or '-'")
    return storage.join(storage.normalize(root), RUNS_DIR, f"{run}.json")


def write_record(root: str, run: str, outputs: dict[str, str], extra: dict[str, Any] | None = None) -> str:
    """Record run `run`'s final outputs ({name: URI}); returns the record's URI."""
    uri = record_uri(root, run)
    storage.write_json(
        uri,
        {
            "run": run,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "outputs": {k: v for k, v in outputs.items() if v},
            **(extra or {}),
        },
    )
    return uri


def list_records(root: str) -> list[dict[str, Any]]:
    """Every run record under `root`, oldest first, each with its own `uri`."""
    base = storage.join(storage.normalize(root), RUNS_DIR)
    records = []
    for rel in storage.list_files(base):
        if rel.endswith(".json") and "/" not in rel:
            uri = storage.join(base, rel)
            record = storage.read_json(uri)
            if isinstance(record, dict) and isinstance(record.get("outputs"), dict):
                records.append({**record, "uri": uri})
    return sorted(records, key=lambda r: (str(r.get("created", "")), str(r.get("run", ""))))


def latest_record(root: str, **outputs: str) -> dict[str, Any] | None:
    """The newest run record whose outputs include `outputs` ({name: URI}), or None."""
    want = {k: storage.normalize(v) for k, v in outputs.items()}
    found = [
        r
        for r in list_records(root)
        if all(storage.normalize(str(r["outputs"].get(k, ""))) == v for k, v in want.items())
    ]
    return found[-1] if found else None
