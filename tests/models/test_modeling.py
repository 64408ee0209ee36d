"""Base loading and the LoRA roles on the micro Llama: one base copy, clean switching, exact trainability."""

from __future__ import annotations

import time

import peft
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from blueprint.models.loading import ModelLoadError, ensure_pad_token, load_base
from blueprint.models.lora import (
    REFERENCE,
    LoraSettings,
    adapter_parameters,
    add_reference_adapter,
    attach_adapters,
    load_adapters,
    save_adapters,
    trainable_only,
    use_adapter,
)
from blueprint.models.tiny import EOS_TOKEN

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


def _perturb(model, name: str, seed: int) -> None:
    """LoRA B starts at zero (every adapter = the base); give adapter `name` weights of its own."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, name).values():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture()
def roles(micro_model):
    model = attach_adapters(micro_model, lora=LORA)
    _perturb(model, "summarizer", 1)
    _perturb(model, "coder", 2)
    return model


@pytest.fixture()
def ids(micro_tokenizer):
    return torch.tensor([micro_tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]])


def test_lora_settings_validate_and_pick_targets(micro_model):
    assert LoraSettings().targets_for(micro_model) == ["q_proj", "v_proj"]
    assert LoraSettings(all_attention=True).targets_for(micro_model) == ["q_proj", "v_proj", "k_proj", "o_proj"]
    assert LoraSettings(target_modules="o_proj").targets_for(micro_model) == ["o_proj"]  # the override wins
    for bad in (dict(r=0), dict(alpha=0), dict(dropout=1.0), dict(target_modules=())):
        with pytest.raises(ValueError, match="LoraSettings"):
            LoraSettings(**bad)


def test_roles_share_one_copy_of_base_weights(micro_model, ids):
    n_base = sum(1 for _ in micro_model.parameters())
    q_weight = micro_model.model.layers[0].self_attn.q_proj.weight
    model = attach_adapters(micro_model, lora=LORA)
    _perturb(model, "coder", 2)
    assert isinstance(model, peft.PeftModel) and set(model.peft_config) == {"summarizer", "coder"}
    assert model.active_adapter == "summarizer"
    assert sum(1 for k, _ in model.named_parameters() if "lora_" not in k) == n_base
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    pointers, outputs = set(), {}
    for role in ("summarizer", "coder"):
        with use_adapter(model, role):
            pointers.add(layer.base_layer.weight.data_ptr())
            outputs[role] = _logits(model, ids)
    assert pointers == {q_weight.data_ptr()}
    assert not torch.equal(outputs["summarizer"], outputs["coder"])  # switching changes the function, not the base


def test_use_adapter_restores_previous_even_on_error(roles):
    grads = {k: p.requires_grad for k, p in roles.named_parameters()}
    with pytest.raises(RuntimeError):
        with use_adapter(roles, "coder"):
            assert roles.active_adapter == "coder"
            raise RuntimeError("boom")
    assert roles.active_adapter == "summarizer"
    assert grads == {k: p.requires_grad for k, p in roles.named_parameters()}
    with pytest.raises(ValueError, match="'critic' not found"):
        with use_adapter(roles, "critic"):
            pass


def test_trainable_only_touches_exactly_one_adapter(roles, ids):
    before = {k: p.detach().clone() for k, p in roles.named_parameters()}
    params = trainable_only(roles, "coder")
    assert {k for k, p in roles.named_parameters() if p.requires_grad} == set(adapter_parameters(roles, "coder"))
    opt = torch.optim.AdamW(params, lr=1e-2)
    with use_adapter(roles, "coder"):
        roles.train()
        roles(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    coder = set(adapter_parameters(roles, "coder"))
    for k, p in roles.named_parameters():
        if k in coder:
            continue
        assert torch.equal(p, before[k]), f"{k} changed"
    assert any(not torch.equal(p, before[k]) for k, p in roles.named_parameters() if k in coder)


def test_reference_copies_summarizer_and_stays_frozen(roles, ids):
    add_reference_adapter(roles)
    assert roles.active_adapter == "summarizer"
    ref, summ = adapter_parameters(roles, REFERENCE), adapter_parameters(roles, "summarizer")
    assert len(ref) == len(summ) > 0
    for k, p in ref.items():
        assert torch.equal(p, summ[k.replace(f".{REFERENCE}.", ".summarizer.")]) and not p.requires_grad
    with use_adapter(roles, REFERENCE):
        ref_logits = _logits(roles, ids)
        assert not any(p.requires_grad for p in ref.values())  # peft's set_adapter would have unfrozen it
    assert torch.equal(ref_logits, _logits(roles, ids))  # active: summarizer

    frozen = {k: p.detach().clone() for k, p in ref.items()}
    opt = torch.optim.SGD(trainable_only(roles, "summarizer"), lr=0.1)
    roles(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(p, frozen[k]) for k, p in ref.items())
    assert not torch.equal(_logits(roles, ids), ref_logits)
    with pytest.raises(ValueError, match="frozen"):
        trainable_only(roles, REFERENCE)
    with pytest.raises(ValueError, match="already exists"):
        add_reference_adapter(roles)


def test_saved_adapters_load_with_plain_peft(roles, micro_tokenizer, ids, tmp_path):
    from transformers import LlamaForCausalLM

    from blueprint.models.tiny import tiny_llama_config

    add_reference_adapter(roles)
    expected = {}
    for name in ("summarizer", "coder", REFERENCE):
        with use_adapter(roles, name):
            expected[name] = _logits(roles, ids)
    assert save_adapters(roles, tmp_path) == ["summarizer", "coder", REFERENCE]
    for name in expected:
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert (tmp_path / name / "adapter_config.json").is_file()

    def fresh_base():
        torch.manual_seed(0)  # same init as the micro_model fixture
        return LlamaForCausalLM(tiny_llama_config(micro_tokenizer, "micro")).eval()

    plain = peft.PeftModel.from_pretrained(fresh_base(), str(tmp_path / "coder"))
    torch.testing.assert_close(_logits(plain, ids), expected["coder"], rtol=0, atol=0)

    loaded = load_adapters(fresh_base(), tmp_path)
    assert list(loaded.peft_config) == ["summarizer", "coder", REFERENCE] and loaded.active_adapter == "summarizer"
    assert not any(p.requires_grad for p in adapter_parameters(loaded, REFERENCE).values())
    assert all(p.requires_grad for p in adapter_parameters(loaded, "coder").values())
    for name, want in expected.items():
        with use_adapter(loaded, name):
            torch.testing.assert_close(_logits(loaded, ids), want, rtol=0, atol=0)
    with pytest.raises(ModelLoadError, match="critic"):
        load_adapters(fresh_base(), tmp_path, names=["critic"])


def test_attach_rejects_bad_names(micro_model):
    for names in ((), ("coder", "coder"), ("default",), ("bad name",)):
        with pytest.raises(ValueError, match="adapter name"):
            attach_adapters(micro_model, names=names, lora=LORA)


# ---------------------------------------------------------------------------------------------- load_base


def _save_base(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_load_base_from_local_dir(micro_model, micro_tokenizer, ids, tmp_path):
    _save_base(micro_model, micro_tokenizer, tmp_path / "base")
    model, tok = load_base(str(tmp_path / "base"))
    assert not model.training and tok.pad_token_id == micro_tokenizer.pad_token_id
    torch.testing.assert_close(_logits(model, ids), _logits(micro_model, ids), rtol=0, atol=0)
    model, _ = load_base(f"file://{tmp_path / 'base'}", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_load_base_errors_name_the_input(micro_model, micro_tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such directory") as err:
        load_base(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(err.value)
    _save_base(micro_model, micro_tokenizer, tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="has no weights") as err:
        load_base(str(tmp_path / "noweights"))
    assert "noweights" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_base(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="valid hub id"):
        load_base("not a//hub id")


@pytest.mark.parametrize(
    "sizes",
    [
        {"vocab_size": 2_000_000_000, "hidden_size": 1_000_000},  # refused unbuilt
        {"intermediate_size": 128},
    ],
)  # plausible, but not these weights' shapes
def test_a_config_whose_sizes_do_not_fit_the_weights_is_one_line_naming_the_base(
    sizes, micro_model, micro_tokenizer, tmp_path
):
    import json

    base = _save_base(micro_model, micro_tokenizer, tmp_path / "absurd")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, **sizes}))
    with pytest.raises(ModelLoadError) as err:
        load_base(str(base))
    message = str(err.value)
    assert message.startswith(f"base model {str(base)!r}: its weights do not fit its config.json")
    assert "\n" not in message


def test_a_truncated_safetensors_file_is_one_line_naming_the_base_and_the_file(micro_model, micro_tokenizer, tmp_path):
    base = _save_base(micro_model, micro_tokenizer, tmp_path / "cut")
    (weights,) = base.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy that stopped half-way
    with pytest.raises(ModelLoadError) as err:
        load_base(str(base))
    message = str(err.value)
    assert message.startswith(f"base model {str(base)!r}: {weights.name} is truncated or corrupt")
    assert "\n" not in message


@pytest.mark.parametrize("offline", ["1", None])
def test_unknown_hub_id_fails_fast(offline, monkeypatch):
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="blueprint-test/no-such-model"):
        load_base("blueprint-test/no-such-model")
    assert time.monotonic() - start < 8.0


def test_pad_token_defaults_to_eos(micro_model, micro_tokenizer, tmp_path):
    bare = PreTrainedTokenizerFast(tokenizer_object=micro_tokenizer.backend_tokenizer, eos_token=EOS_TOKEN)
    assert bare.pad_token is None
    micro_model.config.pad_token_id = None
    _save_base(micro_model, bare, tmp_path / "nopad")
    model, tok = load_base(str(tmp_path / "nopad"))
    assert tok.pad_token == EOS_TOKEN and tok.pad_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.eos_token_id
    none = PreTrainedTokenizerFast(tokenizer_object=micro_tokenizer.backend_tokenizer)
    with pytest.raises(ModelLoadError, match="neither a pad nor an EOS"):
        ensure_pad_token(none)


def test_load_base_from_s3_downloads_once(micro_model, micro_tokenizer, ids, s3_bucket, tmp_path):
    from blueprint.store import storage

    local = _save_base(micro_model, micro_tokenizer, tmp_path / "base")
    uri = f"{s3_bucket}/bootstrap/base"
    storage.upload_dir(local, uri)
    files = {p.name: {"size": p.stat().st_size} for p in local.iterdir()}
    with pytest.raises(ModelLoadError, match="_MANIFEST.json") as err:
        load_base(uri, cache_dir=tmp_path / "cache")
    assert uri in str(err.value)
    storage.write_json(f"{uri}/_MANIFEST.json", {"files": files})

    model, _ = load_base(uri, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(_logits(model, ids), _logits(micro_model, ids), rtol=0, atol=0)
    cached = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".lock-")]
    assert len(cached) == 1 and not cached[0].name.startswith(".")
    storage.write_bytes(f"{uri}/model.safetensors", b"")  # the cache, keyed by the manifest, serves the rerun
    model, _ = load_base(uri, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(_logits(model, ids), _logits(micro_model, ids), rtol=0, atol=0)


def test_ranks_of_one_machine_download_an_s3_base_once(micro_model, micro_tokenizer, s3_bucket, tmp_path):
    """Four processes (as torchrun's ranks would) open one s3:// base at once: one downloads, the others wait for
    its copy; one folder, no partial leftovers."""
    import subprocess
    import sys

    from blueprint.store import storage

    local = _save_base(micro_model, micro_tokenizer, tmp_path / "base")
    uri = f"{s3_bucket}/bootstrap/base"
    storage.upload_dir(local, uri)
    files = {p.name: {"size": p.stat().st_size} for p in local.iterdir()}
    storage.write_json(f"{uri}/_MANIFEST.json", {"files": files})
    code = (
        "import sys; from blueprint.models.loading import fetch_s3_dir; "
        "print('->', fetch_s3_dir(sys.argv[1], sys.argv[2]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, uri, str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert sum("downloading" in out for out in outputs) == 1, outputs
    assert len({out.split("-> ")[-1] for out in outputs}) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".lock-")] == [
        outputs[0].split("-> ")[-1].strip().rsplit("/", 1)[-1]
    ]
