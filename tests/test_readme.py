"""README is a door: short, its links lead somewhere, and every command it shows runs as written (the cheap ones
are run; the expensive ones name make targets, subcommands and flags that exist). Behind it, the docs' settings
reference is generated from the stage configs."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLUEPRINT = ("blueprint", ".venv/bin/blueprint")


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def shell_commands(text: str) -> list[list[str]]:
    """Each command of the ```bash blocks as argv: continuations joined, comments dropped."""
    commands = []
    for block in code_blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def is_cheap(argv: list[str]) -> bool:
    """Runs in seconds with nothing outside this machine: a --help, or a compile."""
    return "--help" in argv or argv[1] == "compile"


BLUEPRINT_COMMANDS = [argv for argv in shell_commands(README) if argv[0] in BLUEPRINT]
CHEAP = [argv for argv in BLUEPRINT_COMMANDS if is_cheap(argv)]
EXPENSIVE = [argv for argv in BLUEPRINT_COMMANDS if not is_cheap(argv)]


def blueprint(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The `blueprint` console script as pyproject.toml declares it, from this checkout."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["blueprint"].split(":")
    code = f"import sys; sys.argv[0] = 'blueprint'; from {module} import {function}; sys.exit({function}())"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(cwd), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_readme_is_at_most_200_lines():
    assert README.count("\n") <= 200


def test_readme_links_lead_to_files_in_the_repository():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    assert links and [link for link in links if "://" not in link and not (REPO / link).exists()] == []


def test_readme_shows_cheap_and_expensive_commands():
    assert CHEAP and EXPENSIVE and any(argv[0] == "make" for argv in shell_commands(README))


def test_make_targets_and_variables_in_readme_exist_in_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    for argv in (argv for argv in shell_commands(README) if argv[0] == "make"):
        for word in argv[1:]:
            name, sep, _ = word.partition("=")
            pattern = rf"^{re.escape(name)} \?=|\$\({re.escape(name)}\)" if sep else rf"^{re.escape(word)}:"
            assert re.search(pattern, makefile, re.MULTILINE), f"`{shlex.join(argv)}`: no {word!r} in the Makefile"


@pytest.mark.parametrize("argv", CHEAP, ids=[shlex.join(argv[1:]) for argv in CHEAP])
def test_cheap_readme_commands_run_as_written(argv, tmp_path):
    done = blueprint(argv[1:], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    if argv[1] == "compile":
        out = argv[argv.index("--out") + 1]
        assert "pipelineInfo:" in (tmp_path / out).read_text()


def _help_of(argv: list[str], cwd: Path) -> str:
    """`--help` of the subcommand argv runs (of the stage, for `blueprint stage NAME`)."""
    head = argv[1:3] if argv[1] == "stage" else argv[1:2]
    done = blueprint([*head, "--help"], cwd)
    assert done.returncode == 0, f"`{shlex.join(argv)}`: {done.stderr[-500:]}"
    return done.stdout


@pytest.mark.parametrize("argv", EXPENSIVE, ids=[shlex.join(argv[1:3]) for argv in EXPENSIVE])
def test_expensive_readme_commands_name_a_real_subcommand_and_flags(argv, tmp_path):
    usage = _help_of(argv, tmp_path)
    flags = [word.split("=")[0] for word in argv if word.startswith("--")]
    assert [flag for flag in flags if not re.search(rf"{re.escape(flag)}\b", usage)] == [], shlex.join(argv)


def test_readme_python_calls_the_api_with_names_it_has():
    import inspect

    from blueprint import BluePrint

    (block,) = code_blocks(README, "python")
    calls = [node for node in ast.walk(ast.parse(block)) if isinstance(node, ast.Call)]
    for call in calls:
        method = call.func.attr if isinstance(call.func, ast.Attribute) else "__init__"
        if isinstance(call.func, ast.Name) and call.func.id != "BluePrint":
            continue
        signature = inspect.signature(getattr(BluePrint, method))
        signature.bind(None, *[None] * len(call.args), **{kw.arg: None for kw in call.keywords})


def test_the_settings_reference_lists_every_setting_of_every_stage_with_its_help():
    import runpy

    from blueprint.stages.registry import STAGES

    hooks = runpy.run_path(str(REPO / "docs" / "hooks.py"))
    reference = hooks["settings_reference"]()
    for spec in STAGES.values():
        section = reference.split(f"## {spec.name}\n", 1)[1].split("\n## ", 1)[0]
        for name, field in spec.config_type().model_fields.items():
            row = next((line for line in section.splitlines() if line.startswith(f"| **{name}** |")), "")
            assert row.endswith(f"| {hooks['cell'](field.description)} |"), f"{spec.name}.{name}: {row or 'missing'}"
