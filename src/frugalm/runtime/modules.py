"""Module helpers that both the techniques and a saved variant at run time need.

Linear-like layers (nn.Linear and GPT-2's Conv1D), their weight as (out, in), the kernel each
layer runs on, and the inference settings a variant carries beyond its weights.
"""

from __future__ import annotations

import torch
from torch import nn


def is_linear(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a Linear with its weight stored (in, out).
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), a view for nn.Linear, transposed for Conv1D."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def kernel_summary(model: nn.Module) -> dict[str, int]:
    """How many linear layers run on which kernel: dense float, a low-bit kernel, or dequantized."""
    counts: dict[str, int] = {}
    for m in model.modules():
        kernel = getattr(m, "kernel", None) or ("dense" if is_linear(m) else None)
        if kernel:
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts


INFERENCE_ATTR = "frugalm_inference"
"""Model attribute holding its inference settings (a plain dict), set by techniques like kv_cache_quant."""


def inference_settings(model: nn.Module) -> dict:
    """How `model` is meant to run beyond its weights (e.g. {"kv_cache": {"bits": 8, ...}}); {} for plain runs.

    Saved as "inference" in frugalm.json and restored by `load_model`, so a variant measured later
    runs the way its recipe set it up.
    """
    return getattr(model, INFERENCE_ATTR, None) or {}
