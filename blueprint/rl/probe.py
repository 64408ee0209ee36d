"""The round's probe: the reward of the summarizer's summaries of a fixed set of codes, before and after PPO and
after the coder's step, from a fixed seed so the figures are paired and training's RNG is untouched.

`cfg` is the round's config (PPORoundConfig): prompt_style, temperature, top_k, top_p, max_new_tokens, seed,
round_index, probe_samples.
"""

from __future__ import annotations

from typing import Any

from blueprint.models.prompts import PromptConfig, encode_prompts, summary_prompt


def probe_reward(model, tokenizer, reward, codes: list[str], cfg: Any, samples: int = 0) -> float:
    """Mean reward of summaries of `codes`: greedy (samples=0), or `samples` draws per code at the PPO temperature
    (the expected reward PPO maximises), from a fixed seed so before/after are paired and training RNG is untouched.
    """
    import torch

    from blueprint.models import lora
    from blueprint.models.batching import pad_batch

    prompts = PromptConfig(style=cfg.prompt_style)
    codes = [c for c in codes for _ in range(max(samples, 1))]
    ids = encode_prompts(tokenizer, [summary_prompt(c, prompts) for c in codes])
    batch, mask = pad_batch(ids, tokenizer.pad_token_id, "left", next(model.parameters()).device)
    width = batch.shape[1]
    sampling = (
        dict(do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        if samples
        else dict(do_sample=False)
    )
    cuda = [batch.device] if batch.device.type == "cuda" else []  # manual_seed seeds CUDA too: restore it after
    with lora.use_adapter(model, "summarizer"), torch.no_grad(), torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.seed * 100_003 + cfg.round_index)
        out = model.generate(
            input_ids=batch,
            attention_mask=mask,
            max_new_tokens=cfg.max_new_tokens,
            **sampling,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    summaries = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return float(reward(codes, summaries).reward.mean())


def probe_metrics(model, tokenizer, reward, codes: list[str], cfg: Any, when: str) -> dict[str, float]:
    """`probe_reward_<when>` (greedy) and, with `probe_samples`, `probe_sampled_<when>` (expected reward)."""
    out = {f"probe_reward_{when}": probe_reward(model, tokenizer, reward, codes, cfg)}
    if cfg.probe_samples:
        out[f"probe_sampled_{when}"] = probe_reward(model, tokenizer, reward, codes, cfg, cfg.probe_samples)
    return out
