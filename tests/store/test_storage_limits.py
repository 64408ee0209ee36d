"""Storage limits: a frozen S3 endpoint fails in bounded time naming it; credentials never ride in a URI.

The frozen endpoint is a real moto server in its own process, stopped with SIGSTOP: the kernel still accepts
TCP connections on its port, but nothing ever answers, which is what a hung MinIO or a dead proxy looks like.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blueprint.store import storage
from blueprint.store.storage import StorageError
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.loopback import free_port

REPO = Path(__file__).resolve().parents[2]
SECRET = "sekrit-0123456789"


def _s3_env(endpoint: str) -> dict[str, str]:
    """The environment a user would have: endpoint and test credentials, no instance metadata lookups."""
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def _wait_until_answering(endpoint: str, proc: subprocess.Popen, limit: float = 30.0) -> None:
    import urllib.request

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto server at {endpoint} did not start within {limit} s")


@pytest.fixture()
def frozen_endpoint() -> Iterator[str]:
    """A moto server in a separate process holding bucket `frozen` with one object, then SIGSTOPped."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_answering(endpoint, proc)
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
        )
        client.create_bucket(Bucket="frozen")
        client.put_object(Bucket="frozen", Key="prefix/shard/k/_MANIFEST.json", Body=b"{}")
        os.kill(proc.pid, signal.SIGSTOP)
        yield endpoint
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(timeout=30)


def test_ls_against_a_frozen_endpoint_fails_within_a_minute_naming_it(frozen_endpoint):
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "blueprint.pipelines.cli", "ls", "s3://frozen/prefix"],
        cwd=REPO,
        env=_s3_env(frozen_endpoint),
        capture_output=True,
        text=True,
        timeout=90,
    )
    seconds = time.monotonic() - start
    print(f"blueprint ls against a frozen endpoint failed after {seconds:.1f} s")
    assert done.returncode == 2, done.stderr
    assert seconds < 60
    assert f"S3 endpoint {frozen_endpoint} did not answer" in done.stderr
    assert "Traceback" not in done.stderr


CREDENTIAL_URIS = [
    f"s3://AKIAX:{SECRET}@bkt/x",
    "s3://AKIAX@bkt/x",
    f"s3://AKIAX:{SECRET[:6]}/{SECRET[6:]}@bkt/x",
    f"s3://AKIAX:{SECRET[:6]}#{SECRET[6:]}@bkt/x",
    f"s3://AKIAX:{SECRET[:6]}@{SECRET[6:]}@bkt/x",
    f"file://me:{SECRET}@host/tmp/x",
    f"gs://me:{SECRET}@bkt/x",
]


@pytest.mark.parametrize("uri", CREDENTIAL_URIS)
@pytest.mark.parametrize(
    "parse", [storage.normalize, storage.split_s3, storage.local_path, storage.exists], ids=lambda f: f.__name__
)
def test_a_uri_with_credentials_is_refused_without_repeating_them(parse, uri):
    with pytest.raises(StorageError, match="credentials in a URI are refused") as err:
        parse(uri)
    assert SECRET not in str(err.value) and SECRET[6:] not in str(err.value) and "AKIAX" not in str(err.value)
    assert "AWS_ACCESS_KEY_ID" in str(err.value)


@pytest.mark.parametrize("uri", ["s3://bkt/models/coder@v2", "file:///tmp/at@sign", "./at@sign"])
def test_an_at_sign_outside_the_host_part_is_not_taken_for_credentials(uri):
    assert "@" in storage.normalize(uri)


@pytest.mark.parametrize("name", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_an_endpoint_with_credentials_is_refused_without_repeating_them(name, monkeypatch):
    monkeypatch.setenv(name, f"http://AKIAX:{SECRET}@minio:9000")
    with pytest.raises(StorageError, match=f"{name} http://\\*\\*\\*@minio:9000: credentials in a URI") as err:
        storage.read_bytes("s3://bkt/x")
    assert SECRET not in str(err.value)


def test_compile_refuses_an_artifact_root_with_credentials_and_writes_nothing(tmp_path):
    out = tmp_path / "pipeline.yaml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "blueprint.pipelines.cli",
            "compile",
            "--artifact-root",
            f"s3://AKIAX:{SECRET}@bkt/x",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    leaked = out.exists() and SECRET in out.read_text()
    assert not leaked and SECRET not in done.stderr and SECRET not in done.stdout
    assert done.returncode == 2 and not out.exists()
    assert "credentials in a URI are refused" in done.stderr
