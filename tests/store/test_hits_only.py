"""Hits-only mode: a committed output is returned as usual; a stage that would compute stops before any work."""

from __future__ import annotations

import pytest

from blueprint.store import artifacts, hits_only


def write_one(calls: list):
    def compute(out_dir):
        calls.append(out_dir)
        (out_dir / "x.txt").write_text("x")
        return {"n": 1}

    return compute


def test_a_committed_output_is_a_hit_and_a_missing_or_forced_one_stops_before_computing(tmp_path):
    calls: list = []
    root = f"file://{tmp_path}/art"
    with hits_only.on(), pytest.raises(hits_only.NotCached):
        artifacts.reuse_or_commit("demo", {"a": 1}, {}, write_one(calls), artifact_root=root)
    assert calls == [] and not list((tmp_path / "art").rglob(artifacts.MANIFEST_NAME))
    first = artifacts.reuse_or_commit("demo", {"a": 1}, {}, write_one(calls), artifact_root=root)
    assert len(calls) == 1 and not first.cached
    with hits_only.on():
        hit = artifacts.reuse_or_commit("demo", {"a": 1}, {}, write_one(calls), artifact_root=root)
        with pytest.raises(hits_only.NotCached):
            artifacts.reuse_or_commit("demo", {"a": 1}, {}, write_one(calls), artifact_root=root, force=True)
    assert hit.cached and hit.uri == first.uri and hit.manifest == first.manifest and len(calls) == 1
    assert not hits_only.active()
