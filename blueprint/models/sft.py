"""Supervised fine-tuning of one LoRA role with trl's SFTTrainer, shared by warmup and the PPO round's coder step.

Data are prompt-completion pairs, so the loss falls on the completion only; texts are clipped to the same token
limits the reward uses, so what a role learns on is what it is later judged on.
"""
from __future__ import annotations

import tempfile
from typing import Any

from blueprint import distributed
from blueprint.config import ConfigError
from blueprint.errors import check_finite_loss
from blueprint.models.prompts import PromptConfig, code_prompt, summary_prompt


def clip_tokens(tokenizer: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Cut each text to its first `max_tokens` tokens, so a long code never pushes its completion out of view."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids)]


def sft_datasets(pairs: list[dict], tokenizer: Any, prompt_style: str, max_code_tokens: int,
                 max_summary_tokens: int) -> dict[str, Any]:
    """Prompt-completion datasets for both roles (clipped consistently with the reward's limits)."""
    from datasets import Dataset

    prompts = PromptConfig(style=prompt_style)
    codes = clip_tokens(tokenizer, [p["code"] for p in pairs], max_code_tokens)
    sums = clip_tokens(tokenizer, [p["summary"] for p in pairs], max_summary_tokens)
    return {
        "summarizer": Dataset.from_dict({"prompt": [summary_prompt(c, prompts) for c in codes], "completion": sums}),
        "coder": Dataset.from_dict({"prompt": [code_prompt(s, prompts) for s in sums], "completion": codes}),
    }


def sft_length(max_code_tokens: int, max_summary_tokens: int) -> int:
    """Sequence length that holds a clipped prompt and completion plus the prompt template."""
    return max_code_tokens + max_summary_tokens + 32


def train_adapter(model, tokenizer, adapter: str, train, evals, steps: int, *, batch_size: int, lr: float,
                  seed: int, max_length: int, progress: bool, task: str, lr_setting: str,
                  gradient_checkpointing: bool = False, batch_setting: str = "batch_size") -> dict[str, float]:
    """SFT of one adapter with trl's SFTTrainer (only its weights train); held-out and train loss before and
    after. A non-finite loss fails naming `lr_setting`, the setting most likely at fault.

    Under torchrun the Trainer (accelerate) runs DDP over the ranks by itself; each takes `batch_size / ranks`
    rows a step, so the global batch is the same whatever the process count."""
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from blueprint.models import lora
    from blueprint.progress import interactive, trainer_progress_callback

    bar = progress and interactive()
    ranks = distributed.world_size()
    if batch_size % ranks:
        raise ConfigError(f"{batch_setting}={batch_size} does not split evenly over {ranks} processes (nproc)")

    model.set_adapter(adapter)
    lora.trainable_only(model, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=max(steps, 1), per_device_train_batch_size=batch_size // ranks,
            per_device_eval_batch_size=batch_size // ranks, learning_rate=lr, lr_scheduler_type="cosine",
            warmup_steps=min(10, max(steps // 10, 0)), logging_steps=max(1, steps // 10), save_strategy="no",
            report_to="none", use_cpu=next(model.parameters()).device.type == "cpu", seed=seed, data_seed=seed,
            disable_tqdm=not bar,
            max_length=max_length, dataloader_num_workers=0,
            completion_only_loss=True, gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
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
        check_finite_loss(value, f"{task} ({adapter} {name})", lr_setting, lr)
    return {f"{adapter}_{k}_before": v for k, v in before.items()} | {f"{adapter}_{k}_after": v for k, v in after.items()}
