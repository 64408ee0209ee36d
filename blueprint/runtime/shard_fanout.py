"""The shard stage fanned out: plan partitions, parse each in its own task, commit one dataset over all parts.

    plan (one task) -> part(p) for every partition (dsl.ParallelFor: one pod each) -> dataset (dsl.Collected)

A part parses its partition's inputs and commits only their results (`index/`, as any shard output keeps them),
reusing unchanged files from an earlier index. The dataset task reads the parts in partition order, which is the
source's own order, and de-duplicates, splits and shards them exactly as one task would: the dataset is the same
whatever the number of partitions. De-duplication keeps only 16-byte hashes while it streams the parts.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

from blueprint.config import parse
from blueprint.data import incremental, partitions
from blueprint.data.sources import SourceError
from blueprint.errors import InputError, user_errors_exit
from blueprint.progress import Progress
from blueprint.runtime.task import report_task
from blueprint.stages import registry, shard
from blueprint.store import artifacts

PART_STAGE = registry.SHARD_PART


def plan(config: shard.ShardConfig) -> list[dict[str, Any]]:
    """The partitions of `config.source` for `config.partitions` tasks."""
    return partitions.plan(config.make_source(), config.partitions)


def run_part(
    config: shard.ShardConfig,
    partition: dict[str, Any],
    *,
    artifact_root: str,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """One partition's per-input results, committed under `shard-part/` (cache hit when its inputs are unchanged)."""
    partition = partitions.normalized(partition)
    source = config.make_source().restricted(partition)
    key = {**shard.key_config(config, source.fingerprint()), "partition": partition}

    def build(out_dir: Path) -> dict[str, Any]:
        target = artifacts.stage_uri(artifact_root, PART_STAGE, artifacts.stage_key(PART_STAGE, key, {}))
        previous = (
            incremental.find_previous(artifact_root, incremental.extraction_key(key), exclude=target)
            if config.incremental and source.is_tree
            else None
        )
        counts: collections.Counter = collections.Counter()
        batch = 8 if source.total else 16
        workers = (
            max(1, min(config.resolved_workers(), -(-source.total // batch)))
            if source.total
            else config.resolved_workers()
        )  # no more processes than batches, as one task does
        results, index = shard.source_results(
            source, config, out_dir, previous, workers, batch, counts, always_index=True
        )
        bar = Progress(
            f"{shard.STAGE}-part-{partition.get('index', 0)}",
            source.total or None,
            progress,
            unit="file" if source.total else "row",
        )
        # A plan of one partition is one task's work: it may stop at max_pairs, as one task does (with more
        # partitions a part cannot know how many of its pairs the dataset will keep).
        room = config.max_pairs if partition.get("of", 1) == 1 else None
        seen: set[bytes] = set()
        try:
            for done, result in enumerate(results, 1):
                bar.update(done)
                if room is not None:
                    seen.update(pair[0][:16] for pair in result.pairs)
                    if len(seen) >= room:
                        break
        finally:
            results.close()
            bar.close()
            index.close()
        return {
            "partition": partition,
            "inputs": index.count,
            "inputs_parsed": counts["inputs_parsed"],
            "inputs_reused": counts["inputs_reused"],
            "skipped": dict(source.skipped),
        }

    return artifacts.reuse_or_commit(PART_STAGE, key, {}, build, artifact_root=artifact_root, force=force)


def check_parts(parts: list[str]) -> list[dict[str, Any]]:
    """The parts' manifests, in order: each one committed, a shard part, and all of one plan."""
    manifests = []
    for i, uri in enumerate(parts):
        try:
            manifest = artifacts.read_manifest(uri, verify="sizes")
        except (artifacts.ArtifactError, OSError) as exc:
            raise InputError(f"part {i} ({uri}) is missing or uncommitted: {exc}") from None
        if manifest.get("stage") != PART_STAGE:
            raise InputError(f"part {i} ({uri}) is a {manifest.get('stage')!r} output, not a {PART_STAGE}")
        manifests.append(manifest)
    indices = [m["metrics"]["partition"].get("index", 0) for m in manifests]
    plans = {m["metrics"]["partition"].get("of", 1) for m in manifests}
    if indices != list(range(len(parts))) or plans != {len(parts)}:
        raise InputError(
            f"parts are partitions {indices} of plans of {sorted(plans)}, not 0..{len(parts) - 1} of "
            f"one plan of {len(parts)} in order"
        )
    return manifests


def previous_inputs(config: shard.ShardConfig, key: dict[str, Any], root: str, target: str) -> set[tuple[str, str]]:
    """(path, identity) of every input of the newest earlier dataset of this source: what a re-shard did not have
    to parse (a part that was a cache hit parsed nothing either)."""
    previous = (
        incremental.find_previous(root, incremental.extraction_key(key), exclude=target) if config.incremental else None
    )
    if previous is None or artifacts.read_manifest(previous, verify="none").get("stage") != shard.STAGE:
        return set()
    old = shard.open_previous(previous)
    return set(old.inputs()) if old is not None else set()


def compute_dataset(
    config: shard.ShardConfig, parts: list[str], out_dir: Path, progress: bool, before: set[tuple[str, str]]
) -> dict[str, Any]:
    start, manifests = time.time(), check_parts(parts)
    writer = shard.ShardWriter(out_dir, config.num_shards, config.row_group_rows)
    tree = config.make_source().spec.kind in ("stdlib", "dir")  # as one task: only a tree keeps an index
    index = incremental.IndexWriter(out_dir) if tree else None
    total = sum(m["metrics"]["inputs"] for m in manifests)
    bar = Progress(shard.STAGE, total or None, progress, unit="file")
    reused = collections.Counter()

    def results():
        for uri in parts:
            for result in incremental.PreviousIndex(uri).results():
                if index is not None:
                    index.add(result)
                result.reused = bool(result.identity) and (result.path, result.identity) in before
                reused[result.reused] += 1
                yield result

    try:
        tally = shard.write_results(results(), writer, config, config.make_source().name, bar)
    finally:
        bar.close()
        if index is not None:
            index.close()
    rows_per_shard = writer.close()
    for m in manifests:  # rows the sources filtered themselves (other languages)
        tally.files_dropped.update(m["metrics"].get("skipped", {}))
        tally.files += sum(m["metrics"].get("skipped", {}).values())
    if tally.kept == 0:
        raise SourceError(f"source {config.source} gave no (code, summary) pairs in {len(parts)} part(s)")
    fingerprint = [m["key"] for m in manifests]
    return shard.dataset_metrics(
        tally, rows_per_shard, config, config.make_source().name, fingerprint, out_dir, start, 0
    ) | {
        "partitions": len(parts),
        "inputs_parsed": reused[False],
        "inputs_reused": reused[True],
        # against an earlier dataset: which rows are new (a retrain may draw them first)
        **({incremental.NEW_ROWS: writer.new_rows()} if reused[True] else {}),
    }


def run_dataset(
    config: shard.ShardConfig, parts: list[str], *, artifact_root: str, force: bool = False, progress: bool = True
) -> artifacts.StageOutput:
    """The dataset over all `parts` (in partition order), committed as a `shard` output."""
    check_parts(parts)  # before reuse_or_commit reads their manifests: the error names the part
    key = shard.key_config(config, {"parts": "inputs"})
    inputs = {f"part-{i:05d}": uri for i, uri in enumerate(parts)}
    target = artifacts.stage_uri(artifact_root, shard.STAGE, artifacts.stage_key(shard.STAGE, key, inputs))
    return artifacts.reuse_or_commit(
        shard.STAGE,
        key,
        inputs,
        lambda d: compute_dataset(config, parts, d, progress, previous_inputs(config, key, artifact_root, target)),
        artifact_root=artifact_root,
        force=force,
    )


# ------------------------------------------------------------------------------------------- component bodies
def _config(settings: dict[str, Any]) -> shard.ShardConfig:
    return parse(shard.ShardConfig, settings)


def plan_task(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The plan component's body: the partitions, which the pipeline's ParallelFor fans out over."""
    with user_errors_exit(registry.SHARD_PLAN):
        found = plan(_config(settings))
    print(f"shard-plan: {len(found)} partition(s) of {settings.get('source')}", flush=True)
    return found


def part_task(
    settings: dict[str, Any],
    partition: dict[str, Any],
    artifact_root: str,
    force: bool = False,
    metrics: Any = None,
    report_path: str | None = None,
) -> tuple[str, str]:
    """A part component's body; a failure names its partition (the retry of that task resumes from the cache)."""
    partition = partitions.normalized(partition)
    label = f"shard-part-{partition.get('index', 0)}"
    with user_errors_exit(label, f"partition {partition.get('index', 0)} ({_describe(partition)})"):
        out = run_part(_config(settings), partition, artifact_root=artifact_root, force=force)
    return report_task(label, out, metrics, report_path)


def dataset_task(
    settings: dict[str, Any],
    parts: list[str],
    artifact_root: str,
    force: bool = False,
    metrics: Any = None,
    report_path: str | None = None,
) -> tuple[str, str]:
    """The fan-in component's body: the dataset over every part, as a `shard` output."""
    with user_errors_exit(shard.STAGE):
        out = run_dataset(_config(settings), list(parts), artifact_root=artifact_root, force=force)
    return report_task(shard.STAGE, out, metrics, report_path)


def _describe(partition: dict[str, Any]) -> str:
    if partition.get("of", 1) == 1:
        return "the whole source"
    return f"from {partition.get('from') or 'the start'} until {partition.get('until') or 'the end'}"
