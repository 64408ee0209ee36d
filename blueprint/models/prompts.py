"""Prompt templates, in one place: what the summarizer and the coder see, and how prompt + target are tokenized.

Every component that builds a prompt (PPO rollouts, coder SFT, the reward, evaluation) goes through here, so a
template change cannot make training and scoring disagree. Two styles:

- `plain`: a bare instruction-free format that a small model trained from scratch picks up quickly.
- `structured`: the original prototype's format; the summary is asked for under four headings (`SECTIONS`), which
  gives an instruction-tuned hub model something concrete to fill in.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, model_validator

from blueprint.config import ConfigError, Settings, setting
from blueprint.errors import InputError

STYLES = ("plain", "structured")
SECTIONS = ("Task description", "Data sources", "Desired features", "Constraints and requirements")

_TEMPLATES: dict[str, dict[str, str]] = {
    "plain": {
        "code_to_summary": "### Code:\n{code}\n### Summary:\n",
        "summary_to_code": "### Summary:\n{summary}\n### Code:\n",
    },
    "structured": {
        "code_to_summary": "### Code:\n{code}\n### Summary, under the headings " + ", ".join(SECTIONS) + ":\n",
        "summary_to_code": "### Specification:\n{summary}\n### Code:\n",
    },
}


def _fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class PromptConfig(Settings):
    """Which templates to use. Leave a template as None to take the style's default; a custom one must hold its
    single placeholder exactly once (`{code}` resp. `{summary}`) and escape other braces as `{{ }}`."""

    error_prefix = "PromptConfig."

    style: str = setting("plain", "plain | structured (the original prototype's four headings)")
    code_to_summary: str | None = setting(None, "the summarizer's template with one {code}; None = the style's")
    summary_to_code: str | None = setting(None, "the coder's template with one {summary}; None = the style's")

    @model_validator(mode="after")
    def _templates(self) -> PromptConfig:
        if self.style not in STYLES:
            raise ConfigError(f"PromptConfig.style={self.style!r}: choose one of {STYLES}")
        for attr, field in (("code_to_summary", "code"), ("summary_to_code", "summary")):
            template = getattr(self, attr)
            if template is None:
                object.__setattr__(self, attr, _TEMPLATES[self.style][attr])
                continue
            try:
                names = _fields(template)
            except ValueError as exc:
                raise ConfigError(f"PromptConfig.{attr}={template!r} is not a valid template: {exc}") from None
            if names != [field]:
                raise ConfigError(
                    f"PromptConfig.{attr}={template!r} must contain the placeholder {{{field}}} exactly "
                    f"once and no other fields (found {names})"
                )
        return self


def _known_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    return style


# A stage's `prompt_style` setting: one of STYLES, checked where it is declared.
PromptStyle = Annotated[str, AfterValidator(_known_style)]


def summary_prompt(code: str, cfg: PromptConfig) -> str:
    """The summarizer's prompt for `code`; its completion is the summary."""
    return cfg.code_to_summary.format(code=code)


def code_prompt(summary: str, cfg: PromptConfig) -> str:
    """The coder's prompt for `summary`; its completion is the code."""
    return cfg.summary_to_code.format(summary=summary)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt: the tokenizer's BOS (if it has one), then the text without other special tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]


def encode_targets(
    tokenizer: Any, targets: Sequence[str], *, max_tokens: int | None = None, add_eos: bool = True
) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each target (completion) and whether it was cut to `max_tokens`.

    Targets are tokenized apart from their prompt and appended to it, so a target's tokens never depend on the
    prompt and the scored positions are exact; the reward goes through here. EOS ends a target only when it was not
    cut: a truncated target must not teach "the code ends here". (SFT does not yet: trl tokenizes prompt and
    completion together and appends EOS to a cut completion too: docs/quality.md, gate floors.)
    """
    if add_eos and tokenizer.eos_token_id is None:
        raise InputError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token; cannot end the targets: "
            "use a base whose tokenizer defines one"
        )
    out, cut = [], []
    for ids in tokenizer(list(targets), add_special_tokens=False)["input_ids"]:
        truncated = max_tokens is not None and len(ids) > max_tokens
        out.append(ids[:max_tokens] if truncated else ids + ([tokenizer.eos_token_id] if add_eos else []))
        cut.append(truncated)
    return out, cut
