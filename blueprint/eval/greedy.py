"""Generation for the evaluation: transformers' generate() in batches sorted by length and spread over the
data-parallel ranks (the same batches, so the same tokens, as one process), or (greedy) a vLLM engine in one call."""

from __future__ import annotations

from blueprint import distributed
from blueprint.models.prompts import encode_prompts


def generate(
    model, tokenizer, adapter: str, prompts: list[str], max_new_tokens: int, batch_size: int, engine=None
) -> list[list[int]]:
    """Greedy completion ids of each prompt with `adapter` active, cut after the first EOS (kept when emitted).

    `engine` (a VLLMEngine): it generates instead, with `adapter`'s merged weights, in one call.

    Otherwise transformers' generate() by length-sorted batches over the data-parallel ranks (`generate_by_length`).
    """
    ids = encode_prompts(tokenizer, prompts)
    eos = tokenizer.eos_token_id
    if engine is not None:
        from blueprint.engines.vllm_engine import Sampling

        if engine.loaded != adapter:
            engine.load(model, adapter)
        return [s.tokens for s in engine.generate(ids, Sampling(max_new_tokens, eos))]
    rows = generate_by_length(
        model, tokenizer, adapter, ids, batch_size, max_new_tokens=max_new_tokens, do_sample=False
    )
    return [tokens[: tokens.index(eos) + 1] if eos in tokens else tokens for [tokens] in rows]


def generate_by_length(
    model, tokenizer, adapter: str, ids: list[list[int]], batch_size: int, **options
) -> list[list[list[int]]]:
    """The new tokens of each prompt's `num_return_sequences` completions (one by default) by transformers'
    generate() with `adapter` active and `options`, uncut, in prompt order.

    Prompts are sorted by length before batching (little left padding). On N data-parallel ranks each generates
    every N-th of those batches and the results are gathered: the same batches as one process, so the same tokens.
    """
    import torch

    from blueprint.models import lora
    from blueprint.models.batching import pad_batch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    n = options.get("num_return_sequences", 1)
    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    done: dict[int, list[list[int]]] = {}
    with lora.use_adapter(model, adapter), torch.no_grad():
        for _, batch in distributed.mine(batches):
            input_ids, mask = pad_batch([ids[i] for i in batch], pad, "left", device)
            gen = model.generate(
                input_ids=input_ids, attention_mask=mask, eos_token_id=eos, pad_token_id=pad, **options
            )
            new = gen[:, input_ids.shape[1] :].tolist()
            for row, i in enumerate(batch):
                done[i] = new[row * n : (row + 1) * n]
    merged = {i: rows for part in distributed.all_objects(done) for i, rows in part.items()}
    return [merged[i] for i in range(len(ids))]


def generate_texts(
    model, tokenizer, adapter: str, prompts: list[str], max_new_tokens: int, batch_size: int, engine=None
) -> tuple[list[list[int]], list[str], list[bool]]:
    """(token ids without the final EOS, decoded texts, whether each ended with EOS) of `adapter`'s greedy
    completions."""
    eos = tokenizer.eos_token_id
    generated = generate(model, tokenizer, adapter, prompts, max_new_tokens, batch_size, engine)
    ended = [bool(ids) and ids[-1] == eos for ids in generated]
    ids = [g[:-1] if e else g for g, e in zip(generated, ended, strict=True)]
    return ids, tokenizer.batch_decode(ids, skip_special_tokens=True), ended
