"""The quality gate and the promoted pointer: only a challenger that wins is promoted, races lose no decision."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch
from test_evaluate import CFG, PAIRS, make_adapters, make_base, make_shards

from blueprint.config import parse
from blueprint.eval.promotion_rule import PromotionRule, decide
from blueprint.stages import evaluate, gate, merge, promote
from blueprint.stages.profiles import stage_settings
from blueprint.store import promotion, storage

# The gate's metric here is the coder's reward on the true docstrings: at this scale the summarizer's summaries
# barely help the coder, while a coder trained on the pairs clearly reads them. Every promotable model must clear
# the sanity floors: its summarizer is trained to write finished summaries, its coder long enough that some code
# parses (the micro coder writes parseable code from about 100 full-batch steps on).
RULE = {"metric": "reward_true_mean", "floor": 0.0}
SUMMARIZER_STEPS = 30
LEVELS = (("untrained", 0), ("weak", 100), ("some", 150), ("trained", 300))  # coder steps; untrained never parses


@pytest.fixture(scope="module")
def world(tmp_path_factory, micro_tokenizer):
    """One base and adapter sets whose coder trained for LEVELS steps, each evaluated and merged, and one whose
    summarizer learnt to write empty summaries."""
    root = tmp_path_factory.mktemp("gate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shards = make_shards(root, PAIRS, PAIRS)
        base = make_base(root, micro_tokenizer, seed=0)
        art = f"file://{root}/artifacts"
        runs = {}
        levels = [(name, steps, PAIRS) for name, steps in LEVELS] + [("silent", 150, [(c, "") for c, _ in PAIRS])]
        for name, steps, summaries in levels:
            adapters = make_adapters(
                root, base, name, coder_steps=steps, summarizer_steps=SUMMARIZER_STEPS, summarizer_pairs=summaries
            )
            ev = evaluate.run(
                evaluate.EvaluateConfig(**CFG),
                shards=shards,
                base=base,
                adapters=adapters,
                artifact_root=art,
                progress=False,
            )
            models = merge.run(
                merge.MergeConfig(), base=base, adapters=adapters, evaluation=ev.uri, artifact_root=art, progress=False
            ).uri
            runs[name] = dict(shards=shards, base=base, adapters=adapters, evaluation=ev.uri, models=models)
    finally:
        torch.set_num_threads(threads)
    return dict(root=root, art=art, runs=runs, tokenizer=micro_tokenizer)


def judge(run: dict, root: str, **settings) -> dict:
    out = gate.run(parse(gate.GateConfig, {**RULE, **settings}), **run, artifact_root=root, progress=False)
    return storage.read_json(storage.join(out.uri, gate.GATE_FILE)) | {"uri": out.uri}


def promote_gated(record: dict, root: str, run: str) -> dict:
    return promote.promote(promote.PromoteConfig(run=run), record["uri"], root, progress=False)


def test_the_rule_promotes_only_a_winner_that_clears_the_floor():
    rule = PromotionRule(metric="gain_gen_mean", margin=0.1, floor_metric="pairwise_accuracy", floor=0.5)
    ours = {
        "gain_gen_mean": 1.0,
        "pairwise_accuracy": 0.6,
        "summary_nonempty_rate": 1.0,
        "eos_rate": 0.9,
        "code_parse_rate": 0.5,
    }
    assert decide(ours, None, rule)[0]
    assert decide(ours, {"gain_gen_mean": 0.85}, rule) == (
        True,
        "gain_gen_mean 1.0000 beats the champion's 0.8500 by more than 0.1",
    )
    assert not decide(ours, {"gain_gen_mean": 0.95}, rule)[0]  # better, but not by the margin
    assert decide({**ours, "pairwise_accuracy": 0.4}, None, rule) == (
        False,
        "floor pairwise_accuracy >= 0.5 missed (pairwise_accuracy 0.4)",
    )
    assert not decide({**ours, "gain_gen_mean": float("nan")}, None, rule)[0]
    assert decide(ours, {}, rule)[0]  # a champion without the metric cannot defend


def test_a_first_run_is_promoted_then_a_better_one_replaces_it_and_a_worse_one_does_not(world, tmp_path):
    root, runs = f"file://{tmp_path}/art", world["runs"]
    first = judge(runs["some"], root)
    assert first["decision"] == "promote" and first["champion"] is None
    assert promote_gated(first, root, "run-1")["promoted"] == 1.0

    worse = judge(runs["weak"], root)  # fewer coder steps, as a bad retrain would leave it
    assert worse["decision"] == "keep", worse["why"]
    assert worse["challenger"]["metrics"]["reward_true_mean"] < worse["champion"]["metrics"]["reward_true_mean"]
    report = storage.read_text(storage.join(worse["uri"], "report.md"))
    assert "# gate: keep" in report and "| metric | champion (run-1) | challenger |" in report

    better = judge(runs["trained"], root)
    assert better["decision"] == "promote", better["why"]
    promote_gated(better, root, "run-3")
    pointer, _ = promotion.read_pointer(root, "blueprint")
    assert [p["run"] for p in promotion.history(pointer)] == ["run-3", "run-1"]
    assert pointer["models"] == runs["trained"]["models"] and pointer["coder"].endswith("/coder")


def test_the_floor_refuses_even_a_first_run(world, tmp_path):
    record = judge(world["runs"]["trained"], f"file://{tmp_path}/art", floor_metric="code_parse_rate", floor=0.9)
    assert record["decision"] == "keep" and "floor code_parse_rate >= 0.9 missed" in record["why"]
    with pytest.raises(ValueError, match="decided 'keep'"):
        promote_gated(record, f"file://{tmp_path}/art", "r")


def test_the_champion_is_evaluated_again_on_a_new_eval_split(world, tmp_path):
    root, runs = f"file://{tmp_path}/art", world["runs"]
    promote_gated(judge(runs["weak"], root), root, "old")
    new_split = make_shards(tmp_path, PAIRS, PAIRS[:6])  # the data changed: six held-out functions, not ten
    challenger = dict(runs["trained"], shards=new_split)
    challenger["evaluation"] = evaluate.run(
        evaluate.EvaluateConfig(**CFG),
        shards=new_split,
        base=runs["trained"]["base"],
        adapters=runs["trained"]["adapters"],
        artifact_root=root,
        progress=False,
    ).uri
    record = judge(challenger, root)
    assert record["champion"]["evaluation"] != runs["weak"]["evaluation"]
    assert record["champion"]["metrics"]["examples"] == 6 == record["challenger"]["metrics"]["examples"]
    assert record["decision"] == "promote"


def test_a_corrupted_pointer_and_an_unreadable_champion_evaluation_are_refused_naming_them(world, tmp_path):
    root = f"file://{tmp_path}/art"
    storage.write_text(promotion.pointer_uri(root, "blueprint"), "{not json")
    with pytest.raises(promotion.PointerError, match=r"promoted/blueprint.json is corrupted"):
        judge(world["runs"]["trained"], root)
    pointer = {k: "file:///nowhere" for k in promotion.REQUIRED} | {"metrics": {}, "name": "blueprint"}
    promotion.write_pointer(root, "blueprint", pointer, hashlib.sha256(b"{not json").hexdigest())  # its version
    with pytest.raises(promotion.PointerError, match=r"champion's evaluation named by promoted/blueprint.json"):
        judge(world["runs"]["trained"], root)


@pytest.mark.parametrize("store", ["file", "s3"])
def test_two_promotions_racing_lose_no_decision(world, tmp_path, store, request):
    """Both challengers beat the champion at their gates; they promote at once. The pointer ends on the better,
    with the other (or its refusal) on record: a compare-and-swap, never a lost write."""
    root = request.getfixturevalue("s3_bucket") + "/art" if store == "s3" else f"file://{tmp_path}/art"
    runs = world["runs"]
    promote_gated(judge(runs["weak"], root), root, "champion")
    records = {name: judge(runs[name], root) for name in ("some", "trained")}
    assert all(r["decision"] == "promote" for r in records.values())
    results, barrier = {}, threading.Barrier(2)

    def go(name: str) -> None:
        barrier.wait()
        results[name] = promote_gated(records[name], root, name)

    threads = [threading.Thread(target=go, args=(n,)) for n in records]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pointer, _ = promotion.read_pointer(root, "blueprint")
    chain = [p["run"] for p in promotion.history(pointer)]
    assert chain[0] == "trained" and chain[-1] == "champion"
    if results["some"]["promoted"]:  # it won the race: the better one replaced it, naming it as previous
        assert chain == ["trained", "some", "champion"]
    else:  # it lost the race: judged again against the better one, and refused
        assert chain == ["trained", "champion"] and "does not beat" in results["some"]["why"]


def test_a_misspelt_metric_is_refused_when_the_settings_are_read():
    with pytest.raises(ValueError, match="'reward_gen_maen' is not an evaluate metric"):
        parse(gate.GateConfig, {"metric": "reward_gen_maen"})


def test_a_retried_promote_whose_write_went_through_is_promoted_once(world, tmp_path):
    root = f"file://{tmp_path}/art"
    record = judge(world["runs"]["some"], root)
    assert promote_gated(record, root, "r")["promoted"] == 1.0
    assert promote_gated(record, root, "r")["promoted"] == 1.0  # the pod's retry
    pointer, _ = promotion.read_pointer(root, "blueprint")
    assert [p["run"] for p in promotion.history(pointer)] == ["r"]


def test_a_copied_root_is_gated_against_its_own_champion_once_the_original_is_gone(world, tmp_path):
    """`stage gate --force` in a copy of a root whose original was deleted reads the champion from the copy."""
    import shutil

    original, copy = tmp_path / "original", tmp_path / "copy"
    shutil.copytree(world["root"] / "artifacts", original)

    def moved(run: dict[str, str], where) -> dict[str, str]:
        return {k: v.replace(world["art"], f"file://{where}") for k, v in run.items()}

    promote_gated(judge(moved(world["runs"]["some"], original), f"file://{original}"), f"file://{original}", "first")
    shutil.copytree(original, copy)
    shutil.rmtree(original)
    out = gate.run(
        parse(gate.GateConfig, RULE),
        **moved(world["runs"]["trained"], copy),
        artifact_root=f"file://{copy}",
        force=True,
        progress=False,
    )
    record = storage.read_json(storage.join(out.uri, gate.GATE_FILE))
    assert record["decision"] == "promote" and record["champion"]["run"] == "first"
    assert record["champion"]["evaluation"] == moved(world["runs"]["some"], copy)["evaluation"]


@pytest.mark.parametrize("run, missed", [("silent", "summary_nonempty_rate"), ("untrained", "code_parse_rate")])
def test_the_smoke_gate_refuses_a_useless_challenger_and_says_which_floor_it_missed(world, tmp_path, run, missed):
    """The smoke profile's own floor is 0: the sanity floors still hold there (no champion to beat, either)."""
    settings = {**stage_settings("smoke", "gate"), "metric": RULE["metric"]}
    out = gate.run(
        parse(gate.GateConfig, settings), **world["runs"][run], artifact_root=f"file://{tmp_path}/art", progress=False
    )
    record = storage.read_json(storage.join(out.uri, gate.GATE_FILE))
    assert record["decision"] == "keep" and record["champion"] is None
    assert f"sanity floor {missed} >= " in record["why"], record["why"]
    assert [m for m in record["missed_floors"] if missed in m], record["missed_floors"]
    report = storage.read_text(storage.join(out.uri, "report.md"))
    assert "# gate: keep" in report and f"Floors the challenger missed:\n\n- sanity floor {missed}" in report
    if run == "silent":
        assert record["challenger"]["metrics"]["summary_nonempty_rate"] == 0.0
