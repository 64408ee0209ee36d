"""What the PPO trainer raises: the user's to fix (one line, exit 2), never a bug's traceback."""

from __future__ import annotations

from blueprint.errors import UserError


class PPOError(UserError, RuntimeError):
    """PPO cannot go on (too many bad batches, non-finite loss)."""


class KLExplodedError(PPOError):
    """The policy drifted past `max_kl` from the reference; the trainer already rolled back to the last good state."""

    def __init__(self, kl: float, max_kl: float, rolled_back: bool, stats: dict[str, float]):
        super().__init__(f"KL {kl:.3f} > max_kl {max_kl}; rolled back to the last good state: {rolled_back}")
        self.kl, self.max_kl, self.rolled_back, self.stats = kl, max_kl, rolled_back, stats
