"""Named bundles of stage settings: `smoke` (seconds, for tests) and `default` (shows learning on 2 CPU cores).

Each profile maps a stage name to keyword settings of that stage's config dataclass; pipeline parameters,
`--set` flags and config files override them.
"""
from __future__ import annotations

import copy
from typing import Any

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "shard": {"source": "stdlib", "num_shards": 2, "eval_fraction": 0.1, "max_pairs": 600},
        "bootstrap": {"preset": "micro", "vocab_size": 512, "seq_len": 128, "batch_size": 8, "max_tokens": 16_384,
                      "max_pairs": 600},
        "warmup": {"steps": 4, "batch_size": 4, "max_code_tokens": 128, "max_summary_tokens": 32},
        "ppo-round": {"ppo_steps": 2, "supervised_steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
                      "samples_per_query": 2, "max_new_tokens": 16, "max_code_tokens": 128, "probe_size": 4},
        "evaluate": {"max_examples": 16, "max_new_tokens": 16, "max_code_tokens": 128},
        "merge": {},
    },
    "default": {  # calibrated on a 2-core CPU: under 10 minutes for 2 epochs (README, "Measured")
        "shard": {"source": "stdlib", "num_shards": 4, "eval_fraction": 0.05},
        "bootstrap": {"preset": "tiny", "max_tokens": 3_145_728, "batch_size": 4, "seq_len": 384},
        "warmup": {"steps": 30, "coder_steps": 120, "lr": 5e-3},
        "ppo-round": {"ppo_steps": 16, "supervised_steps": 20, "batch_size": 32, "samples_per_query": 4,
                      "mini_batch_size": 8, "ppo_epochs": 4, "init_kl_coef": 0.1,
                      "probe_samples": 4},
        "evaluate": {"max_examples": 64},
        "merge": {},
    },
}


def stage_settings(profile: str, stage: str) -> dict[str, Any]:
    """A copy of the settings `profile` gives `stage` (unknown profile -> ValueError naming it)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return copy.deepcopy(PROFILES[profile].get(stage, {}))
