"""PPO step throughput on a fixed workload: generation, the no-grad scoring forwards, and the PPO update.

Workload (fixed so numbers compare across commits): a Llama with vocab 8192, hidden 256, intermediate 688, 4 layers,
4 heads, random init (seed 0); one PeftModel with LoRA r=8/alpha=16 on q_proj, v_proj for `summarizer`, `reference`
and `coder`; 16 random queries of 128 tokens; exactly 48 sampled tokens per response (EOS suppressed); 4 PPO epochs
in minibatches of 4. One warm-up step, then `--steps` timed ones; medians are reported.
The last line printed is one JSON object: gen_s, update_s, gen_tokens_per_s, update_tokens_per_s, peak_rss_mib
(plus forward_s, step_s). `--profile` adds a torch.profiler table of one extra step.

OpenMP threads spin-wait between parallel regions by default. On an idle CPU that is the fastest setting (here:
1.8 s a step with 2 threads, against 2.6 s with OMP_WAIT_POLICY=PASSIVE); on a CPU shared with other processes (CI,
a pod's CPU quota) the spinning threads fight the other load and a step took 36 s instead of 6 s with PASSIVE.
Set OMP_WAIT_POLICY=PASSIVE in the environment (it must be set before torch loads) when the CPU is shared.

    .venv/bin/python benchmarks/ppo_throughput.py [--threads 2] [--steps 5] [--bf16] [--device cpu] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from types import SimpleNamespace

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from blueprint.rl.ppo import PPOConfig, PPOTrainer

VOCAB, EOS, PAD = 8192, 0, 1
BATCH, QUERY_LEN, RESPONSE_LEN = 16, 128, 48


def micro_model() -> tuple[torch.nn.Module, SimpleNamespace]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=EOS,
        pad_token_id=PAD,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    base = LlamaForCausalLM(config).eval()

    def lora() -> LoraConfig:
        return LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    model = get_peft_model(base, lora(), adapter_name="summarizer")
    model.add_adapter("reference", lora())
    model.add_adapter("coder", lora())
    return model, SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bf16", action="store_true", help="PPOConfig.autocast_dtype='bfloat16' (AMX / GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = micro_model()
    model.to(args.device)
    cfg = PPOConfig(
        batch_size=BATCH,
        mini_batch_size=4,
        ppo_epochs=4,
        max_new_tokens=RESPONSE_LEN,
        min_new_tokens=RESPONSE_LEN,
        lr=1e-4,
        missing_eos_penalty=0.0,
        autocast_dtype="bfloat16" if args.bf16 else None,
    )
    trainer = PPOTrainer(model, tokenizer, cfg)
    gen = torch.Generator().manual_seed(1)
    queries = torch.randint(2, VOCAB, (BATCH, QUERY_LEN), generator=gen)

    def score_fn(q, r):
        return torch.randn(len(r), generator=gen), {}

    rows = []
    for i in range(1 + args.steps):
        t0 = time.perf_counter()
        stats = trainer.ppo_step(queries, score_fn)
        step_s = time.perf_counter() - t0
        assert stats["response_length"] == RESPONSE_LEN, stats["response_length"]
        row = {
            "gen_s": stats["time/generate"],
            "forward_s": stats["time/forward"],
            "update_s": stats["time/update"],
            "step_s": step_s,
        }
        print(
            ("warm-up " if i == 0 else f"step {i}   ") + "  ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True
        )
        if i:
            rows.append(row)

    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = {
        "gen_s": round(med["gen_s"], 4),
        "update_s": round(med["update_s"], 4),
        "gen_tokens_per_s": round(BATCH * RESPONSE_LEN / med["gen_s"], 1),
        "update_tokens_per_s": round(cfg.ppo_epochs * BATCH * (QUERY_LEN + RESPONSE_LEN) / med["update_s"], 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "forward_s": round(med["forward_s"], 4),
        "step_s": round(med["step_s"], 4),
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "bf16": args.bf16,
        "device": args.device,
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.ppo_step(queries, score_fn)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    print(
        f"median of {args.steps}: generate {med['gen_s']:.3f}s ({result['gen_tokens_per_s']:.0f} tok/s), "
        f"scoring forwards {med['forward_s']:.3f}s, update {med['update_s']:.3f}s "
        f"({result['update_tokens_per_s']:.0f} tok/s), step {med['step_s']:.3f}s, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
