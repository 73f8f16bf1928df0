"""Mixture-of-experts figures: parameters active per token, and how evenly the router loads the experts.

A token runs through its block's router and the `top_k` experts the router picks (plus any
shared expert, which every token runs), so a token touches

    active_params = params_count - sum over expert banks of (experts - top_k) / experts x bank params

(counted; tied weights once, as params_count). Its FLOPs are counted on the experts actually
routed (measure/compute.py counts `grouped_mm` per row, and the eager loop's matmuls).

Load balance: forward hooks on every router count the tokens routed to each expert (each token's
top_k choices) over the evaluation text, in non-overlapping windows of the quality protocol's
length, so each token is routed once per layer. Per layer the coefficient of variation of the
counts (population std / mean: 0 when every expert gets the same number, sqrt(experts / top_k -
1) when only top_k experts ever get any) is taken; `expert_load_cv` is its mean over layers, and
the protocol keeps every layer's CV, max/mean ratio and counts.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from frugalm.measure.memory import params_count
from frugalm.measure.metrics import Measurement
from frugalm.models import context_length
from frugalm.runtime.experts import bank_params, expert_banks, routers
from frugalm.text.encode import encode_documents


def active_params(model: nn.Module) -> tuple[int, dict]:
    """(parameters a token runs through, the count's protocol)."""
    banks = expert_banks(model)
    idle = sum(bank_params(m) * (m.num_experts - k) // m.num_experts for _, m, k in banks)
    protocol = {
        "what": "parameters minus the unrouted share of every expert bank: (experts - top_k) / experts of its weights",
        "expert_banks": len(banks),
        "experts": banks[0][1].num_experts if banks else 0,
        "top_k": banks[0][2] if banks else 0,
        "params_total": params_count(model),
        "tied_weights": "counted once",
    }
    return params_count(model) - idle, protocol


class RoutingCounter:
    """Counts, per router, how many tokens chose each expert while the context is open."""

    def __init__(self, model: nn.Module):
        self.routers = routers(model)
        self.counts = {name: torch.zeros(m.num_experts, dtype=torch.long) for name, m in self.routers}
        self.top_k = {name: m.top_k for name, m in self.routers}
        self._hooks = []

    def __enter__(self) -> RoutingCounter:
        for name, module in self.routers:
            self._hooks.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def count(module, args, output) -> None:
            indices = output[-1]  # (tokens, top_k)
            self.counts[name] += torch.bincount(indices.reshape(-1).cpu(), minlength=module.num_experts)

        return count

    def __exit__(self, *exc) -> bool:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        return False


def cv(counts: list[int]) -> float:
    """Population standard deviation over the mean (0 for no tokens)."""
    mean = sum(counts) / len(counts)
    if mean == 0:
        return 0.0
    return math.sqrt(sum((c - mean) ** 2 for c in counts) / len(counts)) / mean


@torch.inference_mode()
def load_balance(model: nn.Module, tokenizer, docs: list[str], protocol, data_desc: dict) -> list[Measurement]:
    """expert_load_cv over the evaluated text (the quality protocol's tokens), in non-overlapping
    windows of its length; [] for a model without routers or text."""
    ids = encode_documents(tokenizer, docs, protocol.max_tokens).ids.tolist() if docs else []
    if not routers(model) or len(ids) < 2:
        return []
    window = min(protocol.window, context_length(model.config) or protocol.window)
    device = next(model.parameters()).device
    with RoutingCounter(model) as counter:
        for start in range(0, len(ids), window):
            model(torch.tensor([ids[start : start + window]], device=device), use_cache=False)
    layers = {name: c.tolist() for name, c in counter.counts.items()}
    per_layer = {name: cv(c) for name, c in layers.items()}
    experts, top_k = len(next(iter(layers.values()))), next(iter(counter.top_k.values()))
    figure = {
        **data_desc,
        "tokens": len(ids),
        "window": window,
        "windows": "non-overlapping: each token routed once per layer",
        "statistic": "per layer: population std / mean of the tokens routed to each expert (each token's top_k choices); the figure: their mean over layers",
        "range": [0.0, math.sqrt(experts / top_k - 1)],
        "experts": experts,
        "top_k": top_k,
        "cv_per_layer": per_layer,
        "max_over_mean_per_layer": {n: max(c) * len(c) / max(1, sum(c)) for n, c in layers.items()},
        "counts_per_layer": layers,
    }
    value = sum(per_layer.values()) / len(per_layer)
    return [Measurement("expert_load_cv", value, method="measured", n=len(per_layer), protocol=figure)]


def active_params_figure(model: nn.Module) -> Measurement:
    value, protocol = active_params(model)
    return Measurement("active_params_count", value, method="counted", protocol=protocol)
