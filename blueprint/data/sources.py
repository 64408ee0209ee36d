"""Corpus sources, named by one spec string, streamed as units of work for the parsing workers.

    stdlib                  the running interpreter's standard library (real code, on every machine)
    dir:PATH | dir:s3://B/P a source tree, local or the .py objects below an S3 prefix
    hf:DATASET_ID[:CONFIG]  a Hugging Face dataset, streamed (e.g. hf:codeparrot/github-code)
    jsonl:PATH | parquet:PATH | csv:PATH   data files: a local path or glob, or on S3 a key, a prefix (every
                            .jsonl/.parquet/.csv below it) or a glob on keys (s3://B/data/*.parquet)
    tasks:PATH              code with tests: a local HumanEval/MBPP-shaped .jsonl or .jsonl.gz file or glob
                            (blueprint.data.tasks); each row keeps its task, so the eval split can run its tests

S3 sources are read as they exist, never copied first (blueprint.data.remote): a corpus may be bigger than the pod.

File trees (stdlib, dir) skip hidden directories, `__pycache__`, `site-packages`/`dist-packages`, `node_modules`
and, unless `skip_tests=False`, test directories (`test`, `tests`, `idle_test`) and `test_*.py` files: test code
has few docstrings and many near-copies, so it adds noise, not pairs.

Every source has a fingerprint (what goes into the cache key besides the config) that is cheap and offline:
stdlib = Python version + path; dir = hash of sorted (relpath, size, mtime_ns); data files = (path, size,
mtime_ns); on S3 the ETag takes mtime's place (it changes with the content, not with a re-upload of the same
bytes); hf = id + config + revision (pin `hf_revision` for a reproducible cache, `main` moves).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import platform
import sysconfig
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from blueprint.data import remote, tasks
from blueprint.data.remote import hub_files_url
from blueprint.errors import UserError
from blueprint.store import storage

FILE_KINDS = ("jsonl", "parquet", "csv")
TASKS = "tasks"
KINDS = ("stdlib", "dir", "hf") + FILE_KINDS + (TASKS,)
SKIP_DIRS = frozenset({"__pycache__", "site-packages", "dist-packages", "node_modules"})
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
STDLIB_LICENSE = "PSF-2.0"
SCRIPT_FALLBACK_FILES = "data/*.parquet"  # where script-era hub datasets (codeparrot/github-code) keep their rows


class SourceError(UserError, ValueError):
    """The source cannot give any input (missing, empty, unreachable); the message names the source."""


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str
    target: str = ""  # path, glob or dataset id
    config: str | None = None  # hf dataset config name

    def __str__(self) -> str:
        if self.kind == "stdlib":
            return "stdlib"
        return f"{self.kind}:{self.target}" + (f":{self.config}" if self.config else "")


def parse_source(spec: str) -> SourceSpec:
    """`"hf:codeparrot/github-code:all-all"` -> SourceSpec("hf", "codeparrot/github-code", "all-all").

    A spec with credentials in it (`parquet:s3://KEY:SECRET@bucket/x`) is refused before any message repeats it.
    """
    spec = (spec or "").strip()
    if spec == "stdlib":
        return SourceSpec("stdlib")
    kind, sep, rest = spec.partition(":")
    storage.refuse_credentials(spec, setting="source")
    storage.refuse_credentials(rest, setting="source")
    if not sep or kind not in KINDS or not rest:
        raise SourceError(
            f"unknown source {spec!r}: use stdlib, dir:PATH, hf:DATASET_ID[:CONFIG], jsonl:PATH, "
            "parquet:PATH, csv:PATH or tasks:PATH"
        )
    if kind == TASKS and "://" in rest:
        raise SourceError(f"source {spec!r}: a task file is read from a local path (copy it here first)")
    if kind == "hf":
        dataset_id, _, config = rest.partition(":")
        return SourceSpec("hf", dataset_id, config or None)
    return SourceSpec(kind, rest)


def resolve_source(spec: str) -> str:
    """`dir:./src` as typed -> `dir:/abs/src`: a local path is resolved once, against the working directory, so the
    stage that reads it (another process, another directory) sees the same files."""
    parsed = parse_source(spec)
    storage.refuse_credentials(parsed.target, setting="source")
    if parsed.kind in ("stdlib", "hf") or "://" in parsed.target:
        return str(parsed)
    return str(dataclasses.replace(parsed, target=str(Path(parsed.target).expanduser().absolute())))


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


@dataclasses.dataclass(frozen=True)
class SourceFile:
    abs_path: str
    rel_path: str
    size: int
    mtime_ns: int


def _row_tag(code: Any) -> str:
    """A row without a path is named by its content, not its position: the same in any partition of the source."""
    return hashlib.sha256(str(code).encode("utf-8", errors="replace")).hexdigest()[:12]


def skipped_dir(name: str, skip_tests: bool) -> bool:
    """Whether a tree source leaves out the directory `name` (one rule for local trees and S3 prefixes)."""
    return name.startswith(".") or name in SKIP_DIRS or (skip_tests and name in TEST_DIRS)


def corpus_file(name: str, skip_tests: bool) -> bool:
    """Whether a tree source reads the file `name` (a base name)."""
    return name.endswith(".py") and not (skip_tests and name.startswith("test_"))


def list_python_files(root: Path, skip_tests: bool = True) -> list[SourceFile]:
    """Every .py file below `root` in sorted relative-path order (the order decides the output bytes)."""
    found: list[SourceFile] = []
    prefix = os.path.join(str(root), "")  # a relative path is what follows it (cheaper than Path.relative_to)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not skipped_dir(d, skip_tests))
        for name in sorted(filenames):
            if not corpus_file(name, skip_tests):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling symlink: not part of the corpus
                continue
            found.append(SourceFile(path, path[len(prefix) :].replace(os.sep, "/"), st.st_size, st.st_mtime_ns))
    return sorted(found, key=lambda f: f.rel_path)


def list_python_objects(uri: str, skip_tests: bool = True) -> list[remote.RemoteObject]:
    """The S3 twin of list_python_files: every .py object below `uri` under the same rules, in relative-path order."""
    found = []
    for obj in remote.list_below(uri):
        *dirs, name = obj.rel_path.split("/")
        if corpus_file(name, skip_tests) and not any(skipped_dir(d, skip_tests) for d in dirs):
            found.append(obj)
    return sorted(found, key=lambda o: o.rel_path)


class Source:
    """A parsed spec plus the column/filter settings: lists its fingerprint and streams units of work.

    Units are tuples understood by `blueprint.data.extract.process`. Rows a source drops itself (another language)
    are counted in `self.skipped`, so the stage can report them with the workers' drops.
    """

    def __init__(  # noqa: PLR0913 - ShardConfig's source settings, keyword-only with defaults
        self,
        spec: str,
        *,
        skip_tests: bool = True,
        max_file_bytes: int = 1_000_000,
        max_source_mb: float | None = None,
        code_column: str = "code",
        summary_column: str | None = "summary",
        language_column: str = "language",
        languages: tuple[str, ...] = ("python",),
        path_column: str = "path",
        license_column: str = "license",
        hf_revision: str | None = None,
        hf_data_files: str | None = None,
    ) -> None:
        self.spec = parse_source(spec)
        self.name = str(self.spec)
        self.skip_tests, self.max_file_bytes, self.max_source_mb = skip_tests, max_file_bytes, max_source_mb
        self.code_column, self.summary_column = code_column, summary_column
        self.language_column, self.languages = language_column, {lang.lower() for lang in languages}
        self.path_column, self.license_column = path_column, license_column
        self.hf_revision, self.hf_data_files = hf_revision, hf_data_files
        self.skipped: Counter = Counter()
        self.on_s3 = self.spec.kind != "hf" and storage.is_s3(self.spec.target)
        self._files: list[SourceFile] | list[remote.RemoteObject] | None = None
        self._objects: list[remote.RemoteObject] | None = None  # one listing: the fingerprint is what is read
        self.partition: dict[str, Any] | None = None

    def restricted(self, partition: dict[str, Any] | None) -> Source:
        """This source cut to one partition of the fan-out (`blueprint.data.partitions`): the files whose name
        (a tree's relative path, a data file's path or URI) is in [`from`, `until`), an open end when None."""
        self.partition, self._files, self._objects = partition or None, None, None
        return self

    def _in_partition(self, name: str) -> bool:
        part = self.partition or {}
        return (part.get("from") is None or name >= part["from"]) and (
            part.get("until") is None or name < part["until"]
        )

    def _named(self, fn):
        """`fn()`, with a storage failure (bucket, credentials, endpoint, a broken file) told as this source's."""
        try:
            return fn()
        except storage.StorageError as exc:
            raise SourceError(f"source {self.name}: {exc}") from None

    # ---------------------------------------------------------------- file trees
    def root(self) -> Path:
        if self.spec.kind == "stdlib":
            return stdlib_root()
        root = Path(self.spec.target).expanduser().resolve()
        if not root.is_dir():
            raise SourceError(f"source {self.name}: {root} is not a directory")
        return root

    def files(self) -> list[SourceFile] | list[remote.RemoteObject]:
        """The .py files of a tree source (cut at `max_source_mb`); SourceError when there are none."""
        if self._files is None:
            if self.on_s3:
                files = self._named(lambda: list_python_objects(self.spec.target, self.skip_tests))
            else:
                files = list_python_files(self.root(), self.skip_tests)
            if not files:
                raise SourceError(
                    f"source {self.name} has no Python files (hidden, site-packages"
                    f"{' and test' if self.skip_tests else ''} directories skipped)"
                )
            if self.max_source_mb is not None:
                budget, kept = self.max_source_mb * 1e6, []
                for f in files:
                    if f.size <= self.max_file_bytes:
                        budget -= f.size
                    if budget < 0:
                        break
                    kept.append(f)
                files = kept or files[:1]
            self._files = [f for f in files if self._in_partition(f.rel_path)]
            if not self._files:
                raise SourceError(
                    f"source {self.name}: no file of this partition is left (the source changed after "
                    "it was planned: run again)"
                )
        return self._files

    def data_files(self) -> list[str]:
        target = os.path.expanduser(self.spec.target)
        paths = sorted(glob.glob(target, recursive=True)) if glob.has_magic(target) else [target]
        paths = [str(Path(p).resolve()) for p in paths if os.path.isfile(p)]
        paths = [p for p in paths if self._in_partition(p)]
        if not paths:
            raise SourceError(f"source {self.name}: no {self.spec.kind} file matches {target}")
        return paths

    def objects(self) -> list[remote.RemoteObject]:
        """The S3 objects of a data-file source, listed once; SourceError when none matches."""
        if self._objects is None:
            found = self._named(lambda: remote.list_data_files(self.spec.target, self.spec.kind))
            if not found:
                what = (
                    f"{self.spec.kind} file matches"
                    if glob.has_magic(self.spec.target)
                    else f"{remote.EXTENSIONS[self.spec.kind]} file is at or below"
                )
                raise SourceError(f"source {self.name}: no {what} {self.spec.target}")
            self._objects = [o for o in found if self._in_partition(o.uri)]
        return self._objects

    @property
    def total(self) -> int | None:
        """Units to expect (for the progress bar), when known without reading the data."""
        return len(self.files()) if self.spec.kind in ("stdlib", "dir") else None

    def fingerprint(self) -> dict[str, Any]:
        """Cheap, offline identity of the source's content (part of the cache key)."""
        kind = self.spec.kind
        if kind == "stdlib":
            return {
                "kind": kind,
                "python": platform.python_version(),
                "path": str(stdlib_root()),
                "files": len(self.files()),
            }
        if kind == "dir":
            digest = hashlib.sha256()
            for f in self.files():
                stamp = f.etag if self.on_s3 else f.mtime_ns
                digest.update(f"{f.rel_path}\0{f.size}\0{stamp}\n".encode())
            root = storage.normalize(self.spec.target) if self.on_s3 else str(self.root())
            return {"kind": kind, "path": root, "files": len(self.files()), "sha256": digest.hexdigest()}
        if kind in FILE_KINDS and self.on_s3:
            return {"kind": kind, "files": [[o.uri, o.size, o.etag] for o in self.objects()]}
        if kind in FILE_KINDS + (TASKS,):
            return {"kind": kind, "files": [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in self.data_files()]}
        return {
            "kind": kind,
            "id": self.spec.target,
            "config": self.spec.config,
            "revision": self.hf_revision or "main",
            "data_files": self.hf_data_files,
        }

    @property
    def is_tree(self) -> bool:
        """Whether its inputs are files (stdlib, dir), which incremental sharding can match run to run; a
        dataset's rows have no stable identity of their own."""
        return self.spec.kind in ("stdlib", "dir")

    # ---------------------------------------------------------------- units
    def units(self) -> Iterator[tuple]:
        if self.spec.kind in ("stdlib", "dir"):
            license = STDLIB_LICENSE if self.spec.kind == "stdlib" else None
            for f in self.files():
                yield (
                    ("object", f.uri, f.rel_path, license, f.size, f.etag)
                    if self.on_s3
                    else ("file", f.abs_path, f.rel_path, license)
                )
            return
        if self.spec.kind == TASKS:
            yield from tasks.units(self.data_files())
            return
        budget = self.max_source_mb * 1e6 if self.max_source_mb is not None else None
        for row in self._rows():
            if self.code_column not in row:
                raise SourceError(
                    f"source {self.name}: no column {self.code_column!r} "
                    f"(columns: {', '.join(sorted(row))}); set code_column"
                )
            code = row[self.code_column]
            path = str(row.get(self.path_column) or f"{self.spec.target}#{_row_tag(code)}")
            if not isinstance(code, str) or not code.strip():
                self.skipped["empty_code"] += 1
                continue
            lang = row.get(self.language_column)
            if self.languages and isinstance(lang, str) and lang.lower() not in self.languages:
                self.skipped["other_language"] += 1
                continue
            license = row.get(self.license_column)
            license = str(license) if license is not None else None
            if self.summary_column and self.summary_column in row:
                yield ("pair", code, row[self.summary_column] or "", path, license)
            else:
                yield ("text", code, path, license)
            if budget is not None:
                budget -= len(code)
                if budget < 0:
                    return

    def _rows(self) -> Iterator[dict[str, Any]]:
        """Rows of a data-file or hub source, streamed (never the whole table in memory): S3 files through pyarrow,
        local files and the hub through `datasets`."""
        if self.on_s3:
            columns = [
                c
                for c in (
                    self.code_column,
                    self.summary_column,
                    self.language_column,
                    self.path_column,
                    self.license_column,
                )
                if c
            ]
            try:
                yield from remote.rows(self.objects(), self.spec.kind, columns, self.code_column)
            except storage.StorageError as exc:  # raised while streaming: _named cannot wrap a generator
                raise SourceError(f"source {self.name}: {exc}") from None
            return
        import datasets

        if self.spec.kind in FILE_KINDS:
            builder = "json" if self.spec.kind == "jsonl" else self.spec.kind
            readers = logging.getLogger("datasets.packaged_modules")  # logs a broken file before raising: told below
            level = readers.level
            readers.setLevel(logging.CRITICAL)
            try:
                for path in self.data_files():  # one at a time, in order: a broken file is named
                    try:
                        yield from datasets.load_dataset(builder, data_files=[path], streaming=True, split="train")
                    except (ValueError, OSError) as exc:  # pandas' ParserError, pyarrow's ArrowInvalid, bad JSON
                        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                        raise SourceError(
                            f"source {self.name}: cannot read {path} as {self.spec.kind}: {reason}"
                        ) from None
            finally:
                readers.setLevel(level)
            return
        yield from self._hf_rows(datasets)

    def _hf_rows(self, datasets) -> Iterator[dict[str, Any]]:
        dataset_id, revision = self.spec.target, self.hf_revision
        try:
            if self.hf_data_files:
                ds = self._hf_files(datasets, self.hf_data_files)
            else:
                try:
                    ds = datasets.load_dataset(
                        dataset_id, self.spec.config, revision=revision, streaming=True, split="train"
                    )
                except RuntimeError as exc:
                    if "scripts are no longer supported" not in str(exc):
                        raise
                    # datasets >= 4 runs no loading scripts; read the repo's data files directly instead
                    ds = self._hf_files(datasets, SCRIPT_FALLBACK_FILES)
            yield from ds
        except (ConnectionError, OSError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            hint = " (HF_HUB_OFFLINE is set)" if offline else ""
            raise SourceError(
                f"source {self.name}: cannot stream Hugging Face dataset {dataset_id!r}{hint}: {exc}. "
                "Check the network, or use a local copy via jsonl:/parquet:/csv:PATH"
            ) from None
        except Exception as exc:
            if type(exc).__name__ in ("DatasetNotFoundError", "FileNotFoundError", "DataFilesNotFoundError"):
                raise SourceError(
                    f"source {self.name}: Hugging Face dataset {dataset_id!r} was not found or is not accessible: {exc}"
                ) from None
            raise

    def _hf_files(self, datasets, pattern: str):
        url = hub_files_url(self.spec.target, pattern, self.hf_revision)
        if self.partition and self.partition.get("of", 1) > 1:  # this partition's files of the repo, by name
            url = [
                hub_files_url(self.spec.target, f, self.hf_revision)
                for f, _ in self.hub_files()
                if self._in_partition(f)
            ]
        builder = "json" if pattern.endswith((".jsonl", ".json")) else "csv" if pattern.endswith(".csv") else "parquet"
        return datasets.load_dataset(builder, data_files=url, streaming=True, split="train")

    def hub_files(self) -> list[tuple[str, int]]:
        """(path in the repo, size) of the hub dataset's files matching `hf_data_files` at `hf_revision`, sorted:
        what the fan-out partitions (a network listing; offline it fails as one line naming the source)."""
        from huggingface_hub import HfFileSystem

        root = hub_files_url(self.spec.target, "", self.hf_revision)[len("hf://") :]
        try:
            found = HfFileSystem().glob(root + self.hf_data_files, detail=True)
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, revision or auth: all one user error
            raise SourceError(
                f"source {self.name}: cannot list {self.hf_data_files!r} at revision "
                f"{self.hf_revision or 'main'} on the hub: {exc}"
            ) from None
        files = sorted((path[len(root) :], int(info.get("size") or 0)) for path, info in found.items())
        if not files:
            raise SourceError(f"source {self.name}: no hub file matches {self.hf_data_files!r}")
        return files
