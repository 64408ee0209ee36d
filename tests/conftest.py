"""Shared fixtures: a micro tokenizer and Llama (tens of thousands of parameters) and a loopback S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from blueprint.models.tiny import tiny_llama_config, train_bpe_tokenizer
from blueprint.stages.profiles import stage_settings
from tests.loopback import free_port

TEST_ACCESS_KEY = "AKIATESTBLUEPRINT0001"
TEST_SECRET_KEY = "blueprint-test-secret-do-not-log-0123456789"


def stdlib_texts(limit: int = 40) -> list[str]:
    """A deterministic sample of real Python source from the running interpreter's standard library."""
    root = Path(os.__file__).parent
    files = sorted(p for p in root.glob("*.py"))[:limit]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def micro_qwen2_base(path, tokenizer, seed: int = 0) -> str:
    """A random-init micro Qwen2 with `tokenizer`, saved where `load_base` reads it."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def micro_tokenizer():
    return train_bpe_tokenizer(stdlib_texts(), vocab_size=512)


@pytest.fixture()
def micro_model(micro_tokenizer):
    """A fresh micro Llama, seeded, in eval mode (dropout off)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(micro_tokenizer, "micro"))
    return model.eval()


@pytest.fixture()
def unwritable_dir(tmp_path):
    """A directory path nobody can create, root included: its parent `locked` is a regular file."""
    locked = tmp_path / "locked"
    locked.write_text("a file, not a directory")
    return locked / "target"


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint on loopback (moto), talked to by the real boto3 and pyarrow clients."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    yield endpoint
    server.stop()


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    """Point the standard AWS environment at the loopback server with test credentials."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture()
def s3_bucket(s3_env):
    """A fresh bucket on the loopback server; returns its s3:// root."""
    import uuid

    import boto3

    name = f"bp-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return f"s3://{name}"


# The smoke profile as the stage registry states it (written once there), plus a smaller warmup held-out set.
SMOKE_SHARD = stage_settings("smoke", "shard")
SMOKE_BOOTSTRAP = stage_settings("smoke", "bootstrap")
SMOKE_WARMUP = {**stage_settings("smoke", "warmup"), "eval_pairs": 16}
SMOKE_PPO = stage_settings("smoke", "ppo-round")


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory):
    """shard -> bootstrap (micro) -> warmup on real stdlib code, committed once for the whole session."""
    from blueprint.config import parse
    from blueprint.stages import bootstrap, shard, warmup

    root = f"file://{tmp_path_factory.mktemp('chain')}"
    shards = shard.run(parse(shard.ShardConfig, SMOKE_SHARD), artifact_root=root, progress=False).uri
    base = bootstrap.run(
        parse(bootstrap.BootstrapConfig, SMOKE_BOOTSTRAP), shards=shards, artifact_root=root, progress=False
    ).uri
    adapters = warmup.run(
        parse(warmup.WarmupConfig, SMOKE_WARMUP), shards=shards, base=base, artifact_root=root, progress=False
    ).uri
    return {"root": root, "shards": shards, "base": base, "adapters": adapters}
