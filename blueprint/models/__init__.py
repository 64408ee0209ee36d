"""Base models and their LoRA roles: loading, adapters, prompts, the tiny base, padding."""
