"""Code with tests: task files in the HumanEval/MBPP JSON-lines shape, as (code, summary) pairs that keep their tests.

A task file (`tasks:PATH`, PATH a file or a glob of `.jsonl` / `.jsonl.gz`) holds one JSON object per line.

HumanEval shape, every field a string:
    task_id             unique name of the task
    prompt              imports, helpers, and the signature + docstring of the function to write
    canonical_solution  the body that completes the prompt (prompt + canonical_solution is a working program)
    test                a `check(candidate)` function, or plain asserts that call `entry_point`
    entry_point         the name of the function under test

MBPP shape (`task_id`, `text`, `code`, `test_list`, optional `test_setup_code` and `challenge_test_list`) maps onto
it: prompt = "", canonical_solution = code, test = test_setup_code + the asserts of test_list (and
challenge_test_list), entry_point = the function the first assert calls, and `text` is the description.

As a pair: code = the entry point's source from prompt + canonical_solution, docstring removed (as for any source);
summary = the first paragraph of its docstring, or `text` where the function has none. The task itself travels
with the pair (the shards' `tests` column), so evaluation can run the tests on code a model writes: `program`
builds that test program, `reference_program` the one of the canonical solution.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
from collections.abc import Iterator
from typing import Any

from blueprint.errors import UserError

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
MBPP_FIELDS = ("task_id", "text", "code", "test_list")
_CALLED = re.compile(r"\b([A-Za-z_]\w*)\s*\(")


class TaskFileError(UserError, ValueError):
    """A task file's line is not a task; the message names the file, the line and the field."""


def read_lines(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-blank line of a .jsonl or .jsonl.gz task file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TaskFileError(f"task file {path}, line {number}: not JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise TaskFileError(f"task file {path}, line {number}: not a JSON object")
                yield number, record
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"task file {path}: cannot be read ({exc})") from None


def units(paths: list[str]) -> Iterator[tuple]:
    """One ("task", task, "FILE#TASK_ID", None) unit of work per line of the task files (blueprint.data.extract);
    a line that is not a sound task fails naming the file, the line and the field (a broken task never passes
    unnoticed)."""
    seen: dict[str, str] = {}
    for path in paths:
        for number, record in read_lines(path):
            where = f"task file {path}, line {number}"
            task = normalize(record, where)
            if entry_function(task) is None:
                raise TaskFileError(
                    f"{where} (task {task['task_id']}): prompt + canonical_solution does not parse "
                    f"or does not define its entry_point {task['entry_point']!r}"
                )
            if task["task_id"] in seen:
                raise TaskFileError(f"{where}: task_id {task['task_id']!r} repeats {seen[task['task_id']]}")
            seen[task["task_id"]] = where
            yield ("task", task, f"{os.path.basename(path)}#{task['task_id']}", None)


def _text(record: dict[str, Any], field: str, where: str) -> str:
    value = record.get(field)
    if field not in record or value is None:
        raise TaskFileError(
            f"{where}: missing field {field!r} (a task needs {', '.join(FIELDS)}, or MBPP's {', '.join(MBPP_FIELDS)})"
        )
    if field == "task_id" and isinstance(value, int):
        return str(value)
    if not isinstance(value, str):
        raise TaskFileError(f"{where}: field {field!r} must be a string, not {type(value).__name__}")
    return value


def normalize(record: dict[str, Any], where: str) -> dict[str, str]:
    """The task of a HumanEval- or MBPP-shaped record: {task_id, prompt, canonical_solution, test, entry_point,
    description}; `where` ("task file F, line N") names it in errors."""
    if "test_list" in record and "prompt" not in record:
        return _from_mbpp(record, where)
    task = {field: _text(record, field, where) for field in FIELDS}
    if not task["entry_point"].isidentifier():
        raise TaskFileError(f"{where}: field 'entry_point' must name a function, not {task['entry_point']!r}")
    task["description"] = str(record.get("description") or "")
    return task


def _from_mbpp(record: dict[str, Any], where: str) -> dict[str, str]:
    task_id, text, code = (_text(record, field, where) for field in ("task_id", "text", "code"))
    asserts = list(record.get("test_list") or []) + list(record.get("challenge_test_list") or [])
    if not asserts or not all(isinstance(a, str) for a in asserts):
        raise TaskFileError(f"{where}: field 'test_list' must be a non-empty list of assert strings")
    setup = record.get("test_setup_code") or ""
    called = _CALLED.search(asserts[0].removeprefix("assert"))
    defined = _defined_functions(code)
    entry = called.group(1) if called and called.group(1) in defined else (defined[-1] if defined else "")
    if not entry:
        raise TaskFileError(f"{where}: field 'code' defines no function the tests call")
    return {
        "task_id": task_id,
        "prompt": "",
        "canonical_solution": code,
        "test": "\n".join([setup, *asserts]).strip() + "\n",
        "entry_point": entry,
        "description": text,
    }


def _defined_functions(code: str) -> list[str]:
    """Names of the top-level functions `code` defines, in order ([] when it does not parse)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def solution(task: dict[str, str]) -> str:
    """The canonical program: the prompt completed by its canonical solution."""
    return task["prompt"] + task["canonical_solution"]


def entry_function(task: dict[str, str]) -> tuple[list[str], ast.FunctionDef | ast.AsyncFunctionDef] | None:
    """(lines, node) of the entry point's top-level def in the canonical program, or None when it has none."""
    source = solution(task).replace("\r\n", "\n")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    found = [
        n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == task["entry_point"]
    ]
    return (source.split("\n"), found[-1]) if found else None


def preamble(task: dict[str, str]) -> str:
    """What the prompt holds besides the entry point (imports, helpers), which code written from the summary
    alone would lack; "" when the prompt does not parse."""
    try:
        tree = ast.parse(task["prompt"])
    except (SyntaxError, ValueError):
        return ""
    keep = [
        ast.get_source_segment(task["prompt"], n) or ""
        for n in tree.body
        if not (isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == task["entry_point"])
    ]
    return "\n".join(part for part in keep if part) + ("\n\n" if keep else "")


def _calls_check(test: str) -> bool:
    return "check" in _defined_functions(test)


def _harness(task: dict[str, str], candidate: str) -> str:
    call = f"\ncheck({candidate})\n" if _calls_check(task["test"]) else ""
    return f"\n\n{task['test']}\n{call}"


def reference_program(task: dict[str, str]) -> str:
    """The test program of the canonical solution (as HumanEval's harness builds it)."""
    return solution(task) + _harness(task, task["entry_point"])


def program(task: dict[str, str], code: str) -> str:
    """The test program of `code`, a model's function written from the task's summary: the prompt's imports and
    helpers, the code, then the tests. Code that names its function otherwise (the summary does not say the
    name) is tested through its last top-level function."""
    entry, defined = task["entry_point"], _defined_functions(code)
    alias = f"\n\n{entry} = {defined[-1]}\n" if defined and entry not in defined else ""
    return preamble(task) + code + alias + _harness(task, entry)


def to_json(task: dict[str, str]) -> str:
    """The `tests` column's value: the task, as it travels through sharding."""
    return json.dumps(task, sort_keys=True, ensure_ascii=False)


def from_json(value: str | None) -> dict[str, str] | None:
    return json.loads(value) if value else None
