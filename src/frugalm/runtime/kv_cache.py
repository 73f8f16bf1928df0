"""The packed KV cache: keys and values cached as int8 or int4 codes (see techniques/kv_cache_quant).

The newest `residual_length` tokens of each layer (and up to 15 more between flushes) stay in
full precision; older ones are stored quantized per token in groups of channels and dequantized
when attention reads them. A variant whose frugalm.json says `"inference": {"kv_cache": ...}`
runs with `cache_factory(model)`'s caches, whoever measures or serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, QuantizedLayer

from frugalm.errors import TechniqueError
from frugalm.runtime import compiled
from frugalm.runtime.modules import inference_settings
from frugalm.runtime.quant_linear import (
    dequantize_groups,
    pack,
    quantize_groups,
    unpack,
)

# --- the cache ----------------------------------------------------------------------------------

FLUSH_TOKENS = 16
"""Tokens leave the full-precision window in blocks of at least this many: quantizing and appending
costs ~25 small ops per layer whatever the count, so one token per step would slow decoding by
about a quarter. The window thus holds residual_length to residual_length + 15 tokens."""


@dataclass
class PackedStates:
    """Quantized keys or values of one layer: codes (B, H, S, D*bits/8) uint8, scales float16 and zeros uint8 (B, H, S, D/group)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes

    def cat(self, other: PackedStates) -> PackedStates:
        return PackedStates(
            *(
                torch.cat([a, b], dim=2)
                for a, b in ((self.codes, other.codes), (self.scales, other.scales), (self.zeros, other.zeros))
            )
        )

    def head(self, tokens: int) -> PackedStates:
        """The first `tokens` tokens (views)."""
        return PackedStates(self.codes[:, :, :tokens], self.scales[:, :, :tokens], self.zeros[:, :, :tokens])

    def select(self, batch_idx: torch.Tensor) -> PackedStates:
        return PackedStates(
            self.codes.index_select(0, batch_idx),
            self.scales.index_select(0, batch_idx),
            self.zeros.index_select(0, batch_idx),
        )


class PackedKVLayer(QuantizedLayer):
    """One layer's cache: packed codes for old tokens, full precision for the newest `residual_length`.

    `update` is append-only (the parent class re-quantizes the whole past at every flush and
    quantizes a prompt whole, keeping no recent tokens in full precision): the states passed in
    are attended in full precision at their own step, then join the residual window; once the
    window is FLUSH_TOKENS past `residual_length`, its oldest tokens are quantized (once) and
    appended to the packed storage.
    """

    is_croppable = True

    def __init__(self, bits: int, group_size: int, residual_length: int):
        # axis -1: groups run along head_dim, one token at a time, for keys and values alike.
        super().__init__(
            nbits=bits, axis_key=-1, axis_value=-1, q_group_size=group_size, residual_length=residual_length
        )

    def _quantize(self, tensor: torch.Tensor, axis: int) -> PackedStates:
        assert axis == -1
        b, h, s, d = tensor.shape  # (batch, kv_heads, tokens, head_dim)
        q, scale, zero = quantize_groups(
            tensor.reshape(b * h * s, d), self.nbits, min(self.q_group_size, d), symmetric=False
        )
        return PackedStates(pack(q, self.nbits).view(b, h, s, -1), scale.view(b, h, s, -1), zero.view(b, h, s, -1))

    def _dequantize(self, q: PackedStates) -> torch.Tensor:
        b, h, s, _ = q.codes.shape
        codes = unpack(q.codes.reshape(b * h * s, -1), self.nbits)
        return dequantize_groups(
            codes, q.scales.reshape(b * h * s, -1), q.zeros.reshape(b * h * s, -1), self.dtype
        ).view(b, h, s, -1)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)  # empty residual, dtype, device
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # the residual window, (B, H, r, D)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.keys, self.values
        if self._quantized_keys is not None:
            keys = torch.cat([self._dequantize(self._quantized_keys), keys], dim=-2)
            values = torch.cat([self._dequantize(self._quantized_values), values], dim=-2)
        overflow = self.keys.shape[-2] - self.residual_length
        if overflow >= FLUSH_TOKENS:
            self._append_quantized(self.keys[:, :, :overflow], self.values[:, :, :overflow])
            # clone: a slice would keep the whole old buffer alive behind the smaller window
            self.keys, self.values = self.keys[:, :, overflow:].clone(), self.values[:, :, overflow:].clone()
        return keys, values

    def _append_quantized(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        qk, qv = self._quantize(keys, axis=self.axis_key), self._quantize(values, axis=self.axis_value)
        if self._quantized_keys is None:
            self._quantized_keys, self._quantized_values = qk, qv
        else:
            self._quantized_keys, self._quantized_values = self._quantized_keys.cat(qk), self._quantized_values.cat(qv)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest `-tokens_to_remove` tokens (transformers' convention: a negative count), from
        the full-precision window first, then from the packed storage; nothing is re-quantized."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        drop = min(-tokens_to_remove, self.cumulative_length)
        if drop == 0 or not self.is_initialized:
            return
        window = self.keys.shape[-2]
        from_window = min(drop, window)
        self.keys, self.values = self.keys[:, :, : window - from_window], self.values[:, :, : window - from_window]
        if drop > from_window:  # into the packed past
            kept = self._quantized_keys.codes.shape[2] - (drop - from_window)
            if kept:
                self._quantized_keys = self._quantized_keys.head(kept)
                self._quantized_values = self._quantized_values.head(kept)
            else:
                self._quantized_keys = self._quantized_values = None
        self.cumulative_length -= drop

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self._quantized_keys is not None:
            self._quantized_keys, self._quantized_values = (
                self._quantized_keys.select(idx),
                self._quantized_values.select(idx),
            )

    def cache_bytes(self) -> int:
        """Bytes held, as stored: packed codes + float16 scales + uint8 zeros + the full-precision residual window."""
        if not self.is_initialized:
            return 0
        packed = sum(q.nbytes for q in (self._quantized_keys, self._quantized_values) if q is not None)
        return packed + self.keys.nbytes + self.values.nbytes


# --- building caches for a model ----------------------------------------------------------------


def _text_config(model: nn.Module):
    return model.config.get_text_config()


def head_dim(model: nn.Module) -> int:
    cfg = _text_config(model)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def check_fits(model: nn.Module, bits: int, group_size: int, where: str) -> None:
    """The model-dependent rules: group_size against head_dim, int4 packing, full attention only."""
    d = head_dim(model)
    if group_size < d and d % group_size:
        valid = ", ".join(str(g) for g in range(1, d + 1) if d % g == 0)
        raise TechniqueError(
            f"{where}: group_size {group_size} does not divide head_dim {d}; use a divisor of {d} ({valid}) or any value >= {d} for one group per head vector"
        )
    if bits == 4 and d % 2:
        raise TechniqueError(f"{where}: int4 packs two values per byte, but head_dim {d} is odd; use bits 8")
    layer_types = set(getattr(_text_config(model), "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise TechniqueError(
            f"{where}: the model has {sorted(layer_types - {'full_attention'})} layers; only full-attention caches can be quantized here, use a model without sliding-window or linear-attention layers"
        )


def make_cache(model: nn.Module, settings: dict, max_tokens: int) -> Cache | None:
    """A fresh cache for one generation of up to `max_tokens` tokens per sequence, as `settings` say
    ({"kv_cache": {...}}: packed; {"compiled_decode": {...}}: static); None: the model's default cache."""
    kv = settings.get("kv_cache")
    if kv and settings.get(compiled.SETTING):
        raise TechniqueError("kv_cache and compiled_decode settings together: the packed cache is not static; keep one")
    if kv:
        check_fits(model, kv["bits"], kv["group_size"], "kv_cache setting")
        n_layers = _text_config(model).num_hidden_layers
        return Cache(
            layers=[PackedKVLayer(kv["bits"], kv["group_size"], kv["residual_length"]) for _ in range(n_layers)]
        )
    if settings.get(compiled.SETTING):
        return compiled.static_cache(model, max_tokens)
    return None


def cache_factory(model: nn.Module, settings: dict | None = None) -> Callable[[int], Cache] | None:
    """A maker of fresh caches for `model`, given the tokens per sequence each must hold (settings
    default to the model's own); None when it runs with the default cache."""
    settings = inference_settings(model) if settings is None else settings
    if not (settings.get("kv_cache") or settings.get(compiled.SETTING)):
        return None
    return lambda max_tokens: make_cache(model, settings, max_tokens)
