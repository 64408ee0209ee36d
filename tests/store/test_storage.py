"""The URI layer: the same behaviour on file:// and on a real S3 endpoint (loopback), and clear failures."""

from __future__ import annotations

import time

import pytest

from blueprint.store import storage
from blueprint.store.storage import StorageError


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/root"
    return request.getfixturevalue("s3_bucket") + "/root"


def test_bytes_json_and_listing_round_trip(root):
    storage.write_bytes(storage.join(root, "a/b.bin"), b"\x00\x01")
    storage.write_json(storage.join(root, "c.json"), {"x": 1})
    assert storage.read_bytes(storage.join(root, "a/b.bin")) == b"\x00\x01"
    assert storage.read_json(storage.join(root, "c.json")) == {"x": 1}
    assert storage.list_files(root) == {"a/b.bin": 2, "c.json": 13}
    assert storage.exists(storage.join(root, "c.json"))
    assert not storage.exists(storage.join(root, "nope.json"))


def test_directories_upload_and_download_whole(root, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "weights.safetensors").write_bytes(b"w" * 1000)
    storage.upload_dir(src, storage.join(root, "model"))
    out = storage.download_dir(storage.join(root, "model"), tmp_path / "copy")
    assert (out / "sub" / "weights.safetensors").read_bytes() == b"w" * 1000
    assert (out / "config.json").read_text() == "{}"


def test_delete_prefix_removes_everything_below(root):
    storage.write_bytes(storage.join(root, "p/x"), b"1")
    storage.write_bytes(storage.join(root, "p/y/z"), b"2")
    storage.delete_prefix(storage.join(root, "p"))
    assert storage.list_files(storage.join(root, "p")) == {}


def test_reading_a_missing_object_names_it(root):
    with pytest.raises(StorageError, match="missing.bin"):
        storage.read_bytes(storage.join(root, "missing.bin"))


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "d" / "f.txt"
    storage.write_text(str(target), "one")
    storage.write_text(str(target), "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_local_write_gives_the_file_the_mode_a_plain_write_would(tmp_path):
    import os

    storage.write_bytes(str(tmp_path / "atomic"), b"x")
    (tmp_path / "plain").write_bytes(b"x")  # readable by others under the usual umask: shared artifact roots
    assert os.stat(tmp_path / "atomic").st_mode == os.stat(tmp_path / "plain").st_mode


def test_nonexistent_bucket_gives_one_clear_error(s3_env):
    with pytest.raises(StorageError, match=r"bucket 'no-such-bucket-bp' does not exist"):
        storage.read_bytes("s3://no-such-bucket-bp/x")


def test_wrong_credentials_give_one_clear_error(s3_bucket, monkeypatch):
    import requests

    endpoint = storage.endpoint_url()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    storage._HEALTHY_BUCKETS.clear()
    storage._s3fs.cache_clear()
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0")  # the server starts checking credentials now
    try:
        with pytest.raises(StorageError, match="denied: wrong credentials"):
            storage.read_bytes(f"{s3_bucket}/x")
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf")
        storage._HEALTHY_BUCKETS.clear()


def test_unreachable_endpoint_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    storage._HEALTHY_BUCKETS.clear()
    start = time.monotonic()
    with pytest.raises(StorageError, match=r"http://127.0.0.1:9 is unreachable"):
        storage.read_bytes("s3://bucket/x")
    assert time.monotonic() - start < 60


def test_unsupported_scheme_is_rejected():
    with pytest.raises(StorageError, match="gs://b/x"):
        storage.read_bytes("gs://b/x")
