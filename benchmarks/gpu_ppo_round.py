"""One PPO round's inner loop on a 0.5B- or 1.5B-class base in bf16 on CUDA: rollouts, reward scoring, the update.

Workload: a Qwen2-0.5B- or Qwen2.5-1.5B-shaped random init (`--shape`; no hub needed), one PeftModel with LoRA r=16
on q_proj/v_proj for `summarizer`, `reference` and `coder`, `--batch` random prompts of `--prompt-len` tokens at
most (lengths drawn uniformly from a quarter of it up, so padding shows as it does on real code), exactly
`--new-tokens` sampled tokens each (EOS suppressed), the real round-trip reward (the coder adapter scores the code
given each sampled summary), 2 PPO epochs in minibatches of 8. One warm-up step, then `--steps` timed ones
(`torch.cuda.synchronize()` around each); medians are reported.

Printed: rollout tokens/s, update tokens/s (valid tokens only), the update's MFU against the GPU's dense bf16 peak
(`--peak-tflops`, default from the device name: H100 SXM, PCIe and NVL differ), reward-scoring samples/s, peak GPU
memory allocated and reserved, the PPO forwards' padding share and the share of the step spent in generation. The
last line is one JSON object. FLOPs: 4 x non-embedding parameters x tokens per update pass (the forward, plus the
backward's input gradients; LoRA weight gradients are negligible; 6 x with gradient checkpointing, which runs each
forward twice) plus 4 x hidden x vocab at the response positions only (the trainer applies the LM head nowhere
else); the input embedding is a lookup, no FLOPs, so a tied embedding is not counted twice.

`--engine vllm` samples the rollouts with a colocated vLLM engine (blueprint.engines; it sleeps during the update
and gets the merged policy after each one): rollout tokens/s then include that sync, and the JSON adds
vllm_startup_s, sync_s and the engine log-prob gap (bf16: compare with engine_max_gap's 0.1).

    .venv/bin/python benchmarks/gpu_ppo_round.py [--shape 0.5b|1.5b] [--device cuda] [--dtype bfloat16] [--steps 3]
                                                 [--engine vllm] [--gradient-checkpointing]
    .venv/bin/python benchmarks/gpu_ppo_round.py --device cpu --dtype float32 --shape small --steps 1   # CPU check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib

import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from blueprint.rl.ppo import PPOConfig, PPOTrainer
from blueprint.rl.reward import RewardConfig, RewardModel

QWEN2_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
QWEN25_15B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
SMALL = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
SHAPES = {"0.5b": QWEN2_05B, "1.5b": QWEN25_15B, "small": SMALL}
# dense bf16 peaks (NVIDIA datasheets), most specific name first: "H100 PCIe" must not match the SXM figure
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("L4", 121.0),
)
EOS, PAD = 0, 1


class IdTokenizer:
    """Token ids as text and back (space-separated numbers; any other word, such as the prompt template's, gets
    a fixed id from its crc32): the reward model needs a tokenizer, the benchmark no trained vocabulary."""

    eos_token_id, pad_token_id, bos_token_id = EOS, PAD, None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def _id(self, word: str) -> int:
        return int(word) if word.isdigit() else 2 + zlib.crc32(word.encode()) % (self.vocab_size - 2)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self._id(t) for t in s.split()] for s in texts]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(int(i)) for i in ids)

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode([i for i in r if not skip_special_tokens or i not in (EOS, PAD)]) for r in rows]


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None))
    base = base.to(device=device, dtype=dtype).eval()

    def lora() -> LoraConfig:
        return LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    model = get_peft_model(base, lora(), adapter_name="summarizer")  # peft keeps LoRA weights in fp32
    for name in ("reference", "coder"):
        model.add_adapter(name, lora())
    model.set_adapter("summarizer")
    embedding = base.get_input_embeddings().weight.numel()
    return model, sum(p.numel() for p in base.parameters()) - embedding  # tied: the head is counted on its own


def peak_for(name: str) -> float | None:
    """Dense bf16 TFLOPS of the GPU called `name` (as torch reports it), None when unknown."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given or device.type != "cuda":
        return given
    return peak_for(torch.cuda.get_device_name(device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shape", default="0.5b", choices=sorted(SHAPES), help="small: 1M parameters (a CPU check)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    ap.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="what samples the rollouts")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = SHAPES[args.shape]
    model, n_params = build(shape, device, dtype)
    if args.gradient_checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tok = IdTokenizer(shape["vocab_size"])
    cfg = PPOConfig(
        batch_size=args.batch,
        mini_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        lr=1e-4,
        missing_eos_penalty=0.0,
        copy_penalty=0.0,
    )
    trainer = PPOTrainer(model, tok, cfg)
    engine_figures = {}
    if args.engine == "vllm":
        from blueprint.engines.policy import PolicySampler
        from blueprint.engines.settings import MAX_GAP
        from blueprint.engines.vllm_engine import VLLMEngine

        t0 = time.perf_counter()
        engine = VLLMEngine(
            model, device=device, dtype=dtype, memory=None, max_model_len=args.prompt_len + args.new_tokens
        )
        trainer.engine = PolicySampler(engine, model, "summarizer", MAX_GAP[args.dtype])
        engine_figures["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
    reward = RewardModel(model, tok, config=RewardConfig(max_code_tokens=args.prompt_len, copy_coef=0.0))
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(max(1, args.prompt_len // 4), args.prompt_len + 1, (args.batch,), generator=gen)
    queries = [torch.randint(2, shape["vocab_size"], (int(n),), generator=gen).tolist() for n in lengths]
    codes = [tok.decode(q) for q in queries]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timing = {}

    def score(query_ids, response_ids):
        sync()
        t0 = time.perf_counter()
        out = reward(codes, tok.batch_decode(response_ids, skip_special_tokens=True))
        sync()
        timing["score_s"] = time.perf_counter() - t0
        return out.reward, {}

    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(1 + args.steps):
        sync()
        t0 = time.perf_counter()
        stats = trainer.ppo_step(queries, score)
        sync()
        row = {
            "gen_s": stats["time/generate"] + stats.get("time/sync", 0.0),
            "score_s": timing["score_s"],
            "update_s": stats["time/update"],
            "step_s": time.perf_counter() - t0,
            "padding_share": stats["padding_share"],
        }
        if "engine_logprob_gap_mean" in stats:
            row.update(
                sync_s=stats["time/sync"],
                gap_mean=stats["engine_logprob_gap_mean"],
                gap_max=stats["engine_logprob_gap_max"],
            )
        print(
            ("warm-up " if i == 0 else f"step {i}   ") + "  ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True
        )
        if i:
            rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    update_tokens = cfg.ppo_epochs * (int(lengths.sum()) + args.batch * args.new_tokens)  # valid tokens
    head_tokens = cfg.ppo_epochs * args.batch * args.new_tokens
    passes = 6 if args.gradient_checkpointing else 4
    flops = passes * n_params * update_tokens + 4 * shape["hidden_size"] * shape["vocab_size"] * head_tokens
    peak = peak_tflops(device, args.peak_tflops)
    result = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "engine": args.engine,
        **engine_figures,
        "parameters": n_params,
        "rollout_tokens_per_s": round(args.batch * args.new_tokens / med["gen_s"], 1),
        "update_tokens_per_s": round(update_tokens / med["update_s"], 1),
        "update_mfu": round(flops / med["update_s"] / (peak * 1e12), 4) if peak else None,
        "peak_tflops": peak,
        "score_samples_per_s": round(args.batch / med["score_s"], 1),
        "generation_share": round(med["gen_s"] / med["step_s"], 3),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        if device.type == "cuda"
        else None,
        **{k: round(v, 4) for k, v in med.items()},
    }
    print(
        f"rollouts {result['rollout_tokens_per_s']:.0f} tok/s, update {result['update_tokens_per_s']:.0f} tok/s "
        f"(MFU {result['update_mfu']}), scoring {result['score_samples_per_s']:.0f} samples/s, generation "
        f"{result['generation_share']:.0%} of the step, padding {result['padding_share']:.0%} of the forwards, peak "
        f"GPU memory {result['peak_gpu_memory_gib']} GiB allocated, {result['peak_gpu_reserved_gib']} GiB reserved"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
