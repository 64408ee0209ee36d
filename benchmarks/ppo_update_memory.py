"""Peak RSS of one PPO update on CPU with and without gradient checkpointing, on a micro model with long sequences.

    python benchmarks/ppo_update_memory.py [--prompt-len 1024] [--batch 4] [--layers 4]

Each setting runs in a fresh process: a random-init Qwen2 (hidden 256, `--layers` layers) with summarizer and
reference LoRA adapters, `--batch` random prompts of `--prompt-len` tokens, 8 sampled tokens each, one PPO epoch of
one mini-batch. Printed: the process's peak RSS after the rollout and after the update, and how many decoder layers
the update checkpointed (transformers only checkpoints layers in training mode: before the fix this was 0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RUN = r"""
import json, resource, sys
sys.path.insert(0, {repo!r})
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM
from blueprint.rl.ppo import PPOConfig, PPOTrainer

torch.manual_seed(0)
torch.set_num_threads(2)
config = Qwen2Config(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers={layers},
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=0,
                     pad_token_id=1, tie_word_embeddings=True)
base = Qwen2ForCausalLM(config).eval()
if {checkpointing}:
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{"use_reentrant": False}})
lora = lambda: LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
model = get_peft_model(base, lora(), adapter_name="summarizer")
model.add_adapter("reference", lora())
class Tok:
    eos_token_id, pad_token_id = 0, 1
cfg = PPOConfig(batch_size={batch}, mini_batch_size={batch}, ppo_epochs=1, max_new_tokens=8, min_new_tokens=8,
                missing_eos_penalty=0.0, copy_penalty=0.0)
trainer = PPOTrainer(model, Tok(), cfg)
layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) and hasattr(m, "self_attn")]
calls = set()
for layer in layers:
    real = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda fn, *a, _r=real, _l=layer, **k: (calls.add(id(_l)), _r(fn, *a, **k))[1]
queries = torch.randint(2, 2048, ({batch}, {prompt_len}))
rollout = trainer.make_rollout(queries, lambda q, r: (torch.randn(len(r)), {{}}))
after_rollout = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
trainer.learn(rollout)
print(json.dumps({{"rollout_mib": after_rollout, "update_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                  / 1024, "checkpointed": len(calls), "layers": config.num_hidden_layers}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    repo = str(Path(__file__).resolve().parent.parent)
    print(f"micro Qwen2 (hidden 256, {args.layers} layers), {args.batch} x ({args.prompt_len} + 8) tokens, fp32, CPU")
    for checkpointing in (False, True):
        code = RUN.format(
            repo=repo, layers=args.layers, batch=args.batch, prompt_len=args.prompt_len, checkpointing=checkpointing
        )
        out = json.loads(
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            .stdout.strip()
            .splitlines()[-1]
        )
        print(
            f"  gradient_checkpointing={str(checkpointing).lower():<5}: peak RSS {out['rollout_mib']:6.0f} MiB after "
            f"the rollout, {out['update_mib']:6.0f} MiB after the update; {out['checkpointed']} of "
            f"{out['layers']} layers checkpointed"
        )


if __name__ == "__main__":
    main()
