"""Warmup stage: supervised fine-tuning of both LoRA adapters with trl's SFTTrainer before any PPO.

The summarizer learns (code -> docstring summary) and the coder (summary -> code), as prompt-completion data so
the loss falls on the completion only. Each adapter trains alone: the base and the other adapter stay
bit-identical. Afterwards PPO has a policy that already writes summaries and a reward model that reads them.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from blueprint import artifacts
from blueprint.config import require
from blueprint.errors import InputError, check_finite_loss
from blueprint.prompts import PromptConfig, code_prompt, summary_prompt
from blueprint.stages.common import open_base, save_adapter_set, split_base, key_settings

STAGE = "warmup"


@dataclasses.dataclass
class WarmupConfig:
    steps: int = 60                   # optimizer steps per adapter
    coder_steps: int | None = None    # coder steps when they should differ from `steps`
    batch_size: int = 8
    lr: float = 2e-3
    max_code_tokens: int = 256
    max_summary_tokens: int = 64
    max_pairs: int = 4000
    eval_pairs: int = 64
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    prompt_style: str = "plain"
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        require(self.steps >= 0, "steps", "must be >= 0")
        require(self.coder_steps is None or self.coder_steps >= 0, "coder_steps", "must be >= 0")
        require(self.batch_size >= 1, "batch_size", "must be positive")
        require(self.lr > 0, "lr", "must be positive")
        require(self.max_code_tokens >= 8 and self.max_summary_tokens >= 4, "max_code_tokens",
                "max_code_tokens >= 8 and max_summary_tokens >= 4")
        require(self.max_pairs >= 1 and self.eval_pairs >= 1, "max_pairs", "max_pairs and eval_pairs must be >= 1")
        PromptConfig(style=self.prompt_style)

    def lora(self):
        from blueprint import modeling

        targets = tuple(self.target_modules) if self.target_modules else None
        return modeling.LoraSettings(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                                     target_modules=targets)


def clip_tokens(tokenizer: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Cut each text to its first `max_tokens` tokens, so a long code never pushes its completion out of view."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids)]


def sft_datasets(pairs: list[dict], tokenizer: Any, cfg: WarmupConfig) -> dict[str, Any]:
    """Prompt-completion datasets for both roles (clipped consistently with the reward's limits)."""
    from datasets import Dataset

    prompts = PromptConfig(style=cfg.prompt_style)
    codes = clip_tokens(tokenizer, [p["code"] for p in pairs], cfg.max_code_tokens)
    sums = clip_tokens(tokenizer, [p["summary"] for p in pairs], cfg.max_summary_tokens)
    return {
        "summarizer": Dataset.from_dict({"prompt": [summary_prompt(c, prompts) for c in codes], "completion": sums}),
        "coder": Dataset.from_dict({"prompt": [code_prompt(s, prompts) for s in sums], "completion": codes}),
    }


def train_adapter(model, tokenizer, adapter: str, train, evals, steps: int, cfg: WarmupConfig,
                  progress: bool, task: str = STAGE, lr_setting: str = "lr") -> dict[str, float]:
    """SFT of one adapter (only its weights train); held-out and train loss before and after."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from blueprint import modeling
    from blueprint.progress import interactive, trainer_progress_callback

    bar = progress and interactive()

    model.set_adapter(adapter)
    modeling.trainable_only(model, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=max(steps, 1), per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.batch_size, learning_rate=cfg.lr, lr_scheduler_type="cosine",
            warmup_steps=min(10, max(steps // 10, 0)), logging_steps=max(1, steps // 10), save_strategy="no",
            report_to="none", use_cpu=True, seed=cfg.seed, data_seed=cfg.seed, disable_tqdm=not bar,
            max_length=cfg.max_code_tokens + cfg.max_summary_tokens + 32, dataloader_num_workers=0,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evals,
                             processing_class=tokenizer)
        if not bar:  # lines instead of a bar (kfp.local, pod logs), or nothing at all
            trainer.remove_callback(PrinterCallback)
            if progress:
                trainer.add_callback(trainer_progress_callback(f"{task}[{adapter}]"))
        probe = train.select(range(min(len(train), len(evals))))
        before = {"eval_loss": trainer.evaluate()["eval_loss"],
                  "train_loss": trainer.evaluate(probe, metric_key_prefix="train")["train_loss"]}
        if steps > 0:
            trainer.train()
        after = {"eval_loss": trainer.evaluate()["eval_loss"],
                 "train_loss": trainer.evaluate(probe, metric_key_prefix="train")["train_loss"]}
    model.eval()
    for name, value in after.items():
        check_finite_loss(value, f"{task} ({adapter} {name})", lr_setting, cfg.lr)
    return {f"{adapter}_{k}_before": v for k, v in before.items()} | {f"{adapter}_{k}_after": v for k, v in after.items()}


def build(cfg: WarmupConfig, shards: str, base: str, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    import torch

    from blueprint import modeling
    from blueprint.data import read_pairs

    start = time.time()
    model, tokenizer = open_base(base, cfg.threads, progress)
    pairs = read_pairs(shards, "train", limit=cfg.max_pairs)
    held_out = read_pairs(shards, "eval", limit=cfg.eval_pairs)
    if not pairs or not held_out:
        raise InputError(f"shards {shards} need train and eval pairs (found {len(pairs)} train, {len(held_out)} eval)")
    train, evals = sft_datasets(pairs, tokenizer, cfg), sft_datasets(held_out, tokenizer, cfg)
    torch.manual_seed(cfg.seed)  # LoRA A is drawn at random: same seed -> same adapters, whatever ran before
    peft_model = modeling.attach_adapters(model, modeling.ROLES, cfg.lora())
    metrics: dict[str, Any] = {"train_pairs": len(pairs), "eval_pairs": len(held_out)}
    steps = {"summarizer": cfg.steps, "coder": cfg.steps if cfg.coder_steps is None else cfg.coder_steps}
    for role in modeling.ROLES:
        metrics.update(train_adapter(peft_model, tokenizer, role, train[role], evals[role], steps[role], cfg,
                                     progress))
    save_adapter_set(peft_model, tokenizer, out_dir, base, list(modeling.ROLES), {"round": 0})
    metrics["seconds"] = round(time.time() - start, 1)
    return metrics


def run(config: WarmupConfig, *, shards: str, base: str, artifact_root: str | None = None,
        out_uri: str | None = None, force: bool = False, progress: bool = True) -> artifacts.StageOutput:
    """Committed adapter set (summarizer + coder) trained from `base` on `shards`."""
    inputs = {"shards": shards, **split_base(base)[0]}
    return artifacts.run_stage(STAGE, key_settings(config, base), inputs,
                               lambda d: build(config, shards, base, d, progress),
                               artifact_root=artifact_root, out_uri=out_uri, force=force)
