"""Merge stage on the micro Llama: merged logits equal base + adapter, folders load with plain transformers, a
merge that fails its check commits nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraModel
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from blueprint.models import lora
from blueprint.models.adapter_set import RoleModels, save_adapter_set
from blueprint.models.bases import Bases, open_base
from blueprint.models.tiny import tiny_llama_config
from blueprint.stages import merge
from blueprint.store import artifacts, storage


def commit(local: Path, uri: str, stage: str) -> str:
    artifacts.commit(local, uri, stage=stage, config={}, inputs={}, metrics={})
    return storage.normalize(uri)


def build_trained(root: Path, tokenizer, dtype: torch.dtype = torch.float32) -> dict:
    """A committed micro base (published in `dtype`) and an adapter set whose two roles differ from the base and
    from each other."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer, "micro")).to(dtype).save_pretrained(root / "base-src")
    tokenizer.save_pretrained(root / "base-src")
    base = commit(root / "base-src", str(root / "base"), "bootstrap")
    model, tokenizer = open_base(base)
    model = lora.attach_adapters(model, lora.ROLES, lora.LoraSettings(r=4, alpha=8.0, dropout=0.0))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # fresh LoRA is a no-op (B = 0): give both roles real, different deltas
        for role in lora.ROLES:
            for p in lora.adapter_parameters(model, role).values():
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    save_adapter_set(
        RoleModels(model, tokenizer, model, tokenizer),
        root / "adapters-src",
        Bases.of(base),
        list(lora.ROLES),
        {"round": 2},
    )
    adapters = commit(root / "adapters-src", str(root / "adapters"), "ppo-round")
    return dict(root=root, base=base, adapters=adapters, model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_tokenizer):
    return build_trained(tmp_path_factory.mktemp("merge"), micro_tokenizer)


def test_merged_models_match_adapters_and_load_with_plain_transformers(trained, tmp_path):
    out = merge.run(
        merge.MergeConfig(),
        base=trained["base"],
        adapters=trained["adapters"],
        artifact_root=str(tmp_path),
        progress=False,
    )
    files = out.manifest["files"]
    model, tok = trained["model"], trained["tokenizer"]
    ids = torch.tensor([tok("def add(a, b):\n    return a + b\n")["input_ids"]])
    weights = {}
    for role in lora.ROLES:
        assert out.metrics[f"max_abs_logit_diff_{role}"] <= 1e-4
        for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
            assert f"{role}/{name}" in files, name
        assert f"adapters/{role}/adapter_config.json" in files
        assert out.metrics[f"bytes_{role}"] == sum(f["size"] for rel, f in files.items() if rel.startswith(f"{role}/"))
        # a user's view: plain transformers, no peft, no blueprint
        folder = storage.local_path(storage.join(out.uri, role))
        merged = AutoModelForCausalLM.from_pretrained(folder).eval()
        merged_tok = AutoTokenizer.from_pretrained(folder)
        assert not any("lora" in k for k in merged.state_dict())
        assert out.metrics[f"parameters_{role}"] == sum(p.numel() for p in merged.parameters())
        with torch.no_grad(), lora.use_adapter(model, role):
            expected = model(input_ids=ids).logits
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-4)
        generated = merged.generate(
            **merged_tok("def f(x):", return_tensors="pt"),
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=merged_tok.pad_token_id,
        )
        assert generated.shape[1] > len(merged_tok("def f(x):")["input_ids"])
        weights[role] = merged.model.layers[0].self_attn.q_proj.weight.detach().clone()
        card = (folder / "README.md").read_text()
        ref = artifacts.portable_name
        assert ref(trained["base"]) in card and ref(trained["adapters"]) in card and "round 2" in card
    assert not torch.equal(weights["summarizer"], weights["coder"])  # each role merged into its own base copy
    base_q = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(weights["coder"], base_q)  # and the shared training base was left untouched by merging
    meta = json.loads((storage.local_path(out.uri) / "adapters" / "base.json").read_text())
    assert meta["base"] == artifacts.portable_name(trained["base"])  # the base by reference, no artifact root


def test_failed_logit_check_commits_nothing(trained, tmp_path, monkeypatch):
    """A merge that changes the function (here: peft's merge followed by a corrupted weight) must not ship."""
    real_merge = LoraModel.merge_and_unload

    def corrupted_merge(self, *args, **kwargs):
        merged = real_merge(self, *args, **kwargs)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight[0, 0] += 0.5
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted_merge)
    with pytest.raises(merge.MergeCheckError, match="nothing was committed"):
        merge.run(
            merge.MergeConfig(),
            base=trained["base"],
            adapters=trained["adapters"],
            artifact_root=str(tmp_path),
            progress=False,
        )
    assert not list(tmp_path.rglob(artifacts.MANIFEST_NAME))


def test_adapters_from_another_base_are_refused(trained, micro_tokenizer, tmp_path):
    torch.manual_seed(3)
    LlamaForCausalLM(tiny_llama_config(micro_tokenizer, "micro")).save_pretrained(tmp_path / "other-src")
    micro_tokenizer.save_pretrained(tmp_path / "other-src")
    other = commit(tmp_path / "other-src", str(tmp_path / "other"), "bootstrap")
    with pytest.raises(artifacts.ArtifactError, match="the summarizer was trained on base"):
        merge.run(
            merge.MergeConfig(),
            base=other,
            adapters=trained["adapters"],
            artifact_root=str(tmp_path / "a"),
            progress=False,
        )
    assert not list((tmp_path / "a").rglob(artifacts.MANIFEST_NAME))


def test_config_validation():
    with pytest.raises(ValueError, match="check_tolerance"):
        merge.MergeConfig(check_tolerance=-1.0)
    with pytest.raises(ValueError, match="check_batch"):
        merge.MergeConfig(check_batch=0)


@pytest.mark.parametrize("save_dtype, expected", [("base", torch.bfloat16), ("float32", torch.float32)])
def test_merge_saves_in_the_base_models_published_dtype_unless_told_otherwise(
    save_dtype, expected, tmp_path, micro_tokenizer
):
    from safetensors import safe_open

    bf16 = build_trained(tmp_path / "bf16", micro_tokenizer, dtype=torch.bfloat16)
    out = merge.run(
        merge.MergeConfig(save_dtype=save_dtype),
        base=bf16["base"],
        adapters=bf16["adapters"],
        artifact_root=str(tmp_path / "art"),
        progress=False,
    )
    folder = storage.local_path(storage.join(out.uri, "coder"))
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {expected}
    assert out.metrics["saved_dtype"] == str(expected).removeprefix("torch.")
    assert out.metrics["max_abs_logit_diff_coder"] <= 1e-4  # fp32 merge check, and the folder reloads exactly
    assert (out.metrics["cast_logit_diff_coder"] > 1e-3) == (expected == torch.bfloat16)  # bf16 rounding shows
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
    assert reloaded.dtype == expected


def test_a_bfloat16_merge_passes_its_check_and_a_corrupted_one_still_fails(trained, tmp_path, monkeypatch):
    """bf16 is what dtype=auto picks on a GPU: the check's tolerance scales with the logits and the dtype, so an
    honest bf16 merge (rounding only) ships and a merge that changed the function does not."""
    out = merge.run(
        merge.MergeConfig(dtype="bfloat16"),
        base=trained["base"],
        adapters=trained["adapters"],
        artifact_root=str(tmp_path / "ok"),
        progress=False,
    )
    for role in lora.ROLES:
        assert 0 < out.metrics[f"max_abs_logit_diff_{role}"]  # bf16 rounding shows ...
        assert out.metrics[f"logit_diff_scaled_{role}"] <= merge.default_tolerance(torch.bfloat16)  # ... within it
        assert out.metrics[f"greedy_agreement_{role}"] >= 0.9
    real_merge = LoraModel.merge_and_unload

    def corrupted_merge(self, *args, **kwargs):  # a changed function (the random micro model shifts its logits
        merged = real_merge(self, *args, **kwargs)  # little: 5% of the largest for this, 1% for bf16 rounding)
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight.mul_(-1)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupted_merge)
    with pytest.raises(merge.MergeCheckError, match="nothing was committed"):
        merge.run(
            merge.MergeConfig(dtype="bfloat16"),
            base=trained["base"],
            adapters=trained["adapters"],
            artifact_root=str(tmp_path / "bad"),
            progress=False,
        )


def test_a_cast_that_changes_the_model_beyond_its_dtypes_rounding_is_refused(trained, tmp_path):
    """cast_logit_diff (the saved dtype's rounding) is checked, not only reported: fp16 at a tolerance meant for
    fp32 must fail, at its own tolerance pass."""
    with pytest.raises(merge.MergeCheckError, match="cast to float16"):
        merge.run(
            merge.MergeConfig(save_dtype="float16", cast_tolerance=1e-6),
            base=trained["base"],
            adapters=trained["adapters"],
            artifact_root=str(tmp_path / "a"),
            progress=False,
        )
    out = merge.run(
        merge.MergeConfig(save_dtype="float16"),
        base=trained["base"],
        adapters=trained["adapters"],
        artifact_root=str(tmp_path / "b"),
        progress=False,
    )
    assert 0 < out.metrics["cast_logit_diff_coder"]


def test_model_card_names_the_base_as_given_never_by_a_local_path_with_license_and_pipeline_tag(tmp_path):
    """The card's header is huggingface_hub's ModelCardData: base_model is the hub id or the folder's own name,
    the license is the base card's (this project's for the built base), pipeline_tag text-generation."""
    from huggingface_hub import ModelCard

    folder = tmp_path / "models" / "Qwen2.5-Coder-0.5B"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    built = commit(folder, str(tmp_path / "bootstrap" / "k1"), "bootstrap")
    adapters = "file:///root/ppo-round/abc"
    for base, base_model, license_ in [
        (str(folder), "Qwen2.5-Coder-0.5B", "mit"),
        (f"file://{folder}", "Qwen2.5-Coder-0.5B", "mit"),
        ("no-such-org/no-such-model", "no-such-org/no-such-model", "other"),
        (built, None, "apache-2.0"),
    ]:
        text = merge.model_card(
            "coder", base, adapters, {"stage": "ppo-round", "key": "abc", "round": 1}, None, {}, 0.0
        )
        data = ModelCard(text).data
        assert (data.base_model, data.license, data.pipeline_tag) == (base_model, license_, "text-generation"), base
        assert str(tmp_path) not in text
        assert data.library_name == "transformers" and "lora-merged" in data.tags
