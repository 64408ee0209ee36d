"""Runs model-written Python in a sandbox for mistakes and accidents, one short-lived process per program.

What each program gets:
- its own subprocess (never the stage's interpreter), in a new session, in an empty temporary working directory;
- a stripped environment (PATH, HOME and TMPDIR = the working directory, LANG): no credentials, no proxy settings;
- limits on CPU time, wall time, address space, file size and number of processes (`SandboxSettings`); its output
  goes to a file of bounded size, of which the first `OUTPUT_BYTES` are kept;
- as root, a user id of its own for each parallel slot (60000 + slot, switched to by util-linux's `setpriv`), so the
  process limit holds (root is exempt from it) and the stage's files are out of reach;
- in the `namespace` mode, bubblewrap (`bwrap`): a read-only view of the root filesystem with only the working
  directory writable, `--unshare-all` (no network, its own process tree), `--die-with-parent`.

`auto` takes the namespace mode when bwrap can create namespaces here (many pods forbid it), else the limits alone,
and says which once (`Sandbox.why`). The program itself runs under a small driver (`DRIVER`): the driver sets the
limits, forks the program, reports its outcome on a pipe and, should the stage die, kills the program's whole
process tree. It learns of the stage's death twice over: the kernel's parent-death signal (bwrap's
`--die-with-parent` in the namespace mode), which is racy and bound to a thread, and the end of a lifeline pipe whose
only writer is the stage, which the kernel closes whatever way the stage ends. After each program the stage kills
what is left of its session.

It does not stop a determined attacker: a program may read what its user id may read (the installed packages,
world-readable files), use its CPU and memory up to the limits, leave its session in the limits mode, or exploit
the kernel. Run untrusted models in a pod you would give to untrusted code.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from blueprint.config import Settings, setting
from blueprint.errors import UserError

STATUSES = ("pass", "fail", "error", "timeout")
OUTPUT_BYTES = 2048  # of a program's output, kept with its outcome
REASON_CHARS = 300  # of an outcome's reason
SLOT_UID_BASE = 60000  # as root, slot k runs as uid/gid 60000 + k (Debian leaves 60000-64999 unassigned)
STOP_SECONDS = 5.0  # past its wall time, a program's driver has this long to clean up before it is killed
SIGNAL_EXIT = 128  # the driver exits 128 + N when the program died of signal N
SandboxMode = Literal["auto", "namespace", "limits"]
MODES = typing.get_args(SandboxMode)


class SandboxError(UserError, RuntimeError):
    """The sandbox asked for cannot run here (no bwrap, namespaces forbidden, no usable interpreter)."""


class SandboxSettings(Settings):
    """How model-written code runs: isolation and limits per program (one program = one candidate's tests)."""

    sandbox: SandboxMode = setting(
        "auto",
        "auto (namespace where bubblewrap can create namespaces, else limits) | "
        "namespace (bubblewrap, required) | limits (resource limits only)",
    )
    sandbox_timeout_s: float = setting(10.0, "wall-clock limit of one program, seconds (CPU time: the same)", gt=0)
    sandbox_memory_mb: int = setting(1024, "address-space limit of one program, MB", ge=64)
    sandbox_file_mb: int = setting(16, "largest file (and output) one program may write, MB", ge=1)
    sandbox_processes: int = setting(32, "processes and threads one program may run at once", ge=2)
    sandbox_workers: int = setting(0, "programs run at once; 0 = the cores this stage may use", ge=0)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one program did: `status` is pass, fail (an assertion failed), error (it raised, or died) or timeout."""

    status: str
    reason: str = ""
    seconds: float = 0.0
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


# The driver: argv = wall seconds, cpu seconds, address-space bytes, file bytes, process limit, outcome fd, lifeline
# fd, program path, mode. It runs in the sandbox's interpreter with -I -S -B; the program's code never runs in the
# driver's own process.
DRIVER = r"""
import os, resource, signal, sys, threading
wall, cpu, mem, fsize, nproc, fd, life, path, mode = sys.argv[1:10]
fd, life, worker, late = int(fd), int(life), 0, []
def stop(number, _):  # wall time is up (SIGALRM) or the stage died (SIGTERM, PR_SET_PDEATHSIG): end the program
    late.append(number)
    if worker:
        try:
            os.killpg(worker, signal.SIGKILL)
        except OSError:  # the group is gone already: the worker was reaped just before this signal arrived
            pass
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGALRM, stop)
if mode == "limits":  # (in a namespace, bwrap --die-with-parent and --as-pid-1 do both)
    import ctypes
    libc = ctypes.CDLL(None)
    libc.prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: every orphaned descendant becomes this driver's child
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
def limit(what, soft, hard=None):
    hard = soft if hard is None else hard
    try:
        resource.setrlimit(what, (soft, hard))
    except (ValueError, OSError):
        resource.setrlimit(what, (min(soft, resource.getrlimit(what)[1]),) * 2)
with open(path, encoding="utf-8") as f:
    source = f.read()
worker = os.fork()
if worker == 0:
    worker = os.getpid()
    os.setpgid(0, 0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    def report(text):  # only the forked worker reports (a copy the program forked exits quietly)
        if os.getpid() == worker:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os.write(fd, text.replace("\n", " ").encode("utf-8", "replace")[:4000] + b"\n")
        os._exit(0)
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_FSIZE, int(fsize))
    if int(nproc) > 0:
        limit(resource.RLIMIT_NPROC, int(nproc))
    limit(resource.RLIMIT_CPU, int(cpu), int(cpu) + 1)
    limit(resource.RLIMIT_AS, int(mem))
    name = "<candidate>"
    try:
        exec(compile(source, name, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except AssertionError as exc:
        import linecache, traceback
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == name]
        where = f"line {frames[-1].lineno}: {frames[-1].line}" if frames else "assertion"
        report(f"fail {where}" + (f" ({exc})" if str(exc) else ""))
    except BaseException as exc:
        report(f"error {type(exc).__name__}: {exc}")
    report("pass")
try:
    os.setpgid(worker, worker)
except OSError:
    pass
def lifeline():  # the stage holds the only write end: end of file means the stage is gone, however it ended
    try:
        while os.read(life, 1):
            pass
    except OSError:
        pass
    stop(signal.SIGTERM, None)
threading.Thread(target=lifeline, daemon=True).start()
signal.setitimer(signal.ITIMER_REAL, float(wall))
while True:
    try:
        _, status = os.waitpid(worker, 0)
        break
    except InterruptedError:
        pass
signal.setitimer(signal.ITIMER_REAL, 0)
if signal.SIGALRM in late:
    os.write(fd, f"timeout wall time over {float(wall):g}s\n".encode())
os.close(fd)
def children():
    me = str(os.getpid())
    try:
        return [int(p) for t in os.listdir(f"/proc/{me}/task")
                for p in open(f"/proc/{me}/task/{t}/children").read().split()]
    except OSError:
        return []
while True:  # kill and reap every descendant: the group first, then whoever left it
    try:
        os.killpg(worker, signal.SIGKILL)
    except OSError:
        pass
    for pid in children():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


@dataclasses.dataclass
class Sandbox:
    """A probed way to run programs here: the mode that runs, why, the interpreter and the user ids per slot."""

    mode: str  # namespace | limits: what actually runs
    why: str  # one line for the stage's log
    python: str  # the interpreter programs run in
    bwrap: str | None = None
    setpriv: str | None = None  # as root: slot k runs as uid SLOT_UID_BASE + k, switched to by setpriv
    settings: SandboxSettings = dataclasses.field(default_factory=SandboxSettings)
    process_base: int = 0  # threads the user already runs (not root): the process limit counts them too

    def workers(self) -> int:
        return self.settings.sandbox_workers or cores()

    def command(self, workdir: Path, program: Path, fds: tuple[int, int], uid: int | None) -> list[str]:
        """The command line of one program: [setpriv to its user id] [bwrap ...] the driver, which writes its
        outcome to `fds[0]` and reads its lifeline from `fds[1]`."""
        s = self.settings
        nproc = s.sandbox_processes + (0 if uid is not None else self.process_base)
        cpu = max(1, math.ceil(s.sandbox_timeout_s))
        command = [
            self.python,
            "-I",
            "-S",
            "-B",
            "-c",
            DRIVER,
            f"{s.sandbox_timeout_s:g}",
            str(cpu),
            str(s.sandbox_memory_mb << 20),
            str(s.sandbox_file_mb << 20),
            str(nproc),
            *map(str, fds),
            str(program),
            self.mode,
        ]
        if self.mode == "namespace":
            command = [
                self.bwrap,
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--tmpfs",
                "/dev/shm",
                "--bind",
                str(workdir),
                str(workdir),
                "--chdir",
                str(workdir),
                "--unshare-all",
                "--as-pid-1",
                "--die-with-parent",
                "--",
                *command,
            ]
        if uid is not None:  # setpriv switches users, so the stage spawns with vfork (Popen(user=) would fork it)
            command = [self.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *command]
        return command

    def run(self, program: str, slot: int = 0) -> Outcome:
        """Run one program (its source text) in slot `slot` (0 <= slot < workers()); never raises for what the
        program does."""
        s = self.settings
        uid = SLOT_UID_BASE + slot if self.setpriv else None
        with tempfile.TemporaryDirectory(prefix="blueprint-sandbox-") as tmp:
            top = Path(tmp)
            workdir, program_file = top / "work", top / "program.py"
            workdir.mkdir()
            program_file.write_text(program, encoding="utf-8")
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chmod(top, 0o755)
            env = {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "HOME": str(workdir),
                "TMPDIR": str(workdir),
                "LANG": "C.UTF-8",
                "OMP_NUM_THREADS": "1",
            }
            read_end, write_end = os.pipe()
            life_read, life_write = os.pipe()  # the stage keeps the write end until the program is over
            start = time.monotonic()
            try:
                with open(top / "output", "wb+") as output:
                    try:
                        proc = subprocess.Popen(
                            self.command(workdir, program_file, (write_end, life_read), uid),
                            cwd=workdir,
                            env=env,
                            stdin=subprocess.DEVNULL,
                            stdout=output,
                            stderr=subprocess.STDOUT,
                            pass_fds=(write_end, life_read),
                            start_new_session=True,
                        )
                    finally:
                        os.close(write_end)
                        os.close(life_read)
                    timed_out = _wait(proc, s.sandbox_timeout_s)
                    seconds = time.monotonic() - start
                    reported = _read_all(read_end)
                    output.seek(0)
                    text = output.read(OUTPUT_BYTES).decode("utf-8", errors="replace")
            finally:
                os.close(read_end)
                os.close(life_write)
        return classify(reported, proc.returncode, timed_out, seconds, s, text)

    def run_many(self, programs: Sequence[str]) -> list[Outcome]:
        """Outcomes of `programs`, in order; up to workers() run at once (each waits in a thread of this process)."""
        workers = max(1, min(self.workers(), len(programs)))
        slots: queue.Queue[int] = queue.Queue()
        for k in range(workers):
            slots.put(k)

        def one(program: str) -> Outcome:
            slot = slots.get()
            try:
                return self.run(program, slot)
            finally:
                slots.put(slot)

        if workers == 1:
            return [one(p) for p in programs]
        with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(one, programs))


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the driver, which ends the program at its wall time and reaps every process it left; kill the
    driver's session when it has not finished STOP_SECONDS later (True then). A blocking wait with a timer, not
    Popen.wait(timeout), which polls with sleeps of up to 50 ms."""
    late = threading.Event()

    def kill() -> None:
        late.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    timer = threading.Timer(timeout + STOP_SECONDS, kill)
    timer.start()
    try:
        proc.wait()
    finally:
        timer.cancel()
    return late.is_set()


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def classify(
    reported: str, returncode: int, timed_out: bool, seconds: float, settings: SandboxSettings, output: str = ""
) -> Outcome:
    """The Outcome from what the driver reported on its pipe, its exit code, and whether the wall limit hit."""
    kind, _, reason = reported.strip().partition("\n")[0].partition(" ")
    if timed_out:
        return Outcome(
            "timeout", f"wall time over {settings.sandbox_timeout_s:g}s (the sandbox did not stop it)", seconds, output
        )
    if kind in STATUSES and returncode in (0, SIGNAL_EXIT + signal.SIGKILL):
        return Outcome(kind, reason[:REASON_CHARS], seconds, output)
    if returncode > SIGNAL_EXIT or returncode < 0:  # the program (> 128) or the driver itself (< 0) was killed
        number = returncode - SIGNAL_EXIT if returncode > 0 else -returncode
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        if number == signal.SIGXCPU:
            return Outcome("timeout", f"CPU time over {settings.sandbox_timeout_s:g}s", seconds, output)
        return Outcome("error", f"killed by {name}", seconds, output)
    return Outcome("error", f"exited with code {returncode} before its tests finished", seconds, output)


def cores() -> int:
    """The cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def user_threads(uid: int) -> int:
    """Threads that user `uid` runs now (what RLIMIT_NPROC counts)."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    total += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:
                pass
    return total


def _usable(sandbox: Sandbox) -> str | None:
    """Why `sandbox` cannot run a trivial program here, or None when it can."""
    try:
        outcome = sandbox.run("assert 1 + 1 == 2\n")
    except OSError as exc:
        return str(exc)
    return None if outcome.passed else f"{outcome.status}: {outcome.reason} {outcome.output.strip()[-200:]}".strip()


def interpreters() -> list[str]:
    """Interpreters a program may run in, the stage's own first (as another user it may be out of reach)."""
    found = [sys.executable]
    for name in ("python3", f"python{sys.version_info.major}.{sys.version_info.minor}"):
        for folder in ("/usr/local/bin", "/usr/bin"):
            path = os.path.join(folder, name)
            if os.access(path, os.X_OK) and os.path.realpath(path) not in map(os.path.realpath, found):
                found.append(path)
    return found


def open_sandbox(settings: SandboxSettings | None = None) -> Sandbox:
    """Probe this machine once: the mode to run (namespace where asked and possible), the users, the interpreter;
    each tried on a trivial program, the strongest first.

    A `namespace` that cannot run raises SandboxError naming why; `auto` falls back to `limits` and says why."""
    settings = settings or SandboxSettings()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    setpriv, bwrap = shutil.which("setpriv") if root else None, shutil.which("bwrap")
    base = 0 if root else user_threads(os.getuid())
    modes = {"auto": ("namespace", "limits"), "namespace": ("namespace",), "limits": ("limits",)}[settings.sandbox]
    problems: dict[str, list[str]] = {
        "namespace": [] if bwrap else ["bwrap is not installed (apt-get install bubblewrap)"],
        "limits": [],
    }
    for mode in modes:
        for switch in dict.fromkeys((setpriv, None)):
            for python in interpreters():
                if mode == "namespace" and bwrap is None:
                    break
                sandbox = Sandbox(mode, "", python, bwrap if mode == "namespace" else None, switch, settings, base)
                if (why := _usable(sandbox)) is not None:
                    problems[mode].append(f"{python}{' as another user' if switch else ''}: {why[:200]}")
                    continue
                users = (
                    ", a user id per slot"
                    if switch
                    else ", as root: no process limit (setpriv is missing or other users cannot run the interpreter)"
                    if root
                    else ""
                )
                where = f", in {python}" if python != sys.executable else ""
                fallback = (
                    ""
                    if mode == settings.sandbox or mode == "namespace"
                    else f" (no namespace: {problems['namespace'][-1]})"
                )
                return dataclasses.replace(sandbox, why=f"{mode} mode{fallback}{users}{where}")
        if mode == "namespace" and settings.sandbox == "namespace":
            raise SandboxError(
                f"sandbox=namespace cannot run here: {'; '.join(problems['namespace'])}; use "
                "sandbox=auto or sandbox=limits"
            )
    raise SandboxError("sandbox: no interpreter can run a program here: " + "; ".join(problems["limits"]))
