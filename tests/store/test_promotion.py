"""The promoted pointer: a flat, bounded history; references relative to the root; a dead writer's lock broken;
a broken pointer refused in one line naming it; the format before still read."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from blueprint.pipelines import cli
from blueprint.stages import promote
from blueprint.store import commit_lock, promotion, retention, runs, storage


def entry(root: str, n: int) -> dict:
    """The pointer entry of promotion `n`: every location an output under `root`."""
    return {
        "name": "blueprint",
        "models": f"{root}/merge/m{n}",
        "summarizer": f"{root}/merge/m{n}/summarizer",
        "coder": f"{root}/merge/m{n}/coder",
        "evaluation": f"{root}/evaluate/e{n}",
        "adapters": f"{root}/ppo-round/a{n}",
        "base": "org/some-model",
        "coder_base": "",
        "shards": f"{root}/shard/s",
        "gate": f"{root}/gate/g{n}",
        "run": f"run-{n}",
        "metrics": {"reward_gen_mean": float(n)},
        "why": "better",
        "promoted_at": f"2026-01-01T00:00:{n % 60:02d}Z",
    }


def promote_once(root: str, n: int, keep: int = 20) -> None:
    """What the promote stage writes for promotion `n`: the new entry, the champion heading its history."""
    champion, version = promotion.read_pointer(root, "blueprint")
    gate = {"name": "blueprint", "why": "better", "challenger": entry(root, n)}
    promotion.write_pointer(
        root, "blueprint", promote.new_pointer(gate, champion, f"run-{n}", f"{root}/gate/g{n}", keep), version
    )


def old_nested_pointer(root: str, depth: int) -> str:
    """A pointer as written before (absolute URIs, each replaced pointer nested in `previous`), built as text:
    the old writer itself gave up near this depth."""
    text = "null"
    for n in range(depth):
        fields = json.dumps(entry(root, n))[:-1]
        text = f'{fields}, "previous": {text}}}'
    return text


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/art"
    return f"file://{tmp_path}/art"


def test_many_promotions_keep_a_flat_history_capped_at_the_setting(root):
    for n in range(30):
        promote_once(root, n, keep=5)
    stored = json.loads(storage.read_text(promotion.pointer_uri(root, "blueprint")))
    assert stored["format"] == 2 and "previous" not in stored
    assert [e["run"] for e in stored["history"]] == ["run-28", "run-27", "run-26", "run-25", "run-24"]
    assert all("history" not in e and "previous" not in e for e in stored["history"])
    pointer, _ = promotion.read_pointer(root, "blueprint")
    assert [e["run"] for e in promotion.history(pointer)] == [
        "run-29",
        "run-28",
        "run-27",
        "run-26",
        "run-25",
        "run-24",
    ]


def test_a_pointer_stores_locations_relative_to_its_root_and_a_model_id_as_given(root):
    promote_once(root, 1)
    promote_once(root, 2)
    stored = json.loads(storage.read_text(promotion.pointer_uri(root, "blueprint")))
    assert stored["adapters"] == "ppo-round/a2" and stored["summarizer"] == "merge/m2/summarizer"
    assert stored["history"][0]["evaluation"] == "evaluate/e1" and stored["base"] == "org/some-model"
    pointer, _ = promotion.read_pointer(root, "blueprint")
    assert pointer["adapters"] == f"{root}/ppo-round/a2" and pointer["history"][0]["gate"] == f"{root}/gate/g1"
    assert pointer["base"] == "org/some-model"  # a hub id, not an output of the root


def copy_root(source: str, target: str) -> None:
    """Copy every file of one root to another, then delete the original."""
    for rel in storage.list_files(source):
        storage.write_bytes(storage.join(target, rel), storage.read_bytes(storage.join(source, rel)))
    storage.delete_prefix(source)


def test_a_copied_root_reads_its_own_outputs_from_its_pointer_once_the_original_is_gone(root):
    promote_once(root, 1)
    promote_once(root, 2)
    copy = root.replace("/art", "/copy")
    copy_root(root, copy)
    pointer, _ = promotion.read_pointer(copy, "blueprint")
    assert pointer["models"] == f"{copy}/merge/m2" and pointer["history"][0]["adapters"] == f"{copy}/ppo-round/a1"


def test_a_base_that_is_an_output_of_the_root_is_stored_relative_and_read_back_under_the_copy(root):
    from blueprint.store import artifacts

    base = f"{root}/bootstrap/b"
    storage.write_json(artifacts.manifest_uri(base), {"stage": "bootstrap", "files": {}})
    champion = entry(root, 1) | {"base": base}
    promotion.write_pointer(root, "blueprint", champion, None)
    assert json.loads(storage.read_text(promotion.pointer_uri(root, "blueprint")))["base"] == "bootstrap/b"
    copy = root.replace("/art", "/copy")
    copy_root(root, copy)
    assert promotion.read_pointer(copy, "blueprint")[0]["base"] == f"{copy}/bootstrap/b"


def test_an_old_nested_pointer_a_thousand_promotions_deep_still_reads_and_the_next_promotion_flattens_it(tmp_path):
    root = f"file://{tmp_path}/art"
    storage.write_text(promotion.pointer_uri(root, "blueprint"), old_nested_pointer(root, 995))
    pointer, _ = promotion.read_pointer(root, "blueprint")
    chain = promotion.history(pointer)
    assert len(chain) == 995 and chain[0]["run"] == "run-994" and chain[-1]["run"] == "run-0"
    assert chain[1]["adapters"] == f"{root}/ppo-round/a993"  # absolute, as the old format stored it
    runs.write_record(root, "r", {})
    assert len(retention.promoted_roots(root)) > 995  # gc reads it too
    promote_once(root, 995, keep=20)
    stored = json.loads(storage.read_text(promotion.pointer_uri(root, "blueprint")))
    assert len(stored["history"]) == 20 and stored["history"][0]["adapters"] == "ppo-round/a994"
    assert len(storage.read_bytes(promotion.pointer_uri(root, "blueprint"))) < 32_000


def write_lock(root: str, holder: dict) -> str:
    lock = promotion.pointer_uri(root, "blueprint") + ".lock"
    storage.write_text(lock, json.dumps(holder))
    return lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("holder", ["a dead process on this host", "a silent writer on another host"])
def test_a_promotion_lock_whose_holder_died_is_broken(tmp_path, monkeypatch, holder):
    monkeypatch.setattr(promotion, "LOCK_WAIT_SECONDS", 3.0)  # a lock that is not broken fails in 3 s, not 30
    root = f"file://{tmp_path}/art"
    me = commit_lock.writer_identity()
    if holder == "a dead process on this host":
        dead = {**me, "pid": dead_pid(), "time": time.time()}
    else:
        dead = {**me, "host": "elsewhere-" + socket.gethostname(), "time": time.time() - 60}
    lock = write_lock(root, dead)
    started = time.monotonic()
    promote_once(root, 1)
    assert time.monotonic() - started < 2.5
    assert promotion.read_pointer(root, "blueprint")[0]["run"] == "run-1" and not storage.exists(lock)


def test_a_promotion_lock_a_live_writer_holds_is_waited_for_then_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(promotion, "LOCK_WAIT_SECONDS", 1.0)
    root = f"file://{tmp_path}/art"
    lock = write_lock(root, {**commit_lock.writer_identity(), "time": time.time()})  # this very process: alive
    with pytest.raises(storage.StorageError, match=r"blueprint\.json\.lock was held for 1 s by a live promotion"):
        promote_once(root, 1)
    assert storage.exists(lock) and promotion.read_pointer(root, "blueprint") == (None, None)


BROKEN = {
    "a previous that is not an object": lambda p: p | {"previous": "run-0"},
    "a previous that lacks fields": lambda p: p | {"previous": {"name": "blueprint", "metrics": {}}},
    "a history that is not a list": lambda p: p | {"history": {"run": "x"}},
    "a history entry that lacks fields": lambda p: p | {"history": [{"models": "merge/x"}]},
    "metrics that are not an object": lambda p: p | {"metrics": [1, 2]},
    "an adapters that is not a string": lambda p: p | {"adapters": {"uri": "x"}},
}


@pytest.mark.parametrize("damage", list(BROKEN))
def test_a_damaged_pointer_is_one_line_naming_it_in_promoted_and_gc(tmp_path, capsys, damage):
    root = f"file://{tmp_path}/art"
    storage.write_json(promotion.pointer_uri(root, "blueprint"), BROKEN[damage](entry(root, 1)))
    runs.write_record(root, "r", {})
    for command in (["promoted", root], ["gc", root, "--keep-runs", "1"]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "promoted/blueprint.json is corrupted" in err, err
