"""Reward throughput: batched `RewardModel` vs the original prototype's per-sample loop, on real stdlib
(code, docstring) pairs.

The loop is the original prototype's way: one full forward per sequence with full-vocabulary logits, CE over the
code positions, for the summary prompt and again for the empty prompt (both are needed for the gain). The batched
model does the same arithmetic in sorted, padded batches with the LM head only at the scored positions. Both run the
`tiny` preset with its LoRA coder active. The last line printed is one JSON object.

    .venv/bin/python benchmarks/reward_throughput.py [--samples 48] [--repeats 3] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from blueprint.models.lora import LoraSettings, attach_adapters, use_adapter
from blueprint.models.prompts import PromptConfig, code_prompt, encode_prompts, encode_targets
from blueprint.models.tiny import tiny_llama_config, train_bpe_tokenizer
from blueprint.rl.reward import RewardConfig, RewardModel


def stdlib_sources(limit: int) -> list[str]:
    root = Path(os.__file__).parent
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*.py"))[:limit]]


def function_pairs(sources: list[str]) -> list[tuple[str, str]]:
    """(function source without its docstring, first paragraph of the docstring) for documented functions."""
    pairs = []
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2:
                continue
            first = node.body[0]
            start = (node.decorator_list[0].lineno if node.decorator_list else node.lineno) - 1
            code = lines[start : first.lineno - 1] + lines[first.end_lineno : node.end_lineno]
            pairs.append(("\n".join(code) + "\n", doc.split("\n\n")[0].strip()))
    return pairs


def loop_rewards(
    model, tok, prompts: PromptConfig, codes: list[str], summaries: list[str], max_code: int, with_empty: bool = True
) -> list[tuple[float, float]]:
    """The original prototype's way: per sample, a full forward (full logits) per prompt, CE over the code positions."""
    out = []
    with use_adapter(model, "coder"), torch.no_grad():
        for code, summary in zip(codes, summaries, strict=True):
            (code_ids,), _ = encode_targets(tok, [code], max_tokens=max_code)
            ces = []
            for s in [summary, ""] if with_empty else [summary]:
                (prompt,) = encode_prompts(tok, [code_prompt(s, prompts)])
                ids = torch.tensor([prompt + code_ids])
                logits = model(input_ids=ids).logits[0]
                ces.append(F.cross_entropy(logits[len(prompt) - 1 : -1], ids[0, len(prompt) :]).item())
            out.append((ces[0], ces[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32, help="max sequences per forward")
    ap.add_argument("--batch-tokens", type=int, default=None, help="max padded tokens per forward (default: auto)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each method; the best is reported")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-code-tokens", type=int, default=384)
    ap.add_argument("--files", type=int, default=60, help="stdlib files for the tokenizer and the pairs")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice); 1 gives steadier numbers on a CPU that other jobs share",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    sources = stdlib_sources(args.files)
    tok = train_bpe_tokenizer(sources, vocab_size=args.vocab)
    base = LlamaForCausalLM(tiny_llama_config(tok, "tiny")).eval()
    model = attach_adapters(base, lora=LoraSettings(r=16, alpha=32.0, dropout=0.05))
    prompts = PromptConfig()

    pairs = [(c, s) for c, s in function_pairs(sources) if 24 <= len(tok(c)["input_ids"]) <= args.max_code_tokens]
    random.Random(0).shuffle(pairs)
    pairs = pairs[: args.samples]
    codes, summaries = [c for c, _ in pairs], [s for _, s in pairs]
    n_code = [len(tok(c)["input_ids"]) for c in codes]
    print(
        f"model: tiny preset, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params, vocab {len(tok)}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"data: {len(pairs)} stdlib (function, docstring) pairs, code tokens mean {sum(n_code) / len(n_code):.0f} "
        f"max {max(n_code)}"
    )

    rm = RewardModel(
        model,
        tok,
        prompts,
        RewardConfig(
            batch_size=args.batch_size, max_batch_tokens=args.batch_tokens, max_code_tokens=args.max_code_tokens
        ),
    )
    rm(codes[:2], summaries[:2])  # warm-up (allocator, kernels)
    loop_rewards(model, tok, prompts, codes[:2], summaries[:2], args.max_code_tokens)

    # Interleaved repeats, best of each: the CPU is shared, and contention only ever adds time.
    times: dict[str, list[float]] = {"batched": [], "loop": [], "loop_ce_only": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = rm(codes, summaries)
        times["batched"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = loop_rewards(model, tok, prompts, codes, summaries, args.max_code_tokens)
        times["loop"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        loop_rewards(model, tok, prompts, codes, summaries, args.max_code_tokens, with_empty=False)
        times["loop_ce_only"].append(time.perf_counter() - t0)
    batched_s, loop_s, loop_ce_only_s = (min(times[k]) for k in ("batched", "loop", "loop_ce_only"))
    print("runs (s): " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}" for k, v in times.items()))

    diff = max(max(abs(out.ce[i].item() - a), abs(out.ce_empty[i].item() - b)) for i, (a, b) in enumerate(ref))
    if diff > 1e-4:
        raise SystemExit(f"batched and loop rewards disagree: max |diff| {diff:.2e}")
    n = len(pairs)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result = {
        "batched_samples_per_s": round(n / batched_s, 2),
        "loop_samples_per_s": round(n / loop_s, 2),
        "speedup": round(loop_s / batched_s, 2),
        "peak_rss_mib": round(peak_mib, 1),
        "loop_ce_only_samples_per_s": round(n / loop_ce_only_s, 2),
        "samples": n,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "max_abs_diff": float(f"{diff:.2e}"),
    }
    print(f"batched RewardModel: {n / batched_s:7.2f} samples/s ({batched_s:.2f} s, ce and ce_empty)")
    print(
        f"per-sample loop:     {n / loop_s:7.2f} samples/s ({loop_s:.2f} s, ce and ce_empty; "
        f"{n / loop_ce_only_s:.2f} samples/s for ce alone)"
    )
    print(f"speedup {loop_s / batched_s:.2f}x, max |ce diff| {diff:.1e}, peak RSS {peak_mib:.0f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
