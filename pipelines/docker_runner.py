"""`blueprint run --runner docker`: every stage of the local run in the component image, via kfp.local.DockerRunner.

Works with Docker or with Podman's Docker-compatible API socket (`DOCKER_HOST=unix:///run/podman/podman.sock`).
What a container needs that kfp.local does not give it, set here:

- the host network, so an S3 endpoint on loopback (MinIO or moto on 127.0.0.1) is reachable as on the host;
- the host user's uid:gid, so files written into the bind-mounted pipeline root belong to the caller;
- the caller's AWS settings and credentials (by name from the environment, passed through the engine's API:
  never on a command line, in a log, or in the image);
- a bind mount of a file:// artifact root at the same path, so file URIs mean the same inside and outside.
"""

from __future__ import annotations

import os
from typing import Any

from blueprint import __version__
from blueprint.config import ConfigError
from blueprint.store import storage

DEFAULT_LOCAL_IMAGE = f"blueprint:{__version__}"  # what `make image-cpu` tags
PASSED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CA_BUNDLE",
    "AWS_EC2_METADATA_DISABLED",
    "HF_HUB_OFFLINE",
    "HF_ENDPOINT",
    "HF_TOKEN",
)
PODMAN_HINT = (
    "start Docker, or Podman's API socket: `podman system service --time=0 "
    "unix:///run/podman/podman.sock &` and `export DOCKER_HOST=unix:///run/podman/podman.sock`"
)


def engine_client():
    """A docker client that answered a ping, or ConfigError saying which engine address was tried and what to do."""
    try:
        import docker
    except ImportError:
        raise ConfigError(
            "--runner docker needs the docker Python client: pip install 'blueprint-rt[docker]'"
        ) from None
    where = os.environ.get("DOCKER_HOST") or "the default Docker socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - docker raises several types for "nothing there"
        raise ConfigError(
            f"--runner docker: no container engine answers at {where} ({type(exc).__name__}); {PODMAN_HINT}"
        ) from None
    return client


def resolve_image(client, image: str) -> str:
    """The engine's own tag for `image` (Podman stores `blueprint:0.1.0` as `localhost/blueprint:0.1.0`, and
    kfp.local pulls any tag it does not find verbatim); ConfigError when the engine does not have it."""
    import docker

    try:
        found = client.images.get(image)
    except docker.errors.ImageNotFound:
        raise ConfigError(
            f"--image {image}: the container engine has no such image; build it with "
            "`make image-cpu` (README, Images) or pull it"
        ) from None
    return next((tag for tag in found.tags if tag == image or tag.endswith("/" + image)), image)


def container_settings(artifact_root: str) -> dict[str, Any]:
    """docker-py `containers.run` arguments for every stage container of a run under `artifact_root`."""
    env = {name: os.environ[name] for name in PASSED_ENV if os.environ.get(name)}
    env.update(HOME="/tmp", HF_HOME="/tmp/huggingface")  # any uid can write there
    settings: dict[str, Any] = {"network_mode": "host", "user": f"{os.getuid()}:{os.getgid()}", "environment": env}
    root = storage.normalize(artifact_root)
    if root.startswith("file://"):  # kfp.local passes its own `volumes`, so the root goes in as a Mount
        from docker.types import Mount

        local = storage.local_path(root)
        local.mkdir(parents=True, exist_ok=True)
        settings["mounts"] = [Mount(target=str(local), source=str(local), type="bind")]
    return settings


def podman_gone_is_not_found() -> None:
    """Podman answers 500 "no such container" where Docker answers 404. kfp.local runs every task container with
    auto_remove and treats only docker's NotFound as "it exited and is gone", so a task that finishes within a
    second (shard-plan, gate, promote) failed under Podman. Its answer is read as the NotFound it means."""
    import docker.api.client
    import docker.errors

    original = docker.errors.create_api_error_from_http_exception
    if getattr(docker.api.client.create_api_error_from_http_exception, "podman_aware", False):
        return

    def create(e):
        response = e.response
        if response is not None and response.status_code == 500 and "no such container" in (response.text or ""):
            raise docker.errors.NotFound(e, response=response, explanation=response.text.strip()) from e
        return original(e)

    create.podman_aware = True
    docker.api.client.create_api_error_from_http_exception = create


def docker_runner(image: str | None, artifact_root: str):
    """(kfp.local.DockerRunner, image tag to build the pipeline with), after checking engine and image."""
    from kfp import local

    podman_gone_is_not_found()
    client = engine_client()
    try:
        tag = resolve_image(client, image or DEFAULT_LOCAL_IMAGE)
    finally:
        client.close()
    return local.DockerRunner(**container_settings(artifact_root)), tag
