"""PPO round stage: the original API's `ppo_steps` on the summarizer, then `supervised_steps` on the coder.

The summarizer writes summaries of this round's code; the reward is how much those summaries help the coder
rebuild the code (information gain, minus length and copy penalties). Then the coder learns to rebuild the code
from the summaries the summarizer actually wrote (back-translation), mixed with ground-truth docstrings so it
does not drift. A killed round resumes from its last checkpoint (every `checkpoint_every` PPO steps).
"""

from __future__ import annotations

import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from blueprint import distributed, tracking
from blueprint.config import setting
from blueprint.distributed import ParallelSettings
from blueprint.engines.settings import EngineSettings
from blueprint.models.adapter_set import (
    RoleModels,
    fetch_adapter_set,
    key_settings,
    load_roles,
    open_roles,
    save_adapter_set,
)
from blueprint.models.bases import Bases
from blueprint.models.prompts import PromptConfig, PromptStyle, encode_prompts, summary_prompt
from blueprint.models.runtime import RuntimeSettings, named_out_of_memory
from blueprint.models.sft import SFTRun, clip_tokens, sft_datasets, sft_length, step_logger, train_adapter
from blueprint.rl import round_stats
from blueprint.rl.ppo_config import PPOConfig
from blueprint.rl.probe import probe_metrics, probe_reward
from blueprint.stages import registry
from blueprint.store import artifacts, storage
from blueprint.store.tensor_state import StateFileError, load_state, save_state

if TYPE_CHECKING:  # torch
    from blueprint.rl.reward import SummaryScorer

STAGE = registry.PPO_ROUND
# the settings an out-of-memory error names
MEMORY_BUDGETS = (
    "generate_batch_tokens",
    "update_batch_tokens",
    "score_batch_tokens",
    "forward_batch_size",
    "coder_batch_size",
)
CHECKPOINT = "_checkpoint"
VALUE_HEAD_FILE = "value_head.safetensors"
STATE_NAME = "trainer_state"  # .safetensors (optimizer moments, RNG) + .json (the rest): never a pickle


class PPORoundConfig(PPOConfig, RuntimeSettings, EngineSettings, ParallelSettings):
    """One round: PPO on the summarizer (every PPOConfig setting applies), then the coder's supervised step.

    The PPO settings are PPOConfig's own fields, inherited, not copied; the round re-declares only the defaults it
    chooses differently, each for a measured reason (README, Measured).
    """

    error_prefix = ""
    renamed = {"reference": "kl_anchor"}  # it named both this choice and the adapter the choice makes

    # the round builds these adapters itself: which one PPO trains and which is its anchor are not choices
    policy_adapter: Literal["summarizer"] = setting("summarizer", "the adapter PPO trains (always the summarizer)")
    reference_adapter: Literal["reference"] = setting(
        "reference", "the KL reference adapter the round builds (from kl_anchor)"
    )
    round_index: int = setting(1, "which round this is (1 = the first after warmup): seeds the round's draw", ge=1)
    ppo_steps: int = setting(10, "PPO steps on the summarizer (the original API's ppo_steps)", ge=0)
    supervised_steps: int = setting(
        10, "optimizer steps of the coder on this round's summaries (the original API's supervised_steps)", ge=0
    )
    samples_per_query: int = setting(
        4,
        "summaries sampled per code: each is judged against its siblings, so the advantage says 'better "
        "summary', not 'easier code'",
        gt=0,
    )
    lr: float = setting(1e-3, "learning rate of the summarizer's LoRA and the value head", gt=0)
    temperature: float = setting(
        0.5,
        "sampling and log-prob temperature: nearer greedy than 0.7, so what PPO learns from shows in greedy summaries",
        gt=0,
    )
    max_new_tokens: int = setting(32, "longest summary sampled", gt=0)
    whiten_rewards: bool = setting(
        True,
        "scale the (per-code centred) scores by the batch std: the gain (~0.03 nats/token) is otherwise "
        "small next to the KL penalty (~0.2 nats/summary)",
    )
    missing_eos_penalty: float = setting(
        0.1,
        "on the gain's scale (~0.05 nats/token): at 1.0 one unfinished summary in 32 dominated the whitened batch",
        ge=0,
    )
    length_coef: float = setting(0.01, "weight of len(summary) / len(code) in the reward", ge=0)
    reward: Literal["gain", "neg_ce"] = setting(
        "gain", '"gain" (information gain, low variance) or "neg_ce" (the original prototype\'s -CE)'
    )
    coder_lr: float = setting(1e-3, "learning rate of the coder's supervised step", gt=0)
    coder_batch_size: int = setting(8, "pairs per coder optimizer step", ge=1)
    ground_truth_fraction: float = setting(0.5, "share of the coder's pairs that use the true docstring", ge=0, le=1)
    max_code_tokens: int = setting(256, "code is cut to this many tokens (what the reward and the coder see)", ge=8)
    max_summary_tokens: int = setting(64, "summaries are cut to this many tokens", ge=4)
    score_batch_tokens: int | None = setting(
        None, "token budget of one reward-scoring forward (None = 1024 on CPU, 16384 on a GPU)", gt=0
    )
    probe_size: int = setting(
        128,
        "codes of the round's batch whose greedy-summary reward is measured before "
        "and after (paired, so small changes show)",
        ge=1,
    )
    probe_samples: int = setting(0, ">0: also the expected reward, this many sampled summaries per probe code", ge=0)
    kl_anchor: Literal["round", "warmup"] = setting(
        "round",
        'where the KL reference adapter is taken from: "round" (the summarizer as this round starts: a '
        'per-round trust region, so a recurring retraining never drifts into max_kl) or "warmup" (the '
        "summarizer after warmup)",
    )
    checkpoint_every: int = setting(5, "PPO steps between resumable checkpoints", ge=1)
    prompt_style: PromptStyle = setting("plain", "prompt templates: plain | structured")
    seed: int = setting(0, "seeds the round's draw of codes, the probe and sampling")
    rollout_seeds: Literal["rank", "query"] = setting(
        "rank",
        'how rollouts are sampled: "rank" (each process\'s batch from its own stream, seeded by seed, round '
        'and rank: fastest) or "query" (each query from its own seed, one generate call per query: the same '
        "summaries whatever nproc is)",
    )
    new_data_fraction: float = setting(
        0.0,
        "share of the round's codes drawn from the rows that are new since the dataset this one grew from "
        "(incremental sharding), so a scheduled retrain learns from what changed; 0 = a uniform draw",
        ge=0,
        le=1,
    )

    scaled_batches = ("batch_size", "mini_batch_size", "coder_batch_size")

    def split_over_ranks(self) -> dict[str, int]:
        return {
            "batch_size/samples_per_query": self.batch_size // self.samples_per_query,
            "coder_batch_size": self.coder_batch_size,
        }


def queries_per_step(cfg: PPORoundConfig) -> int:
    return cfg.batch_size // cfg.samples_per_query


def query_seeds(cfg: PPORoundConfig, step: int, indices: range) -> list[int] | None:
    """Per-query sampling seeds of `step` (global query indices), or None to sample from the rank's stream."""
    if cfg.rollout_seeds == "rank":
        return None
    return [random.Random(f"{cfg.seed}/{cfg.round_index}/{step}/{i}").getrandbits(62) for i in indices]


def rank_seed(cfg: PPORoundConfig) -> int:
    """The torch seed of this process: the round's for one process (and rank 0), another for each other rank."""
    return cfg.seed * 100_003 + cfg.round_index + 1_000_003 * distributed.rank()


def round_batch(shards: str, cfg: PPORoundConfig) -> list[dict]:
    """This round's codes: a deterministic draw from (seed, round), one per PPO query and at least `probe_size`,
    read from the train split by row group (the split is never held in memory)."""
    from blueprint.data.incremental import new_rows
    from blueprint.data.readers import sample_pairs

    rng = random.Random(cfg.seed * 100_003 + cfg.round_index)
    need = max(cfg.ppo_steps * queries_per_step(cfg), cfg.probe_size)
    fresh = new_rows(shards, "train") if cfg.new_data_fraction else None
    first = min(len(fresh), round(need * cfg.new_data_fraction)) if fresh else 0

    def draw(rows):
        if first:  # the new rows first, then the rest of the batch from the whole split, shuffled together
            rest = need - first
            picked = rng.sample(fresh, first) + (
                rng.sample(rows, rest) if rest <= len(rows) else [rng.choice(rows) for _ in range(rest)]
            )
            rng.shuffle(picked)
            return picked
        return rng.sample(rows, need) if need <= len(rows) else [rng.choice(rows) for _ in range(need)]

    return sample_pairs(shards, "train", draw)


def task_name(cfg: PPORoundConfig) -> str:
    """The round's name in progress lines, as in the pipeline's task display names."""
    return f"{STAGE}-{cfg.round_index}"


def _save(roles: RoleModels, trainer, out_dir: Path, bases: Bases, extra: dict) -> None:
    save_adapter_set(roles, out_dir, bases, ["summarizer", "coder", "reference"], extra)
    trainer.value_head.save(out_dir / VALUE_HEAD_FILE)
    state = trainer.state_dict()
    state.pop("value_head")
    save_state(state, out_dir, STATE_NAME)


def _load_trainer_state(trainer, directory: Path, source: str) -> None:
    """Resume the trainer from `directory` when it holds a state; a pickled one is refused, never loaded."""
    pickles = sorted(p.name for pattern in ("*.pt", "*.pth", "*.pkl", "*.bin") for p in directory.glob(pattern))
    if pickles:
        raise artifacts.ArtifactError(
            f"{source} holds pickled files ({', '.join(pickles)}): BluePrint never loads a pickle from the store"
        )
    if not (directory / f"{STATE_NAME}.safetensors").exists():
        return
    try:
        state = load_state(directory, STATE_NAME)
    except StateFileError as exc:
        raise artifacts.ArtifactError(f"{source}: {exc}") from None
    state["value_head"] = trainer.value_head.state_dict()
    trainer.load_state_dict(state)


def _open_round(cfg: PPORoundConfig, bases: Bases, adapters: str, ckpt_uri: str, progress: bool):
    """(roles, trainer, meta, resumed): the round's adapters, from its checkpoint when one exists."""
    from blueprint.models import lora
    from blueprint.rl.ppo import PPOTrainer, ValueHead

    roles = open_roles(bases, cfg, progress, task_name(cfg))
    resumed = storage.exists(artifacts.manifest_uri(ckpt_uri))
    with tempfile.TemporaryDirectory() as tmp:
        source = ckpt_uri if resumed else adapters
        adapter_dir, meta = fetch_adapter_set(source, bases, Path(tmp) / "in")
        roles = load_roles(roles, adapter_dir)
        model = roles.summarizer
        if not resumed and cfg.kl_anchor == "round" and cfg.reference_adapter in model.peft_config:
            model.delete_adapter(cfg.reference_adapter)
        if cfg.reference_adapter not in model.peft_config:
            lora.add_reference_adapter(model, cfg.policy_adapter, cfg.reference_adapter)
        head_path = adapter_dir.parent / VALUE_HEAD_FILE
        value_head = ValueHead.load(head_path) if head_path.exists() else None
        trainer = PPOTrainer(model, roles.summarizer_tokenizer, cfg, value_head)
        _load_trainer_state(trainer, adapter_dir.parent, source)
    return roles, trainer, (meta if resumed else {}), resumed


def round_engine(
    cfg: PPORoundConfig, trainer, tokenizer, codes: list[str], base: str, progress: bool
) -> dict[str, Any]:
    """Give the trainer a vLLM engine serving the summarizer when `cfg.engine` resolves to vllm; the figures that
    say which engine sampled."""
    from blueprint.engines import settings as engine_settings
    from blueprint.engines.vllm_engine import open_engine
    from blueprint.models import runtime

    prompts = PromptConfig(style=cfg.prompt_style)
    longest = max(len(q) for q in encode_prompts(tokenizer, [summary_prompt(c, prompts) for c in codes]))
    engine = open_engine(trainer.model, cfg, STAGE, base, longest + cfg.max_new_tokens, progress, rank_seed(cfg))
    if engine is None:
        return {"engine": "hf"}
    from blueprint.engines.policy import PolicySampler

    dtype = str(runtime.place(cfg).dtype).removeprefix("torch.")
    trainer.engine = PolicySampler(engine, trainer.model, cfg.policy_adapter, engine_settings.max_gap(cfg, dtype))
    return {"engine": "vllm", "engine_startup_s": round(engine.startup_s, 1)}


@dataclasses.dataclass
class Round:
    """A round's live state, as its PPO steps and checkpoints share it."""

    cfg: PPORoundConfig
    bases: Bases
    roles: RoleModels
    trainer: Any
    scorer: SummaryScorer
    ckpt_uri: str
    tracker: tracking.Tracker
    stats_rows: list[dict]  # one per step done, resumed ones included
    before: dict[str, Any]  # the probe's figures before the round, carried by each checkpoint


def _ppo_steps(rnd: Round, codes: list[str], done: int, progress: bool) -> str | None:
    """Run the PPO steps from `done` on (appending to `rnd.stats_rows`, checkpointing as configured); why it stopped
    early, or None."""
    from blueprint.progress import Progress
    from blueprint.rl.ppo import KLExplodedError

    cfg, trainer, scorer, stats_rows = rnd.cfg, rnd.trainer, rnd.scorer, rnd.stats_rows
    prompts, tokenizer = PromptConfig(style=cfg.prompt_style), rnd.roles.summarizer_tokenizer
    bar = Progress(task_name(cfg), cfg.ppo_steps, progress, start=done)
    q = queries_per_step(cfg)
    share = distributed.my_share(q)  # this rank's queries of each step (all of them in one process)
    try:
        for step in range(done, cfg.ppo_steps):
            chunk = codes[step * q : (step + 1) * q][share.start : share.stop]
            scorer.codes = [c for c in chunk for _ in range(cfg.samples_per_query)]  # the trainer's rollout order
            queries = encode_prompts(tokenizer, [summary_prompt(c, prompts) for c in chunk])
            code_ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
            try:
                stats = trainer.ppo_step(
                    queries,
                    scorer,
                    code_ids=code_ids,
                    seeds=query_seeds(cfg, step, range(step * q + share.start, step * q + share.stop)),
                )
            except KLExplodedError as exc:
                return f"kl_exploded at step {step}: {exc}"
            stats_rows.append({"step": step, **stats})
            rnd.tracker.log(
                "summarizer",
                round_stats.global_step(cfg.round_index, step + 1, cfg.ppo_steps),
                round_stats.step_figures(stats, cfg.batch_size),
            )
            bar.update(step + 1, reward=stats.get("score/mean", float("nan")), kl=stats.get("kl", 0.0))
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.ppo_steps:
                with tempfile.TemporaryDirectory() as ck:
                    _save(
                        rnd.roles,
                        trainer,
                        Path(ck),
                        rnd.bases,
                        {
                            "ppo_steps_done": step + 1,
                            "stats": stats_rows,
                            **written_state(scorer.written),
                            **rnd.before,
                        },
                    )
                    if distributed.is_main():  # every rank saved (collectives); one commits
                        artifacts.commit(
                            Path(ck),
                            rnd.ckpt_uri,
                            stage=f"{STAGE}-checkpoint",
                            config={},
                            inputs={},
                            metrics={"ppo_steps_done": step + 1},
                        )
    finally:
        bar.close()
    return None


def written_state(written: list[tuple[str, str]]) -> dict[str, Any]:
    """The summaries written so far, for a checkpoint: each rank's own list on N ranks (a collective)."""
    if distributed.world_size() == 1:
        return {"written": written}
    return {"written_ranks": distributed.all_objects(written), "world_size": distributed.world_size()}


def resumed_written(meta: dict[str, Any], source: str) -> list[tuple[str, str]]:
    """This rank's summaries written before the checkpoint it resumes from, which the same number of processes
    must have written (each rank resumes its own share, RNG and summaries)."""
    ranks, world = meta.get("written_ranks"), distributed.world_size()
    if meta and int(meta.get("world_size", 1)) != world:
        raise artifacts.ArtifactError(
            f"{source} was written by {meta.get('world_size', 1)} process(es), this round "
            f"runs on {world}: rerun it with nproc as it was, or with --force"
        )
    return [tuple(w) for w in (ranks[distributed.rank()] if ranks else meta.get("written", []))]


def compute(
    cfg: PPORoundConfig, shards: str, bases: Bases, adapters: str, out_dir: Path, out_uri: str, progress: bool = True
) -> dict[str, Any]:
    with tracking.stage_tracker(task_name(cfg), out_dir, artifacts.config_dict(cfg), out_uri) as tracker:
        return _compute(cfg, shards, bases, adapters, out_dir, out_uri, progress, tracker)


def _compute(
    cfg: PPORoundConfig,
    shards: str,
    bases: Bases,
    adapters: str,
    out_dir: Path,
    out_uri: str,
    progress: bool,
    tracker: tracking.Tracker,
) -> dict[str, Any]:
    import torch

    from blueprint.rl.reward import RewardConfig, RewardModel, SummaryScorer

    start = time.time()
    cfg = cfg.totals(distributed.world_size())  # the trainer and the draw count the step's totals
    torch.manual_seed(rank_seed(cfg))
    ckpt_uri = storage.join(out_uri, CHECKPOINT)
    roles, trainer, meta, resumed = _open_round(cfg, bases, adapters, ckpt_uri, progress)
    model, tokenizer = roles.summarizer, roles.summarizer_tokenizer
    done = int(meta.get("ppo_steps_done", 0))
    stats_rows: list[dict] = list(meta.get("stats", []))

    batch = round_batch(shards, cfg)
    codes = clip_tokens(tokenizer, [p["code"] for p in batch], cfg.max_code_tokens)
    reward = RewardModel(
        roles.coder,
        roles.coder_tokenizer,
        PromptConfig(style=cfg.prompt_style),
        RewardConfig(
            length_coef=cfg.length_coef,
            copy_coef=0.0,
            max_code_tokens=cfg.max_code_tokens,
            max_summary_tokens=cfg.max_summary_tokens,
            max_batch_tokens=cfg.score_batch_tokens,
        ),
    )
    metrics_engine = round_engine(cfg, trainer, tokenizer, codes, bases.summarizer, progress)
    probe = codes[: cfg.probe_size]
    before = (
        {k: v for k, v in meta.items() if k.startswith("probe_")}
        if resumed
        else probe_metrics(model, tokenizer, reward, probe, cfg, "before")
    )
    metrics: dict[str, Any] = {"round_index": cfg.round_index, "resumed_at_step": done, **metrics_engine, **before}
    scorer = SummaryScorer(reward, tokenizer, use_gain=cfg.reward == "gain")
    scorer.written = resumed_written(meta, ckpt_uri)
    try:
        rnd = Round(cfg, bases, roles, trainer, scorer, ckpt_uri, tracker, stats_rows, before)
        stopped = _ppo_steps(rnd, codes, done, progress)
    finally:  # the engine's memory back before the coder's update
        if trainer.engine is not None:
            trainer.engine.engine.close()
            trainer.engine = None
    # The round's two halves, measured on the same codes: PPO improves the summaries for the current coder
    # (probe_reward_after_ppo), then the coder learns from them (probe_reward_after: the whole round).
    metrics.update(probe_metrics(model, tokenizer, reward, probe, cfg, "after_ppo"))
    if stopped is None and cfg.supervised_steps > 0:
        from blueprint.rl import data_parallel

        written = data_parallel.in_step_order(scorer.written, cfg.batch_size // distributed.world_size())
        metrics.update(train_coder(roles, batch, written, cfg, progress, tracker))
    metrics["probe_reward_after"] = probe_reward(model, tokenizer, reward, probe, cfg)
    _save(roles, trainer, out_dir, bases, {"round": cfg.round_index})
    with open(out_dir / "steps.jsonl", "w") as f:  # content only: wall times go to the metrics
        for row in stats_rows:
            f.write(json.dumps({k: v for k, v in row.items() if not k.startswith("time/")}, default=float) + "\n")
    metrics.update(round_stats.step_summary(stats_rows))
    metrics.update(
        ppo_steps_done=len(stats_rows),
        skipped_batches=trainer.skipped_total,
        stopped=stopped or "",
        seconds=round(time.time() - start, 1),
    )
    return metrics


def train_coder(
    roles: RoleModels,
    batch: list[dict],
    written: list[tuple[str, str]],
    cfg: PPORoundConfig,
    progress: bool,
    tracker: tracking.Tracker | None = None,
) -> dict[str, float]:
    """Back-translation: the coder learns (written summary -> code), mixed with (docstring -> code)."""
    model, tokenizer = roles.coder, roles.coder_tokenizer
    rng = random.Random(cfg.seed * 7919 + cfg.round_index)
    n = max(cfg.supervised_steps * cfg.coder_batch_size, 2)
    n_true = round(n * cfg.ground_truth_fraction) if written else n
    generated = [{"summary": s, "code": c} for s, c in written if s.strip()]
    pairs = [rng.choice(batch) for _ in range(n_true)] + (
        [rng.choice(generated) for _ in range(n - n_true)] if generated else []
    )
    rng.shuffle(pairs)
    held_out = generated[-16:] or batch[:16]
    limits = (cfg.prompt_style, cfg.max_code_tokens, cfg.max_summary_tokens)
    train, evals = sft_datasets(pairs, tokenizer, *limits)["coder"], sft_datasets(held_out, tokenizer, *limits)["coder"]
    run = SFTRun(
        steps=cfg.supervised_steps,
        batch_size=cfg.coder_batch_size,
        lr=cfg.coder_lr,
        seed=cfg.seed,
        max_length=sft_length(cfg.max_code_tokens, cfg.max_summary_tokens),
        task=task_name(cfg),
        lr_setting="coder_lr",
        progress=progress,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    out = train_adapter(
        model,
        tokenizer,
        "coder",
        train,
        evals,
        run,
        track=tracker
        and step_logger(
            lambda step, row: tracker.log("coder", step, row),
            round_stats.global_step(cfg.round_index, 0, cfg.supervised_steps),
        ),
    )
    roles.summarizer.set_adapter("summarizer")  # train_adapter made the coder active; the policy acts next
    return out


def run(  # noqa: PLR0913 - a stage's inputs by name, and where it commits: the launcher's keywords
    config: PPORoundConfig,
    *,
    shards: str,
    base: str,
    adapters: str,
    coder_base: str | None = None,
    artifact_root: str | None = None,
    out_uri: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> artifacts.StageOutput:
    """Committed adapter set after one round (summarizer, coder, reference, value head, optimizer state)."""
    bases = Bases.of(base, coder_base)
    inputs = {"shards": shards, "adapters": adapters, **bases.key_parts()[0]}
    settings = key_settings(config, bases)
    owned = out_uri is None  # content-addressed: the checkpoint lives under the key, so a rerun resumes it
    if out_uri is None:
        out_uri = artifacts.stage_uri(artifact_root, STAGE, artifacts.stage_key(STAGE, settings, inputs))
    out_uri = storage.normalize(out_uri)
    if force and distributed.is_main():
        storage.delete_prefix(storage.join(out_uri, CHECKPOINT))
    distributed.barrier()
    with named_out_of_memory(STAGE, MEMORY_BUDGETS):
        return artifacts.reuse_or_commit(
            STAGE,
            settings,
            inputs,
            lambda d: compute(config, shards, bases, adapters, d, out_uri, progress),
            out_uri=out_uri,
            force=force,
            owned=owned,
        )
