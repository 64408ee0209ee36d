"""Retention: delete the stage outputs that neither a promoted model nor one of the last K runs can reach.

Outputs are content-addressed and shared, so "old" does not mean "unused": a bucket lifecycle rule would delete
what the cache and warm start still point to. Reachability decides instead. The roots are the outputs named by
the last K run records and by every pointer in each promoted model's history; from them, the manifests' inputs
lead to everything those runs used (adapters -> the round before -> warmup -> shards and base; evaluation ->
previous evaluation). A running pipeline has no run record yet, so an output created or used (`_USED.json`, stamped
at every cache hit and stage input) within the grace period is a root too. What is left is garbage. Each prefix
loses its manifest first and its files after: an interrupted gc leaves prefixes that look incomplete (a prefix
without a manifest is partial), never ones that look complete but are not. (Files first would leave a manifest
naming missing files: an output that looks committed and fails as damaged.) Partial prefixes past the grace period
go too, each under its commit lock, so no writer starts on one meanwhile and a live writer's is never touched.
Outputs are matched by `stage/key`, so a copied root keeps what its pointers and records reach.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from typing import Any

from blueprint.errors import InputError
from blueprint.stages import registry
from blueprint.store import artifacts, commit_lock, promotion, runs, storage

POINTER_FIELDS = ("models", "evaluation", "adapters", "base", "coder_base", "shards", registry.GATE)


@dataclasses.dataclass
class Collection:
    """What a gc would delete (or deleted), and why the rest stays."""

    doomed: list[dict[str, Any]]  # committed outputs: stage, key, uri, bytes, created
    records: list[str]  # run records beyond the last K
    kept: int  # outputs reachable from a root
    young: int  # unreachable, but used inside the grace period (or what such an output reads)
    partial: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # prefixes without a manifest, no lock
    since: dt.datetime | None = None  # an output used after this is spared, even when a run took it after the plan

    @property
    def bytes(self) -> int:
        return sum(o["bytes"] for o in self.doomed + self.partial)


def _key(uri: str) -> str:
    """An output's identity within any root: `stage/key` (a copied root keeps its outputs reachable)."""
    return artifacts.portable_name(storage.normalize(uri))


def promoted_roots(root: str) -> list[str]:
    """Every URI a promoted pointer (current or replaced) names."""
    uris = []
    for rel in storage.list_files(storage.join(root, promotion.POINTER_DIR)):
        if rel.endswith(".json") and "/" not in rel:
            pointer, _ = promotion.read_pointer(root, rel[: -len(".json")])
            for entry in promotion.history(pointer):
                uris += [entry[f] for f in POINTER_FIELDS if entry.get(f)]
    return uris


def reachable(roots: list[str], outputs: dict[str, dict[str, Any]]) -> set[str]:
    """The committed outputs (keys of `outputs`) reachable from `roots` through their manifests' inputs."""
    seen: set[str] = set()
    todo = [_key(u) for u in roots if isinstance(u, str) and u]
    while todo:
        ref = todo.pop()
        if ref in seen or ref not in outputs:
            continue
        seen.add(ref)
        manifest = storage.read_json(artifacts.manifest_uri(outputs[ref]["uri"]))
        todo += [_key(u) for u in manifest.get("inputs", {}).values() if isinstance(u, str)]
    return seen


def _stamp(value: Any) -> dt.datetime | None:
    """A manifest's `created` or a file's time as an aware datetime; one without a zone is UTC (as BluePrint
    writes them), None when it is no time at all."""
    if isinstance(value, dt.datetime):
        stamp = value
    else:
        try:
            stamp = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=dt.UTC)


def _age_seconds(now: dt.datetime, *times: Any) -> float:
    """Seconds since the newest of `times` (creation, last use); 0 when none is a time: unknown age is young."""
    stamps = [s for s in map(_stamp, times) if s is not None]
    return (now - max(stamps)).total_seconds() if stamps else 0.0


def _ours(output: dict[str, Any]) -> bool:
    """A stage's output (not a run record, not the promoted pointer)."""
    return output["stage"] not in (runs.RUNS_DIR, promotion.POINTER_DIR)


def _unlocked(uri: str) -> bool:
    """Whether no live writer holds the commit lock of `uri` (a dead one's does not count)."""
    holder = commit_lock.read_holder(commit_lock.lock_uri(uri))
    return holder is None or commit_lock.holder_is_dead(holder, time.time())


def plan(root: str, keep_runs: int, grace_seconds: float, now: dt.datetime | None = None) -> Collection:
    """What `collect` would delete under `root`: nothing is touched here."""
    root = storage.normalize(root)
    records = runs.list_records(root)
    if not records:
        raise InputError(
            f"{storage.join(root, runs.RUNS_DIR)} holds no run records: gc cannot tell what a run still "
            "uses, so it deletes nothing (every pipeline run writes one at its gate)"
        )
    now = now or dt.datetime.now(dt.UTC)
    kept_records = records[-keep_runs:] if keep_runs > 0 else []
    roots = [u for r in kept_records for u in r["outputs"].values()] + promoted_roots(root)
    files = storage.list_file_times(root)
    outputs = {_key(o["uri"]): o for o in artifacts.cached_outputs(root, files) if _ours(o)}
    keep = reachable(roots, outputs)
    # an output used inside the grace period belongs to a run that may still be going: it and all it reads stay
    recent = [o["uri"] for o in outputs.values() if _age_seconds(now, o["created"], o["used"]) <= grace_seconds]
    live = reachable(recent, outputs) - keep
    doomed = [o for k, o in outputs.items() if k not in keep and k not in live]
    stale = [
        r["uri"]
        for r in records[: len(records) - len(kept_records)]
        if _age_seconds(now, r.get("created", "")) > grace_seconds
    ]
    partial = [
        p
        for p in partial_outputs(root, files)
        if _ours(p) and _age_seconds(now, p["changed"]) > grace_seconds and _unlocked(p["uri"])
    ]
    return Collection(
        doomed=sorted(doomed, key=lambda o: o["uri"]),
        records=stale,
        kept=len(keep),
        young=len(live),
        partial=partial,
        since=now - dt.timedelta(seconds=grace_seconds),
    )


def used_since(uri: str, since: dt.datetime) -> bool:
    """Whether the output `uri` was stamped in use after `since` (a run took it after gc's plan)."""
    stamp = storage.join(uri, artifacts.USED_NAME)
    if not storage.exists(stamp):
        return False
    try:
        used = _stamp(storage.read_json(stamp).get("used"))
    except (storage.StorageError, AttributeError):
        return True  # a stamp being written: in use
    return used is None or used > since


def delete_output(uri: str) -> None:
    """Delete one committed output: its manifest first (from then on it reads as partial), then every file."""
    storage.delete_file(artifacts.manifest_uri(uri))
    for rel in storage.list_files(uri):
        storage.delete_file(storage.join(uri, rel))
    storage.delete_prefix(uri)  # what is left: empty folders


def delete_partial(uri: str) -> bool:
    """Delete one partial output under its commit lock, so no writer starts on it meanwhile; False (nothing
    deleted) when a live writer holds the lock or it was committed since the plan."""
    lock, me = commit_lock.lock_uri(uri), commit_lock.writer_identity()
    try:
        commit_lock.acquire(lock, me, wait_seconds=0)
    except commit_lock.LockTimeout:
        return False
    try:
        if storage.exists(artifacts.manifest_uri(uri)):
            return False
        storage.delete_prefix(uri)
        return True
    finally:
        if (commit_lock.read_holder(lock) or {}).get("writer") == me["writer"]:
            commit_lock.delete_object(lock)


def collect(found: Collection, progress: Any = None) -> None:
    """Delete what `plan` found: the outputs (but one a run took since), the partial prefixes, then the run records
    that named them."""
    for done, output in enumerate(found.doomed, 1):
        if found.since is not None and used_since(output["uri"], found.since):
            continue
        delete_output(output["uri"])
        if progress is not None:
            progress(done, output)
    for prefix in found.partial:
        delete_partial(prefix["uri"])
    for uri in found.records:
        storage.delete_file(uri)


CONTENT_KEY = re.compile(r"^[0-9a-f]{16}$")  # what `stage_key` makes


def partial_outputs(root: str, files: dict[str, tuple] | None = None) -> list[dict[str, Any]]:
    """Every partial output under `root` (files, no manifest: a failed or killed commit, an interrupted gc):
    stage, key, uri, bytes, changed (its newest file's time). Only a content-addressed prefix, or one beside
    committed outputs of its stage folder, counts: other files a user keeps under the root are not ours."""
    files = storage.list_file_times(root) if files is None else files
    prefixes: dict[tuple[str, str], list[tuple[int, Any]]] = {}
    for rel, meta in files.items():
        parts = rel.split("/")
        if len(parts) >= 3:
            prefixes.setdefault((parts[0], parts[1]), []).append(("/".join(parts[2:]), *meta))
    stages = {stage for (stage, _), listed in prefixes.items() if any(n == artifacts.MANIFEST_NAME for n, *_ in listed)}
    rows = []
    for (stage, key), listed in sorted(prefixes.items()):
        committed = any(
            n.split("/")[-1] == artifacts.MANIFEST_NAME for n, *_ in listed
        )  # here, or an output nested in it
        if committed or not (stage in stages or CONTENT_KEY.match(key)):
            continue
        changed = max((t for _, _, t in listed if t is not None), default=None)
        rows.append(
            {
                "stage": stage,
                "key": key,
                "uri": storage.join(root, stage, key),
                "bytes": sum(size for _, size, _ in listed),
                "changed": changed,
            }
        )
    return rows
