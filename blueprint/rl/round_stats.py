"""A PPO round's per-step statistics: each step's figures as tracked (TensorBoard, MLflow), and the round's
summary of them in its metrics."""

from __future__ import annotations


def step_figures(stats: dict[str, float], batch_size: int) -> dict[str, float]:
    """A PPO step's figures as tracked: its statistics, its wall time and the rollout tokens per second
    (`batch_size` rollouts a step)."""
    times = {k: v for k, v in stats.items() if k.startswith("time/")}
    row = {k: v for k, v in stats.items() if k != "step"}
    if times:
        row["step_seconds"] = sum(times.values())
    if stats.get("time/generate"):
        row["rollout_tokens_per_s"] = stats.get("response_length", 0.0) * batch_size / stats["time/generate"]
    return row


def global_step(round_index: int, step: int, steps_per_round: int) -> int:
    """The step across rounds (round r's step s), so the rounds' curves continue one another."""
    return (round_index - 1) * steps_per_round + step


def step_summary(stats_rows: list[dict]) -> dict[str, float]:
    """First, last and mean of the per-step figures (skipped batches aside), and the seconds of each phase."""
    out: dict[str, float] = {}
    for phase in ("generate", "score", "forward", "update", "sync"):
        times = [r[f"time/{phase}"] for r in stats_rows if f"time/{phase}" in r]
        if times:
            out[f"seconds_{phase}"] = round(sum(times), 3)
    for key in ("score/mean", "score/gain", "kl", "kl_coef", "copy_rate", "response_length", "entropy", "clipfrac"):
        values = [r[key] for r in stats_rows if key in r and not r.get("skipped")]
        if values:
            name = key.replace("/", "_")
            out[f"{name}_first"], out[f"{name}_last"] = values[0], values[-1]
            out[f"{name}_mean"] = sum(values) / len(values)
    gaps = [
        (r["engine_logprob_gap_mean"], r["engine_logprob_gap_max"])
        for r in stats_rows
        if "engine_logprob_gap_mean" in r
    ]
    if gaps:  # the proof that the engine sampled the trained policy, over the whole round
        out["engine_logprob_gap_mean"] = sum(g for g, _ in gaps) / len(gaps)
        out["engine_logprob_gap_max"] = max(g for _, g in gaps)
    return out
