"""Padding share of the PPO forwards on the default profile's stdlib batch: before (every pass at the batch's width)
and after (each micro-batch trimmed to the columns its rows use; mini-batches of queries of similar length).

    python benchmarks/ppo_padding.py [--root /tmp/blueprint-padding]

Shards the stdlib, trains the default bootstrap's tokenizer on it (no model needed: padding depends on token counts
only), draws round 1's codes exactly as the round does, builds each step's prompts (code cut at max_code_tokens), and
gives each rollout a response length drawn uniformly from 1..max_new_tokens (the micro models end their summaries
anywhere in that range; a trained summarizer's lengths would shift the figures a little). The layout is the
trainer's own (`blueprint.rl.micro_batches`) over the first epoch's permutation.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

from blueprint.stages import registry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import torch

    from blueprint.config import parse
    from blueprint.data.readers import read_pairs
    from blueprint.models.prompts import PromptConfig, encode_prompts, summary_prompt
    from blueprint.models.sft import clip_tokens
    from blueprint.models.tiny import train_bpe_tokenizer
    from blueprint.rl.micro_batches import MicroBatch, grouped_by_length, pack, padding_share
    from blueprint.stages import bootstrap, ppo_round, profiles, shard

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/blueprint-padding")
    args = ap.parse_args()
    shutil.rmtree(args.root, ignore_errors=True)
    shards = shard.run(
        parse(shard.ShardConfig, {"source": "stdlib"}), artifact_root=f"file://{args.root}", progress=False
    ).uri
    boot = parse(bootstrap.BootstrapConfig, profiles.stage_settings("default", registry.BOOTSTRAP))
    tokenizer = train_bpe_tokenizer(
        [p["code"] for p in read_pairs(shards, "train", limit=boot.max_pairs)], vocab_size=boot.vocab_size
    )
    cfg = parse(ppo_round.PPORoundConfig, profiles.stage_settings("default", registry.PPO_ROUND))
    codes = clip_tokens(tokenizer, [p["code"] for p in ppo_round.round_batch(shards, cfg)], cfg.max_code_tokens)
    q, k, rng = ppo_round.queries_per_step(cfg), cfg.samples_per_query, random.Random(0)
    gen = torch.Generator().manual_seed(0)
    cases = {"before": None, "after: trimmed": False, "after: trimmed, grouped by length": True}
    figures = {name: [0, 0] for name in cases}
    for step in range(cfg.ppo_steps):
        queries = encode_prompts(
            tokenizer, [summary_prompt(c, PromptConfig()) for c in codes[step * q : (step + 1) * q]]
        )
        query_len = torch.tensor([len(x) for x in queries for _ in range(k)])
        response_len = torch.tensor([rng.randint(1, cfg.max_new_tokens) for _ in query_len])
        width, rows = int(query_len.max()), torch.arange(len(query_len))
        whole = MicroBatch(rows, 0, width + int(response_len.max()), int(response_len.max()))
        permutation = torch.randperm(len(rows), generator=gen)
        for name, case in cases.items():
            if case is None:
                parts = [whole]
            else:
                order = grouped_by_length(permutation, query_len, cfg.mini_batch_size) if case else permutation
                parts = [
                    p
                    for idx in order.split(cfg.mini_batch_size)
                    for p in pack(idx, query_len, response_len, width, cfg.update_batch_tokens, cfg.mini_batch_size)
                ]
            pad, total = padding_share(parts, query_len, response_len)
            figures[name][0] += pad
            figures[name][1] += total
    print(
        f"default profile, stdlib, round 1: {cfg.ppo_steps} steps of {len(query_len)} rollouts "
        f"(code <= {cfg.max_code_tokens} tokens, responses 1..{cfg.max_new_tokens})"
    )
    for name, (pad, total) in figures.items():
        print(f"  {name:<52} padding {pad / total:6.1%} of {total} forward positions")


if __name__ == "__main__":
    main()
