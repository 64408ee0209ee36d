"""The commit protocol: manifest last, partial prefixes never read, tampering detected, content-addressed keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from blueprint.store import artifacts, storage
from blueprint.store.artifacts import ArtifactError


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/arts"
    return request.getfixturevalue("s3_bucket") + "/arts"


def _writer(text: str, calls: list[int] | None = None):
    def build(local: Path) -> dict:
        if calls is not None:
            calls.append(1)
        (local / "data").mkdir()
        (local / "data" / "x.txt").write_text(text)
        return {"rows": len(text)}

    return build


def test_commit_writes_manifest_with_sizes_hashes_and_metrics(root):
    out = artifacts.reuse_or_commit("demo", {"a": 1}, {}, _writer("hello"), artifact_root=root)
    assert not out.cached
    assert out.uri.endswith(f"/demo/{out.manifest['key']}")
    manifest = artifacts.read_manifest(out.uri)
    assert manifest["files"]["data/x.txt"]["size"] == 5
    assert manifest["metrics"] == {"rows": 5}
    assert manifest["config"] == {"a": 1}


def test_existing_manifest_is_a_cache_hit_and_force_recomputes(root):
    calls: list[int] = []
    first = artifacts.reuse_or_commit("demo", {"a": 1}, {}, _writer("x", calls), artifact_root=root)
    again = artifacts.reuse_or_commit("demo", {"a": 1}, {}, _writer("x", calls), artifact_root=root)
    assert again.cached and again.uri == first.uri and len(calls) == 1
    forced = artifacts.reuse_or_commit("demo", {"a": 1}, {}, _writer("x", calls), artifact_root=root, force=True)
    assert not forced.cached and len(calls) == 2


def test_partial_prefix_is_never_read_and_is_rewritten(root):
    out_uri = storage.join(root, "explicit")
    artifacts.mark_writing(out_uri, "demo", "k")  # what a run of this stage killed mid-way leaves
    storage.write_text(storage.join(out_uri, "stale.txt"), "half")
    with pytest.raises(ArtifactError, match="partial output"):
        artifacts.read_manifest(out_uri)
    out = artifacts.reuse_or_commit("demo", {}, {}, _writer("fresh"), out_uri=out_uri)
    assert set(storage.list_files(out.uri)) == {"data/x.txt", artifacts.MANIFEST_NAME}


def test_an_explicit_output_holding_anything_else_is_refused_and_kept(root):
    out_uri = storage.join(root, "mine")
    storage.write_text(storage.join(out_uri, "important.txt"), "x")
    with pytest.raises(ArtifactError, match="important.txt.*refusing to replace"):
        artifacts.reuse_or_commit("demo", {}, {}, _writer("fresh"), out_uri=out_uri, force=True)
    other = artifacts.reuse_or_commit("other", {}, {}, _writer("theirs"), out_uri=storage.join(root, "theirs"))
    with pytest.raises(ArtifactError, match="'other' output: a demo output never replaces it"):
        artifacts.reuse_or_commit("demo", {}, {}, _writer("fresh"), out_uri=other.uri, force=True)
    assert storage.read_text(storage.join(out_uri, "important.txt")) == "x"
    assert artifacts.read_manifest(other.uri)["stage"] == "other"


def test_an_explicit_output_of_the_same_stage_with_other_settings_needs_force(root):
    out_uri = storage.join(root, "o")
    artifacts.reuse_or_commit("demo", {"a": 1}, {}, _writer("one"), out_uri=out_uri)
    with pytest.raises(ArtifactError, match="other settings or inputs; pass --force"):
        artifacts.reuse_or_commit("demo", {"a": 2}, {}, _writer("two"), out_uri=out_uri)
    out = artifacts.reuse_or_commit("demo", {"a": 2}, {}, _writer("two"), out_uri=out_uri, force=True)
    assert not out.cached and storage.read_text(storage.join(out_uri, "data/x.txt")) == "two"


def test_failed_build_leaves_no_manifest(root):
    def broken(local: Path) -> dict:
        (local / "f").write_text("x")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        artifacts.reuse_or_commit("demo", {}, {}, broken, out_uri=storage.join(root, "o"))
    assert not storage.exists(storage.join(root, "o", artifacts.MANIFEST_NAME))


def test_missing_or_tampered_file_is_detected(root):
    out = artifacts.reuse_or_commit("demo", {}, {}, _writer("hello"), artifact_root=root)
    storage.write_text(storage.join(out.uri, "data/x.txt"), "HELLO")  # same size, other bytes
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        artifacts.read_manifest(out.uri)
    storage.write_text(storage.join(out.uri, "data/x.txt"), "hello!")
    with pytest.raises(ArtifactError, match="6 bytes"):
        artifacts.read_manifest(out.uri, verify="sizes")
    storage.delete_prefix(storage.join(out.uri, "data"))
    with pytest.raises(ArtifactError, match="missing"):
        artifacts.read_manifest(out.uri, verify="sizes")


def test_key_changes_with_config_and_with_input_content_not_with_input_path(tmp_path):
    root = f"file://{tmp_path}"
    up = artifacts.reuse_or_commit("up", {}, {}, _writer("v1"), out_uri=f"{root}/same-path")
    k1 = artifacts.reuse_or_commit("down", {"n": 1}, {"up": up.uri}, _writer("d"), artifact_root=root)
    k2 = artifacts.reuse_or_commit("down", {"n": 2}, {"up": up.uri}, _writer("d"), artifact_root=root)
    assert k1.uri != k2.uri
    up2 = artifacts.reuse_or_commit("up", {}, {}, _writer("v2"), out_uri=f"{root}/same-path", force=True)
    k3 = artifacts.reuse_or_commit("down", {"n": 1}, {"up": up2.uri}, _writer("d"), artifact_root=root)
    assert k3.uri != k1.uri and not k3.cached


def test_stage_refuses_an_incomplete_input_before_any_work(tmp_path):
    calls: list[int] = []
    storage.write_text(f"{tmp_path}/half/file.txt", "x")
    with pytest.raises(ArtifactError, match="half"):
        artifacts.reuse_or_commit(
            "down", {}, {"up": f"file://{tmp_path}/half"}, _writer("d", calls), artifact_root=f"file://{tmp_path}"
        )
    assert calls == []


def test_download_artifact_verifies_hashes(tmp_path):
    out = artifacts.reuse_or_commit("demo", {}, {}, _writer("hello"), out_uri=f"file://{tmp_path}/a")
    local, manifest = artifacts.download_artifact(out.uri, tmp_path / "dl")
    assert (local / "data" / "x.txt").read_text() == "hello"
    assert manifest["key"] == out.manifest["key"]


def test_a_commit_that_fails_on_a_full_disk_removes_what_it_wrote(tmp_path):
    """A real failed write: the committing process may not grow a file past 1 MiB (RLIMIT_FSIZE), so the second
    file's upload fails half-way, as on a full disk."""
    import os
    import subprocess
    import sys

    from blueprint.store import commit_lock

    local = tmp_path / "out"
    local.mkdir()
    (local / "a_small.txt").write_text("fits")
    (local / "b_big.bin").write_bytes(b"0" * (2 << 20))
    uri = f"file://{tmp_path}/art/warmup/0123456789abcdef"
    script = (
        "import resource, signal, sys\nfrom pathlib import Path\nfrom blueprint.store import artifacts\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "artifacts.commit(Path(sys.argv[1]), sys.argv[2], stage='warmup', config={}, inputs={}, metrics={},"
        " key='0123456789abcdef')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(local), uri],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert out.returncode != 0 and "File too large" in out.stderr, out.stderr[-2000:]
    assert storage.list_files(uri) == {} and not storage.exists(commit_lock.lock_uri(uri))
