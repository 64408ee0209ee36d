"""The house rules a reader relies on: imports point one way (library <- components <- pipelines <- command
line), and the stage list is written once, in the registry."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPORT = re.compile(r"^\s*(?:from|import)\s+(components|pipelines)\b", re.MULTILINE)


def _importers(package: str, forbidden: set[str]) -> list[str]:
    found = []
    for path in (REPO / package).rglob("*.py"):
        for match in IMPORT.finditer(path.read_text()):
            if match.group(1) in forbidden:
                found.append(f"{path.relative_to(REPO)} imports {match.group(1)}")
    return found


def test_the_library_imports_neither_components_nor_pipelines():
    assert _importers("blueprint", {"components", "pipelines"}) == []


def test_components_import_the_library_only():
    assert _importers("components", {"pipelines"}) == []


def test_the_stage_names_are_written_once():
    names = ('"shard"', '"bootstrap"', '"warmup"', '"ppo-round"', '"evaluate"', '"merge"')
    pattern = re.compile(r"[(\[{]\s*" + r"\s*,\s*".join(re.escape(n) for n in names))  # a literal list of all six
    for package in ("blueprint", "components", "pipelines"):
        for path in (REPO / package).rglob("*.py"):
            assert not pattern.search(path.read_text()), f"{path.relative_to(REPO)} lists the stages again"
