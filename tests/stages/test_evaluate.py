"""Evaluate stage on the micro Llama: metrics that mean what they say, report/plot/history, clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaForCausalLM

from blueprint.eval import metrics
from blueprint.models import lora
from blueprint.models.adapter_set import RoleModels, save_adapter_set
from blueprint.models.bases import Bases, open_base
from blueprint.models.prompts import PromptConfig, code_prompt, encode_prompts, encode_targets, summary_prompt
from blueprint.models.tiny import tiny_llama_config
from blueprint.stages import evaluate, merge
from blueprint.store import artifacts, storage

PAIRS = [
    ("def add(a, b):\n    return a + b\n", "Return the sum of two numbers."),
    (
        "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()\n",
        "Read a text file and return its lines.",
    ),
    ("def is_even(n):\n    return n % 2 == 0\n", "Tell whether an integer is even."),
    (
        "def first(items, default=None):\n    for item in items:\n        return item\n    return default\n",
        "Return the first item of an iterable, or a default when it is empty.",
    ),
    ("def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n", "Limit a value to a closed interval."),
    ("def squares(n):\n    return [i * i for i in range(n)]\n", "List the squares of the first n integers."),
    ("def join_words(words):\n    return ' '.join(words)\n", "Join words with single spaces."),
    ("def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())\n", "Count the vowels in a string."),
    ("def invert(d):\n    return {v: k for k, v in d.items()}\n", "Swap the keys and values of a dictionary."),
    ("def mean(xs):\n    return sum(xs) / len(xs)\n", "Compute the arithmetic mean of a sequence of numbers."),
]
LORA = lora.LoraSettings(
    r=8,
    alpha=16.0,
    dropout=0.0,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
)
CFG = dict(
    max_examples=len(PAIRS),
    max_new_tokens=12,
    max_code_tokens=48,
    max_summary_tokens=24,
    batch_size=4,
    report_examples=2,
)


# ---------------------------------------------------------------------------------------------- artifact helpers
def commit(local: Path, uri: str, stage: str) -> str:
    artifacts.commit(local, uri, stage=stage, config={}, inputs={}, metrics={})
    return storage.normalize(uri)


def make_shards(root: Path, train: list[tuple[str, str]], held_out: list[tuple[str, str]]) -> str:
    """A committed shard artifact: train/ and eval/ Parquet files with the shard columns."""
    local = root / "shards-src"
    for split, pairs in (("train", train), ("eval", held_out)):
        (local / split).mkdir(parents=True)
        cols = {
            "id": [f"{split}{i:04d}" for i in range(len(pairs))],
            "code": [c for c, _ in pairs],
            "summary": [s for _, s in pairs],
            "name": [c.split("(")[0][4:] for c, _ in pairs],
            "language": ["python"] * len(pairs),
            "source": ["test"] * len(pairs),
            "path": ["tests/pairs.py"] * len(pairs),
            "license": [None] * len(pairs),
        }
        schema = pa.schema([(k, pa.string()) for k in cols])
        pq.write_table(pa.table(cols, schema=schema), local / split / "part-00000-of-00001.parquet")
    return commit(local, str(root / "shards"), "shard")


def make_base(root: Path, tokenizer, seed: int, name: str = "base") -> str:
    """A committed micro base folder (what bootstrap produces), as `save_pretrained` writes it."""
    torch.manual_seed(seed)
    local = root / f"{name}-src"
    LlamaForCausalLM(tiny_llama_config(tokenizer, "micro")).save_pretrained(local)
    tokenizer.save_pretrained(local)
    return commit(local, str(root / name), "bootstrap")


def train_coder(model, tokenizer, pairs: list[tuple[str, str]], steps: int) -> None:
    """Full-batch SFT of the coder adapter on (summary -> code): loss on the code tokens only."""
    prompts = encode_prompts(tokenizer, [code_prompt(s, PromptConfig()) for _, s in pairs])
    targets, _ = encode_targets(tokenizer, [c for c, _ in pairs])
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    for r, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        ids[r, : len(p) + len(t)] = torch.tensor(p + t)
        labels[r, len(p) : len(p) + len(t)] = torch.tensor(t)
    opt = torch.optim.AdamW(lora.trainable_only(model, "coder"), lr=2e-2)
    with lora.use_adapter(model, "coder"):
        for _ in range(steps):
            model(
                input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id), labels=labels
            ).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def train_summarizer(model, tokenizer, pairs: list[tuple[str, str]], steps: int) -> None:
    """Full-batch SFT of the summarizer adapter on (code -> summary): it then writes finished, non-empty summaries,
    as a model the gate's sanity floors let through must."""
    prompts = encode_prompts(tokenizer, [summary_prompt(c, PromptConfig()) for c, _ in pairs])
    targets, _ = encode_targets(tokenizer, [s for _, s in pairs])
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    ids = torch.full((len(pairs), width), tokenizer.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    for r, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        ids[r, : len(p) + len(t)] = torch.tensor(p + t)
        labels[r, len(p) : len(p) + len(t)] = torch.tensor(t)
    opt = torch.optim.AdamW(lora.trainable_only(model, "summarizer"), lr=2e-2)
    with lora.use_adapter(model, "summarizer"):
        for _ in range(steps):
            model(
                input_ids=ids, attention_mask=(labels != -100) | (ids != tokenizer.pad_token_id), labels=labels
            ).loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()


def make_adapters(
    root: Path,
    base: str,
    name: str,
    coder_steps: int = 0,
    summarizer_steps: int = 0,
    summarizer_pairs: list[tuple[str, str]] = PAIRS,
) -> str:
    """A committed adapter set (summarizer + coder) on `base`; the coder trained for `coder_steps` steps, the
    summarizer for `summarizer_steps` on `summarizer_pairs`."""
    model, tokenizer = open_base(base)
    torch.manual_seed(1)
    model = lora.attach_adapters(model, lora.ROLES, LORA)
    if coder_steps:
        train_coder(model, tokenizer, PAIRS, coder_steps)
    if summarizer_steps:
        train_summarizer(model, tokenizer, summarizer_pairs, summarizer_steps)
    local = root / f"{name}-src"
    save_adapter_set(
        RoleModels(model, tokenizer, model, tokenizer), local, Bases.of(base), list(lora.ROLES), {"round": coder_steps}
    )
    return commit(local, str(root / name), "warmup")


@pytest.fixture(scope="module")
def world(tmp_path_factory, micro_tokenizer):
    """Shards, a base, untrained and coder-trained adapters, and two chained evaluations (epoch 0 and 1)."""
    root = tmp_path_factory.mktemp("evaluate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # micro-model ops are too small to split; on a busy shared CPU, threads only thrash
    try:
        shards = make_shards(root, PAIRS, PAIRS)  # same pairs held out: the test is about the metric
        base = make_base(root, micro_tokenizer, seed=0)
        untrained = make_adapters(root, base, "untrained")
        trained = make_adapters(root, base, "trained", coder_steps=60)
        art = str(root / "artifacts")
        first = evaluate.run(
            evaluate.EvaluateConfig(**CFG, epoch=0),
            shards=shards,
            base=base,
            adapters=untrained,
            artifact_root=art,
            progress=False,
        )
        second = evaluate.run(
            evaluate.EvaluateConfig(**CFG, epoch=1),
            shards=shards,
            base=base,
            adapters=trained,
            previous=first.uri,
            artifact_root=art,
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return dict(
        root=root, shards=shards, base=base, untrained=untrained, trained=trained, art=art, first=first, second=second
    )


def local(uri: str, *parts: str) -> Path:
    return storage.local_path(storage.join(uri, *parts))


# ---------------------------------------------------------------------------------------------- metric helpers
def test_text_and_code_metrics():
    refs = ["Return the sum of two numbers.", "Read a text file and return its lines."]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.rouge_l(refs, refs) == pytest.approx(100.0)
    assert 0.0 < metrics.bleu(["Return the sum of numbers.", "Read a file and return lines."], refs) < 100.0
    assert metrics.bleu(["", ""], refs) == 0.0
    assert metrics.parses("def f(x):\n    return x\n")
    assert not metrics.parses("def f(x:\n    return x\n")  # syntax error
    assert not metrics.parses("def f(x):\nreturn x\n")  # indentation error
    assert not metrics.parses("x = 1\x00")  # null byte: ValueError inside ast.parse
    assert not metrics.parses("\n\n  \n# only a comment\n")  # blank output rebuilds nothing
    assert metrics.parse_rate(["pass", "def (", "x = 1"]) == pytest.approx(2 / 3)
    assert metrics.exact_match(["def f():  \n    pass\n\n"], ["\ndef f():\n    pass"]) == 1.0
    assert metrics.exact_match(["def f():\n  pass"], ["def f():\n    pass"]) == 0.0
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.bleu(refs, refs[:1])


def test_partners_are_a_fixed_derangement():
    for n in (2, 3, 10):
        p = evaluate.partners(n, seed=0)
        assert sorted(p) == list(range(n)) and all(p[i] != i for i in range(n))
        assert p == evaluate.partners(n, seed=0)
    assert evaluate.pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])) == 0.5


# ---------------------------------------------------------------------------------------------- the stage
def test_pairwise_accuracy_rises_when_the_coder_learns(world):
    before, after = world["first"].metrics, world["second"].metrics
    # untrained LoRA (B = 0) is the random base: its ranking of docstrings is noise
    assert after["pairwise_accuracy"] >= 0.9 > before["pairwise_accuracy"]
    assert after["ce_true_mean"] < before["ce_true_mean"]
    assert after["gain_true_mean"] > before["gain_true_mean"] + 0.05  # the docstring now tells the coder something
    assert after["reward_true_mean"] > before["reward_true_mean"]
    assert after["code_bleu"] > before["code_bleu"]


def test_metrics_land_in_manifest_and_files(world):
    out = world["second"]
    m = out.metrics
    for key in (
        "reward_gen_mean",
        "reward_true_mean",
        "gain_gen_mean",
        "pairwise_accuracy",
        "bleu_summary",
        "rougeL_summary",
        "code_parse_rate",
        "code_bleu",
        "code_exact_match",
        "copy_rate",
        "eos_rate",
        "summary_tokens_mean",
        "length_ratio_mean",
        "epoch",
    ):
        assert isinstance(m[key], (int, float)), key
    assert m["epoch"] == 1 and m["examples"] == len(PAIRS)
    assert 0 <= m["eos_rate"] <= 1 and 0 <= m["copy_rate"] <= 1 and m["summary_tokens_mean"] <= CFG["max_new_tokens"]
    full = json.loads(local(out.uri, "metrics.json").read_text())
    for comp in evaluate.COMPONENTS:
        for tag in ("gen", "true"):
            assert f"{comp}_{tag}_mean" in full and f"{comp}_{tag}_std" in full
    # reward = gain - length term, per set
    assert full["reward_true_mean"] == pytest.approx(full["gain_true_mean"] - full["length_term_true_mean"], abs=1e-5)
    samples = [json.loads(line) for line in local(out.uri, "samples.jsonl").read_text().splitlines()]
    assert [s["summary"] for s in samples] == [s for _, s in PAIRS]
    assert all(isinstance(s["generated_summary"], str) and isinstance(s["rebuilt_code"], str) for s in samples)
    # deterministic: the same inputs are a cache hit, a forced rerun reproduces the numbers (greedy decoding)
    again = evaluate.run(
        evaluate.EvaluateConfig(**CFG, epoch=1),
        shards=world["shards"],
        base=world["base"],
        adapters=world["trained"],
        previous=world["first"].uri,
        artifact_root=world["art"],
        progress=False,
    )
    assert again.cached and again.uri == out.uri
    forced = evaluate.run(
        evaluate.EvaluateConfig(**CFG, epoch=1),
        shards=world["shards"],
        base=world["base"],
        adapters=world["trained"],
        previous=world["first"].uri,
        out_uri=str(world["root"] / "re"),
        progress=False,
    )
    assert {k: v for k, v in forced.metrics.items() if k != "seconds"} == {k: v for k, v in m.items() if k != "seconds"}


def test_report_plot_and_history_across_two_runs(world):
    first, second = world["first"], world["second"]
    assert [h["epoch"] for h in json.loads(local(first.uri, "history.json").read_text())] == [0]
    history = json.loads(local(second.uri, "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1]
    # references, not URIs: the files stay the same when the root is copied elsewhere
    assert [h["adapters"] for h in history] == [
        artifacts.portable_name(world["untrained"]),
        artifacts.portable_name(world["trained"]),
    ]
    assert history[0]["pairwise_accuracy"] == first.metrics["pairwise_accuracy"]
    png = local(second.uri, "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = local(second.uri, "report.md").read_text()
    assert "## Metrics" in text and "## History" in text and "## Examples" in text
    assert "| pairwise_accuracy |" in text and artifacts.portable_name(world["trained"]) in text
    assert text.count("### ") == CFG["report_examples"]
    assert repr(PAIRS[0][1]) in text and "def add(a, b):" in text
    table = evaluate.compare([first.uri, second.uri])
    row = next(line for line in table.splitlines() if line.startswith("| pairwise_accuracy |"))
    assert row.count("|") == 4 and "epoch 0" in table and "epoch 1" in table and second.uri in table
    with pytest.raises(artifacts.ArtifactError, match="not an evaluate output"):
        evaluate.compare([world["trained"]])


def test_empty_eval_shards_fail_clearly_and_commit_nothing(world, tmp_path):
    shards = make_shards(tmp_path, PAIRS, [])
    art = tmp_path / "artifacts"
    with pytest.raises(ValueError, match=f"shards {shards} hold no eval pairs"):
        evaluate.run(
            evaluate.EvaluateConfig(**CFG),
            shards=shards,
            base=world["base"],
            adapters=world["trained"],
            artifact_root=str(art),
            progress=False,
        )
    assert not list(art.rglob(artifacts.MANIFEST_NAME))


def test_adapters_from_another_base_are_refused(world, micro_tokenizer, tmp_path):
    other = make_base(tmp_path, micro_tokenizer, seed=5, name="other-base")
    with pytest.raises(artifacts.ArtifactError, match="the summarizer was trained on base"):
        evaluate.run(
            evaluate.EvaluateConfig(**CFG),
            shards=world["shards"],
            base=other,
            adapters=world["trained"],
            artifact_root=str(tmp_path / "artifacts"),
            progress=False,
        )
    assert not list((tmp_path / "artifacts").rglob(artifacts.MANIFEST_NAME))


def test_previous_must_be_an_evaluate_output(world, tmp_path):
    with pytest.raises(artifacts.ArtifactError, match="not an evaluate output"):
        evaluate.run(
            evaluate.EvaluateConfig(**CFG),
            shards=world["shards"],
            base=world["base"],
            adapters=world["trained"],
            previous=world["untrained"],
            artifact_root=str(tmp_path),
            progress=False,
        )


def test_config_validation():
    with pytest.raises(ValueError, match="max_examples"):
        evaluate.EvaluateConfig(max_examples=0)
    with pytest.raises(ValueError, match="style"):
        evaluate.EvaluateConfig(prompt_style="fancy")


def test_merge_card_carries_the_evaluation(world, tmp_path):
    """The model card quotes the evaluation of the very adapters merged; another run's evaluation is refused."""
    out = merge.run(
        merge.MergeConfig(keep_adapters=False),
        base=world["base"],
        adapters=world["trained"],
        evaluation=world["second"].uri,
        artifact_root=str(tmp_path),
        progress=False,
    )
    card = local(out.uri, "coder", "README.md").read_text()
    ref = artifacts.portable_name
    assert ref(world["second"].uri) in card and "| pairwise_accuracy |" in card and ref(world["trained"]) in card
    assert str(world["root"]) not in card
    assert out.metrics["eval_pairwise_accuracy"] == world["second"].metrics["pairwise_accuracy"]
    assert not any(rel.startswith("adapters/") for rel in out.manifest["files"])
    with pytest.raises(ValueError, match="its metrics would describe another model"):
        merge.run(
            merge.MergeConfig(),
            base=world["base"],
            adapters=world["untrained"],
            evaluation=world["second"].uri,
            artifact_root=str(tmp_path),
            progress=False,
        )


EXAMPLE_TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks.jsonl"


def test_rows_with_tests_report_execution_metrics_and_per_task_results(world, tmp_path):
    """A task file as the source: the canonical solutions all pass, the coder's code from the docstring and from
    the generated summary is run against the tests, and sampled codes give the unbiased pass@k."""
    from blueprint.config import parse
    from blueprint.data.readers import read_pairs
    from blueprint.stages import shard

    shards = shard.run(
        parse(
            shard.ShardConfig, {"source": f"tasks:{EXAMPLE_TASKS}", "eval_fraction": 0.2, "num_shards": 1, "workers": 1}
        ),
        artifact_root=str(tmp_path / "art"),
        progress=False,
    ).uri
    held_out = read_pairs(shards, "eval")
    cfg = evaluate.EvaluateConfig(
        **{**CFG, "max_examples": len(held_out)}, code_samples=2, pass_k=(1, 2), sandbox_timeout_s=5
    )
    out = evaluate.run(
        cfg,
        shards=shards,
        base=world["base"],
        adapters=world["trained"],
        artifact_root=str(tmp_path / "art"),
        progress=False,
    )
    m = out.metrics
    assert m["tested_examples"] == m["examples"] == len(held_out) > 0
    assert m["reference_pass_rate"] == 1.0 and m["sandbox"] in ("namespace", "limits")
    for key in (
        "pass_at_1_docstring",
        "pass_at_1_roundtrip",
        "sampled_pass_at_1_docstring",
        "sampled_pass_at_2_docstring",
        "sampled_pass_at_1_roundtrip",
        "sampled_pass_at_2_roundtrip",
    ):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["sampled_pass_at_2_roundtrip"] >= m["sampled_pass_at_1_roundtrip"]
    assert json.loads(local(out.uri, "metrics.json").read_text())["reference_failures"] == []
    samples = [json.loads(line) for line in local(out.uri, "samples.jsonl").read_text().splitlines()]
    ran = [s["execution"] for s in samples]
    assert [r["task_id"] for r in ran] == [json.loads(p["tests"])["task_id"] for p in held_out]
    assert all(
        r["reference"]["status"] == "pass"
        and r["docstring"]["status"] in ("pass", "fail", "error", "timeout")
        and isinstance(r["roundtrip_code"], str)
        and 0 <= r["roundtrip_samples_passed"] <= 2
        for r in ran
    )
    assert "| pass_at_1_roundtrip |" in local(out.uri, "report.md").read_text()
