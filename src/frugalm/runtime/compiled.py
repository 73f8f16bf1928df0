"""The compiled decode path: a static KV cache and `torch.compile` of the one-token step (gpt-fast's approach).

A decode step at batch 1 is a few hundred small kernels whose Python and dispatch overhead is a
large share of the step on CPU; compiled as one graph (inductor: fused C++ loops on CPU, Triton
on CUDA) against a cache whose tensors never change shape, that overhead goes. Prefill (more than
one new token) stays eager: its kernels are large and its shapes vary.

`install(model)` replaces the model's `forward` with a dispatcher: a call with one new token per
sequence and a `StaticDecodeCache` runs the compiled graph, anything else the eager forward. The
graph is compiled on its first call for each (batch, cache length) shape and reused after; each
compilation's wall time is logged on the model (`compile_log`): it is a cost of deploying the
variant, paid once per process and shape (inductor's on-disk cache shortens later ones). A
variant carries the path as `"inference": {"compiled_decode": {...}}` (techniques/compile_decode,
or `frugalm bench --compile`), and whoever runs it asks `cache_factory` for its static caches.

Written here rather than taken from `model.generate(cache_implementation="static")`: the
benchmark times single steps and whole generations outside `generate`, and needs the cache
restorable (`crop`) and the compile time on record.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn
from transformers.cache_utils import StaticCache

from frugalm.errors import TechniqueError

SETTING = "compiled_decode"
"""Key of the inference setting; its value is {"mode": torch.compile mode}."""
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
COMPILE_LOG_ATTR = "frugalm_compile_log"


class StaticDecodeCache(StaticCache):
    """transformers' StaticCache (preallocated, written in place) that can also forget its newest tokens."""

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest `-tokens_to_remove` tokens: the write position moves back; the slots are overwritten later."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        with torch.inference_mode():  # the counter is an inference tensor when the cache was filled in that mode
            for layer in self.layers:
                if layer.is_initialized:
                    layer.cumulative_length.sub_(min(-tokens_to_remove, int(layer.cumulative_length)))

    def rewind(self, tokens: int) -> None:
        """Keep the first `tokens` tokens (the next write goes to position `tokens`); later slots are overwritten later."""
        with torch.inference_mode():
            for layer in self.layers:
                layer.cumulative_length.fill_(tokens)


def check_fits(model: nn.Module, where: str) -> None:
    if not getattr(model, "_can_compile_fullgraph", False):
        raise TechniqueError(
            f"{where}: {type(model).__name__} does not support a static KV cache in one compiled graph (transformers' _can_compile_fullgraph); run it without compiled decode"
        )
    if next(model.parameters()).device.type == "cpu":
        from torch._inductor import cpp_builder  # deferred: inductor is slow to import

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # its lookup raises its own error types, which vary between torch versions
            raise TechniqueError(
                f"{where}: torch.compile on CPU builds C++ and found no compiler ({type(e).__name__}); install g++ (apt install g++) or run without compiled decode"
            ) from None


def static_cache(model: nn.Module, max_tokens: int) -> StaticDecodeCache:
    """An empty static cache holding `max_tokens` tokens per sequence (its tensors are allocated on first use)."""
    return StaticDecodeCache(config=model.config, max_cache_len=max_tokens)


def install(model: nn.Module, settings: dict) -> nn.Module:
    """Route `model`'s one-token steps on a StaticDecodeCache through `torch.compile` (idempotent)."""
    if getattr(model.forward, "frugalm_compiled", False):
        return model
    check_fits(model, SETTING)
    eager = model.forward
    compiled = torch.compile(eager, mode=settings.get("mode", "default"), fullgraph=True, dynamic=False)
    log: list[dict] = []
    seen: set[tuple[int, int]] = set()

    @functools.wraps(eager)
    def forward(input_ids=None, *args, past_key_values=None, **kwargs):
        if isinstance(past_key_values, StaticDecodeCache) and input_ids is not None and input_ids.shape[1] == 1:
            shape = (input_ids.shape[0], past_key_values.layers[0].max_cache_len)
            if shape in seen:
                return compiled(input_ids, *args, past_key_values=past_key_values, **kwargs)
            t = time.perf_counter()
            out = compiled(input_ids, *args, past_key_values=past_key_values, **kwargs)
            log.append({"batch": shape[0], "cache_tokens": shape[1], "first_call_s": time.perf_counter() - t})
            seen.add(shape)
            return out
        return eager(input_ids, *args, past_key_values=past_key_values, **kwargs)

    forward.frugalm_compiled = True
    model.forward = forward
    setattr(model, COMPILE_LOG_ATTR, log)
    return model


def log_compile(model: nn.Module, record: dict) -> None:
    """Add one compilation's record to `model`'s log (compile_log)."""
    if COMPILE_LOG_ATTR not in model.__dict__:
        setattr(model, COMPILE_LOG_ATTR, [])
    getattr(model, COMPILE_LOG_ATTR).append(record)


def compile_log(model: nn.Module) -> list[dict]:
    """One record per compiled shape: batch, cache tokens, and the wall time of its first call (compilation plus one step), seconds."""
    return list(getattr(model, COMPILE_LOG_ATTR, None) or [])
