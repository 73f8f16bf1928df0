"""Model families beyond the dense Transformer, and what running them needs.

- Mixture-of-experts (Mixtral, Qwen2-MoE, OLMoE): in transformers 5 a block's experts are 3-D
  parameters (experts, out, in), not `nn.Linear`s, run by `grouped_mm` (the default, on CPU too)
  or by an eager loop over the experts hit; the router is a module returning (logits, weights,
  indices). They decode like any Transformer, with a KV cache.
- Recurrent (RWKV, Mamba, Mamba2): no KV cache but a state of fixed size per sequence, passed
  as `state` (RWKV: a list of five (batch, hidden, layers) tensors, updated in place) or as
  `cache_params` (Mamba, Mamba2: a DynamicCache of LinearAttentionLayers holding the causal
  convolution's window and the SSM state).

`install` gives a recurrent model the Transformer's cache interface (`past_key_values=` in,
`.past_key_values` out, through forward hooks), so every decoding loop of the benchmark runs it
unchanged; it changes no computation. RWKV's state travels in a DynamicCache whose one
layer is an `RwkvStateLayer`. A recurrent state cannot be rewound: `crop` refuses, and
`step_back_` (the paired timing's undo of one decode step) leaves it as it is, since a recurrent
step costs the same at every position.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers import DynamicCache

from frugalm.errors import ModelError

RECURRENT_CACHE_ARG = {
    "rwkv": "state",
    "mamba": "cache_params",
    "mamba2": "cache_params",
    "falcon_mamba": "cache_params",  # Mamba's modeling code; not tested here
}
"""model_type -> the forward keyword its recurrent state travels in."""
MOE_TYPES = ("mixtral", "qwen2_moe", "olmoe")
"""Tested here; any other config with `num_experts_per_tok` counts as mixture-of-experts too."""
DENSE_TYPES = ("llama", "qwen2", "gpt2", "gpt_neox", "opt")
"""The dense Transformers every technique supports (techniques/_arch.py's table)."""


def model_type(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None) or type(model_or_config).__name__


def family(model_or_config) -> str:
    """'recurrent', 'moe' or 'dense' (any other Transformer)."""
    config = getattr(model_or_config, "config", model_or_config)
    kind = model_type(config)
    if kind in RECURRENT_CACHE_ARG:
        return "recurrent"
    if kind in MOE_TYPES or (getattr(config, "num_experts_per_tok", 0) or 0) > 0:
        return "moe"
    return "dense"


def describe(model_or_config) -> str:
    """'mamba (recurrent)', 'mixtral (mixture-of-experts)': how refusals name a family."""
    label = {"recurrent": "recurrent", "moe": "mixture-of-experts", "dense": "dense Transformer"}
    return f"{model_type(model_or_config)} ({label[family(model_or_config)]})"


def attention_kernel(model: nn.Module) -> str:
    """The attention implementation the model runs with, as transformers resolved it."""
    if family(model) == "recurrent":
        return "none (no attention layers)"
    return str(getattr(model.config, "_attn_implementation", None))


# --- RWKV's state as a cache layer ---------------------------------------------------------------


class RwkvStateLayer:
    """RWKV's five state tensors, (batch, hidden, layers) each, as the one layer of a Cache."""

    is_croppable = False
    is_compileable = False
    is_sliding = False

    def __init__(self):
        self.state: list[torch.Tensor] | None = None
        self.tokens = 0

    def get_seq_length(self, *args) -> int:
        return self.tokens

    def get_max_cache_shape(self, *args) -> int:
        return -1

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.state) if self.state else 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ModelError(
            "rwkv (recurrent): its state cannot be rewound to an earlier token; decode it plainly, without speculation"
        )

    def reset(self) -> None:
        self.state, self.tokens = None, 0


def _rwkv_layer(cache) -> RwkvStateLayer:
    """The cache's RWKV state layer, made in place of its (empty) layers on first use."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ModelError(f"rwkv (recurrent): past_key_values must be a transformers Cache, got {type(cache).__name__}")
    if not (len(layers) == 1 and isinstance(layers[0], RwkvStateLayer)):
        cache.layers = [RwkvStateLayer()]
    return cache.layers[0]


# --- the adapter ---------------------------------------------------------------------------------


INSTALLED_ATTR = "frugalm_cache_interface"


def install(model: nn.Module) -> nn.Module:
    """Give a recurrent model the Transformer's cache interface (idempotent; other families unchanged).

    Forward hooks, not a wrapped `forward`: they receive the module they run on, so a deep copy
    of the model (a cascade's small model, a distillation's student) keeps working on its own
    weights, and `forward`'s signature (its `logits_to_keep`) stays what callers inspect."""
    kind = model_type(model)
    if kind not in RECURRENT_CACHE_ARG or getattr(model, INSTALLED_ATTR, False):
        return model
    if kind == "rwkv":
        _fix_rwkv_one_token_batch_(model)
    model.register_forward_pre_hook(_cache_in, with_kwargs=True)
    model.register_forward_hook(_cache_out, with_kwargs=True)
    setattr(model, INSTALLED_ATTR, True)
    return model


def _cache_in(module, args, kwargs):
    """`past_key_values=` -> the model's own keyword (RWKV: the state held in the cache's RwkvStateLayer)."""
    cache = kwargs.pop("past_key_values", None)
    kind = model_type(module)
    if kind == "rwkv":
        if cache is None and kwargs.get("use_cache", True):
            cache = DynamicCache()
        if cache is not None:
            kwargs["state"] = _rwkv_layer(cache).state
    elif cache is not None:
        kwargs[RECURRENT_CACHE_ARG[kind]] = cache
    module.__dict__["_frugalm_cache"] = cache  # for _cache_out (not a submodule, not saved)
    return args, kwargs


def _cache_out(module, args, kwargs, out):
    """The returned state as `out.past_key_values` (RWKV: stored in the cache's layer)."""
    cache = module.__dict__.pop("_frugalm_cache", None)
    if isinstance(out, tuple):  # return_dict=False: the caller reads the state from the tuple itself
        return out
    if model_type(module) == "rwkv":
        if cache is not None and getattr(out, "state", None) is not None:
            layer = _rwkv_layer(cache)
            layer.state = out.state
            ids = args[0] if args else kwargs.get("input_ids")
            layer.tokens += (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
            out.past_key_values = cache
    else:
        out.past_key_values = getattr(out, RECURRENT_CACHE_ARG[model_type(module)], None)
    return out


def _fix_rwkv_one_token_batch_(model: nn.Module) -> None:
    """transformers' RWKV mixes a one-token step with the previous token's hidden state taken as
    (batch, hidden), which broadcasts against the (batch, 1, hidden) input into (batch, batch,
    hidden) when batch > 1: every sequence of a batch then decodes wrongly (batch 1 is right).
    The two token-shift methods are rebound per module with the state row given its token axis."""
    for module in model.modules():
        name = type(module).__name__
        if name == "RwkvSelfAttention":
            module.extract_key_value = types.MethodType(_rwkv_extract_key_value, module)
        elif name == "RwkvFeedForward":
            module.forward = types.MethodType(_rwkv_feed_forward, module)


def _shifted(module, hidden: torch.Tensor, row: torch.Tensor | None) -> torch.Tensor:
    """(batch, seq, hidden): each position's previous hidden state, the first one's from `row` (batch, hidden)."""
    if hidden.size(1) == 1 and row is not None:
        return row.unsqueeze(1)
    shifted = module.time_shift(hidden)
    if row is not None:
        shifted[:, 0] = row
    return shifted


def _rwkv_extract_key_value(self, hidden, state=None):
    shifted = _shifted(self, hidden, state[1][:, :, self.layer_id] if state is not None else None)
    key = hidden * self.time_mix_key + shifted * (1 - self.time_mix_key)
    value = hidden * self.time_mix_value + shifted * (1 - self.time_mix_value)
    receptance = hidden * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
    key, value, receptance = self.key(key), self.value(value), torch.sigmoid(self.receptance(receptance))
    if state is not None:
        state[1][:, :, self.layer_id] = hidden[:, -1]
    return receptance, key, value, state


def _rwkv_feed_forward(self, hidden, state=None):
    shifted = _shifted(self, hidden, state[0][:, :, self.layer_id] if state is not None else None)
    key = hidden * self.time_mix_key + shifted * (1 - self.time_mix_key)
    receptance = hidden * self.time_mix_receptance + shifted * (1 - self.time_mix_receptance)
    value = self.value(torch.square(torch.relu(self.key(key))))
    receptance = torch.sigmoid(self.receptance(receptance))
    if state is not None:
        state[0][:, :, self.layer_id] = hidden[:, -1]
    return receptance * value, state


# --- what a cache holds --------------------------------------------------------------------------


def _is_recurrent_layer(layer) -> bool:
    return isinstance(layer, RwkvStateLayer) or hasattr(layer, "recurrent_states")


def is_recurrent_cache(cache) -> bool:
    return any(_is_recurrent_layer(layer) for layer in getattr(cache, "layers", ()))


def layer_bytes(layer) -> int:
    """Bytes one cache layer holds as stored: its own `cache_bytes()` (packed quantized layers, RWKV's
    state), a linear-attention layer's convolution windows and SSM states, else its keys and values."""
    if hasattr(layer, "cache_bytes"):
        return layer.cache_bytes()
    tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]  # hybrid layers have both kinds
    if hasattr(layer, "recurrent_states"):
        tensors += [*layer.conv_states.values(), *layer.recurrent_states.values()]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def step_back_(cache) -> None:
    """Undo one decode step: a KV cache forgets its newest token; a recurrent state is left as it
    is (it cannot be rewound, and a recurrent step costs the same at every position)."""
    if not is_recurrent_cache(cache):
        cache.crop(-1)
