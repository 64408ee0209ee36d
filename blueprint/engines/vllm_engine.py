"""A vLLM engine in the stage's own process, serving the adapter that generates as merged weights.

Why merged weights and not a `LoRARequest`: on CPU vLLM's LoRA path ran about 7x slower per token than its base path
(issue 26's trial; here, 27M parameters, 64 x 32 tokens, its sync included: 72 tokens/s against 303 merged), and
merging costs one low-rank product per adapted projection after each update, which the benchmark
(benchmarks/rollout_engines.py) counts in the rollout's time. The merge is computed from the adapter's
factors without touching the trainer's model (peft's `merge_adapter`/`unmerge_adapter` round trip would add
rounding error to the base weights at every step).

The engine starts from the base's config with dummy weights (no second copy on disk, any base `open_base` accepts)
and receives all weights at every load (a few ms for the micro models, about 0.1 s for 27M parameters on CPU). It
is told token ids, never text (`skip_tokenizer_init`), so it needs no tokenizer and its tokens are the trainer's.

trl 1.16's `trl.generation.vllm_generation.VLLMGeneration` is not used: it needs an Accelerator and a base on disk
(`model.name_or_path`; ours may be built in memory or fetched from s3), starts vLLM with the external_launcher
backend (a torch.distributed group), syncs peft models with `merge_adapter`/`unmerge_adapter` on the base that the
reference and the coder share, and its `load_weights` fails on vLLM's CPU backend (see `load_into`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from blueprint.errors import UserError

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: no spawn, no __main__ guard
CPU_MEMORY, GPU_MEMORY = 0.05, 0.35


class EngineStartError(UserError, RuntimeError):
    """vLLM could not start on this base (memory, an architecture or shape it cannot serve)."""


@dataclasses.dataclass
class Sample:
    """One completion: its token ids (ending with EOS when it stopped there) and, when asked, each token's log-prob
    at the sampling temperature."""

    tokens: list[int]
    logprobs: list[float] | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How each completion is drawn: greedy at temperature 0; top_k 0 keeps every token; no EOS ends it before
    `min_new_tokens`."""

    max_new_tokens: int
    eos_token_id: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0


def vllm_name(name: str) -> str:
    """A peft parameter name as the base checkpoint (and vLLM's `load_weights`) spells it."""
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def merged_weights(model: Any, adapter: str | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the base with `adapter`'s LoRA delta added to each adapted weight (None: the bare base)."""
    from peft.tuners.lora import LoraLayer

    adapted: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight
            if adapter is not None and adapter in module.lora_A:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            adapted[vllm_name(name) + ".weight"] = weight
    for name, param in model.named_parameters(remove_duplicate=False):  # a tied lm_head too: vLLM may not tie it
        name = vllm_name(name)
        if ".lora_" in name or "modules_to_save" in name:
            continue
        yield name, adapted.get(name, param)


def load_into(model: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """vLLM's `model.load_weights`, on CPU too: there vLLM repacks each linear layer's weight for its GEMM kernel
    (dropping the original parameter and its loader) and the LM head's, so dropped parameters are created afresh,
    everything is loaded, and every layer packed again (vLLM 0.32's own in-place reload does not restore them: its
    metadata is never recorded). On a GPU nothing is packed and this is `load_weights` plus a no-op pass."""
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase, UnquantizedLinearMethod

    packed = [
        layer
        for layer in model.modules()
        if isinstance(layer, LinearBase)
        and isinstance(layer.quant_method, UnquantizedLinearMethod)
        and layer.weight.numel() == 0
    ]
    for layer in packed:
        del layer.weight
        v2 = type(layer.quant_method).__name__ in WEIGHT_LOADER_V2_SUPPORTED
        layer.quant_method.create_weights(
            layer=layer,
            input_size_per_partition=layer.input_size_per_partition,
            output_partition_sizes=layer.output_partition_sizes,
            input_size=layer.input_size,
            output_size=layer.output_size,
            params_dtype=layer.params_dtype,
            weight_loader=layer.weight_loader_v2 if v2 else layer.weight_loader,
        )
    model.load_weights(weights)
    for layer in model.modules():  # the LM head keeps its weight but computes with a packed copy of it
        method = getattr(layer, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(layer)


@contextlib.contextmanager
def local_proxies_hidden() -> Iterator[None]:
    """Modules holding werkzeug LocalProxy objects (flask.g, flask.request: Flask imported by an S3 test server or a
    host application) left out of sys.modules while vLLM starts, then put back untouched. vLLM 0.32's CPU worker
    rebinds its Triton kernels by scanning every module's globals with `hasattr`, which an unbound proxy answers
    with RuntimeError instead of False."""
    import sys

    def holds_proxy(module: Any) -> bool:  # type() never goes through the proxy
        namespace = getattr(module, "__dict__", None) or {}
        return any(type(v).__module__ == "werkzeug.local" for v in list(namespace.values()))

    hidden = {name: module for name, module in list(sys.modules.items()) if holds_proxy(module)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield
    finally:
        sys.modules.update(hidden)


class VLLMEngine:
    """One vLLM `LLM` for one base, colocated: `load(model, adapter)` then `generate(...)`; `sleep`/`wake` on a
    GPU around the trainer's update."""

    def __init__(
        self,
        model: Any,
        *,
        device: Any,
        dtype: Any,
        memory: float | None,
        max_model_len: int,
        seed: int = 0,
        base: str = "the base",
        setting: str = "engine",
    ):
        from vllm import LLM

        self.device, self.setting, self.base = device, setting, base
        self.gpu = device.type == "cuda"
        memory = memory if memory is not None else (GPU_MEMORY if self.gpu else CPU_MEMORY)
        config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        t0 = time.perf_counter()
        # vLLM's CPU worker drops torch to 1 thread unless OMP_NUM_THREADS is set, and replaces torch.set_num_threads
        # for the whole process: the trainer beside it keeps its threads and its setter
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        set_threads = torch.set_num_threads
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp)  # the architecture only: the weights come from `load`
            try:
                # on CPU the share is of host RAM and vLLM counts the whole process (trainer included) against
                # it: the KV cache is sized directly instead
                # Also on CPU: no chunked prefill. A seeded request whose prefill is cut into chunks makes vLLM
                # 0.32 rewind its generator's offset, which a CPU generator refuses (RuntimeError mid-rollout).
                budget = (
                    dict(gpu_memory_utilization=memory)
                    if self.gpu
                    else dict(
                        kv_cache_memory_bytes=int(memory * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                        enable_chunked_prefill=False,
                        max_num_batched_tokens=max(max_model_len, 8192),
                    )
                )
                with local_proxies_hidden():
                    self.llm = LLM(
                        model=tmp,
                        skip_tokenizer_init=True,
                        load_format="dummy",
                        dtype=str(dtype).removeprefix("torch."),
                        seed=seed,
                        enforce_eager=not self.gpu,
                        max_model_len=max_model_len,
                        **budget,
                        logprobs_mode="processed_logprobs",
                        enable_sleep_mode=self.gpu,
                        enable_prefix_caching=False,
                    )
                from vllm import SamplingParams  # one token: a shape its kernels refuse fails here, not mid-round

                self.llm.generate(
                    [{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False
                )
            except Exception as exc:  # noqa: BLE001 - any start failure is the user's base or budget
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise EngineStartError(
                    f"engine vllm could not start on base {base} ({type(exc).__name__}: {first}): set {setting}=hf, "
                    f"or change {setting}_memory (now {memory}, the share of "
                    f"{'GPU memory' if self.gpu else 'host RAM'} it reserves)"
                ) from None
            finally:
                torch.set_num_threads = set_threads
        self.startup_s = time.perf_counter() - t0
        self.loaded: str | None = "<dummy>"
        self.asleep = False

    def load(self, model: Any, adapter: str | None) -> float:
        """Send `model`'s weights with `adapter` merged in to the engine; seconds it took."""
        self.wake()
        t0 = time.perf_counter()
        with torch.no_grad():
            weights = [(n, t.detach()) for n, t in merged_weights(model, adapter)]
        self.llm.apply_model(lambda m: load_into(m, weights))
        self.llm.reset_prefix_cache()
        self.loaded = adapter
        return time.perf_counter() - t0

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        seeds: Sequence[int] | None = None,
        logprobs: bool = False,
    ) -> list[Sample]:
        """One completion per prompt: greedy (temperature 0) or sampled, each prompt under its own seed when given;
        stopped at the first EOS (kept) or after `max_new_tokens`."""
        from vllm import SamplingParams

        self.wake()
        s = sampling
        params = [
            SamplingParams(
                max_tokens=s.max_new_tokens,
                min_tokens=s.min_new_tokens,
                temperature=s.temperature,
                top_k=s.top_k if s.top_k > 0 else -1,
                top_p=s.top_p,
                seed=None if seeds is None else int(seeds[i]) % (2**63 - 1),
                stop_token_ids=[s.eos_token_id],
                logprobs=0 if logprobs else None,
                detokenize=False,
                skip_special_tokens=False,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        samples = []
        for out in outs:
            done = out.outputs[0]
            tokens = list(done.token_ids)
            lps = [step[t].logprob for step, t in zip(done.logprobs, tokens, strict=True)] if logprobs else None
            samples.append(Sample(tokens, lps))
        return samples

    def close(self) -> None:
        """Stop the engine and free its memory (a stage's engine ends with the stage)."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()

    def sleep(self) -> None:
        """Free the KV cache and move the weights to host memory while the trainer updates (GPU only)."""
        if self.gpu and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False


def open_engine(
    model: Any, cfg: Any, stage: str, base: str, need_tokens: int, progress: bool = True, seed: int = 0
) -> VLLMEngine | None:
    """The stage's vLLM engine for `model` when `cfg.engine` resolves to vllm here, else None (generate() then).
    `need_tokens`: the longest prompt plus its new tokens. `auto` falls back to hf when the engine cannot start,
    and says so; an explicit `vllm` fails with one line naming the base and the setting."""
    from blueprint import distributed
    from blueprint.engines import settings
    from blueprint.models import runtime
    from blueprint.progress import note

    where = runtime.place(cfg)
    if settings.resolve(cfg, where.device, distributed.world_size()) != "vllm":
        return None
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    longest = getattr(config.get_text_config(), "max_position_embeddings", None) or need_tokens
    try:
        engine = VLLMEngine(
            model,
            device=where.device,
            dtype=where.dtype,
            memory=cfg.engine_memory,
            max_model_len=min(longest, need_tokens),
            seed=seed,
            base=base,
            setting=f"{stage}.engine",
        )
    except EngineStartError as exc:
        if cfg.engine == "vllm":
            raise
        note(stage, f"engine=auto: vLLM did not start ({exc}); generating with hf", progress)
        return None
    note(
        stage,
        f"engine vllm started in {engine.startup_s:.1f} s (memory share {cfg.engine_memory or 'default'})",
        progress,
    )
    return engine
