"""Task files with tests (tasks:PATH): HumanEval/MBPP records, errors that name the line, tests kept through
sharding, and test programs that run in the sandbox."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from blueprint.data import tasks
from blueprint.data.readers import read_pairs
from blueprint.data.sources import Source
from blueprint.eval.sandbox import SandboxSettings, open_sandbox
from blueprint.stages import shard

EXAMPLE_TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks.jsonl"
MBPP = {
    "task_id": 7,
    "text": "Write a function to find the shared elements of two lists.",
    "code": "def helper(x):\n    return set(x)\n\ndef similar_elements(a, b):\n    return tuple(sorted(helper(a) & "
    "helper(b)))\n",
    "test_list": ["assert similar_elements([3, 4, 5], [5, 7, 4]) == (4, 5)", "assert similar_elements([1], [2]) == ()"],
    "test_setup_code": "",
    "challenge_test_list": [],
}


def records() -> list[dict]:
    return [json.loads(line) for line in EXAMPLE_TASKS.read_text().splitlines()]


def write_lines(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_missing_field_names_the_file_the_line_and_the_field(tmp_path):
    rows = records()[:3]
    del rows[1]["test"]
    path = write_lines(tmp_path / "mine.jsonl", rows)
    with pytest.raises(tasks.TaskFileError, match=rf"task file {path}, line 2: missing field 'test'"):
        list(Source(f"tasks:{path}").units())
    (tmp_path / "bad.jsonl").write_text(json.dumps(records()[0]) + "\n{not json\n")
    with pytest.raises(tasks.TaskFileError, match="bad.jsonl, line 2: not JSON"):
        list(Source(f"tasks:{tmp_path / 'bad.jsonl'}").units())
    broken = {**records()[0], "entry_point": "nowhere"}
    with pytest.raises(tasks.TaskFileError, match=r"line 1 \(task blueprint/0\).*does not define its entry_point"):
        list(Source(f"tasks:{write_lines(tmp_path / 'broken.jsonl', [broken])}").units())


def test_task_rows_keep_their_tests_through_sharding(tmp_path):
    zipped = tmp_path / "data" / "part-1.jsonl.gz"  # a glob over a .jsonl and a .jsonl.gz
    zipped.parent.mkdir()
    with gzip.open(zipped, "wt") as f:
        f.write(json.dumps(MBPP) + "\n")
    shutil.copy(EXAMPLE_TASKS, tmp_path / "data" / "part-0.jsonl")
    cfg = shard.ShardConfig(source=f"tasks:{tmp_path}/data/part-*", num_shards=2, eval_fraction=0.5, workers=1)
    out = shard.run(cfg, artifact_root=f"file://{tmp_path}/art", progress=False)
    assert out.metrics["pairs"] == len(records()) + 1, out.metrics  # every task kept
    rows = read_pairs(out.uri, "eval") + read_pairs(out.uri, "train")
    assert read_pairs(out.uri, "eval") and read_pairs(out.uri, "train")
    carried = {tasks.from_json(r["tests"])["task_id"]: r for r in rows}
    assert set(carried) == {r["task_id"] for r in records()} | {"7"}
    vowels = carried["blueprint/0"]
    assert vowels["summary"] == "Count the vowels (a, e, i, o, u, either case) in a string."
    assert vowels["code"].startswith("def count_vowels(text: str) -> int:\n    return") and '"""' not in vowels["code"]
    mbpp = carried["7"]
    assert mbpp["summary"] == MBPP["text"] and mbpp["name"] == "similar_elements"


def test_mbpp_records_and_renamed_functions_are_tested_as_the_task_says():
    box = open_sandbox(SandboxSettings(sandbox_timeout_s=5))
    mbpp = tasks.normalize(MBPP, "MBPP line 1")
    assert mbpp["entry_point"] == "similar_elements" and mbpp["prompt"] == ""
    vowels = tasks.normalize(records()[0], "line 1")
    renamed = "def vowels_in(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)\n"  # the summary gives no name
    count_words = tasks.normalize(records()[14], "line 15")  # its prompt imports re: the code written gets it too
    words = (
        "def count(text):\n    out = {}\n    for w in re.findall('[a-z]+', text.lower()):\n"
        "        out[w] = out.get(w, 0) + 1\n    return out\n"
    )
    outcomes = box.run_many(
        [
            tasks.reference_program(mbpp),
            tasks.program(vowels, renamed),
            tasks.program(count_words, words),
            tasks.program(vowels, "def f(x):\n    return 0\n"),
        ]
    )
    assert [o.status for o in outcomes] == ["pass", "pass", "pass", "fail"], outcomes
