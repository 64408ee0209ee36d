"""The pure tensor maths of PPO: masked statistics, per-token rewards, GAE, the clipped losses, KL controllers.

Kept apart from `ppo.py` (which owns models, generation and the loop) so each formula can be tested by hand on
tiny tensors. Conventions: tensors are [B, T] over response tokens; `mask` is 1.0 on valid response tokens (up to
and including the first EOS) and 0.0 after it. Valid tokens always form a prefix of each row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

# reduce(t) -> t summed over every data-parallel rank (None: one process). The sums, not the means, are reduced,
# so N ranks holding a batch's parts get the statistics of the whole batch.
Reduce = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | None = None, reduce: Reduce | None = None
) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (all of them when `dim` is None); with `reduce`, over the
    valid positions of every rank."""
    if dim is None:
        if reduce is None:
            return (x * mask).sum() / mask.sum().clamp(min=1)
        total, count = reduce(torch.stack([(x * mask).sum(), mask.sum().to(x.dtype)]))
        return total / count.clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, reduce: Reduce | None = None
) -> torch.Tensor:
    """Variance of `x` over valid positions (Bessel-corrected by default, like torch.var)."""
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)
    n = mask.sum() if reduce is None else reduce(mask.sum().to(x.dtype))
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce | None = None
) -> torch.Tensor:
    """Standardise `x` over valid positions; invalid positions come back as 0 so they cannot leak into sums.

    `shift_mean=False` only rescales (keeps the sign of rewards meaningful).
    """
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Standardise a 1-D tensor (e.g. a batch of scalar scores); a batch of one is only centred."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def group_baseline(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Each score minus the mean of its group (consecutive `group_size` samples of one query), then, with `scale`,
    divided by the batch std of those differences.

    Why: the round-trip gain varies far more between codes (some are predictable without any summary) than between
    two summaries of one code, so a batch-wide baseline mostly teaches "which code was easy". A per-query mean
    removes that (the RLOO / GRPO baseline); one batch-wide scale keeps PPO's step size comparable across batches
    without blowing up groups whose samples happen to agree.
    """
    if group_size == 1:
        return whiten(scores, eps) if scale else scores
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    groups = scores.view(-1, group_size)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    return centred / (centred.std() + eps) if scale else centred


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(token) and the entropy of π, with π = softmax(logits / temperature), in one log_softmax.

    The temperature must be the sampling temperature: the rollout was drawn from softmax(logits/T), so that is the
    behaviour policy whose ratio PPO clips. The entropy is computed without grad (it is a statistic, not a loss).
    """
    logp_all = F.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def eos_cut(response: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locate each row's first EOS. Returns (mask [B, R] float: 1 up to and including it, lengths [B]: tokens before
    it (= R when absent), has_eos [B] bool). The EOS stays a valid action so the policy can learn when to stop."""
    is_eos = response == eos_token_id
    has_eos = is_eos.any(1)
    R = response.shape[1]
    lengths = torch.where(has_eos, is_eos.int().argmax(1), torch.full_like(has_eos, R, dtype=torch.long))
    positions = torch.arange(R, device=response.device)
    mask = (positions[None, :] <= lengths[:, None]).float()
    return mask, lengths, has_eos


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, exactly as `generate` builds them, so log-probs match the sampler."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def per_token_rewards(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [B, T]: −β·(log π − log π_ref) (the k1 KL estimator) on every valid token, score on the last one.

    Returns (rewards, kl) with kl = (log π − log π_ref)·mask per token.
    """
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)  # index of the last valid token of each row
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards, kl


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [B, T]; the episode ends after the last valid token (bootstrap 0).

    Because valid tokens form a prefix, zeroing rewards and values past it makes the recursion terminate there.
    Returns (advantages, returns) with returns = advantages + values, both zero on invalid positions.
    """
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class Targets:
    """What the rollout fixed for the update, [B, T] each: the sampling policy's log-probs and values, the
    advantages and returns computed from them, and the valid tokens."""

    logp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index) -> Targets:
        """The same tokens of each tensor (a micro-batch's rows and columns)."""
        return Targets(*(getattr(self, f.name)[index] for f in fields(self)))


def ppo_losses(
    logp: torch.Tensor, values: torch.Tensor, old: Targets, cliprange: float, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss and clipped value loss of the current `logp` and `values`, token-averaged over
    the valid tokens of `old`.

    Returns (policy_loss, value_loss, stats); stats are detached scalars: clipfrac (share of tokens where the
    clipped branch is active), approxkl = 0.5·mean(logratio²), vf_clipfrac.
    """
    mask, advantages, returns = old.mask, old.advantages, old.returns
    logratio = logp - old.logp
    ratio = torch.exp(logratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.maximum(pg1, pg2), mask)

    v_clipped = old.values + torch.clamp(values - old.values, -cliprange_value, cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg2 > pg1).float(), mask),
            "approxkl": 0.5 * masked_mean(logratio**2, mask),
            "vf_clipfrac": masked_mean((vf2 > vf1).float(), mask),
            "ratio": masked_mean(ratio, mask),
        }
    return policy_loss, value_loss, stats


@dataclass
class FixedKLController:
    """β that never moves."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, ±0.2)·n_steps/horizon).

    Proportional control towards a target KL; the clip bounds how fast β moves on one noisy batch.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target, self.horizon = float(state["target"]), int(state["horizon"])


def scalar_std(x: torch.Tensor) -> float:
    """The standard deviation of a batch's figures as a number (0 for a single value, where torch gives nan)."""
    return x.std().item() if x.numel() > 1 else 0.0
