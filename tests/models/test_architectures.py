"""Any causal LM that transformers loads: a micro random-init base per architecture goes through warmup ->
ppo-round -> evaluate -> merge, and the merged model reloads to the adapter model's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE_PPO, SMOKE_WARMUP
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from blueprint.config import parse
from blueprint.models.targets import NoLoraTargets, discover_targets
from blueprint.store import storage

SHAPE = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
ARCHITECTURES = {  # model_type -> what its config needs beyond SHAPE (or instead of it)
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "gemma2": {"head_dim": 8},
    "phi3": {},
    "starcoder2": {},
    "granite": {},
    "olmo2": {},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "gpt_neox": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
    },
}
TARGETS = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"]}
WIDE = {
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "attn.c_proj"],  # not the MLP's c_proj
    "gpt_neox": ["query_key_value", "dense"],
}


def micro_base(model_type: str, tokenizer, path) -> str:
    """A random-init base of `model_type` with the smoke chain's tokenizer, saved where `load_base` reads it."""
    shape = ARCHITECTURES[model_type] if model_type in ("gpt2", "gpt_neox") else {**SHAPE, **ARCHITECTURES[model_type]}
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **shape, **ids))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chain_tokenizer(smoke_chain):
    return AutoTokenizer.from_pretrained(storage.local_path(smoke_chain["base"]))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_architecture_trains_evaluates_and_merges(model_type, smoke_chain, chain_tokenizer, tmp_path):
    from blueprint.stages import evaluate, merge, ppo_round, warmup

    base = micro_base(model_type, chain_tokenizer, tmp_path / "base")
    root, shards = f"file://{tmp_path}/art", smoke_chain["shards"]
    kw = dict(artifact_root=root, progress=False)
    adapters = warmup.run(parse(warmup.WarmupConfig, {**SMOKE_WARMUP, "steps": 2}), shards=shards, base=base, **kw).uri
    rnd = ppo_round.run(
        parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "ppo_steps": 1, "supervised_steps": 1}),
        shards=shards,
        base=base,
        adapters=adapters,
        **kw,
    )
    assert rnd.metrics["ppo_steps_done"] == 1
    ev = evaluate.run(
        parse(
            evaluate.EvaluateConfig,
            {"max_examples": 4, "pairwise_examples": 4, "max_new_tokens": 8, "max_code_tokens": 64},
        ),
        shards=shards,
        base=base,
        adapters=rnd.uri,
        **kw,
    )
    assert ev.metrics["examples"] == 4
    out = merge.run(parse(merge.MergeConfig, {}), base=base, adapters=rnd.uri, evaluation=ev.uri, **kw)
    assert out.metrics["max_abs_logit_diff_summarizer"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(storage.local_path(out.uri) / "summarizer").eval()
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), storage.local_path(rnd.uri) / "adapters" / "summarizer"
    ).eval()
    ids = torch.tensor([chain_tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-4)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_lora_targets_are_the_attention_projections(model_type, chain_tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(micro_base(model_type, chain_tokenizer, tmp_path / "b"))
    assert discover_targets(model) == TARGETS.get(model_type, ["q_proj", "v_proj"])
    assert discover_targets(model, all_attention=True) == WIDE.get(model_type, ["q_proj", "v_proj", "k_proj", "o_proj"])


def test_a_model_without_attention_projections_is_named():
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))

    with pytest.raises(NoLoraTargets, match=r"my-base: found no linear projection .*\(linear modules: 0\)"):
        discover_targets(Bag(), name="my-base")
