"""PPO hyper-parameters, validated; kept apart from `blueprint.rl.ppo` so a config can be built (and a cached stage
answered) without importing torch."""

from __future__ import annotations

from pydantic import model_validator

from blueprint.config import ConfigError, Settings, setting


class PPOConfig(Settings):
    """The PPO algorithm's settings. The PPO round's config extends this one (and sets its own defaults)."""

    error_prefix = "PPOConfig."

    lr: float = setting(5e-5, "learning rate of the policy LoRA and the value head", gt=0)
    batch_size: int = setting(16, "rollouts (sampled responses) per PPO step", gt=0)
    samples_per_query: int = setting(
        1,
        "responses sampled per query: a step takes batch_size/samples_per_query queries; >1 scores each "
        "response against its own query's other samples",
        gt=0,
    )
    mini_batch_size: int = setting(4, "sequences per gradient step", gt=0)
    ppo_epochs: int = setting(4, "passes over each batch of rollouts", gt=0)
    gamma: float = setting(1.0, "discount of the per-token rewards", ge=0, le=1)
    lam: float = setting(0.95, "GAE lambda", ge=0, le=1)
    cliprange: float = setting(0.2, "PPO ratio clip", ge=0)
    cliprange_value: float = setting(0.2, "value clip around the rollout's values", ge=0)
    vf_coef: float = setting(0.1, "weight of the value loss", ge=0)
    max_grad_norm: float = setting(1.0, "gradient norm clip", gt=0)
    temperature: float = setting(0.7, "sampling AND log-prob temperature", gt=0)
    top_k: int = setting(0, "0 = off (sampling then differs from the policy used for log-probs: keep off)", ge=0)
    top_p: float = setting(1.0, "1.0 = off (same caveat as top_k)", gt=0, le=1)
    max_new_tokens: int = setting(64, "longest sampled response", gt=0)
    min_new_tokens: int = setting(
        0, ">0 suppresses EOS while sampling (benchmarks only: biases the behaviour policy)", ge=0
    )
    init_kl_coef: float = setting(0.05, "starting weight beta of the per-token KL penalty", ge=0)
    adaptive_kl: bool = setting(True, "steer beta towards kl_target (else beta stays init_kl_coef)")
    kl_target: float = setting(6.0, "per-sequence KL (sum over tokens) the adaptive controller steers to", gt=0)
    kl_horizon: int = setting(10000, "horizon of the adaptive KL controller, in rollouts", gt=0)
    missing_eos_penalty: float = setting(1.0, "subtracted from the score of responses without EOS (0 = off)", ge=0)
    whiten_rewards: bool = setting(
        False,
        "standardise the scalar scores across the batch before adding them (with samples_per_query > 1: "
        "centre on the query's mean, then scale by batch std)",
    )
    copy_penalty: float = setting(1.0, "subtracted per unit of copy rate (0 = off)", ge=0)
    copy_ngram: int = setting(4, "n-gram length of the copy rate", gt=0)
    max_kl: float = setting(50.0, "per-sequence KL above which the step aborts (KLExplodedError)", gt=0)
    max_bad_batches: int = setting(3, "consecutive non-finite-score batches tolerated before PPOError", ge=0)
    forward_batch_size: int | None = setting(
        None, "chunk size of the no-grad rollout forwards (None = whole batch)", gt=0
    )
    generate_batch_tokens: int | None = setting(
        None,
        "token budget of one generate call: rollouts are sampled in chunks of at most this many prompt + "
        "response tokens (None = the whole batch at once; chunks draw other samples than one call)",
        gt=0,
    )
    update_batch_tokens: int | None = setting(
        None,
        "token budget of one forward/backward of the update: a mini-batch is split into micro-batches of at "
        "most this many tokens and their gradients summed, weighted by valid tokens, so the step is the "
        "mini-batch's (None = one pass per mini-batch)",
        gt=0,
    )
    group_by_length: bool = setting(
        True,
        "mini-batches of queries of similar length (the epoch's random permutation sorted by query length, "
        "ties in random order): far less padding in each pass; every rollout is still used once an epoch",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    policy_adapter: str = setting("summarizer", "the adapter PPO trains")
    reference_adapter: str | None = setting(
        "reference", "the frozen KL reference adapter; None = the bare base (adapters off)"
    )
    autocast_dtype: str | None = setting(
        None, '"bfloat16"/"float16": autocast the model (AMX CPUs, GPUs); None = as loaded'
    )

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of mini_batch_size {self.mini_batch_size}"
            )
        if self.batch_size % self.samples_per_query:
            raise ConfigError(
                f"batch_size {self.batch_size} is not a multiple of samples_per_query {self.samples_per_query}"
            )
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError("min_new_tokens must be <= max_new_tokens")
        if self.autocast_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {self.autocast_dtype!r}")
        if self.reference_adapter == self.policy_adapter:
            raise ConfigError("reference_adapter must differ from policy_adapter")
        return self
