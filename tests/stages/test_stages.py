"""The model stages end to end on stdlib shards with a micro base: bootstrap, warmup, ppo-round."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SMOKE_PPO, SMOKE_WARMUP
from peft import PeftModel
from transformers import AutoModelForCausalLM

from blueprint.config import parse
from blueprint.models import lora
from blueprint.models.bases import open_base
from blueprint.stages import ppo_round, warmup
from blueprint.store import artifacts, storage
from blueprint.store.artifacts import ArtifactError


def test_bootstrap_base_loads_with_plain_from_pretrained(smoke_chain):
    path = storage.local_path(smoke_chain["base"])
    model = AutoModelForCausalLM.from_pretrained(path)
    manifest = artifacts.read_manifest(smoke_chain["base"])
    assert manifest["metrics"]["tokens"] == 524_288  # the smoke profile's pre-training budget
    assert model.config.model_type == "llama" and "model.safetensors" in manifest["files"]


def test_a_bootstrap_warmup_longer_than_the_run_is_cut_so_the_rate_reaches_its_peak(smoke_chain):
    from blueprint.stages.bootstrap import lr_factor

    assert max(lr_factor(s, 16, 30) for s in range(16)) == 1.0  # a 16-step run, warmup 30 asked for
    assert lr_factor(14, 2048, 30) == pytest.approx(0.5, abs=1e-3)  # a long run keeps the warmup it asked for
    metrics = artifacts.read_manifest(smoke_chain["base"])["metrics"]
    assert metrics["loss_end"] < metrics["loss_start"] - 0.3  # it learns (a sixth of the peak rate left it at 0.1)


def test_bootstrap_packing_keeps_every_document_whole_from_its_head(smoke_chain):
    from blueprint.stages.bootstrap import _packed_blocks

    _, tokenizer = open_base(smoke_chain["base"])
    docs = [
        f"### Summary:\nAdd {k} numbers.\n### Code:\n" + f"def add{k}(a, b):\n    return a + b\n" * k
        for k in (1, 3, 2, 9)
    ]
    blocks = _packed_blocks(docs, tokenizer, seq_len=64)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [tokenizer(d, add_special_tokens=False)["input_ids"] + [eos] for d in docs]
    starts = []  # every block starts with a document's first token; documents come back in order
    for row in blocks.tolist():
        row = row[: row.index(pad)] if pad in row else row
        while row:
            doc = next(e for e in encoded if row[: len(e)] == e[: len(row)])  # the docs differ early
            starts.append(encoded.index(doc))
            row = row[len(doc) :]
    assert starts == [0, 1, 2, 3]
    assert blocks.shape[1] == 65 and (blocks[-1, :65] == torch.tensor(encoded[3][:65])).all()  # only a tail is cut


def test_warmup_gives_the_same_adapters_for_the_same_inputs(smoke_chain, tmp_path):
    hashes = []
    for root in ("a", "b"):
        torch.rand(1000)  # disturb the global RNG: the stage seeds what it draws
        out = warmup.run(
            parse(warmup.WarmupConfig, SMOKE_WARMUP),
            shards=smoke_chain["shards"],
            base=smoke_chain["base"],
            artifact_root=f"file://{tmp_path}/{root}",
            progress=False,
        )
        hashes.append({k: f["sha256"] for k, f in out.manifest["files"].items() if k.endswith(".safetensors")})
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2


def test_warmup_adapters_load_back_with_plain_peft(smoke_chain):
    base, _ = open_base(smoke_chain["base"])
    adapters = storage.local_path(smoke_chain["adapters"]) / "adapters"
    model = PeftModel.from_pretrained(base, adapters / "summarizer", adapter_name="summarizer")
    model.load_adapter(adapters / "coder", adapter_name="coder")
    assert set(model.peft_config) == {"summarizer", "coder"}
    meta = json.loads((storage.local_path(smoke_chain["adapters"]) / "base.json").read_text())
    assert meta["base_identity"].startswith("sha256:")


def test_warmup_trains_only_the_adapter_in_training(smoke_chain):
    model, tokenizer = open_base(smoke_chain["base"])
    peft_model = lora.attach_adapters(model, lora.ROLES, lora.LoraSettings(r=4, alpha=8, dropout=0.0))
    frozen = {k: v.detach().clone() for k, v in peft_model.named_parameters() if ".summarizer." not in k}
    from blueprint.data.readers import read_pairs
    from blueprint.models import sft

    cfg = parse(warmup.WarmupConfig, {**SMOKE_WARMUP, "lr": 0.05})
    pairs = read_pairs(smoke_chain["shards"], "train", limit=16)
    data = sft.sft_datasets(pairs, tokenizer, cfg.prompt_style, cfg.max_code_tokens, cfg.max_summary_tokens)[
        "summarizer"
    ]
    before = {k: v.detach().clone() for k, v in peft_model.named_parameters() if ".summarizer." in k}
    run = sft.SFTRun(
        steps=3,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        max_length=256,
        task="test",
        lr_setting="lr",
        progress=False,
    )
    sft.train_adapter(peft_model, tokenizer, "summarizer", data, data, run)
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(v, after[k]) for k, v in frozen.items()), "base or coder moved"
    assert any(not torch.equal(v, after[k]) for k, v in before.items()), "summarizer did not train"


def test_warmup_to_s3_round_trips(smoke_chain, s3_bucket):
    from conftest import SMOKE_SHARD

    from blueprint.stages import shard

    shards = shard.run(
        parse(shard.ShardConfig, {**SMOKE_SHARD, "max_pairs": 200}), artifact_root=s3_bucket, progress=False
    ).uri
    base_uri = storage.join(s3_bucket, "base")
    storage.upload_dir(storage.local_path(smoke_chain["base"]), base_uri)  # a committed copy on S3
    storage.write_bytes(
        artifacts.manifest_uri(base_uri), storage.read_bytes(artifacts.manifest_uri(smoke_chain["base"]))
    )
    out = warmup.run(
        parse(warmup.WarmupConfig, {**SMOKE_WARMUP, "steps": 1}),
        shards=shards,
        base=base_uri,
        artifact_root=s3_bucket,
        progress=False,
    )
    assert out.uri.startswith("s3://") and "adapters/coder/adapter_model.safetensors" in out.manifest["files"]


def _round(chain, **extra):
    cfg = parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, **extra})
    return ppo_round.run(
        cfg,
        shards=chain["shards"],
        base=chain["base"],
        adapters=chain["adapters"],
        artifact_root=chain["root"],
        progress=False,
    )


def test_ppo_round_commits_adapters_value_head_state_and_steps(smoke_chain):
    out = _round(smoke_chain)
    files = out.manifest["files"]
    for rel in (
        "adapters/summarizer/adapter_model.safetensors",
        "adapters/reference/adapter_model.safetensors",
        "value_head.safetensors",
        "trainer_state.safetensors",
        "trainer_state.json",
        "steps.jsonl",
    ):
        assert rel in files
    assert out.metrics["ppo_steps_done"] == 2 and out.metrics["kl_first"] == 0.0
    assert "coder_eval_loss_after" in out.metrics


def test_ppo_round_is_deterministic_on_cpu(smoke_chain, tmp_path):
    cfg = parse(ppo_round.PPORoundConfig, SMOKE_PPO)
    outs = [
        ppo_round.run(
            cfg,
            shards=smoke_chain["shards"],
            base=smoke_chain["base"],
            adapters=smoke_chain["adapters"],
            out_uri=f"file://{tmp_path}/r{i}",
            progress=False,
        )
        for i in range(2)
    ]
    sha = [{k: v["sha256"] for k, v in o.manifest["files"].items() if k.endswith(".safetensors")} for o in outs]
    assert sha[0] == sha[1]


def _adapter_sha(out, name):
    return out.manifest["files"][f"adapters/{name}/adapter_model.safetensors"]["sha256"]


def test_the_old_reference_setting_is_refused_naming_kl_anchor():
    from blueprint.config import ConfigError

    with pytest.raises(ConfigError, match=r"^reference: renamed kl_anchor"):
        parse(ppo_round.PPORoundConfig, {"reference": "warmup"})
    assert parse(ppo_round.PPORoundConfig, {"kl_anchor": "warmup"}).kl_anchor == "warmup"


def test_second_round_keeps_the_warmup_reference_or_takes_its_own_start_as_reference(smoke_chain, tmp_path):
    first = _round(smoke_chain)
    args = dict(shards=smoke_chain["shards"], base=smoke_chain["base"], adapters=first.uri, progress=False)
    kept, reset = (
        ppo_round.run(
            parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "round_index": 2, "kl_anchor": anchor}),
            out_uri=f"file://{tmp_path}/{anchor}",
            **args,
        )
        for anchor in ("warmup", "round")
    )
    assert _adapter_sha(kept, "reference") == _adapter_sha(first, "reference")
    assert _adapter_sha(reset, "reference") == _adapter_sha(first, "summarizer") != _adapter_sha(first, "reference")
    assert reset.metrics["kl_first"] == 0.0 != kept.metrics["kl_first"]


def test_sampled_probe_is_paired_and_leaves_training_unchanged(smoke_chain, tmp_path):
    args = dict(
        shards=smoke_chain["shards"], base=smoke_chain["base"], adapters=smoke_chain["adapters"], progress=False
    )
    plain = ppo_round.run(parse(ppo_round.PPORoundConfig, SMOKE_PPO), out_uri=f"file://{tmp_path}/a", **args)
    probed = ppo_round.run(
        parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "ppo_steps": 0, "probe_samples": 3}),
        out_uri=f"file://{tmp_path}/b",
        **args,
    )
    # no PPO step: the same summarizer, the same seeded draws, so before == after exactly
    assert probed.metrics["probe_sampled_before"] == probed.metrics["probe_sampled_after_ppo"]
    again = ppo_round.run(
        parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "probe_samples": 3}), out_uri=f"file://{tmp_path}/c", **args
    )
    assert _adapter_sha(again, "summarizer") == _adapter_sha(plain, "summarizer")


def test_killed_round_resumes_from_its_checkpoint_with_the_same_result(smoke_chain, tmp_path, monkeypatch):
    cfg = parse(ppo_round.PPORoundConfig, {**SMOKE_PPO, "ppo_steps": 3, "checkpoint_every": 1})
    args = dict(
        shards=smoke_chain["shards"], base=smoke_chain["base"], adapters=smoke_chain["adapters"], progress=False
    )
    straight = ppo_round.run(cfg, out_uri=f"file://{tmp_path}/straight", **args)

    from blueprint.rl.ppo import PPOTrainer

    real_step = PPOTrainer.ppo_step
    calls = {"n": 0}

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_step(self, *a, **k)

    monkeypatch.setattr(PPOTrainer, "ppo_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        ppo_round.run(cfg, out_uri=f"file://{tmp_path}/resumed", **args)
    assert not storage.exists(f"file://{tmp_path}/resumed/{artifacts.MANIFEST_NAME}")
    monkeypatch.setattr(PPOTrainer, "ppo_step", real_step)
    resumed = ppo_round.run(cfg, out_uri=f"file://{tmp_path}/resumed", **args)
    assert resumed.metrics["resumed_at_step"] == 2

    def pick(o) -> dict[str, str]:
        return {k: v["sha256"] for k, v in o.manifest["files"].items() if k.startswith("adapters/summarizer")}

    assert pick(resumed) == pick(straight)


def test_adapters_from_another_base_are_refused(smoke_chain, tmp_path):
    other = f"file://{tmp_path}/other-base"
    model, tokenizer = open_base(smoke_chain["base"])
    torch.nn.init.normal_(model.lm_head.weight)
    out = artifacts.reuse_or_commit(
        "bootstrap",
        {"other": 1},
        {},
        lambda d: model.save_pretrained(d) or tokenizer.save_pretrained(d) and {},
        out_uri=other,
    )
    with pytest.raises(ArtifactError, match="trained on base"):
        ppo_round.run(
            parse(ppo_round.PPORoundConfig, SMOKE_PPO),
            shards=smoke_chain["shards"],
            base=out.uri,
            adapters=smoke_chain["adapters"],
            out_uri=f"file://{tmp_path}/x",
            progress=False,
        )
