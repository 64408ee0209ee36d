"""A stopped stage stops what it started: SIGTERM/SIGINT to `blueprint stage` with nproc > 1 reach torchrun and its
ranks, and the launcher exits only once they are gone (real torchrun, real processes, ranks that just sleep)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RANK = """
import os, sys, time
from pathlib import Path
Path(sys.argv[1], f"rank-{os.environ['RANK']}").write_text(f"{os.getpid()} {os.getppid()}")
print(f"rank {os.environ['RANK']} ready", flush=True)
time.sleep(600)
"""

LAUNCHER = """
import sys
from blueprint import distributed
from blueprint.runtime import launch
launch.worker_module_args = lambda req: [sys.argv[1], sys.argv[2]]  # the ranks run the test's sleeper, not a stage
launch.launch("evaluate", distributed.ParallelSettings(nproc="2"), {"progress": True})
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not read its status yet


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_launcher_stops_torchrun_and_its_ranks_and_is_waited_for(tmp_path, sig):
    (tmp_path / "rank.py").write_text(RANK)
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path / "rank.py"), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("rank-*"))) < 2:
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
            time.sleep(0.2)
        ranks = [int(p.read_text().split()[0]) for p in tmp_path.glob("rank-*")]
        (torchrun,) = {int(p.read_text().split()[1]) for p in tmp_path.glob("rank-*")}
        launcher.send_signal(sig)
        launcher.wait(timeout=60)
        assert not [pid for pid in [torchrun, *ranks] if _alive(pid)]  # gone before the launcher returned
        assert launcher.returncode == -sig  # it then ends as that signal ends it (SIGINT: by KeyboardInterrupt)
    finally:
        for pid in [p for p in (locals().get("torchrun"), *locals().get("ranks", [])) if p and _alive(p)]:
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
