"""PPO for the summarizer adapter (trl 1.x has no PPOTrainer, so it is ours).

One causal LM base wrapped as ONE peft `PeftModel`: the policy is the `summarizer` LoRA adapter, the KL anchor is the
frozen `reference` adapter (or the bare base when `reference_adapter=None`), and a `ValueHead` reads the policy's last
hidden states. Roles are switched with `set_adapter`, never copied. One `ppo_step`:

1. rollout: sample `samples_per_query` responses per query with `model.generate` (left-padded queries, temperature
   T), cut each at its first EOS (the EOS is kept as the last action; tokens after it are masked); a rollout
   engine (`engine`, blueprint.engines) samples instead when set: its log-probs of the samples are checked against
   the trainer's after step 3, and it gets the policy's new weights after every update;
2. score: `score_fn(query_ids, response_ids)` → scalar scores, minus `copy_penalty·copy_rate` (copy guard) and minus
   `missing_eos_penalty` for responses that never ended (Huang et al., "The N+ implementation details of RLHF");
3. log π, log π_ref (at temperature T, dropout off) and values in one no-grad forward each;
4. scores centred on their query's mean when k > 1 (`group_baseline`) and/or whitened; per-token rewards
   −β·(log π − log π_ref), score on the last valid token; GAE; whitened advantages;
5. `ppo_epochs` passes over shuffled minibatches of the clipped policy + value loss; only the policy LoRA and the
   value head receive updates (an explicit optimizer parameter list, so the base, reference and coder cannot move).

Failure contract: a batch whose score is NaN/inf is skipped (`stats["skipped"] == 1`, nothing updated); more than
`max_bad_batches` consecutive skipped batches raise `PPOError`. A rollout whose KL exceeds `max_kl` raises
`KLExplodedError` *after* the trainer has rolled the policy adapter, value head and optimizer back to their state
before the previous update (the last state whose KL passed the check), so the caller can catch it, save, and stop.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from blueprint import distributed
from blueprint.models import runtime
from blueprint.models.batching import pad_batch
from blueprint.rl import data_parallel, ppo_math
from blueprint.rl.copying import copy_rates
from blueprint.rl.micro_batches import MicroBatch, epoch_layout, padding_share, row_lengths
from blueprint.rl.ppo_config import PPOConfig  # torch-free, so stages can validate without torch
from blueprint.rl.ppo_errors import KLExplodedError, PPOError
from blueprint.rl.rollout import Rollout, query_lists, rows_within
from blueprint.rl.value_head import ValueHead

__all__ = ["PPOConfig", "PPOTrainer", "ValueHead", "Rollout", "PPOError", "KLExplodedError", "ScoreFn"]

# score_fn(query_ids, response_ids) -> (scores [B], components {name: [B]}); response_ids are EOS-cut token lists.
ScoreFn = Callable[[list[list[int]], list[list[int]]], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


class PPOTrainer:
    """Owns the value head, the optimizer, the KL controller and the PPO loop for one policy adapter of `model`."""

    def __init__(self, model: nn.Module, tokenizer, config: PPOConfig, value_head: ValueHead | None = None):
        self.model, self.config = model, config
        self.eos_token_id: int = tokenizer.eos_token_id
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        adapters = set(getattr(model, "peft_config", {}))
        for name in [config.policy_adapter, config.reference_adapter]:
            if name is not None and name not in adapters:
                raise ValueError(f"adapter {name!r} not in the model (has {sorted(adapters)})")
        self.causal_lm = model.get_base_model()
        self.device = next(model.parameters()).device
        hidden = self.causal_lm.config.get_text_config().hidden_size
        self.value_head = (value_head if value_head is not None else ValueHead(hidden)).to(self.device)
        # Trained parameters, selected by name: the policy adapter's own weights (lora_A/B.<policy>...) and the head.
        self.policy_params = [p for n, p in model.named_parameters() if config.policy_adapter in n.split(".")]
        if not self.policy_params:
            raise ValueError(f"no parameters belong to adapter {config.policy_adapter!r}")
        self.params = self.policy_params + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.kl_ctl = (
            ppo_math.AdaptiveKLController(config.init_kl_coef, config.kl_target, config.kl_horizon)
            if config.adaptive_kl
            else ppo_math.FixedKLController(config.init_kl_coef)
        )
        self.generation_config = GenerationConfig(
            do_sample=True,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.min_new_tokens,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,  # override any hub defaults that would distort π
        )
        self.engine = None  # a rollout engine (blueprint.engines.policy.PolicySampler) instead of generate()
        self.step = 0  # completed updates
        self.bad_batches = 0  # consecutive skipped batches
        self.skipped_total = 0
        self._last_good: dict | None = None
        self._bad_loss: str | None = None  # what made this rank's last micro-batch loss non-finite

    # ---------------------------------------------------------------- forwards

    def _activate(self, adapter: str | None) -> None:
        if adapter is not None:  # requires_grad only on the policy adapter, never on the anchor
            self.model.set_adapter(adapter, inference_mode=adapter != self.config.policy_adapter)

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int, with_values: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (and values) at the positions that predict the response tokens, for the active adapter.

        Runs the decoder once and applies the LM head only to the response positions: on long code prompts most of
        the LM head's cost (and memory) would otherwise go to query positions nobody needs.
        """
        with self._autocast():
            out = self.causal_lm.get_decoder()(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=ppo_math.position_ids(attention_mask),
                use_cache=False,
            )
            hidden = out.last_hidden_state[:, -n_response - 1 : -1]
            logits = self.causal_lm.get_output_embeddings()(hidden).float()
        cap = getattr(self.causal_lm.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits, (self.value_head(hidden.float()) if with_values else None)

    def _autocast(self) -> torch.autocast:
        dtype = self.config.autocast_dtype
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype or "bfloat16"), enabled=dtype is not None)

    def _forward_part(
        self, r: Rollout, part: MicroBatch, with_values: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward` of the rows and columns of one micro-batch (see `micro_batches`)."""
        rows = part.rows.to(self.device)
        return self._forward(
            r.input_ids[rows, part.start : part.stop],
            r.attention_mask[rows, part.start : part.stop],
            part.width,
            with_values,
        )

    @torch.inference_mode()
    def _score_forwards(self, r: Rollout) -> None:
        """log π, log π_ref, values and entropy for the whole rollout, without grad, in eval mode (no dropout), in
        the micro-batches of the update's first epoch: old and new log-probs computed alike (`micro_batches`)."""
        T, (B, R) = self.config.temperature, r.response.shape
        out = {k: torch.zeros(B, R, device=self.device) for k in ("logp", "ref_logp", "values", "entropy")}
        layout = epoch_layout(r.permutation, r.attention_mask, r.mask, self.config)
        parts = [part for _, mini in layout for part in mini]
        for part in parts:
            rows, resp = part.rows.to(self.device), r.response[part.rows.to(self.device), : part.width]
            self._activate(self.config.policy_adapter)
            logits, values = self._forward_part(r, part, with_values=True)
            logp, entropy = ppo_math.logprobs_and_entropy(logits, resp, T)
            del logits
            if self.config.reference_adapter is None:
                with self.model.disable_adapter():
                    ref_logits, _ = self._forward_part(r, part, with_values=False)
            else:
                self._activate(self.config.reference_adapter)
                ref_logits, _ = self._forward_part(r, part, with_values=False)
            ref_logp, _ = ppo_math.logprobs_and_entropy(ref_logits, resp, T, with_entropy=False)
            for k, v in zip(("logp", "ref_logp", "values", "entropy"), (logp, ref_logp, values, entropy), strict=True):
                out[k][rows, : part.width] = v.float()
        self._activate(self.config.policy_adapter)
        for k, v in out.items():  # clone out of inference mode: these become constants inside the PPO loss
            setattr(r, k, v.clone())
        r.padding = padding_share(parts, *row_lengths(r.attention_mask.cpu(), r.mask.cpu()))

    # ---------------------------------------------------------------- rollout

    def _sample_per_query(self, queries: list[list[int]], seeds: Sequence[int]) -> list[torch.Tensor]:
        """Each query's k samples drawn under its own seed (the training RNG untouched): what a query gets does not
        depend on the other queries of its batch, nor on which data-parallel rank holds it."""
        k, out = self.config.samples_per_query, []
        for q, seed in zip(queries, seeds, strict=True):
            ids = torch.tensor([q] * k, device=self.device)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed)
                out.append(
                    self.model.generate(
                        input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=self.generation_config
                    )[:, ids.shape[1] :]
                )
        return out

    def make_rollout(
        self,
        queries: Sequence[torch.Tensor | Sequence[int]] | torch.Tensor,
        score_fn: ScoreFn,
        code_ids: Sequence[Sequence[int]] | None = None,
        timings: dict | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Rollout:
        """Generate, EOS-cut, score (and penalise); then the no-grad forwards unless a score is NaN/inf.
        `seeds` (one per query): sample each query under its own seed instead of from the batch's RNG stream."""
        timings = {} if timings is None else timings
        cfg = self.config
        k = cfg.samples_per_query  # each query's samples sit next to each other: [q0, q0, q1, q1, ...]
        query_ids = [q for q in query_lists(queries) for _ in range(k)]
        # left padding: every response starts at column Q
        input_ids, attention_mask = pad_batch(query_ids, self.pad_token_id, "left", self.device)
        B, Q = input_ids.shape

        t0 = time.perf_counter()
        self.model.eval()
        self._activate(cfg.policy_adapter)
        rows = rows_within(cfg.generate_batch_tokens, Q + cfg.max_new_tokens, B)
        engine_logp = None
        if self.engine is not None:  # the engine samples the same policy and returns its own log-probs of it
            chunk, engine_logp = self.engine.sample(query_ids, k, seeds, cfg, self.eos_token_id, self.pad_token_id)
            chunks = [chunk.to(self.device)]
        else:
            with torch.inference_mode(), self._autocast():
                chunks = (
                    self._sample_per_query(query_ids[::k], seeds)
                    if seeds is not None
                    else [
                        self.model.generate(
                            input_ids=input_ids[s : s + rows],
                            attention_mask=attention_mask[s : s + rows],
                            generation_config=self.generation_config,
                        )[:, Q:]
                        for s in range(0, B, rows)
                    ]
                )
        width = max(c.shape[1] for c in chunks)
        response = torch.cat([F.pad(c, (0, width - c.shape[1]), value=self.pad_token_id) for c in chunks]).clone()
        mask, lengths, has_eos = ppo_math.eos_cut(response, self.eos_token_id)
        R = int(mask.sum(1).max())  # drop columns that are padding in every row
        response, mask = response[:, :R], mask[:, :R]
        response = torch.where(mask.bool(), response, torch.full_like(response, self.pad_token_id))
        response_ids = [response[i, : lengths[i]].tolist() for i in range(B)]
        timings["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        out = score_fn(query_ids, response_ids)
        raw, components = out if isinstance(out, tuple) else (out, {})
        raw = torch.as_tensor(raw, dtype=torch.float32).detach().flatten().cpu()
        if raw.numel() != B:
            raise ValueError(f"score_fn returned {raw.numel()} scores for {B} responses")
        components = {
            k: torch.as_tensor(v, dtype=torch.float32).detach().flatten().cpu() for k, v in components.items()
        }
        codes = query_ids if code_ids is None else [list(c) for c in code_ids for _ in range(k)]
        rate = copy_rates(response_ids, codes, cfg.copy_ngram)
        scores = raw - cfg.copy_penalty * rate - cfg.missing_eos_penalty * (~has_eos.cpu()).float()
        timings["score"] = time.perf_counter() - t0

        r = Rollout(
            query_ids,
            response_ids,
            torch.cat([input_ids, response], 1),
            torch.cat([attention_mask, torch.ones_like(response)], 1),
            response,
            mask,
            has_eos.cpu(),
            raw,
            rate,
            scores,
            components,
        )
        if data_parallel.all_finite(r.finite):  # a skipped batch draws nothing (and on no rank)
            t0 = time.perf_counter()
            r.permutation = data_parallel.global_permutation(B * distributed.world_size())  # the first epoch's
            self._score_forwards(r)
            timings["forward"] = time.perf_counter() - t0
            if engine_logp is not None:  # stops the round when the engine did not sample this policy (the step
                # counted from 1, as steps.jsonl and the progress lines count it)
                r.engine_gap = self.engine.check(r.logp, engine_logp[:, :R], r.mask, self.step + 1)
        return r

    # ---------------------------------------------------------------- step

    def ppo_step(
        self,
        queries: Sequence[torch.Tensor | Sequence[int]] | torch.Tensor,
        score_fn: ScoreFn,
        code_ids: Sequence[Sequence[int]] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> dict[str, float]:
        """One PPO iteration of `batch_size` rollouts; returns flat float stats (see module doc for failures).

        `code_ids` are the code tokens the copy guard compares against (default: the query tokens themselves).
        With `samples_per_query` k > 1 it takes batch_size/k queries and samples k responses for each; score_fn
        then sees every query k times in a row. On N data-parallel ranks each passes its 1/N of the queries.
        """
        cfg = self.config
        want = cfg.batch_size // cfg.samples_per_query // distributed.world_size()
        if len(queries) != want:
            raise ValueError(f"ppo_step got {len(queries)} queries, needs batch_size/samples_per_query/ranks = {want}")
        was_training, prev_adapter = self.model.training, getattr(self.model, "active_adapter", None)
        timings: dict[str, float] = {}
        try:
            return self.learn(self.make_rollout(queries, score_fn, code_ids, timings, seeds), timings)
        finally:
            self.model.train(was_training)
            if prev_adapter is not None:
                self._activate(prev_adapter if isinstance(prev_adapter, str) else prev_adapter[0])

    def _skip(self, r: Rollout) -> dict[str, float]:
        self.bad_batches += 1
        self.skipped_total += 1
        if self.bad_batches > self.config.max_bad_batches:
            raise PPOError(
                f"{self.bad_batches} consecutive batches with non-finite scores "
                f"(max_bad_batches={self.config.max_bad_batches})"
            )
        return {
            "skipped": 1.0,
            "bad_batches": float(self.bad_batches),
            "skipped_total": float(self.skipped_total),
            "step": float(self.step),
            "kl_coef": self.kl_ctl.value,
        }

    def learn(self, r: Rollout, timings: dict[str, float] | None = None) -> dict[str, float]:
        """The PPO update from a rollout (`make_rollout` + `learn` = `ppo_step`); skips batches with bad scores."""
        if not data_parallel.all_finite(r.finite):
            return self._skip(r)
        self.bad_batches = 0
        timings = {} if timings is None else timings
        cfg, B, reduce = self.config, len(r.query_ids), data_parallel.reducer()
        beta = self.kl_ctl.value
        # every figure over the GLOBAL batch: per-rollout scalars gathered in rank order, token sums reduced
        every = distributed.all_cat
        all_scores, all_raw = every(r.scores), every(r.raw_scores)  # one gather each, for the baseline and stats
        scores = ppo_math.group_baseline(all_scores, cfg.samples_per_query, scale=cfg.whiten_rewards)
        scores = scores[distributed.my_share(len(scores))]
        rewards, kl = ppo_math.per_token_rewards(scores.to(self.device), r.logp, r.ref_logp, r.mask, beta)
        kl_seq = every(kl.sum(1))
        advantages, returns = ppo_math.compute_gae(rewards, r.values, r.mask, cfg.gamma, cfg.lam)
        advantages = ppo_math.masked_whiten(advantages, r.mask, reduce=reduce)

        lengths = every(torch.tensor([float(len(x)) for x in r.response_ids]))
        stats: dict[str, float] = {
            "skipped": 0.0,
            "score/mean": all_scores.mean().item(),
            "score/std": ppo_math.scalar_std(all_scores),
            "score/raw_mean": all_raw.mean().item(),
            "score/raw_std": ppo_math.scalar_std(all_raw),
            "copy_rate": every(r.copy_rate).mean().item(),
            "no_eos_rate": (~every(r.has_eos)).float().mean().item(),
            "kl": kl_seq.mean().item(),
            "kl_coef": beta,
            "non_score_reward": (-beta * kl_seq).mean().item(),
            "entropy": ppo_math.masked_mean(r.entropy, r.mask, reduce=reduce).item(),
            "response_length": float(lengths.sum()) / len(lengths),
            "values/mean": ppo_math.masked_mean(r.values, r.mask, reduce=reduce).item(),
            "returns/mean": ppo_math.masked_mean(returns, r.mask, reduce=reduce).item(),
        }
        stats.update({f"score/{k}": every(v).mean().item() for k, v in r.components.items()})
        stats.update(r.engine_gap)
        padding, positions = distributed.all_sum(torch.tensor(r.padding, dtype=torch.float64)).tolist()
        stats["padding_share"] = padding / positions if positions else 0.0  # of the no-grad forwards' positions
        if not math.isfinite(stats["kl"]) or stats["kl"] > cfg.max_kl:
            rolled_back = self._rollback()
            raise KLExplodedError(stats["kl"], cfg.max_kl, rolled_back, stats)

        self._last_good = self._snapshot()
        if self.engine is not None:
            self.engine.before_update()
        t0 = time.perf_counter()
        stats.update(self._update(r, r.targets(advantages, returns)))
        timings["update"] = time.perf_counter() - t0
        if self.engine is not None:  # the next rollout samples the policy as updated now
            timings["sync"] = self.engine.sync(self.model)
        self.kl_ctl.update(stats["kl"], B * distributed.world_size())
        self.step += 1
        stats["step"] = float(self.step)
        stats.update({f"time/{k}": v for k, v in timings.items()})
        return stats

    def _update(self, r: Rollout, targets: ppo_math.Targets) -> dict[str, float]:
        cfg, B = self.config, len(r.query_ids)
        runtime.checkpointing_without_dropout(self.model)
        self._activate(cfg.policy_adapter)
        totals: dict[str, float] = {}
        n, ranks = 0, distributed.world_size()
        valid_per_row = distributed.all_cat(r.mask.sum(1).cpu())  # every rank's rows, for the global token shares
        for epoch in range(cfg.ppo_epochs):
            first = r.permutation if epoch == 0 and r.permutation is not None else None
            permutation = first if first is not None else data_parallel.global_permutation(B * ranks)
            for idx, parts in epoch_layout(permutation, r.attention_mask, r.mask, cfg):
                self.optimizer.zero_grad(set_to_none=True)
                st = self._accumulate(
                    r, parts, targets, valid_per_row[idx].sum().clamp(min=1), whole=ranks == 1 and len(parts) == 1
                )
                bad, self._bad_loss = self._bad_loss, None
                if not data_parallel.all_finite(bad is None):
                    self._rollback()  # minibatches already applied this step are undone too
                    raise PPOError(f"non-finite PPO loss at step {self.step} ({bad or 'on another rank'})")
                data_parallel.sync_gradients(self.params)
                st = data_parallel.summed_stats({k: float(v) for k, v in st.items()})
                st["grad_norm"] = nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                for k, v in st.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                n += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {k: v / n for k, v in totals.items()}

    def _accumulate(
        self, r: Rollout, parts: list[MicroBatch], targets: ppo_math.Targets, valid: torch.Tensor, whole: bool
    ) -> dict[str, torch.Tensor]:
        """Gradients of this rank's micro-batches `parts` of one mini-batch's PPO loss; each micro-batch's token mean
        is weighted by its share of the mini-batch's `valid` tokens (on all ranks), so the sum over micro-batches and
        ranks is the mini-batch's loss. `whole`: `parts` is the whole mini-batch in one pass."""
        cfg = self.config
        stats: dict[str, torch.Tensor] = {}
        for part in parts:  # a rank may hold none of a mini-batch's rows
            rows, cols = part.rows.to(self.device), slice(0, part.width)
            old = targets[rows, cols]
            # a whole mini-batch weighs exactly 1.0 (not valid/valid), so no budget leaves the numerics untouched
            share = 1.0 if whole else old.mask.sum() / valid.to(old.mask.device)
            logits, values = self._forward_part(r, part, with_values=True)
            logp, _ = ppo_math.logprobs_and_entropy(logits, r.response[rows, cols], cfg.temperature, with_entropy=False)
            pg_loss, vf_loss, st = ppo_math.ppo_losses(logp, values.float(), old, cfg.cliprange, cfg.cliprange_value)
            loss = (pg_loss + cfg.vf_coef * vf_loss) * share
            if not torch.isfinite(loss):  # raised by _update on every rank at once, never on one alone
                self._bad_loss = f"policy {pg_loss.item()}, value {vf_loss.item()}"
                break
            loss.backward()
            st.update({"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach()})
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v * share
        return stats

    # ---------------------------------------------------------------- state

    def _snapshot(self) -> dict:
        return {
            "params": [p.detach().clone() for p in self.params],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
        }

    def _rollback(self) -> bool:
        """Restore policy LoRA, value head and optimizer to just before the last update (False if none yet)."""
        if self._last_good is None:
            return False
        with torch.no_grad():
            for p, saved in zip(self.params, self._last_good["params"], strict=True):
                p.copy_(saved)
        self.optimizer.load_state_dict(self._last_good["optimizer"])
        return True

    def state_dict(self) -> dict:
        """Everything besides the adapter weights needed to resume a round (save those with peft)."""
        return {
            "step": self.step,
            "bad_batches": self.bad_batches,
            "skipped_total": self.skipped_total,
            "kl_ctl": self.kl_ctl.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "value_head": self.value_head.state_dict(),
            "config": self.config.to_dict(),
            "rng": data_parallel.rng_states(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bad_batches = int(state["step"]), int(state["bad_batches"])
        self.skipped_total = int(state["skipped_total"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.value_head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        data_parallel.restore_rng(state["rng"])
        self._last_good = None
