"""The PPO round's algorithm: PPO maths and trainer, the round-trip reward, the copy guard."""
