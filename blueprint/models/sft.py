"""Supervised fine-tuning of one LoRA role with trl's SFTTrainer, shared by warmup and the PPO round's coder step.

Data are prompt-completion pairs, so the loss falls on the completion only; texts are clipped to the same token
limits the reward uses, so what a role learns on is what it is later judged on.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from typing import Any

from blueprint import distributed
from blueprint.errors import check_finite_loss
from blueprint.models.prompts import PromptConfig, code_prompt, summary_prompt


def clip_tokens(tokenizer: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Cut each text to its first `max_tokens` tokens, so a long code never pushes its completion out of view."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens]) for t, i in zip(texts, ids, strict=True)]


def sft_datasets(
    pairs: list[dict], tokenizer: Any, prompt_style: str, max_code_tokens: int, max_summary_tokens: int
) -> dict[str, Any]:
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


def start_losses():
    """A Trainer callback keeping the losses of the evaluation `eval_on_start` runs (after DDP wrapping, before the
    first step)."""
    from transformers import TrainerCallback

    class StartLosses(TrainerCallback):
        def __init__(self):
            self.metrics: dict[str, float] = {}

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if state.global_step == 0:
                self.metrics.update(metrics or {})

    return StartLosses()


def step_logger(track: Callable[[int, dict[str, float]], None], step_offset: int = 0):
    """A Trainer callback handing every training log (loss, learning rate, grad norm, tokens/s) to `track` with
    its global step (`step_offset` + the Trainer's step), as each step ends."""
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        def __init__(self):
            self.last: tuple[float, float] | None = None  # (time, tokens seen) at the previous log

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs:  # evaluation and end-of-training summaries are not steps
                return
            row = {
                k: v
                for k, v in logs.items()
                if k in ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy")
            }
            now, tokens = time.perf_counter(), float(logs.get("num_tokens", 0.0))
            if self.last is not None and now > self.last[0]:
                row["tokens_per_s"] = (tokens - self.last[1]) / (now - self.last[0])
            self.last = (now, tokens)
            track(step_offset + state.global_step, row)

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = (time.perf_counter(), 0.0)

    return StepLogger()


@dataclasses.dataclass(frozen=True)
class SFTRun:
    """How one adapter is fine-tuned, and what the run is called in progress lines and errors."""

    steps: int
    batch_size: int  # rows per optimizer step, over all ranks
    lr: float
    seed: int
    max_length: int  # tokens of prompt + completion
    task: str  # the stage (or round) the progress lines and errors name
    lr_setting: str  # the setting a non-finite loss names, the one most likely at fault
    progress: bool = True
    gradient_checkpointing: bool = False


def train_adapter(model, tokenizer, adapter: str, train, evals, run: SFTRun, track=None) -> dict[str, float]:
    """SFT of one adapter with trl's SFTTrainer (only its weights train); held-out and train loss before and
    after. A non-finite loss fails naming `run.lr_setting`. `track` (a `step_logger` callback) receives each
    step's figures.

    Under torchrun the Trainer (accelerate) runs DDP over the ranks by itself; each takes `batch_size / ranks`
    rows a step, so the global batch is the same whatever the process count. The before-losses come from the
    Trainer's own evaluation at the start (`eval_on_start`): an `evaluate()` before `train()` makes accelerate
    mark the model prepared and train it without DDP. Evaluation runs whole `batch_size` batches on every rank:
    trl's evaluation loss is a mean of per-batch token means, which depends on how rows are cut into batches."""
    import torch
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from blueprint.models import lora
    from blueprint.progress import interactive, trainer_progress_callback

    steps, batch_size, task, progress = run.steps, run.batch_size, run.task, run.progress
    bar = progress and interactive()
    ranks = distributed.world_size()  # the stage's config checked that batch_size splits (check_world)

    model.set_adapter(adapter)
    lora.trainable_only(model, adapter)
    with tempfile.TemporaryDirectory() as tmp:
        # bf16 autocast only for a bf16 base: trl's own default (bf16=True, on CPU too) trained an fp32 model in
        # bf16, 7x slower on CPU, and rounded each rank's gradient before the all-reduce (N ranks != 1 process)
        args = SFTConfig(
            output_dir=tmp,
            max_steps=max(steps, 1),
            per_device_train_batch_size=batch_size // ranks,
            per_device_eval_batch_size=batch_size,
            learning_rate=run.lr,
            lr_scheduler_type="cosine",
            warmup_steps=min(10, max(steps // 10, 0)),
            logging_steps=1,
            save_strategy="no",  # a point per step
            report_to="none",
            use_cpu=next(model.parameters()).device.type == "cpu",
            seed=run.seed,
            data_seed=run.seed,
            disable_tqdm=not bar,
            eval_on_start=steps > 0,
            ddp_find_unused_parameters=False,
            bf16=getattr(model, "dtype", None) == torch.bfloat16,
            max_length=run.max_length,
            dataloader_num_workers=0,
            completion_only_loss=True,
            gradient_checkpointing=run.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False} if run.gradient_checkpointing else None,
        )
        probe = train.select(range(min(len(train), len(evals))))
        start = start_losses()
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset={"eval": evals, "train": probe},
            processing_class=tokenizer,
            callbacks=[start] + ([track] if track is not None else []),
        )
        if not bar:  # lines instead of a bar (kfp.local, pod logs), or nothing at all
            trainer.remove_callback(PrinterCallback)
            if progress:
                trainer.add_callback(trainer_progress_callback(f"{task}[{adapter}]"))
        if steps > 0:
            trainer.train()
            if ranks > 1 and trainer.model_wrapped is trainer.model:
                raise RuntimeError(
                    f"{task} ({adapter}): the Trainer trained without DDP on {ranks} processes; "
                    "an evaluation before training left the model marked as prepared"
                )
        after = trainer.evaluate()
        before = start.metrics if steps > 0 else after
    before, after = ({"eval_loss": m["eval_eval_loss"], "train_loss": m["eval_train_loss"]} for m in (before, after))
    model.eval()
    for name, value in after.items():
        check_finite_loss(value, f"{task} ({adapter} {name})", run.lr_setting, run.lr)
    return {f"{adapter}_{k}_before": v for k, v in before.items()} | {
        f"{adapter}_{k}_after": v for k, v in after.items()
    }
