"""The round-trip reward on the micro Llama: exact against a hand-computed CE, invariant to batching and padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blueprint.models.lora import LoraSettings, adapter_parameters, attach_adapters, use_adapter
from blueprint.models.prompts import PromptConfig, code_prompt, summary_prompt
from blueprint.rl.copying import copy_rate
from blueprint.rl.reward import RewardConfig, RewardError, RewardModel

CODE = "def add(a, b):\n    return a + b\n"
SUMMARY = "Return the sum of two numbers."
LONG_CODE = "\n".join(f"def f{i}(x):\n    return x * {i} + len(str(x))" for i in range(12)) + "\n"


@pytest.fixture()
def coder_model(micro_model):
    """Summarizer + coder on the micro base; the coder gets non-zero LoRA weights so that it differs from the base."""
    model = attach_adapters(micro_model, lora=LoraSettings(r=4, alpha=8.0, dropout=0.1))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter_parameters(model, "coder").values():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def _hand_ce(model, tok, summary: str, code: str, max_code: int | None = None) -> float:
    """The definition, spelled out: one full forward, full logits, shift by one, CE over code tokens (+ EOS)."""
    prompt = tok(code_prompt(summary, PromptConfig()), add_special_tokens=False)["input_ids"]
    code_ids = tok(code, add_special_tokens=False)["input_ids"]
    code_ids = code_ids[:max_code] if max_code and len(code_ids) > max_code else code_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt + code_ids])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return F.cross_entropy(logits[len(prompt) - 1 : -1], ids[0, len(prompt) :]).item()


def test_reward_equals_hand_computed_cross_entropy(coder_model, micro_tokenizer):
    tok = micro_tokenizer
    coder_model.train()  # the reward must switch dropout off and restore the mode
    out = RewardModel(coder_model, tok, PromptConfig(), RewardConfig(use_gain=True))([CODE], [SUMMARY])
    assert coder_model.training and coder_model.active_adapter == "summarizer"
    coder_model.eval()
    with use_adapter(coder_model, "coder"):
        ce, ce_empty = _hand_ce(coder_model, tok, SUMMARY, CODE), _hand_ce(coder_model, tok, "", CODE)
    length = len(tok(SUMMARY)["input_ids"]) / len(tok(CODE)["input_ids"])
    assert out.ce.item() == pytest.approx(ce, abs=1e-5)
    assert out.ce_empty.item() == pytest.approx(ce_empty, abs=1e-5)
    assert out.gain.item() == pytest.approx(ce_empty - ce, abs=1e-5)
    assert out.length_term.item() == pytest.approx(0.01 * length, abs=1e-7)
    assert out.copy_term.item() == 0.0
    assert out.reward.item() == pytest.approx(ce_empty - ce - 0.01 * length, abs=1e-5)
    seed = RewardModel(coder_model, tok, config=RewardConfig(use_gain=False))([CODE], [SUMMARY])
    assert seed.reward.item() == pytest.approx(-ce - 0.01 * length, abs=1e-5)


def test_fast_head_path_matches_full_forward(coder_model, micro_tokenizer):
    rm = RewardModel(coder_model, micro_tokenizer, config=RewardConfig(batch_size=2, max_head_rows=7))
    assert rm._fast
    codes, summaries = [CODE, LONG_CODE, CODE], [SUMMARY, "Many small functions.", "Adds."]
    fast = rm(codes, summaries)
    rm._fast = False
    slow = rm(codes, summaries)
    torch.testing.assert_close(fast.ce, slow.ce, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.ce_empty, slow.ce_empty, rtol=0, atol=1e-5)


def test_padding_does_not_change_a_sample(coder_model, micro_tokenizer):
    rm = RewardModel(coder_model, micro_tokenizer, config=RewardConfig(batch_size=8))
    alone = rm([CODE], [SUMMARY])
    padded = rm([LONG_CODE, CODE], ["A long list of helper functions. " * 4, SUMMARY])
    for field in ("reward", "ce", "ce_empty"):
        assert getattr(padded, field)[1].item() == pytest.approx(getattr(alone, field)[0].item(), abs=1e-5)


def test_batched_equals_per_sample(coder_model, micro_tokenizer):
    rm = RewardModel(coder_model, micro_tokenizer, config=RewardConfig(batch_size=3))
    codes = [CODE, LONG_CODE, "import os\nprint(os.sep)\n", CODE, "x = [i * i for i in range(10)]\n"]
    summaries = [SUMMARY, "Helpers.", "Print the path separator.", "Adds two things together, returning it.", ""]
    batched = rm(codes, summaries)
    for i, (c, s) in enumerate(zip(codes, summaries, strict=True)):
        single = rm([c], [s])
        for field in ("reward", "ce", "ce_empty", "gain", "length_term"):
            assert getattr(batched, field)[i].item() == pytest.approx(getattr(single, field)[0].item(), abs=1e-5)


def test_empty_summary_scores_the_baseline(coder_model, micro_tokenizer):
    out = RewardModel(coder_model, micro_tokenizer)([CODE, CODE], ["", SUMMARY])
    assert out.ce[0].item() == out.ce_empty[0].item() and out.gain[0].item() == 0.0
    assert out.length_term[0].item() == 0.0 and out.reward[0].item() == 0.0
    assert out.ce_empty[0].item() == out.ce_empty[1].item()


def test_each_distinct_sequence_goes_through_the_model_once(coder_model, micro_tokenizer):
    rm = RewardModel(coder_model, micro_tokenizer, config=RewardConfig(batch_size=2))
    rows = []
    hook = rm._decoder.register_forward_hook(
        lambda mod, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        rm([CODE, CODE, CODE, LONG_CODE], ["Adds.", "Adds.", "", "Helpers."])
    finally:
        hook.remove()
    # distinct: (Adds., CODE), (Helpers., LONG_CODE) and one empty-summary row per code (the "" sample reuses it)
    assert sum(rows) == 4 and max(rows) <= 2


def test_too_long_inputs_are_truncated_and_counted(coder_model, micro_tokenizer):
    tok = micro_tokenizer
    cfg = RewardConfig(max_code_tokens=8, max_summary_tokens=4, length_coef=0.5)
    long_summary = "Return the sum of the two numbers a and b, as the plus operator does."
    out = RewardModel(coder_model, tok, config=cfg)([CODE, CODE], [long_summary, "Sum."])
    assert out.code_truncated.tolist() == [True, True]
    assert out.summary_truncated.tolist() == [True, False]
    assert out.num_truncated == 2 and out.metrics()["summary_truncated"] == 1
    n_summary, n_code = len(tok(long_summary)["input_ids"]), len(tok(CODE)["input_ids"])
    assert out.length_term[0].item() == pytest.approx(0.5 * n_summary / n_code)  # what was written, not what was kept
    shown = tok.decode(tok(long_summary)["input_ids"][:4])
    with use_adapter(coder_model, "coder"):
        assert out.ce[0].item() == pytest.approx(_hand_ce(coder_model, tok, shown, CODE, max_code=8), abs=1e-5)


def test_non_finite_logits_raise(micro_model, micro_tokenizer):
    rm = RewardModel(micro_model, micro_tokenizer, coder_adapter=None)
    assert torch.isfinite(rm([CODE], [SUMMARY]).reward).all()
    with torch.no_grad():
        micro_model.model.norm.weight[0] = float("nan")
    with pytest.raises(RewardError, match=r"non-finite .* samples \[0, 1\]"):
        rm([CODE, LONG_CODE], [SUMMARY, ""])


def test_copying_the_code_is_penalised(micro_model, micro_tokenizer):
    rm = RewardModel(micro_model, micro_tokenizer, config=RewardConfig(copy_coef=2.0), coder_adapter=None)
    out = rm([LONG_CODE, LONG_CODE], [LONG_CODE, "Twelve small helpers."])
    assert out.copy_term.tolist() == [2.0, 0.0]
    assert copy_rate([1, 2, 3], [0, 1, 2, 3], 2) == 1.0 and copy_rate([1, 2], [1, 2], 3) == 0.0


def test_bad_inputs_and_configs_are_named(coder_model, micro_tokenizer):
    rm = RewardModel(coder_model, micro_tokenizer)
    with pytest.raises(ValueError, match="equally many"):
        rm([CODE], [])
    with pytest.raises(ValueError, match="sample 1: code"):
        rm([CODE, "  "], ["a", "b"])
    with pytest.raises(ValueError, match="RewardConfig.batch_size"):
        RewardConfig(batch_size=0)
    with pytest.raises(ValueError, match="RewardConfig.length_coef"):
        RewardConfig(length_coef=float("nan"))
    with pytest.raises(ValueError, match="'critic' not found"):
        RewardModel(coder_model, micro_tokenizer, coder_adapter="critic")


def test_prompt_templates():
    structured = PromptConfig(style="structured")
    assert "Task description" in summary_prompt(CODE, structured) and CODE in summary_prompt(CODE, structured)
    assert code_prompt("S", PromptConfig()) == "### Summary:\nS\n### Code:\n"
    assert summary_prompt("{x}", PromptConfig()) == "### Code:\n{x}\n### Summary:\n"  # braces in code are data
    for bad in (dict(style="fancy"), dict(summary_to_code="{code}"), dict(code_to_summary="{code} {code}")):
        with pytest.raises(ValueError, match="PromptConfig"):
            PromptConfig(**bad)


def test_batches_respect_row_and_token_budgets(coder_model, micro_tokenizer):
    rm = RewardModel(coder_model, micro_tokenizer, config=RewardConfig(batch_size=3, max_batch_tokens=100))
    shapes = []
    hook = rm._decoder.register_forward_hook(
        lambda mod, args, kwargs, out: shapes.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        codes = [LONG_CODE] + [f"x{i} = {i}\n" for i in range(7)]
        rm(codes, [f"Set x{i}." for i in range(8)])
    finally:
        hook.remove()
    assert sum(b for b, _ in shapes) == 16  # 8 summary rows + 8 empty-summary rows
    assert all(b <= 3 and (b * t <= 100 or b == 1) for b, t in shapes)
    assert shapes == sorted(shapes, key=lambda s: -s[1])  # longest first
