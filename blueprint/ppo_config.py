"""PPO hyper-parameters, validated; kept apart from `blueprint.ppo` so a config can be built (and a cached stage
answered) without importing torch."""
from __future__ import annotations

from dataclasses import dataclass

from blueprint.config import ConfigError


@dataclass
class PPOConfig:
    lr: float = 5e-5
    batch_size: int = 16            # rollouts (sampled responses) per ppo_step
    samples_per_query: int = 1      # responses sampled per query: ppo_step takes batch_size/samples_per_query
                                    # queries; >1 scores each response against its own query's other samples
    mini_batch_size: int = 4        # sequences per gradient step
    ppo_epochs: int = 4
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    temperature: float = 0.7        # sampling AND log-prob temperature
    top_k: int = 0                  # 0 = off (sampling then differs from the π used for log-probs: keep off)
    top_p: float = 1.0              # 1.0 = off (same caveat)
    max_new_tokens: int = 64
    min_new_tokens: int = 0         # >0 suppresses EOS while sampling (benchmarks only: biases the behaviour policy)
    init_kl_coef: float = 0.05
    adaptive_kl: bool = True
    kl_target: float = 6.0          # per-sequence KL (sum over tokens) the adaptive controller steers to
    kl_horizon: int = 10000
    missing_eos_penalty: float = 1.0  # subtracted from the score of responses without EOS (0 = off)
    whiten_rewards: bool = False    # standardise the scalar scores across the batch before adding them (with
                                    # samples_per_query > 1: centre on the query's mean, then scale by batch std)
    copy_penalty: float = 1.0       # subtracted per unit of copy_rate (0 = off)
    copy_ngram: int = 4
    max_kl: float = 50.0            # per-sequence KL above which the step aborts (KLExplodedError)
    max_bad_batches: int = 3        # consecutive non-finite-score batches tolerated before PPOError
    forward_batch_size: int | None = None  # chunk size of the no-grad rollout forwards (None = whole batch)
    weight_decay: float = 0.0
    policy_adapter: str = "summarizer"
    reference_adapter: str | None = "reference"  # None = the bare base (adapters disabled) is the reference
    autocast_dtype: str | None = None  # "bfloat16"/"float16": autocast the model (AMX CPUs, GPUs); None = as loaded

    def __post_init__(self) -> None:
        positive = ["lr", "batch_size", "samples_per_query", "mini_batch_size", "ppo_epochs", "temperature",
                    "max_new_tokens", "kl_target", "kl_horizon", "copy_ngram", "max_kl", "max_grad_norm"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)!r}")
        nonneg = ["init_kl_coef", "missing_eos_penalty", "copy_penalty", "vf_coef", "cliprange", "cliprange_value",
                  "top_k", "min_new_tokens", "max_bad_batches", "weight_decay"]
        for name in nonneg:
            if getattr(self, name) < 0:
                raise ConfigError(f"PPOConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ["gamma", "lam"]:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"PPOConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"PPOConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of mini_batch_size "
                             f"{self.mini_batch_size}")
        if self.batch_size % self.samples_per_query:
            raise ConfigError(f"batch_size {self.batch_size} is not a multiple of samples_per_query "
                             f"{self.samples_per_query}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError("min_new_tokens must be <= max_new_tokens")
        if self.forward_batch_size is not None and self.forward_batch_size <= 0:
            raise ConfigError("forward_batch_size must be > 0 or None")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if self.reference_adapter == self.policy_adapter:
            raise ConfigError("reference_adapter must differ from policy_adapter")
