"""Warmup stage: supervised fine-tuning of both LoRA adapters with trl's SFTTrainer before any PPO.

The summarizer learns (code -> docstring summary) and the coder (summary -> code), as prompt-completion data so
the loss falls on the completion only. Each adapter trains alone: the base and the other adapter stay
bit-identical. Afterwards PPO has a policy that already writes summaries and a reward model that reads them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from blueprint import tracking
from blueprint.config import setting
from blueprint.distributed import ParallelSettings
from blueprint.errors import InputError
from blueprint.models.adapter_set import key_settings, open_roles, save_adapter_set
from blueprint.models.bases import Bases
from blueprint.models.prompts import PromptStyle
from blueprint.models.runtime import RuntimeSettings, named_out_of_memory
from blueprint.models.sft import SFTRun, sft_datasets, sft_length, step_logger, train_adapter
from blueprint.stages import registry
from blueprint.store import artifacts

STAGE = registry.WARMUP
MEMORY_BUDGETS = ("batch_size", "max_code_tokens")  # the settings an out-of-memory error names


class WarmupConfig(RuntimeSettings, ParallelSettings):
    """Supervised warmup of both adapters before any PPO."""

    steps: int = setting(60, "optimizer steps per adapter", ge=0)
    coder_steps: int | None = setting(None, "coder steps when they should differ from `steps`", ge=0)
    batch_size: int = setting(8, "pairs per optimizer step", ge=1)
    lr: float = setting(2e-3, "learning rate (cosine schedule with warmup)", gt=0)
    max_code_tokens: int = setting(256, "code is cut to this many tokens", ge=8)
    max_summary_tokens: int = setting(64, "summaries are cut to this many tokens", ge=4)
    max_pairs: int = setting(4000, "training pairs read from the train shards", ge=1)
    eval_pairs: int = setting(64, "held-out pairs for the before/after losses", ge=1)
    lora_r: int = setting(16, "LoRA rank of both adapters", gt=0)
    lora_alpha: float = setting(32.0, "LoRA alpha", gt=0)
    lora_dropout: float = setting(0.0, "LoRA dropout", ge=0, lt=1)
    target_modules: list[str] | None = setting(None, "LoRA target modules (comma-separated); None = by architecture")
    prompt_style: PromptStyle = setting("plain", "prompt templates: plain | structured")
    seed: int = setting(0, "seeds LoRA init and data order")

    scaled_batches = ("batch_size",)

    def split_over_ranks(self) -> dict[str, int]:
        return {"batch_size": self.batch_size}

    def lora(self):
        from blueprint.models import lora

        targets = tuple(self.target_modules) if self.target_modules else None
        return lora.LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, target_modules=targets
        )


def compute(
    cfg: WarmupConfig, shards: str, bases: Bases, out_dir: Path, progress: bool = True, out_uri: str | None = None
) -> dict[str, Any]:
    with tracking.stage_tracker(STAGE, out_dir, artifacts.config_dict(cfg), out_uri) as tracker:
        return _compute(cfg, shards, bases, out_dir, progress, tracker)


def _compute(
    cfg: WarmupConfig, shards: str, bases: Bases, out_dir: Path, progress: bool, tracker: tracking.Tracker
) -> dict[str, Any]:
    import torch

    from blueprint import distributed
    from blueprint.data.readers import read_pairs
    from blueprint.models import lora

    start = time.time()
    cfg = cfg.totals(distributed.world_size())  # train_adapter splits the step's total over the ranks
    roles = open_roles(bases, cfg, progress, STAGE)
    pairs = read_pairs(shards, "train", limit=cfg.max_pairs)
    held_out = read_pairs(shards, "eval", limit=cfg.eval_pairs)
    if not pairs or not held_out:
        raise InputError(f"shards {shards} need train and eval pairs (found {len(pairs)} train, {len(held_out)} eval)")
    limits = (cfg.prompt_style, cfg.max_code_tokens, cfg.max_summary_tokens)
    torch.manual_seed(cfg.seed)  # LoRA A is drawn at random: same seed -> same adapters, whatever ran before
    roles = roles.wrapped(lambda model, names: lora.attach_adapters(model, names, cfg.lora()), lora.ROLES)
    metrics: dict[str, Any] = {"train_pairs": len(pairs), "eval_pairs": len(held_out)}
    steps = {"summarizer": cfg.steps, "coder": cfg.steps if cfg.coder_steps is None else cfg.coder_steps}
    run = SFTRun(
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        task=STAGE,
        lr_setting="lr",
        max_length=sft_length(cfg.max_code_tokens, cfg.max_summary_tokens),
        progress=progress,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    for role in lora.ROLES:
        tokenizer = roles.tokenizer(role)  # each role's texts are clipped by its own base's tokenizer
        train, evals = sft_datasets(pairs, tokenizer, *limits)[role], sft_datasets(held_out, tokenizer, *limits)[role]
        metrics.update(
            train_adapter(
                roles.model(role),
                tokenizer,
                role,
                train,
                evals,
                dataclasses.replace(run, steps=steps[role]),
                track=step_logger(lambda step, row, r=role: tracker.log(r, step, row)),
            )
        )
    save_adapter_set(roles, out_dir, bases, list(lora.ROLES), {"round": 0})
    metrics["seconds"] = round(time.time() - start, 1)
    return metrics


def run(
    config: WarmupConfig,
    *,
    shards: str,
    base: str,
    coder_base: str | None = None,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """Committed adapter set (summarizer + coder) trained on `shards`: the summarizer on `base`, the coder on
    `coder_base` (empty: `base`)."""
    bases = Bases.of(base, coder_base)
    inputs = {"shards": shards, **bases.key_parts()[0]}
    settings = key_settings(config, bases)
    live = out_uri or artifacts.stage_uri(
        artifact_root, STAGE, artifacts.stage_key(STAGE, artifacts.config_dict(settings), inputs)
    )
    with named_out_of_memory(STAGE, MEMORY_BUDGETS):
        return artifacts.reuse_or_commit(
            STAGE,
            settings,
            inputs,
            lambda d: compute(config, shards, bases, d, progress, live),
            artifact_root=artifact_root,
            out_uri=out_uri,
            force=force,
        )
