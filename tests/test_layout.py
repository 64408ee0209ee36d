"""The house rules a reader relies on: the stage list is written once, in the registry; modules stay small; every
setting has help. (The import graph's rules are in test_imports.py.)"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_stage_names_are_written_once():
    names = ('"shard"', '"bootstrap"', '"warmup"', '"ppo-round"', '"evaluate"', '"merge"')
    pattern = re.compile(r"[(\[{]\s*" + r"\s*,\s*".join(re.escape(n) for n in names))  # a literal list of all six
    for package in ("blueprint", "components", "pipelines"):
        for path in (REPO / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path.relative_to(REPO)} lists the stages again"


def _definitions():
    import ast

    for package in ("blueprint", "components", "pipelines"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            yield path, tree


def statements(tree) -> int:
    """A module's size in statements: what a reader reads, whatever the formatter does with the lines."""
    import ast

    return sum(isinstance(node, ast.stmt) for node in ast.walk(tree))


def test_no_module_exceeds_300_statements():
    """One idea per module. Functions are held by ruff (PLR0915: 50 statements, C901: complexity 12,
    PLR0913: 8 arguments), which has no rule for a module's size."""
    large = [
        f"{path.relative_to(REPO)}: {n} statements" for path, tree in _definitions() if (n := statements(tree)) > 300
    ]
    assert large == []


def test_stages_never_import_one_another():
    from blueprint.stages import registry

    stage_modules = {spec.module for spec in registry.STAGES.values()}
    found = []
    for spec in registry.STAGES.values():
        text = (REPO / (spec.module.replace(".", "/") + ".py")).read_text()
        for other in stage_modules - {spec.module}:
            pkg, name = other.rsplit(".", 1)
            if re.search(
                rf"^\s*(from {re.escape(other)} import|import {re.escape(other)}\b|from {re.escape(pkg)} "
                rf"import .*\b{name}\b)",
                text,
                re.MULTILINE,
            ):
                found.append(f"{spec.module} imports {other}")
    assert found == []


def test_every_stage_setting_has_help_and_an_unknown_key_is_named():
    import pytest

    from blueprint.config import ConfigError
    from blueprint.stages import registry

    for spec in registry.STAGES.values():
        cls = spec.config_type()
        assert [n for n, f in cls.model_fields.items() if not f.description] == [], spec.name
        with pytest.raises(ConfigError, match=r"unknown setting\(s\) no_such_setting"):
            cls(no_such_setting=1)


def test_stage_help_lists_every_setting(capsys):
    import pytest

    from blueprint.pipelines.cli import main
    from blueprint.stages import registry

    with pytest.raises(SystemExit) as done:
        main(["stage", "ppo-round", "--help"])
    out = capsys.readouterr().out
    fields = registry.get("ppo-round").config_type().model_fields
    assert done.value.code == 0 and all(f"  {name} (" in out for name in fields)
    assert "learning rate of the summarizer's LoRA" in out  # the help text, not only the name
