"""Stage outputs: content-addressed prefixes committed by writing `_MANIFEST.json` last.

A prefix without a manifest is incomplete: it is never read as an input and is cleared and rewritten on rerun.
A stage whose output manifest exists is a cache hit and returns at once. The key of an output hashes the stage
name, its config, the manifests of its inputs and the package version, so a changed object behind an unchanged
path changes the key (KFP's own cache only sees parameter values). A commit that fails (a full disk, a failed
upload) removes what it wrote. Each cache hit and each stage input is stamped in use (`_USED.json`, beside the
manifest and not listed in it), so gc's grace period counts from an output's last use, not its creation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime as dt
import hashlib
import json
import platform
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from blueprint import distributed
from blueprint.errors import UserError
from blueprint.store import hits_only, storage
from blueprint.version import __version__

MANIFEST_NAME = "_MANIFEST.json"
WRITING_NAME = "_WRITING.json"  # present while a stage writes an explicit output location (not listed in manifests)
USED_NAME = "_USED.json"  # rewritten whenever a run takes the output as a cache hit or an input (not in manifests)
MANIFEST_FORMAT = 1
VIEW_PREFIXES = ("tensorboard/",)  # files that show how a run went (event files with wall times), not its content


class ArtifactError(UserError, RuntimeError):
    """An input artifact is missing, incomplete, tampered with, or of the wrong kind."""


@dataclasses.dataclass(frozen=True)
class StageOutput:
    """Where a stage's committed output lives, its manifest, and whether it came from the cache."""

    uri: str
    manifest: dict[str, Any]
    cached: bool

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in blocks (one helper for the manifests and the model downloads)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_dict(config: Any) -> dict[str, Any]:
    """Settings (anything with `to_dict`), a dataclass or a mapping, as a plain dict."""
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def versions() -> dict[str, str]:
    """Versions that decide what a stage produces (recorded in every manifest)."""
    import importlib.metadata as md

    found = {"blueprint": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "pyarrow", "datasets"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def manifest_uri(uri: str) -> str:
    return storage.join(uri, MANIFEST_NAME)


def read_manifest(uri: str, *, verify: str = "full") -> dict[str, Any]:
    """The manifest of a committed artifact at `uri`, checked against the files actually there.

    verify: "full" (sizes and sha256 of every file), "sizes", or "none". Raises ArtifactError naming the URI when
    the prefix was never committed or a file is missing, resized or altered.
    """
    muri = manifest_uri(uri)
    if not storage.exists(muri):
        what = "holds partial output (no manifest)" if storage.list_files(uri) else "does not exist"
        raise ArtifactError(f"input {uri} {what}: run the stage that produces it first")
    manifest = storage.read_json(muri)
    if verify == "none":
        return manifest
    present = storage.list_files(uri)
    for rel, meta in manifest["files"].items():
        if rel not in present:
            raise ArtifactError(f"input {uri} is damaged: {rel} listed in its manifest is missing")
        if present[rel] != meta["size"]:
            raise ArtifactError(f"input {uri} is damaged: {rel} has {present[rel]} bytes, manifest says {meta['size']}")
    if verify == "full":
        for rel in manifest["files"]:
            verify_file(uri, rel, manifest)
    return manifest


def _listed(uri: str, rel: str, manifest: dict[str, Any]) -> dict[str, Any]:
    meta = manifest.get("files", {}).get(rel)
    if meta is None:
        raise ArtifactError(f"input {uri} has no {rel} in its manifest")
    return meta


def _check(uri: str, rel: str, meta: dict[str, Any], size: int, sha256: str) -> None:
    """A same-size bit flip fails here, naming the file and the input, instead of being trained on."""
    if size != meta["size"] or sha256 != meta["sha256"]:
        raise ArtifactError(f"input {uri} is damaged: {rel} does not match its sha256 in the manifest")


def read_verified(uri: str, rel: str, manifest: dict[str, Any]) -> bytes:
    """The bytes of `rel` in the committed artifact `uri`, checked against the manifest's sha256."""
    meta = _listed(uri, rel, manifest)
    data = storage.read_bytes(storage.join(uri, rel))
    _check(uri, rel, meta, len(data), hashlib.sha256(data).hexdigest())
    return data


def verify_file(uri: str, rel: str, manifest: dict[str, Any], chunk_bytes: int = 8 << 20) -> None:
    """`rel` streamed through sha256 in chunks and checked against the manifest (memory: one chunk, not the
    file), for files that are then read in parts (a shard's row groups)."""
    import pyarrow as pa

    meta = _listed(uri, rel, manifest)
    fs, path = storage.filesystem(storage.join(uri, rel))
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(chunk_bytes):
                digest.update(chunk)
                size += len(chunk)
    except (OSError, pa.ArrowException) as exc:
        raise storage.StorageError(f"cannot read {storage.join(uri, rel)}: {exc}") from None
    _check(uri, rel, meta, size, digest.hexdigest())


# Content only: not the input URIs (`inputs`), which change when a root is copied; their manifests' digests do not.
IDENTITY_FIELDS = ("stage", "key", "config", "input_manifests", "files")


def portable_name(uri: str) -> str:
    """How an output names another artifact in its own files: `stage/key`, never the root (a root copied to
    another bucket keeps the same bytes, so every cache hit holds)."""
    return "/".join(str(uri).rstrip("/").split("/")[-2:])


def manifest_digest(uri: str) -> str:
    """What an input contributes to a consumer's cache key: the content part of its manifest (how it was made and
    the sha256 of every file), not when, where or how fast. A recomputed output with the same bytes keeps its
    identity, so its consumers stay cache hits; any changed file changes it."""
    manifest = storage.read_json(manifest_uri(uri))
    identity = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    if isinstance(identity.get("files"), dict):  # per-step curves carry wall times: a view of the run, not content
        identity["files"] = {rel: meta for rel, meta in identity["files"].items() if not rel.startswith(VIEW_PREFIXES)}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def stage_key(stage: str, config: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """Content address of a stage output: stage, config, input manifests, package version."""
    material = {
        "stage": stage,
        "config": dict(config),
        "inputs": {name: manifest_digest(uri) for name, uri in sorted(inputs.items())},
        "version": __version__,
    }
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:16]


def stage_uri(artifact_root: str, stage: str, key: str) -> str:
    return storage.join(artifact_root, stage, key)


def download_artifact(uri: str, local_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Copy a committed artifact to `local_dir`, verifying every file against its manifest sha256."""
    manifest = read_manifest(uri, verify="sizes")
    storage.download_dir(uri, local_dir, files=list(manifest["files"]))
    for rel, meta in manifest["files"].items():
        if sha256_file(local_dir / rel) != meta["sha256"]:
            raise ArtifactError(f"input {uri} is damaged: {rel} does not match its sha256 in the manifest")
    return local_dir, manifest


def commit(
    local_dir: Path,
    out_uri: str,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    metrics: Mapping[str, Any],
    key: str | None = None,
    replace: bool = True,
) -> dict[str, Any]:
    """Upload `local_dir` to `out_uri`, then write the manifest last; the manifest that holds when this returns.

    One writer at a time (commit_lock). With `replace` False, an output another writer committed meanwhile is
    kept and its manifest returned: the work done here is dropped, the caller becomes a cache hit.
    """
    return _commit(
        local_dir, out_uri, stage=stage, config=config, inputs=inputs, metrics=metrics, key=key, replace=replace
    )[0]


def _commit(
    local_dir: Path,
    out_uri: str,
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    metrics: Mapping[str, Any],
    key: str | None,
    replace: bool,
) -> tuple[dict[str, Any], bool]:
    """`commit`, and whether this call wrote the output (False: another writer's is kept)."""
    from blueprint.store import commit_lock

    files = {p.relative_to(local_dir).as_posix(): p for p in sorted(local_dir.rglob("*")) if p.is_file()}
    if MANIFEST_NAME in files:
        raise ArtifactError(f"stage {stage} wrote its own {MANIFEST_NAME}; only commit() may")

    def committed() -> bool:
        return storage.exists(manifest_uri(out_uri))

    with commit_lock.held(out_uri, done=lambda: not replace and committed()) as refresh:
        if refresh is None or (not replace and committed()):
            theirs = read_manifest(out_uri, verify="sizes")
            if theirs.get("key") != key:  # an explicit location another run filled meanwhile, from other settings
                raise ArtifactError(
                    f"{out_uri} was committed meanwhile by a {theirs.get('stage')} run from other "
                    "settings or inputs; pass --force to replace it, or choose another location"
                )
            mark_used(out_uri)
            return theirs, False
        refresh()
        storage.delete_prefix(out_uri)  # a partial output of ours, or (replace) the stage's own older output
        try:
            mark_writing(out_uri, stage, key)
            storage.upload_dir(local_dir, out_uri)
            refresh()
            manifest = _manifest(files, stage=stage, config=config, inputs=inputs, metrics=metrics, key=key)
            storage.write_text(
                manifest_uri(out_uri), json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n"
            )
        except commit_lock.LockLost:
            raise  # the prefix is another writer's now: not ours to clear
        except BaseException:  # disk full, a failed upload, interrupted: free what this commit wrote
            with contextlib.suppress(Exception):  # never hide why the commit failed
                storage.delete_prefix(out_uri)
            raise
        commit_lock.delete_object(storage.join(out_uri, WRITING_NAME))
    return manifest, True


def _manifest(
    files: dict[str, Path],
    *,
    stage: str,
    config: Mapping[str, Any],
    inputs: Mapping[str, str],
    metrics: Mapping[str, Any],
    key: str | None,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "key": key,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "producer": {"host": socket.gethostname(), "versions": versions()},
        "config": dict(config),
        "inputs": dict(inputs),
        "input_manifests": {name: manifest_digest(uri) for name, uri in sorted(inputs.items())},
        "metrics": dict(metrics),
        "files": {rel: {"size": p.stat().st_size, "sha256": sha256_file(p)} for rel, p in files.items()},
    }


def check_target(uri: str, stage: str, key: str, owned: bool, force: bool) -> dict[str, Any] | None:
    """The committed manifest at `uri` (a cache hit unless `force`), None when `uri` may be written; refuses a
    target that holds anything but this stage's own output or partial output.

    `owned`: `uri` is the content-addressed prefix of this key, so what is there is ours by construction.
    """
    files = storage.list_files(uri)
    if not files:
        return None
    if MANIFEST_NAME in files:
        manifest = read_manifest(uri, verify="sizes")
        if manifest.get("stage") != stage:
            raise ArtifactError(
                f"{uri} holds a {manifest.get('stage')!r} output: a {stage} output never replaces "
                "it; choose another output location"
            )
        if not owned and not force and manifest.get("key") != key:
            raise ArtifactError(
                f"{uri} holds a {stage} output made from other settings or inputs; pass --force "
                "to replace it, or choose another output location"
            )
        return manifest
    if owned:
        return None
    marker = storage.join(uri, WRITING_NAME)
    if WRITING_NAME in files and storage.read_json(marker).get("stage") == stage:
        return None  # this stage's own unfinished output: cleared and rewritten
    shown = ", ".join(list(files)[:3]) + (", ..." if len(files) > 3 else "")
    raise ArtifactError(
        f"{uri} already holds {len(files)} file(s) that are not a {stage} output ({shown}): "
        "refusing to replace them; choose an empty or new output location"
    )


def mark_writing(uri: str, stage: str, key: str) -> None:
    """Claim an explicit output location before any work, so a crash's leftovers are known to be ours."""
    storage.write_json(storage.join(uri, WRITING_NAME), {"stage": stage, "key": key})


def mark_used(uri: str) -> None:
    """Stamp a committed output as in use now: gc's grace period counts from its last use, so an old output that a
    running pipeline took as a cache hit or an input is not deleted under it. Best effort: an input in a root this
    run may only read is not ours to collect anyway."""
    with contextlib.suppress(storage.StorageError):
        storage.write_json(storage.join(uri, USED_NAME), {"used": dt.datetime.now(dt.UTC).isoformat()})


def reuse_or_commit(
    stage: str,
    config: Any,
    inputs: Mapping[str, str],
    compute: Callable[[Path], Mapping[str, Any]],
    *,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    owned: bool | None = None,
) -> StageOutput:
    """A stage's output under the commit protocol: the committed one of this key, reused, or computed and committed
    (not `launch.run_stage`, which runs a stage's function, on several processes when asked).

    `compute(local_dir)` writes the stage's files into a fresh local directory and returns its metrics. The output
    goes to `out_uri`, or to the content-addressed `{artifact_root}/{stage}/{key}` (`owned`: `out_uri` is that
    prefix). A committed output of this key there is a cache hit (unless `force`); a content-addressed prefix
    without a manifest is partial and is cleared and rewritten; an explicit `out_uri` holding anything else is
    refused. Two writers of one key: one commits, the other becomes a cache hit.
    """
    if (artifact_root is None) == (out_uri is None):
        raise ValueError("give exactly one of artifact_root or out_uri")
    owned = out_uri is None if owned is None else owned
    cfg = config_dict(config)
    for uri in inputs.values():
        read_manifest(uri, verify="sizes")  # fail before any work when an input is incomplete
        if distributed.is_main():
            mark_used(uri)
    key = stage_key(stage, cfg, inputs)
    uri = storage.normalize(out_uri if out_uri is not None else stage_uri(artifact_root, stage, key))
    if not distributed.is_main():
        return _follow_main(stage, uri, compute)
    existing = check_target(uri, stage, key, owned, force)
    if existing is None or force:
        hits_only.check(uri)  # `blueprint run` asking for a hit only: stop here, before any work
    if existing is None and _COMMITTED_ONLY.get():
        raise ArtifactError(f"{stage}: its processes ended without committing {uri}")
    distributed.from_main(existing is not None and not force)  # the other ranks learn whether this is a hit
    if existing is not None and not force:
        mark_used(uri)
        return StageOutput(uri, existing, cached=True)
    if not owned and existing is None:
        mark_writing(uri, stage, key)
    return _compute_and_commit(stage, uri, compute, cfg, inputs, key, owned, force)


_COMMITTED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("committed_only", default=False)


@contextlib.contextmanager
def committed_only() -> Iterator[None]:
    """Inside: a stage reads its committed output and never computes it (after its ranks ran it elsewhere)."""
    token = _COMMITTED_ONLY.set(True)
    try:
        yield
    finally:
        _COMMITTED_ONLY.reset(token)


def _follow_main(stage: str, uri: str, compute: Callable[[Path], Mapping[str, Any]]) -> StageOutput:
    """A data-parallel rank other than 0: compute alongside rank 0 (its collectives need every rank) and write
    nothing. It does not wait for rank 0's upload (which may take longer than a collective may wait): its output
    has no manifest, and the launcher reads the one rank 0 commits."""
    hit = distributed.from_main(None)
    if hit:
        return StageOutput(uri, read_manifest(uri, verify="sizes"), cached=True)
    with tempfile.TemporaryDirectory(prefix=f"blueprint-{stage}-") as tmp:
        compute(Path(tmp))
    return StageOutput(uri, {}, cached=False)


def _compute_and_commit(
    stage: str,
    uri: str,
    compute: Callable[[Path], Mapping[str, Any]],
    cfg: dict[str, Any],
    inputs: Mapping[str, str],
    key: str,
    owned: bool,
    force: bool,
) -> StageOutput:
    with tempfile.TemporaryDirectory(prefix=f"blueprint-{stage}-") as tmp:
        try:
            metrics = compute(Path(tmp))
        except BaseException:
            if not owned and set(storage.list_files(uri)) == {WRITING_NAME}:
                storage.delete_prefix(uri)  # failed before writing anything there: leave no trace
            raise
        manifest, wrote = _commit(
            Path(tmp), uri, stage=stage, config=cfg, inputs=inputs, metrics=metrics or {}, key=key, replace=force
        )
    return StageOutput(uri, manifest, cached=not wrote)


def cached_outputs(root: str, files: dict[str, tuple] | None = None) -> list[dict[str, Any]]:
    """Every committed stage output under `root`: stage, key, created, used (its last use, None when never
    stamped), bytes, metrics. `files`: the root's `storage.list_file_times`, when the caller has it already."""
    rows = []
    files = storage.list_file_times(root) if files is None else files
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[2] == MANIFEST_NAME:
            uri = storage.join(root, parts[0], parts[1])
            manifest = storage.read_json(manifest_uri(uri))
            size = sum(f["size"] for f in manifest.get("files", {}).values())
            used = files.get(f"{parts[0]}/{parts[1]}/{USED_NAME}", (0, None))[1]
            rows.append(
                {
                    "stage": parts[0],
                    "key": parts[1],
                    "created": str(manifest.get("created", "?")),
                    "used": used.isoformat() if used else None,
                    "bytes": size,
                    "metrics": manifest.get("metrics", {}),
                    "uri": uri,
                }
            )
    return sorted(rows, key=lambda r: (r["created"], r["stage"]))
