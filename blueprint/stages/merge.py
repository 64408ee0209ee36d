"""Merge stage: each role's LoRA adapter folded into a copy of its base, as a standalone Hugging Face model.

Training keeps ONE base with switchable adapters; users want two ordinary models that load with
`AutoModelForCausalLM.from_pretrained` and need neither peft nor BluePrint. So each role (summarizer, coder) is
loaded onto a fresh base, `merge_and_unload`ed and saved with its tokenizer and a model card.

A merge that silently changed the model would ship a different model than the one evaluated, so before anything
is committed the merged model is checked against the adapter model: logits on a fixed batch of prompts, on the
stage's device and in its dtype, in memory, after the cast to the saved dtype, and after reloading the saved folder
(onto the same device, in the same dtype). Differences are scaled by the largest logit and checked against a
tolerance of a few rounding steps of the dtype (fp32 is exact up to float sums, bf16 rounds every product), so a
bf16 merge on a GPU passes and a merge that changed the function does not. Above it the stage raises, and since
reuse_or_commit commits only when compute returns, nothing is committed.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import model_validator

from blueprint.config import ConfigError, setting
from blueprint.errors import InputError, UserError
from blueprint.eval.report import DESCRIPTIONS, table
from blueprint.models.adapter_set import BASE_FILE, fetch_adapter_set, key_settings
from blueprint.models.bases import Bases, is_artifact, open_base
from blueprint.models.prompts import PromptConfig, code_prompt, encode_prompts, summary_prompt
from blueprint.models.runtime import RuntimeSettings, named_out_of_memory
from blueprint.progress import Progress
from blueprint.stages import registry
from blueprint.store import artifacts, storage

STAGE = registry.MERGE
MEMORY_BUDGETS = ("check_batch",)  # the settings an out-of-memory error names
SAVE_DTYPES = ("base", "float32", "bfloat16", "float16")

# Fixed check inputs: real-looking prompts of the role's own format, so the adapted attention paths are exercised.
CHECK_CODES = (
    "def add(a, b):\n    return a + b\n",
    "def read_lines(path):\n    with open(path) as f:\n        return [line.rstrip() for line in f]\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
    "        self.items.append(x)\n",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
)
CHECK_SUMMARIES = (
    "Return the sum of two numbers.",
    "Read a file and return its lines without trailing whitespace.",
    "A last-in first-out stack.",
    "Return the n-th Fibonacci number.",
)


class MergeCheckError(UserError, RuntimeError):
    """The merged model's logits differ from the adapter model's: the merge must not be shipped."""


class MergeConfig(RuntimeSettings):
    """Merging each role's adapter into its own copy of the base, checked against the adapter model."""

    keep_adapters: bool = setting(True, "also commit the adapter-only folders under adapters/")
    check_tolerance: float | None = setting(
        None,
        "max |logit(merged) - logit(base + adapter)| / max |logit| accepted; None = by dtype "
        "(1e-4 float32; 2e-2 bfloat16, 3e-3 float16: about 5 rounding steps of the largest logit)",
        ge=0,
    )
    cast_tolerance: float | None = setting(
        None, "the same bound on the cast to save_dtype (cast_logit_diff); None = by save_dtype", ge=0
    )
    check_batch: int = setting(4, "prompts in the check batch", ge=1)
    save_dtype: str = setting(
        "base",
        'dtype of the saved weights: "base" (the base\'s own, e.g. bf16 for most hub '
        "models, fp32 for tiny) or float32 / bfloat16 / float16. Merged in fp32.",
    )
    dtype: str = setting(
        "float32",
        "dtype the base is loaded, merged and checked in: float32 (the check is then "
        "exact up to float sums) or bfloat16 / float16 / auto (checked at that dtype's "
        "tolerance); the saved dtype is save_dtype",
    )
    seed: int = setting(0, "seeds the check batch")

    @model_validator(mode="after")
    def _known_save_dtype(self) -> MergeConfig:
        if self.save_dtype not in SAVE_DTYPES:
            raise ConfigError(f"save_dtype: choose one of {', '.join(SAVE_DTYPES)}")
        return self


TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 3e-3}  # bf16, fp16: ~5 rounding steps


def default_tolerance(dtype) -> float:
    """Scaled logit difference a merge computed (or saved) in `dtype` may show from rounding alone."""
    return TOLERANCES[str(dtype).removeprefix("torch.")]


def resolve_dtype(save_dtype: str, published: str | None):
    """The torch dtype to save in: `save_dtype`, or for "base" the dtype the base was published in (fp32 if unknown)."""
    import torch

    if save_dtype == "base":
        save_dtype = published if published in SAVE_DTYPES else "float32"
    return getattr(torch, save_dtype)


def check_batch(tokenizer, role: str, size: int):
    """(input_ids, attention_mask) of `size` fixed prompts in `role`'s format, right-padded."""
    from blueprint.models.batching import pad_batch

    prompts = PromptConfig()
    texts = [
        summary_prompt(CHECK_CODES[i % len(CHECK_CODES)], prompts)
        if role == "summarizer"
        else code_prompt(CHECK_SUMMARIES[i % len(CHECK_SUMMARIES)], prompts)
        for i in range(size)
    ]
    ids = encode_prompts(tokenizer, texts)
    return pad_batch(ids, tokenizer.pad_token_id, "right")  # on the CPU: `logits` moves it to the model


def logits(model, batch):
    """fp32 logits at the real (unpadded) positions of the batch, flattened to [positions, vocab], on the model's
    device: compared there, never across devices (a GPU and a CPU forward differ by more than a merge may)."""
    import torch

    input_ids, mask = batch
    device = next(model.parameters()).device
    mask = mask.to(device)
    with torch.no_grad():
        out = model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False).logits.float()
    return out[mask.bool()]


def max_diff(a, b) -> float:
    import torch

    if a.shape != b.shape:
        return float("inf")
    diff = (a - b).abs().max()
    return float("inf") if not torch.isfinite(diff) else float(diff)


def scaled_diff(a, b) -> float:
    """max |a - b| over the scale of the logits, max |b|: a rounding step is relative to that scale."""
    return max_diff(a, b) / max(float(b.abs().max()), 1e-6)


def greedy_agreement(a, b) -> float:
    """Share of positions where both logits pick the same next token."""
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def checked(role: str, what: str, a, b, tolerance: float) -> float:
    """`scaled_diff(a, b)`, raising MergeCheckError above `tolerance`."""
    diff = scaled_diff(a, b)
    if not diff <= tolerance:
        raise MergeCheckError(
            f"{role}: {what} differ by {max_diff(a, b):.3g} ({diff:.3g} of the largest logit, "
            f"> {tolerance:g}); nothing was committed"
        )
    return diff


def merge_role(
    role: str, base: str, adapter_dir: Path, out_dir: Path, cfg: MergeConfig, progress: bool = True
) -> dict[str, Any]:
    """Merge `role` into a fresh base, save it to `out_dir`, and verify it; returns the role's metrics."""
    import torch
    from transformers import AutoModelForCausalLM

    from blueprint.models import lora

    model, tokenizer = open_base(base, cfg, progress, STAGE)
    device, compute = next(model.parameters()).device, model.dtype
    dtype = resolve_dtype(cfg.save_dtype, getattr(model, "published_dtype", None))
    tolerance = cfg.check_tolerance if cfg.check_tolerance is not None else default_tolerance(compute)
    cast_tolerance = cfg.cast_tolerance if cfg.cast_tolerance is not None else default_tolerance(dtype)
    model = lora.load_adapters(model, adapter_dir, names=[role], frozen=[role]).eval()
    batch = check_batch(tokenizer, role, cfg.check_batch)
    expected = logits(model, batch)
    merged = model.merge_and_unload().eval()
    in_memory = logits(merged, batch)
    scaled = checked(role, "merged logits and the adapter model's", in_memory, expected, tolerance)
    # Saved in `dtype`: round the weights to it in place (stored as computed, so the reference below is computed
    # exactly as the reloaded folder will be), and check what the rounding did at the saved dtype's tolerance.
    with torch.no_grad():
        for p in merged.parameters():
            p.copy_(p.to(dtype))
    saved = logits(merged, batch)
    checked(
        role,
        f"logits before and after the cast to {str(dtype).removeprefix('torch.')}",
        saved,
        in_memory,
        cast_tolerance,
    )
    merged = merged.to(dtype)
    merged.config.dtype = dtype
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    parameters = sum(p.numel() for p in merged.parameters())
    del model, merged
    gc.collect()
    # What is committed is the folder, so check the folder: a save that drops or unties weights shows up here.
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=compute, device_map=device, local_files_only=True
    ).eval()
    on_disk = logits(reloaded, batch)
    del reloaded
    checked(role, "the saved merged model's logits and the merged model's", on_disk, saved, tolerance)
    return {
        f"max_abs_logit_diff_{role}": max(max_diff(in_memory, expected), max_diff(on_disk, saved)),
        f"logit_diff_scaled_{role}": scaled,
        f"greedy_agreement_{role}": greedy_agreement(in_memory, expected),
        f"parameters_{role}": parameters,
        f"cast_logit_diff_{role}": max_diff(saved, expected),
        "saved_dtype": str(dtype).removeprefix("torch."),
    }


def evaluation_metrics(evaluation: str | None, adapters: str) -> dict[str, Any]:
    """Headline metrics of the evaluate output `evaluation`, which must have evaluated these very adapters."""
    if not evaluation:
        return {}
    manifest = artifacts.read_manifest(evaluation, verify="sizes")
    if manifest.get("stage") != registry.EVALUATE:
        raise artifacts.ArtifactError(
            f"evaluation {evaluation} is a {manifest.get('stage')!r} output, not an evaluate output"
        )
    evaluated = manifest.get("input_manifests", {}).get("adapters")
    if evaluated != artifacts.manifest_digest(adapters):
        raise InputError(
            f"evaluation {evaluation} evaluated adapters {manifest['inputs'].get('adapters')}, not "
            f"{adapters}: its metrics would describe another model"
        )
    return dict(manifest.get("metrics", {}))


PIPELINE_TAG = "text-generation"  # what the Hub's widget and search file a causal LM under
BUILT_BASE_LICENSE = "apache-2.0"  # the `tiny` base is built by this project, under its own license


def base_name(base: str) -> str:
    """How a card names a base: a hub id as given, a folder (local or s3://) by its own name, a base built in the
    store by its reference (stage/key). Never an absolute path: it says nothing off this machine, and the card is
    content, the same wherever the root lives."""
    from blueprint.models import loading

    if is_artifact(base):
        return artifacts.portable_name(base)
    if storage.is_s3(base) or loading._is_local(base):
        return base.rstrip("/").rsplit("/", 1)[-1]
    return base


def base_license(base: str) -> str:
    """The license a merged model inherits from its base: the base's own card's (a folder's README.md, or the
    hub's card when it is cached here), this project's for a base it built, else "other" (unknown: see the base)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    from blueprint.models import loading

    if is_artifact(base):
        return BUILT_BASE_LICENSE
    if storage.is_s3(base):
        return "other"
    card = (
        Path(storage.local_path(storage.normalize(base))) / "README.md"
        if loading._is_local(base)
        else try_to_load_from_cache(base, "README.md")
    )
    if isinstance(card, (str, Path)) and Path(card).is_file():
        return ModelCard.load(card).data.license or "other"
    return "other"


def card_metadata(base: str) -> str:
    """The card's YAML header through huggingface_hub's ModelCardData: base_model (a hub id or the folder's name
    the user gave; none for a base built in the store), license and pipeline_tag."""
    from huggingface_hub import ModelCardData

    built = is_artifact(base)
    data = ModelCardData(
        library_name="transformers",
        tags=["blueprint", "code", "lora-merged"],
        base_model=None if built else base_name(base),
        license=base_license(base),
        pipeline_tag=PIPELINE_TAG,
    )
    return f"---\n{data.to_yaml()}\n---"


def model_card(
    role: str,
    base: str,
    adapters: str,
    adapter_run: dict[str, Any],
    evaluation: str | None,
    scores: dict[str, Any],
    check: float,
) -> str:
    """README.md of a merged folder: what it is, where it came from, how it scored, how to load it."""
    task = {
        "summarizer": "writes a one-paragraph summary (docstring) of a Python function",
        "coder": "writes a Python function from its summary (docstring)",
    }[role]
    prompt = PromptConfig()
    template = prompt.code_to_summary if role == "summarizer" else prompt.summary_to_code
    front = [card_metadata(base)]
    base = base_name(base)  # the card is content: no root, no time, no local path
    adapters, evaluation = artifacts.portable_name(adapters), evaluation and artifacts.portable_name(evaluation)
    lines = front + [
        "",
        f"# BluePrint {role}",
        "",
        f"A causal LM that {task}: the `{role}` LoRA adapter of a BluePrint run merged into its base.",
        "",
        f"- base model: `{base}`",
        f"- adapters: `{adapters}` (stage `{adapter_run.get('stage')}`, key `{adapter_run.get('key')}`, "
        f"round {adapter_run.get('round', '?')})",
        f"- merge check: max |logit difference| vs base + adapter = {check:.3g}",
        "",
        "Prompt format (the completion follows it):",
        "",
        "```",
        template,
        "```",
        "",
    ]
    if scores:
        lines += [
            f"## Evaluation (`{evaluation}`)",
            "",
            table(
                ["metric", "value", "meaning"],
                [(k, scores[k], DESCRIPTIONS.get(k, "")) for k in DESCRIPTIONS if k in scores],
            ),
            "",
        ]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def compute(
    cfg: MergeConfig, bases: Bases, adapters: str, evaluation: str | None, out_dir: Path, progress: bool = True
) -> dict[str, Any]:
    import torch

    from blueprint.models import lora

    start = time.time()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(cfg.seed)
    scores = evaluation_metrics(evaluation, adapters)
    manifest = artifacts.read_manifest(adapters, verify="none")
    metrics: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir, meta = fetch_adapter_set(adapters, bases, Path(tmp) / "in")
        run_info = {"stage": manifest.get("stage"), "key": manifest.get("key"), "round": meta.get("round", "?")}
        roles = Progress(STAGE, len(lora.ROLES), progress, unit="model")
        for done, role in enumerate(lora.ROLES, 1):
            base = bases.of_adapter(role)  # each role is merged into the base it was trained on
            role_metrics = merge_role(role, base, adapter_dir, out_dir / role, cfg, progress)
            roles.update(done, merged=role)
            metrics.update(role_metrics)
            (out_dir / role / "README.md").write_text(
                model_card(
                    role, base, adapters, run_info, evaluation, scores, role_metrics[f"max_abs_logit_diff_{role}"]
                )
            )
            metrics[f"bytes_{role}"] = folder_bytes(out_dir / role)
        if cfg.keep_adapters:
            for role in lora.ROLES:
                shutil.copytree(adapter_dir / role, out_dir / "adapters" / role)
            shutil.copy(adapter_dir.parent / BASE_FILE, out_dir / "adapters" / BASE_FILE)
    metrics.update({f"eval_{k}": v for k, v in scores.items() if k in ("reward_gen_mean", "pairwise_accuracy")})
    metrics["seconds"] = round(time.time() - start, 1)
    return metrics


def run(  # noqa: PLR0913 - a stage's inputs by name, and where it commits: the launcher's keywords
    config: MergeConfig,
    *,
    base: str,
    adapters: str,
    evaluation: str | None = None,
    coder_base: str | None = None,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """Committed `summarizer/` (on `base`) and `coder/` (on `coder_base`, empty: `base`) standalone model folders,
    plus `adapters/` when kept."""
    evaluation = evaluation or None  # pipelines pass "" for "none"
    bases = Bases.of(base, coder_base)
    inputs = {"adapters": adapters, **bases.key_parts()[0]}
    if evaluation:
        inputs["evaluation"] = evaluation
    with named_out_of_memory(STAGE, MEMORY_BUDGETS):
        return artifacts.reuse_or_commit(
            STAGE,
            key_settings(config, bases),
            inputs,
            lambda d: compute(config, bases, adapters, evaluation, d, progress),
            artifact_root=artifact_root,
            out_uri=out_uri,
            force=force,
        )
