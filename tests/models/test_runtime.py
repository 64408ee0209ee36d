"""One device and precision policy: resolved where a base is opened, named when it cannot be honoured."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOKE_PPO

from blueprint.config import ConfigError, parse
from blueprint.models import runtime
from blueprint.models.bases import open_base

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_auto_means_cpu_and_float32_without_a_gpu():
    where = runtime.place(runtime.RuntimeSettings())
    expected = (
        (torch.device("cuda", torch.cuda.current_device()), torch.bfloat16)
        if torch.cuda.is_available()
        else (torch.device("cpu"), torch.float32)
    )
    assert (where.device, where.dtype) == expected
    assert runtime.resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.parametrize(
    "values, name",
    [
        ({"device": "gpu"}, "device"),
        ({"dtype": "fp8"}, "dtype"),
        ({"attn_implementation": "flash"}, "attn_implementation"),
    ],
)
def test_bad_runtime_settings_are_named(values, name):
    with pytest.raises(ConfigError, match=f"^{name}: "):
        runtime.RuntimeSettings(**values)


@needs_no_cuda
def test_flash_attention_without_cuda_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="attn_implementation='flash_attention_2'"):
        runtime.place(runtime.RuntimeSettings(attn_implementation="flash_attention_2"))


@needs_no_cuda
def test_device_cuda_without_cuda_fails_before_the_first_stage(tmp_path, capsys):
    from blueprint.pipelines.cli import main

    assert main(["run", "--profile", "smoke", "--artifact-root", str(tmp_path), "--set", "warmup.device=cuda"]) == 2
    err = capsys.readouterr().err
    assert "parameter warmup_settings: device='cuda': this machine has no CUDA device" in err
    assert not (tmp_path / "shard").exists()  # nothing ran


@needs_no_cuda
def test_device_cuda_without_cuda_fails_in_the_stage_too(smoke_chain, tmp_path):
    """A pod without the GPU it asked for (the --gpu profile sets device=cuda) fails at once, naming it."""
    from blueprint.stages import ppo_round

    cfg = parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "device": "cuda"})
    with pytest.raises(ConfigError, match="device='cuda'"):
        ppo_round.run(
            cfg,
            shards=smoke_chain["shards"],
            base=smoke_chain["base"],
            adapters=smoke_chain["adapters"],
            out_uri=f"file://{tmp_path}/r",
            progress=False,
        )
    assert not (tmp_path / "r").exists()


def test_bfloat16_base_keeps_lora_weights_in_float32(smoke_chain):
    from blueprint.models import lora

    model, _ = open_base(smoke_chain["base"], runtime.RuntimeSettings(dtype="bfloat16"), progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    peft_model = lora.attach_adapters(model, lora.ROLES)
    trainable = lora.trainable_only(peft_model, "summarizer")
    assert {p.dtype for p in trainable} == {torch.float32}


@pytest.mark.parametrize("extra", [{"dtype": "bfloat16"}, {"gradient_checkpointing": True}])
def test_a_round_runs_in_bfloat16_and_with_gradient_checkpointing(extra, smoke_chain, tmp_path):
    from blueprint.stages import ppo_round

    cfg = parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, **extra})
    out = ppo_round.run(
        cfg,
        shards=smoke_chain["shards"],
        base=smoke_chain["base"],
        adapters=smoke_chain["adapters"],
        out_uri=f"file://{tmp_path}/r",
        progress=False,
    )
    assert out.metrics["ppo_steps_done"] == SMOKE_PPO["ppo_steps"]
    assert all(torch.isfinite(torch.tensor(out.metrics[k])) for k in ("probe_reward_before", "probe_reward_after"))


def test_out_of_memory_names_the_settings_to_lower():
    with pytest.raises(
        runtime.OutOfMemory,
        match=r"ppo-round\.batch_size, ppo-round\.mini_batch_size, or set "
        r"ppo-round\.dtype=bfloat16",
    ):
        with runtime.named_out_of_memory("ppo-round", ("batch_size", "mini_batch_size")):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(KeyError):  # anything else passes through untouched
        with runtime.named_out_of_memory("ppo-round", ("batch_size",)):
            raise KeyError("x")


def test_gpu_compile_sets_device_cuda_for_the_gpu_stages_only(tmp_path):
    import yaml

    from blueprint.pipelines import cli

    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--out", str(out), "--gpu"]) == 0
    params = yaml.safe_load(out.read_text())["root"]["inputDefinitions"]["parameters"]
    devices = {name: params[name]["defaultValue"].get("device") for name in params if name.endswith("_settings")}
    assert devices == {
        "shard_settings": None,
        "bootstrap_settings": None,
        "warmup_settings": "cuda",
        "ppo_settings": "cuda",
        "evaluate_settings": "cuda",
        "merge_settings": "cuda",
        "gate_settings": "cuda",
        "promote_settings": None,
    }  # the gate may evaluate the champion


def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_the_base(smoke_chain, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blueprint.models.loading import ModelLoadError, load_base
    from blueprint.store import storage

    source = storage.local_path(smoke_chain["base"])
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(source)) - 8)
    model.save_pretrained(tmp_path / "cut")
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path / "cut")
    with pytest.raises(ModelLoadError, match=r"cut'.*tokenizer has \d+ tokens but the model's embedding has \d+ rows"):
        load_base(str(tmp_path / "cut"))


@pytest.mark.parametrize(
    "dtype, expected",
    [(torch.bfloat16, "flash_attention_2"), (torch.float16, "flash_attention_2"), (torch.float32, None)],
)
def test_auto_attention_picks_flash_attention_only_for_16_bit_weights(dtype, expected):
    """flash-attention 2 rejects fp32: `auto` must not pick it for an fp32 stage (merge's default) on a GPU."""
    cuda = torch.device("cuda", 0)  # resolve_attention only reads the device's type: no GPU is touched
    assert runtime.resolve_attention("auto", cuda, dtype, flash_installed=True) == expected
    assert runtime.resolve_attention("auto", torch.device("cpu"), torch.bfloat16, flash_installed=True) is None
    with pytest.raises(ConfigError, match="float32"):
        runtime.resolve_attention("flash_attention_2", cuda, torch.float32, flash_installed=True)
