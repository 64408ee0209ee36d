"""The sandbox for model-written code: real programs, real subprocesses, both modes (namespace where bwrap can
create namespaces here), and nothing of them left behind, even when the stage that ran them is killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from blueprint.data import tasks
from blueprint.eval import execution
from blueprint.eval.sandbox import SandboxError, SandboxSettings, open_sandbox

EXAMPLE_TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks.jsonl"
LIMITS = dict(sandbox_timeout_s=2.0, sandbox_memory_mb=256)


def example_tasks() -> list[dict[str, str]]:
    return [tasks.normalize(record, f"line {n}") for n, record in tasks.read_lines(str(EXAMPLE_TASKS))]


@pytest.fixture(scope="module", params=["namespace", "limits"])
def sandbox(request):
    try:
        return open_sandbox(SandboxSettings(sandbox=request.param, **LIMITS))
    except SandboxError as exc:  # a machine without bwrap or namespaces: the limits mode still runs every test
        pytest.skip(f"no {request.param} mode here: {exc}")


def processes_with(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line holds `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_canonical_solutions_pass_and_a_wrong_one_fails_naming_its_assert(sandbox):
    found = example_tasks()
    outcomes = sandbox.run_many([tasks.reference_program(t) for t in found])
    assert [o.status for o in outcomes] == ["pass"] * len(found), [o for o in outcomes if not o.passed]
    wrong = tasks.program(found[0], "def count_vowels(text):\n    return len(text)\n")
    outcome = sandbox.run(wrong)
    assert outcome.status == "fail" and 'assert candidate("Banana") == 3' in outcome.reason


def test_a_solution_that_raises_is_an_error_with_its_exception(sandbox):
    outcome = sandbox.run("def f(x):\n    return 1 / x\nassert f(0) == 0\n")
    assert outcome.status == "error" and outcome.reason == "ZeroDivisionError: division by zero"
    assert sandbox.run("def f(:\n").reason.startswith("SyntaxError")
    assert sandbox.run("import sys\nsys.exit(0)\n").status == "error"  # leaving early is no pass


def test_an_infinite_loop_is_a_timeout_within_the_limit(sandbox):
    outcome = sandbox.run("while True:\n    pass\n")
    assert outcome.status == "timeout" and outcome.seconds < LIMITS["sandbox_timeout_s"] + 1.5, outcome


def test_a_memory_bomb_is_contained(sandbox):
    outcome = sandbox.run("hoard = [bytearray(1 << 20) for _ in range(100_000)]\n")
    assert outcome.status == "error" and "MemoryError" in outcome.reason


def test_a_fork_bomb_is_contained_and_leaves_no_process(sandbox):
    marker = f"forkbomb-{uuid.uuid4().hex}"
    bomb = textwrap.dedent(f"""
        import os, sys
        while True:
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-S", "-c", "import time; time.sleep(60)", "{marker}"])
    """)
    outcome = sandbox.run(bomb)
    assert outcome.status == "error" and "Resource temporarily unavailable" in outcome.reason, outcome
    # the reaper acts within a second; the bound leaves room for a loaded machine (5 s failed once at load 12)
    assert wait_until(lambda: not processes_with(marker), 20), processes_with(marker)
    assert sandbox.run("assert 1 + 1 == 2\n").passed  # its slot is usable again


def test_the_environment_is_stripped_and_the_output_kept(sandbox, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    outcome = sandbox.run("import os\nprint(sorted(os.environ))\nassert 'AWS_SECRET_ACCESS_KEY' not in os.environ\n")
    assert outcome.passed and "AWS" not in outcome.output and "HOME" in outcome.output


def test_the_namespace_mode_blocks_writes_outside_the_workdir_and_the_network():
    try:
        sandbox = open_sandbox(SandboxSettings(sandbox="namespace", **LIMITS))
    except SandboxError as exc:
        pytest.skip(f"no namespace mode here: {exc}")
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # beside the stage's own temporary files
        tmp_path = Path(folder)
        os.chmod(tmp_path, 0o777)  # a directory and a file anyone may write to: still read-only inside
        mine = tmp_path / "stage-file.txt"
        mine.write_text("the stage's")
        os.chmod(mine, 0o666)
        check_writes_and_network(sandbox, tmp_path, mine)


def check_writes_and_network(sandbox, tmp_path: Path, mine: Path) -> None:
    write = sandbox.run(f"open({str(mine)!r}, 'w').write('overwritten')\n")
    create = sandbox.run(f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')\n")
    with socket.create_server(("127.0.0.1", 0)) as server:  # a service of the stage's host, listening
        port = server.getsockname()[1]
        local = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n")
    remote = sandbox.run("import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)\n")
    here = sandbox.run("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'\n")
    assert write.status == create.status == "error" and "Read-only file system" in write.reason
    assert local.status == "error" and "Connection refused" in local.reason, local  # its own loopback only
    assert remote.status == "error" and "unreachable" in remote.reason, remote
    assert here.passed, here
    assert mine.read_text() == "the stage's" and not (tmp_path / "new.txt").exists()


def orphan_program(marker: str) -> str:
    """A program that leaves a process behind outside its process group, its command line holding `marker`."""
    return textwrap.dedent(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()  # leaves the program's process group: only the driver's reaping finds it
            os.execv(sys.executable, [sys.executable, "-S", "-c", "import time; time.sleep(60)", "{marker}"])
        time.sleep(60)
    """)


def described(pids: list[int]) -> list[str]:
    """What a failed reaping left: each survivor's state, parent and pid in each namespace."""
    lines = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        lines.append(f"{pid}: " + " ".join(x for x in status if x.split(":")[0] in ("State", "PPid", "NSpid")))
    return lines


@pytest.mark.parametrize("mode", ["namespace", "limits"])
def test_no_process_survives_the_stage_being_killed(mode, tmp_path):
    marker = f"orphan-{uuid.uuid4().hex}"
    stage = textwrap.dedent(f"""
        import sys
        from blueprint.eval.sandbox import SandboxError, SandboxSettings, open_sandbox
        try:
            box = open_sandbox(SandboxSettings(sandbox={mode!r}, sandbox_timeout_s=60))
        except SandboxError:
            print("unavailable", flush=True)
            sys.exit(0)
        print("running", flush=True)
        box.run({orphan_program(marker)!r})
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", stage], stdout=subprocess.PIPE, text=True, env=env)
    if proc.stdout.readline().strip() == "unavailable":
        proc.wait()
        pytest.skip(f"no {mode} mode here")
    assert wait_until(lambda: processes_with(marker), 10), "the program never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the reaper acts within a second; the bound leaves room for a loaded machine (5 s failed once at load 12)
    assert wait_until(lambda: not processes_with(marker), 20), described(processes_with(marker))


@pytest.mark.parametrize("mode", ["namespace", "limits"])
def test_the_lifeline_alone_ends_a_program_whose_stage_is_gone(mode, tmp_path):
    """The stage's end reaches the driver through the lifeline pipe even where no parent-death signal fires (here
    the process that started the driver lives on, and only the pipe's write end closes)."""
    try:
        box = open_sandbox(SandboxSettings(sandbox=mode, sandbox_timeout_s=60))
    except SandboxError:
        pytest.skip(f"no {mode} mode here")
    marker = f"orphan-{uuid.uuid4().hex}"
    (tmp_path / "work").mkdir()
    (tmp_path / "program.py").write_text(orphan_program(marker))
    outcome_read, outcome_write = os.pipe()
    life_read, life_write = os.pipe()
    fds = (outcome_write, life_read)
    command = box.command(tmp_path / "work", tmp_path / "program.py", fds, uid=None)
    proc = subprocess.Popen(command, cwd=tmp_path / "work", pass_fds=fds, start_new_session=True)
    for fd in fds:
        os.close(fd)
    try:
        assert wait_until(lambda: processes_with(marker), 10), "the program never started"
        os.close(life_write)
        assert wait_until(lambda: not processes_with(marker), 20), described(processes_with(marker))
        assert proc.wait(timeout=20) != 0  # the driver ended too, the program's outcome unreported
        assert os.read(outcome_read, 4096) == b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        os.close(outcome_read)


def test_auto_falls_back_to_the_limits_and_says_why_where_bwrap_cannot_make_namespaces(monkeypatch):
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # a folder the sandbox's users may read
        fallback_is_said(Path(folder) / "bwrap", monkeypatch)


def fallback_is_said(fake: Path, monkeypatch) -> None:
    """With `fake` as the only bwrap: what bwrap says in a pod that forbids namespaces."""
    os.chmod(fake.parent, 0o755)
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    for tool in ("setpriv",):
        if os.path.exists(f"/usr/bin/{tool}"):
            (fake.parent / tool).symlink_to(f"/usr/bin/{tool}")
    monkeypatch.setenv("PATH", str(fake.parent))
    box = open_sandbox(SandboxSettings(sandbox="auto", **LIMITS))
    assert box.mode == "limits" and "No permissions to creating new namespace" in box.why
    assert box.run("assert sum(range(4)) == 6\n").passed
    with pytest.raises(SandboxError, match="sandbox=namespace cannot run here"):
        open_sandbox(SandboxSettings(sandbox="namespace", **LIMITS))


def test_a_task_whose_canonical_solution_fails_is_named_by_its_task_id(sandbox):
    sound, broken = example_tasks()[:2]
    broken = {**broken, "task_id": "mine/broken", "canonical_solution": "    return numbers[::-1]\n"}
    values, rows = execution.execute(
        sandbox, [sound, broken], {"docstring": ["x = 1\n"] * 2, "roundtrip": ["def f(: pass\n"] * 2}
    )
    assert values["reference_pass_rate"] == 0.5 and values["reference_failures"] == ["mine/broken"]
    assert values["pass_at_1_docstring"] == values["pass_at_1_roundtrip"] == 0.0
    assert values["sandbox"] == sandbox.mode and rows[1]["roundtrip"]["status"] == "error"
    assert "mine/broken (fail: line" in execution.reference_note(values, rows)
