"""The round-trip reward: how well the coder rebuilds the original code from a summary.

For a (code, summary) pair, with the `coder` adapter active and the model in eval mode:

    ce        mean token cross-entropy of the code tokens (+ EOS) given the coder prompt built from the summary
    ce_empty  the same given an empty summary: how predictable the code is on its own (the per-code baseline)
    gain      ce_empty - ce: the information the summary carries about the code
    reward    gain (use_gain, for PPO) or -ce (the original prototype's), minus length and copy penalties

Speed comes from three things: every distinct sequence goes through the model once per call (so `ce_empty` is
computed once per code and an empty summary costs nothing), sequences are sorted by length before batching (little
padding), and the LM head runs only at the scored code positions, in chunks (bounded memory, no vocab-sized logits
for prompt or padding positions).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from blueprint import distributed
from blueprint.config import Settings, setting
from blueprint.errors import UserError
from blueprint.models.lora import use_adapter
from blueprint.models.prompts import PromptConfig, code_prompt, encode_prompts, encode_targets
from blueprint.rl.copying import copy_rate


class RewardError(UserError, RuntimeError):
    """The reward could not be computed sanely (non-finite loss, bad input); the message names the samples."""


class RewardConfig(Settings):
    """How the reward is computed and batched."""

    error_prefix = "RewardConfig."

    length_coef: float = setting(
        0.01, "weight of len(summary tokens) / len(code tokens) (untruncated counts: what was written)", ge=0
    )
    copy_coef: float = setting(
        1.0,
        "weight of the copy rate (blueprint.rl.copying.copy_rate, as PPO and evaluate use it: the share of "
        "the summary's copy_ngram-token n-grams found verbatim in the code); without it, pasting the code "
        "into the summary maximises the gain",
        ge=0,
    )
    copy_ngram: int = setting(4, "n-gram length of the copy rate", ge=1)
    max_code_tokens: int = setting(512, "longer code is cut (and flagged): bounds compute and memory", ge=1)
    max_summary_tokens: int = setting(256, "longer summaries are cut (and flagged)", ge=1)
    batch_size: int = setting(32, "at most this many sequences per forward", ge=1)
    max_batch_tokens: int | None = setting(
        None,
        "at most this many padded tokens per forward (a longer single sequence runs alone). None = 1024 "
        "on CPU (small batches stay in cache: measured fastest on the tiny preset), 16384 on an accelerator",
        ge=1,
    )
    max_head_rows: int = setting(2048, "scored positions per LM-head call (memory: rows x vocab)", ge=1)
    use_gain: bool = setting(True, "reward the information gain over the empty summary (else -CE)")


@dataclasses.dataclass
class RewardOutput:
    """Per-sample float32 tensors (shape [n]) plus truncation flags."""

    reward: torch.Tensor
    ce: torch.Tensor
    ce_empty: torch.Tensor
    gain: torch.Tensor
    length_term: torch.Tensor
    copy_term: torch.Tensor
    summary_truncated: torch.Tensor
    code_truncated: torch.Tensor

    @property
    def num_truncated(self) -> int:
        """Samples whose summary or code was cut."""
        return int((self.summary_truncated | self.code_truncated).sum())

    def metrics(self) -> dict[str, float]:
        """Batch means, for logs and manifests."""
        out = {
            k: float(getattr(self, k).mean()) for k in ("reward", "ce", "ce_empty", "gain", "length_term", "copy_term")
        }
        out.update(summary_truncated=int(self.summary_truncated.sum()), code_truncated=int(self.code_truncated.sum()))
        return out


def checked_samples(codes: Sequence[str], summaries: Sequence[str]) -> tuple[list[str], list[str]]:
    """The samples as lists, or a ValueError naming the first bad one (scoring garbage would hand PPO noise)."""
    codes, summaries = list(codes), list(summaries)
    if len(codes) != len(summaries) or not codes:
        raise ValueError(f"need equally many codes and summaries, at least one (got {len(codes)} and {len(summaries)})")
    for i, (c, s) in enumerate(zip(codes, summaries, strict=True)):
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"sample {i}: code must be a non-empty string, got {c!r:.60}")
        if not isinstance(s, str):
            raise ValueError(f"sample {i}: summary must be a string, got {type(s).__name__}")
    return codes, summaries


class RewardModel:
    """Batched round-trip reward with the coder adapter of `model` (a PeftModel, or a plain causal LM when
    `coder_adapter` is None). The model is switched to the coder and to eval mode for the call, then restored."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompts: PromptConfig | None = None,
        config: RewardConfig | None = None,
        coder_adapter: str | None = "coder",
        spread: bool = False,
    ) -> None:
        """`spread`: on N data-parallel ranks, each scores every N-th batch and the scores are summed across ranks
        (every rank then holds all of them, computed in the very batches one process would use)."""
        if coder_adapter is not None:
            if not isinstance(model, PeftModel):
                raise TypeError(
                    f"coder_adapter={coder_adapter!r} needs a peft.PeftModel, got {type(model).__name__}"
                    "; pass coder_adapter=None to score with the plain model"
                )
            if coder_adapter not in model.peft_config:
                raise ValueError(
                    f"coder_adapter {coder_adapter!r} not found; the model has {sorted(model.peft_config)}"
                )
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "tokenizer has no pad token: load it with blueprint.models.loading.load_base or call ensure_pad_token"
            )
        self.model, self.tokenizer = model, tokenizer
        self.prompts, self.config = prompts or PromptConfig(), config or RewardConfig()
        self.coder_adapter, self.spread = coder_adapter, spread
        causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
        self._decoder, self._head = causal_lm.base_model, causal_lm.get_output_embeddings()
        self._fast = self._head is not None and self._decoder is not causal_lm
        if self._fast:
            with self._scoring_mode():
                self._fast = self._head_matches_full_forward()

    # -- model state ------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _scoring_mode(self):
        """Coder active, dropout off, no autograd; afterwards every module's train/eval flag is put back as it was
        (not `model.train(flag)`, which would also flip submodules that were deliberately left in eval)."""
        modes = [(m, m.training) for m in self.model.modules()]
        adapter = use_adapter(self.model, self.coder_adapter) if self.coder_adapter else contextlib.nullcontext()
        self.model.eval()
        try:
            with adapter, torch.no_grad():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def _head_matches_full_forward(self) -> bool:
        """The fast path assumes logits = lm_head(last hidden state); archs that scale or cap logits
        (softcapping, logit_scale) fail this check and fall back to full forwards."""
        ids = torch.tensor([[self.tokenizer.eos_token_id or 0, self.tokenizer.pad_token_id]], device=self._device())
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        fast = self._head(self._decoder(input_ids=ids, use_cache=False).last_hidden_state).float()
        return full.shape == fast.shape and torch.allclose(full, fast, atol=1e-4, rtol=1e-4)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- scoring ----------------------------------------------------------------------------------------------

    def __call__(self, codes: Sequence[str], summaries: Sequence[str]) -> RewardOutput:
        codes, summaries = checked_samples(codes, summaries)
        cfg, tok = self.config, self.tokenizer

        # Codes: once per distinct code. raw_code (no EOS, uncut) is what length and copy terms measure.
        unique = list(dict.fromkeys(codes))
        slot = {c: j for j, c in enumerate(unique)}
        code_ids, code_cut = encode_targets(tok, unique, max_tokens=cfg.max_code_tokens)
        raw_code = tok(unique, add_special_tokens=False)["input_ids"]

        # Summaries: cut to max_summary_tokens (the coder sees the cut text); length counts what was written.
        summary_ids = tok(summaries, add_special_tokens=False)["input_ids"]
        shown = [
            s if len(ids) <= cfg.max_summary_tokens else tok.decode(ids[: cfg.max_summary_tokens])
            for s, ids in zip(summaries, summary_ids, strict=True)
        ]
        prompts = encode_prompts(tok, [code_prompt(s, self.prompts) for s in shown] + [code_prompt("", self.prompts)])
        empty_prompt = prompts.pop()

        # Distinct sequences (prompt, code): the empty-summary row of each code appears once, whatever the batch.
        seq_index: dict[tuple[tuple[int, ...], int], int] = {}
        seqs: list[tuple[list[int], int]] = []

        def add(prompt: list[int], j: int) -> int:
            key = (tuple(prompt), j)
            if key not in seq_index:
                seq_index[key] = len(seqs)
                seqs.append((prompt, j))
            return seq_index[key]

        sample_seq = [add(p, slot[c]) for p, c in zip(prompts, codes, strict=True)]
        empty_seq = [add(empty_prompt, j) for j in range(len(unique))]
        ce_seq = self._score(seqs, code_ids)

        bad = [
            i
            for i in range(len(codes))
            if not torch.isfinite(ce_seq[sample_seq[i]]) or not torch.isfinite(ce_seq[empty_seq[slot[codes[i]]]])
        ]
        if bad:
            raise RewardError(
                f"non-finite coder cross-entropy (NaN/inf logits) for samples {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''} of {len(codes)}: the coder weights or inputs are "
                "broken; refusing to hand NaN rewards to PPO"
            )

        j_of = torch.tensor([slot[c] for c in codes])
        ce = ce_seq[torch.tensor(sample_seq)]
        ce_empty = ce_seq[torch.tensor(empty_seq)][j_of]
        n_code = torch.tensor([max(len(raw_code[j]), 1) for j in j_of.tolist()], dtype=torch.float32)
        length = torch.tensor([len(ids) for ids in summary_ids], dtype=torch.float32) / n_code
        copy = torch.tensor(
            [
                copy_rate(s, raw_code[slot[c]], cfg.copy_ngram) if cfg.copy_coef else 0.0
                for s, c in zip(summary_ids, codes, strict=True)
            ],
            dtype=torch.float32,
        )
        gain = ce_empty - ce
        length_term, copy_term = cfg.length_coef * length, cfg.copy_coef * copy
        reward = (gain if cfg.use_gain else -ce) - length_term - copy_term
        return RewardOutput(
            reward=reward,
            ce=ce,
            ce_empty=ce_empty,
            gain=gain,
            length_term=length_term,
            copy_term=copy_term,
            summary_truncated=torch.tensor([len(ids) > cfg.max_summary_tokens for ids in summary_ids]),
            code_truncated=torch.tensor([code_cut[j] for j in j_of.tolist()]),
        )

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Sequence indices grouped longest first, each group within `batch_size` rows and `max_batch_tokens`
        padded tokens: sorting keeps padding small, the token budget keeps activations in cache and memory bounded."""
        budget = self.config.max_batch_tokens or (1024 if self._device().type == "cpu" else 16384)
        order = sorted(range(len(lengths)), key=lambda k: -lengths[k])
        batches: list[list[int]] = []
        for k in order:
            if (
                batches
                and len(batches[-1]) < self.config.batch_size
                and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= budget
            ):
                batches[-1].append(k)
            else:
                batches.append([k])
        return batches

    def _score(self, seqs: list[tuple[list[int], int]], code_ids: list[list[int]]) -> torch.Tensor:
        """Mean CE of the code tokens of every (prompt, code) sequence.

        Rows are right-padded and attention is causal, so a real position never attends to a pad: no attention mask
        is needed (the plain causal kernel is also the fastest), and pad positions are simply never scored.
        """
        device, pad = self._device(), self.tokenizer.pad_token_id
        lengths = [len(p) + len(code_ids[j]) for p, j in seqs]
        out = torch.zeros(len(seqs), dtype=torch.float32)
        batches = self._batches(lengths)
        with self._scoring_mode():
            for _, batch in distributed.mine(batches) if self.spread else enumerate(batches):
                input_ids = torch.full((len(batch), lengths[batch[0]]), pad, dtype=torch.long)
                rows, cols, targets, counts = [], [], [], []
                for r, k in enumerate(batch):
                    prompt, j = seqs[k]
                    input_ids[r, : lengths[k]] = torch.tensor(prompt + code_ids[j])
                    # position t predicts token t+1: the code tokens are predicted from len(prompt)-1 on
                    n = len(code_ids[j])
                    rows += [r] * n
                    cols += range(len(prompt) - 1, len(prompt) - 1 + n)
                    targets += code_ids[j]
                    counts.append(n)
                losses = self._token_losses(
                    input_ids.to(device),
                    torch.tensor(rows, device=device),
                    torch.tensor(cols, device=device),
                    torch.tensor(targets, device=device),
                )
                sums = torch.zeros(len(batch), dtype=torch.float32).index_add_(0, torch.tensor(rows), losses.cpu())
                out[torch.tensor(batch)] = sums / torch.tensor(counts, dtype=torch.float32)
        return distributed.all_sum(out) if self.spread else out  # x + 0.0 is x: the sum changes no score

    def _token_losses(
        self, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Per scored position cross-entropy (float32), the LM head applied to `max_head_rows` positions at a time."""
        if self._fast:
            hidden = self._decoder(input_ids=input_ids, use_cache=False).last_hidden_state
            picked = hidden[rows, cols]
            step = self.config.max_head_rows
            return torch.cat(
                [
                    F.cross_entropy(self._head(picked[i : i + step]).float(), targets[i : i + step], reduction="none")
                    for i in range(0, len(targets), step)
                ]
            )
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        return F.cross_entropy(logits[rows, cols].float(), targets, reduction="none")


class SummaryScorer:
    """score_fn for PPO: decode the summaries, score them with the coder, keep them for back-translation."""

    def __init__(self, reward, tokenizer, use_gain: bool):
        self.reward, self.tokenizer, self.use_gain = reward, tokenizer, use_gain
        self.codes: list[str] = []
        self.written: list[tuple[str, str]] = []  # (generated summary, code)

    def __call__(self, query_ids, response_ids):
        summaries = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        out = self.reward(self.codes, summaries)
        self.written.extend(zip(summaries, self.codes, strict=True))
        score = out.reward if self.use_gain else -out.ce - (out.length_term)
        return score, {"ce": out.ce, "gain": out.gain, "length_term": out.length_term}
