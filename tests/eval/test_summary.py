"""The end-of-run summary says each thing once."""

from __future__ import annotations

from blueprint.eval.summary import floor_verdict, run_summary
from blueprint.stages.gate import GateConfig


def test_a_gate_refusal_for_missed_floors_names_them_once():
    metrics = {"summary_nonempty_rate": 0.0, "code_parse_rate": 0.0, "reward_gen_mean": 0.0}
    verdict = floor_verdict(metrics, GateConfig().to_dict())
    missed = verdict.partition(": ")[2]
    assert "summary_nonempty_rate" in missed
    text = run_summary([], {"decision": "keep", "why": missed}, {}, verdict)
    assert text.count(missed) == 1
    assert "gate: not promoted: " + missed in text
    assert "final model: THE FINAL MODEL FAILED A FLOOR, do not use it (the floors on the gate's line)" in text


def test_a_gate_refusal_for_another_reason_keeps_the_floors_on_the_final_model_line():
    metrics = {"summary_nonempty_rate": 0.0, "code_parse_rate": 0.0, "reward_gen_mean": 0.0}
    verdict = floor_verdict(metrics, GateConfig().to_dict())
    text = run_summary([], {"decision": "keep", "why": "the champion scores higher"}, {}, verdict)
    assert f"final model: {verdict}" in text
