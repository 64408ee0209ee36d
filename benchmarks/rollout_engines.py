"""Rollout throughput of the two engines, the per-step weight sync included, and the whole PPO step with each.

Workload (issue 26): a 27M-parameter Qwen2-shaped random-init model (hidden 512, 8 layers, 8 heads of 64, 2 KV
heads, vocabulary 4,096), fp32, LoRA r=16 on q/v for `summarizer` (the policy) and `reference`; 64 prompts of
about 100 tokens (96-104), exactly 32 new tokens each (EOS suppressed), sampled at the round's temperature (0.5);
one PPO epoch in mini-batches of 16. One warm-up step, then `--steps` timed ones; medians are reported.

vllm's tokens/s counts generation plus the sync of the updated policy into the engine (merged weights), as the
round pays it every step. `--lora-request` also times vLLM serving the adapter as a LoRARequest (the adapter
saved and re-registered under a new id every step, its sync) instead of merged weights.

The last line printed is one JSON object: hf_tokens_per_s, vllm_tokens_per_s, vllm_startup_s, hf_step_s,
vllm_step_s (plus vllm_sync_s, gap figures and, with --lora-request, lora_request_tokens_per_s: vLLM's LoRA path
on dummy base weights, since exactly 32 tokens are sampled whatever the weights).

    .venv/bin/python benchmarks/rollout_engines.py [--steps 2] [--lora-request]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from blueprint.engines.policy import PolicySampler
from blueprint.engines.vllm_engine import VLLMEngine
from blueprint.models import lora
from blueprint.rl.ppo import PPOConfig, PPOTrainer

VOCAB, EOS, PAD = 4096, 0, 1
PROMPTS, NEW_TOKENS, TEMPERATURE = 64, 32, 0.5


def model_and_tokenizer():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2",
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        vocab_size=VOCAB,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    base = AutoModelForCausalLM.from_config(config).eval()
    model = lora.attach_adapters(base, ["summarizer"], lora.LoraSettings(dropout=0.0))
    lora.add_reference_adapter(model, "summarizer")
    return model.eval(), SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, VOCAB, (96 + i % 9,), generator=g).tolist() for i in range(PROMPTS)]


def score(queries, responses):  # varies between samples, so every update moves the policy
    return torch.tensor([sum(t < VOCAB // 2 for t in r) / max(len(r), 1) for r in responses]), {}


def config() -> PPOConfig:
    return PPOConfig(
        batch_size=PROMPTS,
        mini_batch_size=16,
        ppo_epochs=1,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        temperature=TEMPERATURE,
        lr=1e-3,
        missing_eos_penalty=0.0,
    )


def run_steps(trainer: PPOTrainer, steps: int) -> list[dict]:
    out = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        stats = trainer.ppo_step(prompts(), score)
        stats["step_s"] = time.perf_counter() - t0
        if i:  # the first is a warm-up
            out.append(stats)
    return out


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def lora_request_rate(model, steps: int) -> float:
    """Tokens/s of vLLM serving `summarizer` as a LoRARequest, re-saved and re-registered each step."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    with tempfile.TemporaryDirectory() as tmp:
        model.get_base_model().config.save_pretrained(tmp)
        llm = LLM(
            model=tmp,
            skip_tokenizer_init=True,
            load_format="dummy",
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=1 << 30,
            max_model_len=256,
            enable_lora=True,
            max_lora_rank=16,
            enable_chunked_prefill=False,
            max_num_batched_tokens=8192,  # as VLLMEngine on CPU
            enable_prefix_caching=False,
        )
        rates = []  # the base keeps its dummy weights: exactly NEW_TOKENS are sampled, whatever the weights
        for i in range(steps + 1):
            t0 = time.perf_counter()
            model.save_pretrained(f"{tmp}/adapter{i}", selected_adapters=["summarizer"])
            request = LoRARequest(f"summarizer{i}", i + 1, f"{tmp}/adapter{i}/summarizer")
            params = SamplingParams(
                max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=TEMPERATURE, detokenize=False, seed=i
            )
            outs = llm.generate(
                [{"prompt_token_ids": p} for p in prompts()], params, lora_request=request, use_tqdm=False
            )
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            if i:
                rates.append(tokens / (time.perf_counter() - t0))
        del llm
        return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--lora-request", action="store_true")
    args = ap.parse_args()

    model, tokenizer = model_and_tokenizer()
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    print(f"model: {params / 1e6:.1f}M parameters; {PROMPTS} prompts x {NEW_TOKENS} new tokens", flush=True)
    tokens = PROMPTS * NEW_TOKENS

    hf = run_steps(PPOTrainer(model, tokenizer, config()), args.steps)
    hf_rate = tokens / med(hf, "time/generate")
    print(f"hf: {hf_rate:.0f} tokens/s, step {med(hf, 'step_s'):.1f} s", flush=True)

    model, tokenizer = model_and_tokenizer()  # the same start for the vLLM run
    t0 = time.perf_counter()
    engine = VLLMEngine(model, device=torch.device("cpu"), dtype=torch.float32, memory=0.05, max_model_len=256)
    trainer = PPOTrainer(model, tokenizer, config())
    trainer.engine = PolicySampler(engine, model, "summarizer", max_gap=0.01)
    startup = time.perf_counter() - t0  # the engine's start plus the first weight load
    vl = run_steps(trainer, args.steps)
    vllm_rate = tokens / (med(vl, "time/generate") + med(vl, "time/sync"))
    print(
        f"vllm: {vllm_rate:.0f} tokens/s (sync {med(vl, 'time/sync'):.2f} s), step {med(vl, 'step_s'):.1f} s, "
        f"gap per step {[round(r['engine_logprob_gap_mean'], 6) for r in vl]}",
        flush=True,
    )
    figures = {
        "hf_tokens_per_s": round(hf_rate, 1),
        "vllm_tokens_per_s": round(vllm_rate, 1),
        "vllm_startup_s": round(startup, 1),
        "hf_step_s": round(med(hf, "step_s"), 2),
        "vllm_step_s": round(med(vl, "step_s"), 2),
        "vllm_sync_s": round(med(vl, "time/sync"), 3),
        "engine_logprob_gap_mean": max(r["engine_logprob_gap_mean"] for r in vl),
        "engine_logprob_gap_max": max(r["engine_logprob_gap_max"] for r in vl),
    }
    engine.close()
    print(json.dumps(figures) if not args.lora_request else "lora-request: timing vLLM's LoRA path", flush=True)
    if args.lora_request:
        figures["lora_request_tokens_per_s"] = round(lora_request_rate(model, args.steps), 1)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
