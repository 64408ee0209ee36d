"""Which modules LoRA adapts, found by looking at the model instead of a per-architecture table.

Causal LMs name their attention projections in a handful of ways: separate `q_proj`/`k_proj`/`v_proj`/`o_proj`
(Llama, Mistral, Qwen, Gemma, StarCoder2, Granite, OLMo, ...), one fused query-key-value projection (Phi-3
`qkv_proj`, GPT-2 `c_attn`, GPT-NeoX and Falcon `query_key_value`, MPT `Wqkv`, Baichuan `W_pack`), or something
else inside a module called attention. The default adapts the query and value projections (the LoRA paper's
choice), or the fused projection that holds them; `all_attention` adds the key and output projections.
"""

from __future__ import annotations

from typing import Any

from blueprint.errors import UserError

SEPARATE = ("q_proj", "v_proj")
SEPARATE_EXTRA = ("k_proj", "o_proj")
FUSED = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")
ATTENTION_WORDS = ("attn", "attention")


class NoLoraTargets(UserError, ValueError):
    """The base has no linear projections that LoRA could adapt; the message names the base and what it has."""


def _is_projection(module: Any) -> bool:
    """A weight matrix peft can wrap: torch Linear, or the Conv1D that GPT-2-style models use instead."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def attention_projections(model: Any) -> list[tuple[str, str]]:
    """(qualified name, leaf name) of every projection inside an attention block, in module order."""
    found = []
    for name, module in model.named_modules():
        parts = name.lower().split(".")
        if _is_projection(module) and any(w in p for p in parts[:-1] for w in ATTENTION_WORDS):
            found.append((name, name.rsplit(".", 1)[-1]))
    return found


def _unambiguous(model: Any, leaves: list[str]) -> list[str]:
    """Leaf names, each qualified by its parent (`attn.c_proj`) where the same leaf also names a projection outside
    attention (GPT-2's MLP has a `c_proj` too): peft matches a target as a suffix of the module's name."""
    inside = attention_projections(model)
    inside_names = {n for n, _ in inside}
    outside = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_projection(m) and n not in inside_names}
    parent = {leaf: n.split(".")[-2] for n, leaf in inside}
    return [f"{parent[leaf]}.{leaf}" if leaf in outside else leaf for leaf in leaves]


def discover_targets(model: Any, all_attention: bool = False, name: str = "the base") -> list[str]:
    """Module names for peft's `target_modules` (peft matches them as name suffixes, in every layer)."""
    leaves = list(dict.fromkeys(leaf for _, leaf in attention_projections(model)))
    if all(p in leaves for p in SEPARATE):
        extra = [p for p in SEPARATE_EXTRA if p in leaves] if all_attention else []
        return [*SEPARATE, *extra]
    fused = [p for p in FUSED if p in leaves]
    if fused:
        rest = [leaf for leaf in leaves if leaf not in fused] if all_attention else []
        return _unambiguous(model, [fused[0], *rest])
    if leaves:
        return _unambiguous(model, leaves)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_projection(m)})
    raise NoLoraTargets(
        f"{name}: found no linear projection inside an attention block to adapt with LoRA "
        f"(linear modules: {', '.join(linear[:12]) or 'none'}); set target_modules to choose them"
    )
