"""Decode latency of linear layers per stored format, measured here, for budgets in ms per token.

A decode step at batch 1 runs every linear layer on one row. Each candidate format of a layer is
built as a saved variant would run it eagerly (runtime/quant_linear.fast_layer: PackedWeightLinear
on ATen's int8 and int4 CPU kernels where the layer fits them, CodesLinear for small layers they
refuse, else the dequantizing QuantLinear) and timed on one float32 row, round-robin with the
layer's other formats and its float original (every one once per round, `rounds` rounds, each
sample `calls` calls), keeping the median per format. The step
outside the targeted layers is the float model's whole step (one token from a `prompt`-token
cache, median of `rounds` samples) minus the float layers' own times. Layers cost more inside
a model than alone, so each format's isolated latencies are scaled to match the measured step of
the model with every layer that takes the format in it (`in_model_scale`): the sum is then exact
for every uniform allocation and interpolates between them, as the additive allocation assumes. Timing is the one thing here a stage measures: a profile that guides the
allocation, recorded with the stage (its seconds count as production cost); the variant's own
decode speed is the benchmark's to measure.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from transformers import DynamicCache

from frugalm.runtime.modules import weight_out_in
from frugalm.runtime.quant_linear import QuantLinear, fast_layer, quantize_groups

Format = tuple[int, int]


def _sample_ns(fn, calls: int) -> float:
    t = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - t) / calls


def as_run(module: nn.Module, fmt: Format, symmetric: bool) -> nn.Module:
    """The layer in format `fmt` on the kernel a loaded variant would use."""
    w = weight_out_in(module).detach()
    q, scale, zero = quantize_groups(w, fmt[0], fmt[1], symmetric)
    bias = getattr(module, "bias", None)
    layer = QuantLinear.from_codes(q, scale, zero, fmt[0], bias)
    return fast_layer(layer, fbgemm=False) or layer  # weight-only: fbgemm does not apply


@torch.inference_mode()
def layer_costs_ns(layers, formats: dict[str, list[Format]], symmetric: bool, rounds: int = 7,
                   calls: int = 50) -> tuple[dict[str, dict[Format, int]], dict[str, int], dict[str, dict[Format, str]]]:  # fmt: skip
    """(ns per one-row call of each layer in each format, ns of each float layer, kernel per layer and format)."""
    costs, floats, kernels = {}, {}, {}
    for name, module in layers:
        x = torch.randn(1, 1, weight_out_in(module).shape[1])
        runs = {fmt: as_run(module, fmt, symmetric) for fmt in formats[name]}
        fns = {fmt: (lambda m=m: m(x)) for fmt, m in runs.items()}
        fns["float"] = lambda: module(x)
        for fn in fns.values():
            fn()  # warm-up
        samples = {key: [] for key in fns}
        for _ in range(rounds):
            for key, fn in fns.items():
                samples[key].append(_sample_ns(fn, calls))
        floats[name] = round(statistics.median(samples.pop("float")))
        costs[name] = {fmt: round(statistics.median(s)) for fmt, s in samples.items()}
        kernels[name] = {fmt: getattr(m, "kernel", "dequantize") for fmt, m in runs.items()}
    return costs, floats, kernels


@torch.inference_mode()
def in_model_scale(model: nn.Module, layers, costs: dict[str, dict[Format, int]], floats: dict[str, int],
                   outside: int, symmetric: bool, prompt: int) -> dict[Format, float]:  # fmt: skip
    """Per format, the factor that makes its isolated one-row latencies add up to the measured step
    of the model with every layer that takes the format in it (the others float): layers called
    inside a model cost more than alone (caches, allocations between calls); 1 where the step
    leaves nothing for them."""
    scale = {}
    for fmt in sorted({f for d in costs.values() for f in d}):
        has = [(n, m) for n, m in layers if fmt in costs[n]]
        originals = {n: m for n, m in has}
        for n, m in has:
            _swap(model, n, as_run(m, fmt, symmetric))
        try:
            step = step_ns(model, prompt)
        finally:
            for n, m in originals.items():
                _swap(model, n, m)
        alone = sum(costs[n][fmt] for n, _ in has)
        rest = sum(v for n, v in floats.items() if n not in originals)
        inside = step - outside - rest
        # A step no longer than what the other parts cost alone is noise (a busy machine), not a
        # free format: the isolated latencies then stand as measured (factor 1).
        scale[fmt] = inside / alone if alone and inside > 0 else 1.0
    return scale


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.inference_mode()
def step_ns(model: nn.Module, prompt: int = 128, rounds: int = 7, calls: int = 10) -> int:
    """Median ns of the model's one-token decode step from a `prompt`-token cache (batch 1, cropped back each call)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(min(4, vocab - 1), vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    first = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def step():
        model(first, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.crop(-1)

    step()
    return round(statistics.median(_sample_ns(step, calls) for _ in range(rounds)))
