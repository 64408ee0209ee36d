"""Retention: delete the stage outputs that neither a promoted model nor one of the last K runs can reach.

Outputs are content-addressed and shared, so "old" does not mean "unused": a bucket lifecycle rule would delete
what the cache and warm start still point to. Reachability decides instead. The roots are the outputs named by
the last K run records and by every pointer in each promoted model's history; from them, the manifests' inputs
lead to everything those runs used (adapters -> the round before -> warmup -> shards and base; evaluation ->
previous evaluation). What is left, and older than the grace period (a running pipeline's newest outputs have no
run record yet), is garbage. Each prefix loses its manifest first and its files after: an interrupted gc leaves
prefixes that look incomplete (a prefix without a manifest is partial, cleared and rewritten by the next run that
needs it), never ones that look complete but are not. (Files first would leave a manifest naming missing files:
an output that looks committed and fails as damaged.) Outputs are matched by `stage/key`, so a copied root keeps
what its pointers and records reach.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from blueprint.errors import InputError
from blueprint.store import artifacts, promotion, runs, storage

POINTER_FIELDS = ("models", "evaluation", "adapters", "base", "coder_base", "shards", "gate")


@dataclasses.dataclass
class Collection:
    """What a gc would delete (or deleted), and why the rest stays."""

    doomed: list[dict[str, Any]]        # committed outputs: stage, key, uri, bytes, created
    records: list[str]                  # run records beyond the last K
    kept: int                           # outputs reachable from a root
    young: int                          # unreachable, but inside the grace period

    @property
    def bytes(self) -> int:
        return sum(o["bytes"] for o in self.doomed)


def _key(uri: str) -> str:
    """An output's identity within any root: `stage/key` (a copied root keeps its outputs reachable)."""
    return artifacts.reference(storage.normalize(uri))


def promoted_roots(root: str) -> list[str]:
    """Every URI a promoted pointer (current or replaced) names."""
    uris = []
    for rel in storage.list_files(storage.join(root, promotion.POINTER_DIR)):
        if rel.endswith(".json") and "/" not in rel:
            pointer, _ = promotion.read_pointer(root, rel[:-len(".json")])
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


def _age_seconds(created: str, now: dt.datetime) -> float:
    try:
        stamp = dt.datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return 0.0  # unknown age: treated as young, never deleted
    return (now - stamp).total_seconds()


def plan(root: str, keep_runs: int, grace_seconds: float, now: dt.datetime | None = None) -> Collection:
    """What `collect` would delete under `root`: nothing is touched here."""
    root = storage.normalize(root)
    records = runs.list_records(root)
    if not records:
        raise InputError(f"{storage.join(root, runs.RUNS_DIR)} holds no run records: gc cannot tell what a run still "
                         "uses, so it deletes nothing (every pipeline run writes one at its gate)")
    now = now or dt.datetime.now(dt.timezone.utc)
    kept_records = records[-keep_runs:] if keep_runs > 0 else []
    roots = [u for r in kept_records for u in r["outputs"].values()] + promoted_roots(root)
    outputs = {_key(o["uri"]): o for o in artifacts.cached_outputs(root) if o["stage"] not in ("runs", "promoted")}
    keep = reachable(roots, outputs)
    unreached = [o for k, o in outputs.items() if k not in keep]
    doomed = [o for o in unreached if _age_seconds(str(o["created"]), now) > grace_seconds]
    stale = [r["uri"] for r in records[:len(records) - len(kept_records)]
             if _age_seconds(str(r.get("created", "")), now) > grace_seconds]
    return Collection(doomed=sorted(doomed, key=lambda o: o["uri"]), records=stale, kept=len(keep),
                      young=len(unreached) - len(doomed))


def delete_output(uri: str) -> None:
    """Delete one committed output: its manifest first (from then on it reads as partial), then every file."""
    storage.delete_file(artifacts.manifest_uri(uri))
    for rel in storage.list_files(uri):
        storage.delete_file(storage.join(uri, rel))
    storage.delete_prefix(uri)  # what is left: empty folders


def collect(found: Collection, progress: Any = None) -> None:
    """Delete what `plan` found: the outputs, then the run records that named them."""
    for done, output in enumerate(found.doomed, 1):
        delete_output(output["uri"])
        if progress is not None:
            progress(done, output)
    for uri in found.records:
        storage.delete_file(uri)
