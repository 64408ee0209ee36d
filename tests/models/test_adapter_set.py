"""The original API's two models: the summarizer on one base and the coder on another, each base held once,
tokenizers apart."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE_PPO, SMOKE_WARMUP, micro_qwen2_base, stdlib_texts
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from blueprint.config import parse
from blueprint.errors import InputError
from blueprint.models.adapter_set import open_roles
from blueprint.models.bases import Bases, checked_bases
from blueprint.models.loading import ModelLoadError
from blueprint.models.tiny import train_bpe_tokenizer
from blueprint.runtime.task import bootstrap_task
from blueprint.stages import evaluate, merge, ppo_round, warmup
from blueprint.store import artifacts, storage

CODER_VOCAB = 384  # not the summarizer's 512: the two tokenizers differ


QUICK_WARMUP = {**SMOKE_WARMUP, "steps": 4}  # the roles on their own bases are what this shows, not skill


@pytest.fixture(scope="module")
def coder_tokenizer():
    return train_bpe_tokenizer(stdlib_texts(30)[::-1], vocab_size=CODER_VOCAB)


@pytest.fixture(scope="module")
def two_bases(smoke_chain, coder_tokenizer, tmp_path_factory):
    """warmup -> ppo-round -> evaluate -> merge with the smoke chain's Llama summarizing and a Qwen2 coding."""
    tmp = tmp_path_factory.mktemp("two-bases")
    summarizer = str(storage.local_path(smoke_chain["base"]))
    coder = micro_qwen2_base(tmp / "coder-base", coder_tokenizer)
    kw = dict(artifact_root=f"file://{tmp}/art", progress=False, base=summarizer, coder_base=coder)
    shards = smoke_chain["shards"]
    warm = warmup.run(parse(warmup.WarmupConfig, QUICK_WARMUP), shards=shards, **kw)
    rnd = ppo_round.run(parse(ppo_round.PPORoundConfig, SMOKE_PPO), shards=shards, adapters=warm.uri, **kw)
    ev = evaluate.run(
        parse(
            evaluate.EvaluateConfig,
            {"max_examples": 4, "pairwise_examples": 4, "max_new_tokens": 8, "max_code_tokens": 64},
        ),
        shards=shards,
        adapters=rnd.uri,
        **kw,
    )
    merged = merge.run(parse(merge.MergeConfig, {}), adapters=rnd.uri, evaluation=ev.uri, **kw)
    return dict(tmp=tmp, summarizer=summarizer, coder=coder, warm=warm, rnd=rnd, ev=ev, merged=merged, kw=kw)


def test_each_role_is_trained_saved_and_merged_on_its_own_base(two_bases):
    rnd, merged = storage.local_path(two_bases["rnd"].uri), storage.local_path(two_bases["merged"].uri)
    named = {"summarizer": artifacts.portable_name(two_bases["summarizer"]), "coder": two_bases["coder"]}  # committed
    for role, base in (("summarizer", "summarizer"), ("reference", "summarizer"), ("coder", "coder")):
        recorded = json.loads((rnd / "adapters" / role / "adapter_config.json").read_text())
        assert recorded["base_model_name_or_path"] == named[base]
    assert len(AutoTokenizer.from_pretrained(rnd / "coder_tokenizer")) == CODER_VOCAB
    assert len(AutoTokenizer.from_pretrained(rnd / "tokenizer")) == 512
    summarizer = AutoModelForCausalLM.from_pretrained(merged / "summarizer")
    coder = AutoModelForCausalLM.from_pretrained(merged / "coder").eval()
    assert (summarizer.config.model_type, coder.config.model_type) == ("llama", "qwen2")
    assert len(AutoTokenizer.from_pretrained(merged / "coder")) == CODER_VOCAB
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(two_bases["coder"]), rnd / "adapters" / "coder"
    ).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(merged / "coder")("Return x.\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(coder(ids).logits, adapter(ids).logits, atol=1e-4)


def test_the_round_learns_across_the_two_tokenizers(two_bases):
    """The reward reads the summaries as text: finite, and the coder's step ran on the coder's own base."""
    m = two_bases["rnd"].metrics
    assert m["ppo_steps_done"] == SMOKE_PPO["ppo_steps"]
    assert all(
        torch.isfinite(torch.tensor(m[k]))
        for k in ("probe_reward_before", "probe_reward_after", "coder_eval_loss_after")
    )
    assert two_bases["ev"].metrics["examples"] == 4 and 0 <= two_bases["ev"].metrics["pairwise_accuracy"] <= 1


def test_both_bases_are_in_the_cache_key_and_naming_one_base_twice_is_one_base(two_bases, smoke_chain):
    kw, shards = dict(two_bases["kw"]), smoke_chain["shards"]
    cfg = parse(warmup.WarmupConfig, QUICK_WARMUP)
    assert two_bases["warm"].manifest["config"]["coder_base_name"] == two_bases["coder"]
    kw["coder_base"] = two_bases["summarizer"]
    same = warmup.run(cfg, shards=shards, **kw)
    kw.pop("coder_base")
    assert warmup.run(cfg, shards=shards, **kw).uri == same.uri != two_bases["warm"].uri


def test_adapters_of_another_coder_base_are_refused_naming_it(two_bases, coder_tokenizer, smoke_chain):
    other = micro_qwen2_base(two_bases["tmp"] / "other-coder", coder_tokenizer, seed=1)
    kw = {**two_bases["kw"], "coder_base": other}
    with pytest.raises(artifacts.ArtifactError, match="the coder was trained on base .* pass the coder_base"):
        evaluate.run(
            parse(evaluate.EvaluateConfig, {"max_examples": 4}),
            shards=smoke_chain["shards"],
            adapters=two_bases["rnd"].uri,
            **kw,
        )


def test_a_coder_base_whose_tokenizer_outgrows_its_embeddings_is_refused_naming_it(smoke_chain, tmp_path):
    big = train_bpe_tokenizer(stdlib_texts(30), vocab_size=1024)
    path = micro_qwen2_base(tmp_path / "mismatched", train_bpe_tokenizer(stdlib_texts(30), vocab_size=CODER_VOCAB))
    big.save_pretrained(path)
    with pytest.raises(ModelLoadError, match=r"mismatched'?: its tokenizer has \d+ tokens but .* 384 rows"):
        warmup.run(
            parse(warmup.WarmupConfig, SMOKE_WARMUP),
            shards=smoke_chain["shards"],
            base=smoke_chain["base"],
            coder_base=path,
            artifact_root=f"file://{tmp_path}/art",
            progress=False,
        )


def test_one_base_is_opened_once_and_two_bases_once_each(two_bases):
    shared = open_roles(Bases.of(two_bases["summarizer"]), progress=False)
    assert shared.shared and shared.coder is shared.summarizer
    apart = open_roles(Bases.of(two_bases["summarizer"], two_bases["coder"]), progress=False)
    assert not apart.shared and apart.coder.config.model_type == "qwen2"
    assert len(apart.coder_tokenizer) == CODER_VOCAB != len(apart.summarizer_tokenizer)


def test_the_tiny_base_is_never_the_coder_alone_and_an_equal_coder_base_means_one_base(two_bases):
    with pytest.raises(InputError, match="coder_base 'tiny'"):
        Bases.of("org/model", "tiny")
    assert Bases.of("tiny", "tiny").shared and Bases.of("a", "").shared
    assert checked_bases("tiny", "tiny") == ("tiny", "")
    with pytest.raises(ValueError, match="parameter coder_base 'tiny'"):
        checked_bases(two_bases["coder"], "tiny")
    assert checked_bases(two_bases["coder"], two_bases["coder"]) == (two_bases["coder"], "")


def test_the_bootstrap_task_hands_on_the_coder_base_or_nothing_when_shared(tmp_path, capsys):
    report = tmp_path / "report.md"
    assert bootstrap_task("org/a", "org/b", "", {}, str(tmp_path), report_path=str(report)) == ("org/a", "", "org/b")
    assert bootstrap_task("org/a", "org/a", "", {}, str(tmp_path)) == ("org/a", "", "")
    assert "used as given" in report.read_text()
    with pytest.raises(SystemExit) as exit_info:
        bootstrap_task("org/a", "tiny", "", {}, str(tmp_path))
    assert exit_info.value.code == 2 and "coder_base 'tiny'" in capsys.readouterr().err
