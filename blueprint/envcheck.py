"""`python -m blueprint.envcheck`: does this environment hold everything the package declares?

Run as the last step of every image build (docker/Dockerfile*), so an image that lacks a declared dependency, or
holds one at a version outside its range, fails to build with the dependency's name instead of failing later in a
pod. Users can run it inside any image or venv to diagnose the same.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import sys

from packaging.requirements import Requirement

DISTRIBUTION = "blueprint-rt"
# What a stage process imports first: the component entry point and the heavy libraries it lazily loads.
RUNTIME_MODULES = (
    "blueprint.runtime.task",
    "kfp.dsl.executor_main",
    "torch",
    "transformers",
    "peft",
    "trl",
    "pyarrow.fs",
    "boto3",
)


def problems(distribution: str = DISTRIBUTION, modules: tuple[str, ...] = RUNTIME_MODULES) -> list[str]:
    """One line per unmet declared requirement (missing, or a version outside its range) or failed import."""
    try:
        declared = md.requires(distribution) or []
    except md.PackageNotFoundError:
        return [f"{distribution} itself is not installed"]
    found = []
    for line in declared:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # optional extras (test, docker) are not part of the runtime
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            found.append(f"{req.name}: declared by {distribution} ({req}) but not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            found.append(f"{req.name}: {version} installed, {distribution} needs {req}")
    if found:  # imports would only repeat the missing names
        return found
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is a broken image
            found.append(f"{module}: import failed: {type(exc).__name__}: {exc}")
    return found


def main() -> int:
    found = problems()
    if found:
        print(f"envcheck: this environment cannot run {DISTRIBUTION}:", file=sys.stderr)
        for line in found:
            print(f"  - {line}", file=sys.stderr)
        return 1
    print(f"envcheck: {DISTRIBUTION} {md.version(DISTRIBUTION)} and all its declared dependencies are installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
