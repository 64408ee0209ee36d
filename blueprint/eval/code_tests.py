"""The evaluate stage's execution phase: on eval rows that carry tests (a `tasks:` source), the coder writes code
from each generated summary (round trip) and, when asked, samples codes; everything then runs against the tests
in the sandbox (blueprint.eval.execution, blueprint.eval.sandbox)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from blueprint.eval import execution
from blueprint.eval.greedy import generate_by_length
from blueprint.eval.sandbox import open_sandbox
from blueprint.models.adapter_set import RoleModels
from blueprint.models.prompts import PromptConfig, code_prompt, encode_prompts
from blueprint.models.sft import clip_tokens
from blueprint.progress import note


def sample_texts(
    model, tokenizer, adapter: str, prompts: list[str], n: int, max_new_tokens: int, batch_size: int, temperature: float
) -> list[list[str]]:
    """`n` sampled completions (decoded, without EOS) of each prompt with `adapter` active; batches of
    `batch_size` prompts, each generating its n samples at once (`greedy.generate_by_length` splits them over the
    ranks)."""
    eos = tokenizer.eos_token_id
    rows = generate_by_length(
        model,
        tokenizer,
        adapter,
        encode_prompts(tokenizer, prompts),
        batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=n,
    )
    return [
        tokenizer.batch_decode([r[: r.index(eos)] if eos in r else r for r in samples], skip_special_tokens=True)
        for samples in rows
    ]


def tested_figures(
    roles: RoleModels,
    pairs: list[dict],
    summaries: list[str],
    rebuilt: list[str],
    cfg: Any,
    prompts: PromptConfig,
    greedy_codes: Callable[[list[str]], list[str]],
    report_phase: Callable[..., None],
) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """Execution metrics of the rows of `pairs` that carry tests, and {row index: {"execution": its results}} for
    the sample rows ({} when no row has tests). The coder writes code from each generated summary (round trip, by
    `greedy_codes`, the stage's greedy generation), and samples when `cfg.code_samples` > 1 (`cfg`: the
    EvaluateConfig); `report_phase(4, ...)` says when the tests have run."""
    from blueprint.data.tasks import from_json

    tested = [i for i, p in enumerate(pairs) if p.get("tests")]
    if not tested:
        return {}, {}
    sandbox = open_sandbox(cfg)
    note(f"evaluate-{cfg.epoch}", f"sandbox: {sandbox.why}; {len(tested)} eval rows with tests")
    tasks = [from_json(pairs[i]["tests"]) for i in tested]
    coder, tokenizer = roles.coder, roles.coder_tokenizer
    truths = clip_tokens(tokenizer, [pairs[i]["summary"] for i in tested], cfg.max_summary_tokens)
    generated = clip_tokens(tokenizer, [summaries[i] for i in tested], cfg.max_summary_tokens)
    roundtrip = greedy_codes(generated)
    sampled = {}
    if cfg.code_samples > 1:
        import torch

        torch.manual_seed(cfg.seed)
        for source, shown in (("docstring", truths), ("roundtrip", generated)):
            sampled[source] = sample_texts(
                coder,
                tokenizer,
                "coder",
                [code_prompt(s, prompts) for s in shown],
                cfg.code_samples,
                cfg.max_code_tokens,
                cfg.batch_size,
                cfg.sample_temperature,
            )
    values, rows = execution.execute(
        sandbox, tasks, {"docstring": [rebuilt[i] for i in tested], "roundtrip": roundtrip}, sampled, cfg.pass_k
    )
    if (message := execution.reference_note(values, rows)) is not None:
        note(f"evaluate-{cfg.epoch}", message, True)
    report_phase(4, phase="code run against the tests")
    return values, {
        i: {"execution": {**row, "roundtrip_code": code}} for i, row, code in zip(tested, rows, roundtrip, strict=True)
    }
