"""Evaluate stage: how good are the summarizer and the coder after an epoch, on held-out functions.

Everything is measured with GREEDY decoding on the eval split, so two evaluations of the same adapters agree and
two epochs differ only by what training changed:

- the round-trip reward of the generated summaries, next to that of the true docstrings (the target to reach);
- pairwise accuracy: does the coder find a function's own docstring more informative than another function's?
  This tells whether the reward can rank summaries at all; at 0.5 PPO optimises noise;
- summary quality against the docstring (BLEU, ROUGE-L), and the coder alone: code rebuilt from the docstring
  (parses? BLEU, exact match);
- lengths, EOS share and copy rate, the usual ways a policy games the reward (rambling, pasting code);
- where eval rows carry tests (a `tasks:` source): the code run against them in a sandbox
  (blueprint.eval.execution): the canonical solutions, the coder's code from the docstring and from the
  summarizer's summary (round-trip correctness), and with `code_samples > 1` the unbiased pass@k.

Outputs: metrics.json (all numbers), samples.jsonl (every generation), report.md, history.json (this epoch
appended to the `previous` evaluation's history), metrics.png (key metrics across the epochs in history),
curves.png (the evaluated round's PPO steps, when the adapters come from a round) and report.html (the report with
its plots embedded: what the KFP UI shows).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import field_validator

from blueprint.config import ConfigError, setting
from blueprint.distributed import ParallelSettings
from blueprint.engines.settings import EngineSettings
from blueprint.errors import InputError
from blueprint.eval import code_tests, report
from blueprint.eval import metrics as text_metrics
from blueprint.eval.greedy import generate_texts
from blueprint.eval.sandbox import SandboxSettings
from blueprint.models.adapter_set import RoleModels, fetch_adapter_set, key_settings, load_roles, open_roles
from blueprint.models.bases import Bases, is_artifact
from blueprint.models.prompts import PromptConfig, PromptStyle, code_prompt, encode_prompts, summary_prompt
from blueprint.models.runtime import RuntimeSettings, named_out_of_memory
from blueprint.models.sft import clip_tokens
from blueprint.progress import Progress
from blueprint.stages import registry
from blueprint.store import artifacts

if TYPE_CHECKING:
    import torch

STAGE = registry.EVALUATE
MEMORY_BUDGETS = ("batch_size", "score_batch_tokens")  # the settings an out-of-memory error names
COMPONENTS = ("reward", "ce", "ce_empty", "gain", "length_term")


class EvaluateConfig(RuntimeSettings, EngineSettings, ParallelSettings, SandboxSettings):
    """What the evaluation generates and scores on the held-out split."""

    max_examples: int = setting(64, "held-out functions whose summary and code are generated (the first ones)", ge=1)
    pairwise_examples: int = setting(
        256,
        "held-out functions scored for pairwise accuracy (forward passes only; "
        "at least max_examples): 64 pairs leave it +-0.06 noisy, 256 +-0.03",
        ge=0,
    )
    max_new_tokens: int = setting(48, "summary generation budget; code generation gets max_code_tokens", ge=1)
    max_code_tokens: int = setting(256, "code is cut to this many tokens (as in training)", ge=8)
    max_summary_tokens: int = setting(64, "summaries are cut to this many tokens", ge=4)
    batch_size: int = setting(8, "prompts per generate() call", ge=1)
    score_batch_tokens: int | None = setting(
        None, "token budget of one reward-scoring forward (None = 1024 on CPU, 16384 on a GPU)", gt=0
    )
    length_coef: float = setting(0.01, "weight of len(summary) / len(code) in the reward", ge=0)
    prompt_style: PromptStyle = setting("plain", "prompt templates: plain | structured")
    report_examples: int = setting(3, "example rows shown in report.md", ge=0)
    epoch: int = setting(0, "PPO rounds done (0 = after warmup): the x axis of the history", ge=0)
    seed: int = setting(0, "fixes the docstring pairing of pairwise accuracy and the code samples")
    code_samples: int = setting(
        1,
        "eval rows with tests: codes sampled per row from its docstring and from its "
        "generated summary, for pass@k (1 = the greedy code only)",
        ge=1,
    )
    pass_k: tuple[int, ...] = setting(
        (1, 5), "k values of the sampled pass@k (those <= code_samples are reported; comma-separated)"
    )
    sample_temperature: float = setting(0.8, "temperature of the code samples", gt=0)

    @field_validator("pass_k")
    @classmethod
    def _positive_k(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if any(k < 1 for k in ks):
            raise ValueError(f"{list(ks)}: every k of pass@k is at least 1")
        return ks


def greedy_codes(roles: RoleModels, prompts: PromptConfig, cfg: EvaluateConfig, summaries: list[str]) -> list[str]:
    """The coder's greedy code from each of `summaries`."""
    return generate_texts(
        roles.coder,
        roles.coder_tokenizer,
        "coder",
        [code_prompt(s, prompts) for s in summaries],
        cfg.max_code_tokens,
        cfg.batch_size,
    )[1]


def partners(n: int, seed: int) -> list[int]:
    """A fixed derangement: shuffle 0..n-1 with `seed`, then pair each index with the next one in that order.

    Deterministic (same pairs every epoch, so accuracies compare) and never pairs a function with itself.
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % n]
    return partner


def pairwise_accuracy(ce_true: torch.Tensor, ce_other: torch.Tensor) -> float:
    """Share of codes whose own docstring gives the lower coder CE (a tie, e.g. two identical docstrings, = 1/2).

    For a fixed code, -CE and the gain order summaries identically (CE(code | empty) is shared)."""
    wins, ties = int((ce_true < ce_other).sum()), int((ce_true == ce_other).sum())
    return (2 * wins + ties) / (2 * len(ce_true))  # from the counts: 9 of 10 is exactly 0.9, not float32's 0.89999998


def reward_stats(out, tag: str) -> dict[str, float]:
    """Mean and std of every reward component, e.g. reward_gen_mean, ce_true_std."""
    stats = {}
    for name in COMPONENTS:
        values = getattr(out, name).tolist()
        stats[f"{name}_{tag}_mean"] = text_metrics.mean(values)
        stats[f"{name}_{tag}_std"] = text_metrics.std(values)
    return stats


def scored_pairwise(reward, scored: list[dict], own_ce_first: torch.Tensor, other: list[int]) -> float | None:
    """Pairwise accuracy: each scored code with its own docstring against another function's (the derangement
    `other`). The first len(own_ce_first) own-docstring CEs are already computed; only the rest are scored."""
    import torch

    if len(scored) < 2:
        return None
    codes, truths = [p["code"] for p in scored], [p["summary"] for p in scored]
    own, done = own_ce_first, len(own_ce_first)
    if len(scored) > done:
        own = torch.cat([own, reward(codes[done:], truths[done:]).ce])
    return pairwise_accuracy(own, reward(codes, [truths[j] for j in other]).ce)


def text_figures(
    tokenizer,
    codes: list[str],
    truths: list[str],
    summaries: list[str],
    summary_ids: list[list[int]],
    rebuilt: list[str],
    shown_codes: list[str],
) -> dict[str, float]:
    """Text overlap and length figures of the generated summaries and the rebuilt codes."""
    code_tokens = [len(ids) for ids in tokenizer(codes, add_special_tokens=False)["input_ids"]]
    truth_tokens = [len(ids) for ids in tokenizer(truths, add_special_tokens=False)["input_ids"]]
    stripped = [s.strip() for s in summaries]
    return {
        "bleu_summary": text_metrics.bleu(stripped, truths),
        "rougeL_summary": text_metrics.rouge_l(stripped, truths),
        "code_bleu": text_metrics.bleu(rebuilt, shown_codes),
        "code_exact_match": text_metrics.exact_match(rebuilt, shown_codes),
        "summary_tokens_mean": text_metrics.mean([len(s) for s in summary_ids]),
        "summary_nonempty_rate": text_metrics.mean([bool(s) for s in stripped]),
        "summary_true_tokens_mean": text_metrics.mean(truth_tokens),
        "code_tokens_mean": text_metrics.mean(code_tokens),
        "length_ratio_mean": text_metrics.mean(
            [len(s) / max(c, 1) for s, c in zip(summary_ids, code_tokens, strict=True)]
        ),
    }


def generate_both(roles: RoleModels, cfg: EvaluateConfig, summary_prompts: list[str], code_prompts: list[str]):
    """The summarizer's summaries of the codes, then the coder's codes from the docstrings (ids, texts, ended):
    on one base the same engine serves both in turn; a second base's coder generates with hf rather than start a
    second engine."""
    engine = evaluation_engine(roles, cfg, summary_prompts, code_prompts)
    try:
        summaries = generate_texts(
            roles.summarizer,
            roles.summarizer_tokenizer,
            "summarizer",
            summary_prompts,
            cfg.max_new_tokens,
            cfg.batch_size,
            engine,
        )
        codes = generate_texts(
            roles.coder,
            roles.coder_tokenizer,
            "coder",
            code_prompts,
            cfg.max_code_tokens,
            cfg.batch_size,
            engine if roles.shared else None,
        )
    finally:
        if engine is not None:
            engine.close()
    return summaries, codes


def evaluate_pairs(
    roles: RoleModels, scored: list[dict], cfg: EvaluateConfig, progress: Any = None
) -> tuple[dict[str, Any], list[dict]]:
    """All metrics of the summarizer and the coder: generation on the first `max_examples` of `scored`, pairwise
    accuracy on all of them; one sample row per generated pair. Lengths and copies count the summarizer's tokens;
    the coder reads the summaries as text."""
    from blueprint.rl.copying import copy_rate
    from blueprint.rl.reward import RewardConfig, RewardModel

    pairs = scored[: cfg.max_examples]
    prompts, tokenizer = PromptConfig(style=cfg.prompt_style), roles.summarizer_tokenizer
    codes, truths = [p["code"] for p in pairs], [p["summary"] for p in pairs]
    shown_codes = clip_tokens(tokenizer, codes, cfg.max_code_tokens)  # what the models see (as in training)
    shown_truths = clip_tokens(roles.coder_tokenizer, truths, cfg.max_summary_tokens)
    coder_codes = shown_codes if roles.shared else clip_tokens(roles.coder_tokenizer, codes, cfg.max_code_tokens)

    (summary_ids, summaries, ended), (rebuilt_ids, rebuilt, rebuilt_ended) = generate_both(
        roles, cfg, [summary_prompt(c, prompts) for c in shown_codes], [code_prompt(s, prompts) for s in shown_truths]
    )
    report_phase = progress.update if progress is not None else (lambda done, **figures: None)
    report_phase(1, phase="summaries written, codes rebuilt")

    # The coder scores summaries (the reward PPO optimises, copy penalty off: copy rate is reported on its own).
    reward = RewardModel(
        roles.coder,
        roles.coder_tokenizer,
        prompts,
        RewardConfig(
            length_coef=cfg.length_coef,
            copy_coef=0.0,
            max_code_tokens=cfg.max_code_tokens,
            max_summary_tokens=cfg.max_summary_tokens,
            max_batch_tokens=cfg.score_batch_tokens,
        ),
        spread=True,
    )
    gen_out, true_out = reward(codes, summaries), reward(codes, truths)
    other = partners(len(scored), cfg.seed)
    pairwise = scored_pairwise(reward, scored, true_out.ce, other)
    report_phase(2, phase="coder scored the summaries")

    # Code with tests: run in the sandbox (the round-trip code from the summaries generated with hf: the engine
    # has served its two generations and is closed).
    tested, executed = code_tests.tested_figures(
        roles,
        pairs,
        summaries,
        rebuilt,
        cfg,
        prompts,
        functools.partial(greedy_codes, roles, prompts, cfg),
        lambda _, **figures: report_phase(3, **figures),
    )
    shown_code_ids = tokenizer(shown_codes, add_special_tokens=False)["input_ids"]
    copies = [copy_rate(s, c, n=4) for s, c in zip(summary_ids, shown_code_ids, strict=True)]
    parsed = [text_metrics.parses(c) for c in rebuilt]
    values: dict[str, Any] = {
        "epoch": cfg.epoch,
        "examples": len(pairs),
        **reward_stats(gen_out, "gen"),
        **reward_stats(true_out, "true"),
        "pairwise_accuracy": pairwise,
        "pairwise_examples": len(scored),
        **text_figures(tokenizer, codes, truths, summaries, summary_ids, rebuilt, coder_codes),
        "rebuilt_tokens_mean": text_metrics.mean([len(i) + e for i, e in zip(rebuilt_ids, rebuilt_ended, strict=True)]),
        "copy_rate": text_metrics.mean(copies),
        "code_parse_rate": text_metrics.mean(parsed),
        "eos_rate": text_metrics.mean(ended),
        "code_truncated": int(gen_out.code_truncated.sum()),
        "summary_true_truncated": int(true_out.summary_truncated.sum()),
        **tested,
    }
    values["ce_empty_mean"] = values["ce_empty_gen_mean"]
    report_phase(4 if executed else 3, phase="figures computed")
    rows = SampleColumns(shown_codes, truths, summaries, rebuilt, ended, copies, parsed)
    samples = sample_rows(pairs, scored, other, rows, gen_out, true_out, executed)
    return values, samples


@dataclasses.dataclass
class SampleColumns:
    """What was generated and measured per pair, by row: the code shown, its docstring, the summary, the rebuilt
    code, whether the summary ended, its copy rate, whether the rebuilt code parses."""

    codes: list[str]
    truths: list[str]
    summaries: list[str]
    rebuilt: list[str]
    ended: list[bool]
    copies: list[float]
    parsed: list[bool]


def sample_rows(
    pairs: list[dict],
    scored: list[dict],
    other: list[int],
    rows: SampleColumns,
    gen_out,
    true_out,
    executed: dict[int, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One samples.jsonl row per generated pair: its texts, rewards, flags and (with tests) execution results."""
    return [
        {
            "id": p.get("id"),
            "name": p.get("name"),
            "path": p.get("path"),
            "code": rows.codes[i],
            "summary": rows.truths[i],
            "generated_summary": rows.summaries[i],
            "rebuilt_code": rows.rebuilt[i],
            "reward_gen": float(gen_out.reward[i]),
            "reward_true": float(true_out.reward[i]),
            "gain_gen": float(gen_out.gain[i]),
            "gain_true": float(true_out.gain[i]),
            "eos": rows.ended[i],
            "copy_rate": rows.copies[i],
            "rebuilt_parses": rows.parsed[i],
            "pair_with": scored[other[i]].get("id"),
            **executed.get(i, {}),
        }
        for i, p in enumerate(pairs)
    ]


def evaluation_engine(roles: RoleModels, cfg: EvaluateConfig, summary_prompts: list[str], code_prompts: list[str]):
    """The vLLM engine of this evaluation when `cfg.engine` resolves to vllm, sized for its longest generation."""
    from blueprint.engines.vllm_engine import open_engine

    def longest(tokenizer, texts: list[str]) -> int:
        return max((len(ids) for ids in encode_prompts(tokenizer, texts)), default=0)

    need = longest(roles.summarizer_tokenizer, summary_prompts) + cfg.max_new_tokens
    if roles.shared:
        need = max(need, longest(roles.coder_tokenizer, code_prompts) + cfg.max_code_tokens)
    base = getattr(roles.summarizer, "name_or_path", "") or "the summarizer's base"
    return open_engine(roles.summarizer, cfg, STAGE, base, need, progress=False, seed=cfg.seed)


def headline(values: dict[str, Any]) -> dict[str, Any]:
    """The numbers that go into the manifest (and so into KFP metrics, `blueprint ls` and `compare`)."""
    return {k: values[k] for k in report.DESCRIPTIONS if k in values} | {
        k: values[k] for k in sorted(values) if report.SAMPLED.match(k)
    }


def previous_history(previous: str | None) -> list[dict[str, Any]]:
    """history.json of an earlier evaluate output ([] when there is none); refuses another stage's output."""
    if not previous:
        return []
    manifest = artifacts.read_manifest(previous, verify="sizes")
    if manifest.get("stage") != STAGE or "history.json" not in manifest.get("files", {}):
        raise artifacts.ArtifactError(
            f"previous {previous} is a {manifest.get('stage')!r} output, not an {STAGE} output with a history.json"
        )
    return list(json.loads(artifacts.read_verified(previous, "history.json", manifest)))


def compute(
    cfg: EvaluateConfig,
    shards: str,
    bases: Bases,
    adapters: str,
    previous: str | None,
    out_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    import torch

    from blueprint.data.readers import read_pairs
    from blueprint.models import lora

    start = time.time()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    pairs = read_pairs(shards, "eval", limit=max(cfg.max_examples, cfg.pairwise_examples))
    if not pairs:
        raise InputError(f"shards {shards} hold no eval pairs: nothing to evaluate (shard with eval_fraction > 0)")
    history = previous_history(previous)
    torch.manual_seed(cfg.seed)
    roles = open_roles(bases, cfg, progress, f"{STAGE}-{cfg.epoch}")
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir, meta = fetch_adapter_set(adapters, bases, Path(tmp) / "adapters")
        roles = load_roles(roles, adapter_dir, names=lora.ROLES, frozen=lora.ROLES)
    roles.summarizer.eval(), roles.coder.eval()
    tests = any(p.get("tests") for p in pairs[: cfg.max_examples])
    phases = Progress(f"{STAGE}-{cfg.epoch}", 4 if tests else 3, progress)
    values, samples = evaluate_pairs(roles, pairs, cfg, phases)
    phases.close()
    top = headline(values)  # the files hold no wall time: same inputs -> same bytes -> downstream cache hits

    # One history row per epoch: a rerun of an epoch replaces its row, so the plot never doubles back.
    portable = artifacts.portable_name
    history = [h for h in history if h.get("epoch") != cfg.epoch] + [{**top, "adapters": portable(adapters)}]
    history.sort(key=lambda h: h.get("epoch", 0))
    context = {
        "adapters": portable(adapters),
        "adapter round": str(meta.get("round", "?")),
        "base": _named(bases.summarizer),
        "shards": portable(shards),
        "previous": portable(previous) if previous else "-",
    }
    if not bases.shared:
        context["coder base"] = _named(bases.coder)
    if values.get("reference_failures"):  # a broken task file or environment, named where the reader looks first
        context["reference failures (canonical solution fails its tests)"] = ", ".join(values["reference_failures"])
    (out_dir / "metrics.json").write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    (out_dir / "history.json").write_text(json.dumps(history, indent=2, sort_keys=True) + "\n")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for row in samples:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    report.plot_history(history, out_dir / "metrics.png")
    plots = [("metrics across epochs", "metrics.png")]
    steps = round_steps(adapters)
    if steps:
        report.plot_steps(steps, out_dir / "curves.png", f"PPO steps of the round evaluated ({portable(adapters)})")
        plots.append(("the evaluated round's PPO steps", "curves.png"))
    text = report.markdown_report(top, history, samples[: cfg.report_examples], context, plots)
    (out_dir / "report.md").write_text(text, encoding="utf-8")
    page = report.html_page(
        text, f"BluePrint evaluation, epoch {cfg.epoch}", {name: out_dir / name for _, name in plots}
    )
    (out_dir / "report.html").write_text(page, encoding="utf-8")
    return {**top, "seconds": round(time.time() - start, 1)}


def round_steps(adapters: str) -> list[dict[str, Any]]:
    """The per-step statistics of the PPO round that wrote `adapters` ([] for warmup's adapters)."""
    manifest = artifacts.read_manifest(adapters, verify="sizes")
    if "steps.jsonl" not in manifest.get("files", {}):
        return []
    text = artifacts.read_verified(adapters, "steps.jsonl", manifest).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _named(base: str) -> str:
    return artifacts.portable_name(base) if is_artifact(base) else base


def run(  # noqa: PLR0913 - a stage's inputs by name, and where it commits: the launcher's keywords
    config: EvaluateConfig,
    *,
    shards: str,
    base: str,
    adapters: str,
    previous: str | None = None,
    coder_base: str | None = None,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """Committed evaluation of the adapter set `adapters` on the eval split of `shards`.

    `previous` (an earlier evaluate output) carries the history: this epoch's row is appended to its history.json.
    """
    previous = previous or None  # pipelines pass "" for "none"
    bases = Bases.of(base, coder_base)
    inputs = {"shards": shards, "adapters": adapters, **bases.key_parts()[0]}
    if previous:
        inputs["previous"] = previous
    with named_out_of_memory(STAGE, MEMORY_BUDGETS):
        return artifacts.reuse_or_commit(
            STAGE,
            key_settings(config, bases),
            inputs,
            lambda d: compute(config, shards, bases, adapters, previous, d, progress),
            artifact_root=artifact_root,
            out_uri=out_uri,
            force=force,
        )


def compare(uris: list[str]) -> str:
    """A Markdown table of the headline metrics of several evaluate outputs, side by side."""
    if not uris:
        raise ConfigError("compare needs at least one evaluate output URI")
    runs = []
    for uri in uris:
        manifest = artifacts.read_manifest(uri, verify="sizes")
        if manifest.get("stage") != STAGE:
            raise artifacts.ArtifactError(f"{uri} is a {manifest.get('stage')!r} output, not an {STAGE} output")
        metrics = manifest.get("metrics", {})
        label = f"epoch {metrics.get('epoch', '?')} ({manifest.get('key') or uri.rstrip('/').rsplit('/', 1)[-1]})"
        runs.append((label, metrics))
    legend = "\n".join(f"- {label}: `{uri}`" for (label, _), uri in zip(runs, uris, strict=True))
    return report.comparison_table(runs) + "\n\n" + legend + "\n"
