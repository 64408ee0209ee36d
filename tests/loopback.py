"""Real servers on loopback for the tests and benchmarks that talk to them: a free port and `mlflow server`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(home: Path, *, timeout_s: float = 90) -> tuple[str, subprocess.Popen]:
    """`mlflow server` with a sqlite backend under `home`, in a session of its own (so it can be killed whole);
    (its URI, its process) once it accepts connections."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", f"sqlite:///{home}/mlflow.db", "--default-artifact-root", f"{home}/artifacts"]
    proc = subprocess.Popen(
        [*command, "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=home,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.5)
    stop_session(proc, signal.SIGKILL)
    raise RuntimeError(f"mlflow server did not start within {timeout_s:g} s")


def stop_session(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal a process started here in a session of its own and everything in that session (a server and its
    workers, a pipeline run and its task processes), then wait for it."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(30)
