"""The packed KV cache: keys and values cached as int8 or int4 codes (see techniques/kv_cache_quant).

The newest `residual_length` tokens of each layer (and up to 15 more between flushes) stay in
full precision; older ones are stored quantized per token in groups of channels and dequantized
when attention reads them (written in place beside the window, `_dequantized_cat`). A variant
whose frugalm.json says `"inference": {"kv_cache": ...}` (or `{"compiled_decode": ...}`: a
static cache) runs with `cache_factory(model)`'s caches, whoever measures or serves it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, QuantizedLayer

from frugalm.errors import TechniqueError
from frugalm.runtime import compiled
from frugalm.runtime.families import describe, family
from frugalm.runtime.modules import inference_settings
from frugalm.runtime.quant_linear import (
    pack,
    quantize_groups,
)

# --- the cache ----------------------------------------------------------------------------------

FLUSH_TOKENS = 16
"""Tokens leave the full-precision window in blocks of at least this many: quantizing and appending
costs ~25 small ops per layer whatever the count, so one token per step would slow decoding by
about a quarter. The window thus holds residual_length to residual_length + 15 tokens."""


def _dequantized_cat(codes, scales, zeros, window: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., S + R, D): codes (..., S, D*bits/8) dequantized per group, then window (..., R, D).

    The past is written straight into the result and scaled there in place: three passes, no
    temporaries, no concatenation. Written out like this because the one-expression form (cast,
    subtract, multiply, then cat) is five passes with four full-size temporaries: it made
    int8-cache decoding 0.80x as fast as the float cache at 1,536 tokens (135M stand-in, paired);
    an inductor-compiled version, though one loop, cost ~50 us per call in guards with dynamic
    shapes and was slower than this.
    """
    *lead, s, _ = codes.shape
    d, g = window.shape[-1], scales.shape[-1]
    out = torch.empty(*lead, s + window.shape[-2], d, dtype=window.dtype, device=window.device)
    past = out[..., :s, :]
    if bits == 8:
        past.copy_(codes)
    else:  # pack(): even channels in the low nibble, odd ones in the high
        pairs = past.view(*lead, s, d // 2, 2)
        pairs[..., 0].copy_(codes & 0x0F)
        pairs[..., 1].copy_(codes >> 4)
    grouped = past.view(*lead, s, g, d // g)
    grouped.sub_(zeros.to(window.dtype)[..., None]).mul_(scales.to(window.dtype)[..., None])
    out[..., s:, :].copy_(window)
    return out


@dataclass
class PackedStates:
    """Quantized keys and values of one layer, stacked: codes (2, B, H, S, D*bits/8) uint8, scales
    float16 and zeros uint8 (2, B, H, S, D/group). Tokens run along dim -2, the batch along dim 1."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes + self.zeros.nbytes

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    def _map(self, fn) -> PackedStates:
        return PackedStates(fn(self.codes), fn(self.scales), fn(self.zeros))

    def cat(self, other: PackedStates) -> PackedStates:
        return PackedStates(*(torch.cat([a, b], dim=-2) for a, b in zip(
            (self.codes, self.scales, self.zeros), (other.codes, other.scales, other.zeros), strict=True)))  # fmt: skip

    def head(self, tokens: int) -> PackedStates:
        """The first `tokens` tokens (views)."""
        return self._map(lambda t: t[..., :tokens, :])

    def select(self, batch_idx: torch.Tensor) -> PackedStates:
        return self._map(lambda t: t.index_select(1, batch_idx))


class PackedKVLayer(QuantizedLayer):
    """One layer's cache: packed codes for old tokens, full precision for the newest `residual_length`.

    `update` is append-only (the parent class re-quantizes the whole past at every flush and
    quantizes a prompt whole, keeping no recent tokens in full precision): the states passed in
    are attended in full precision at their own step, then join the residual window; once the
    window is FLUSH_TOKENS past `residual_length`, its oldest tokens are quantized (once) and
    appended to the packed storage (`packed`: keys and values stacked on a leading axis,
    quantized together at each flush).
    """

    is_croppable = True

    def __init__(self, bits: int, group_size: int, residual_length: int):
        # axis -1: groups run along head_dim, one token at a time, for keys and values alike.
        super().__init__(
            nbits=bits, axis_key=-1, axis_value=-1, q_group_size=group_size, residual_length=residual_length
        )
        self.packed: PackedStates | None = None

    def _quantize(self, tensor: torch.Tensor, axis: int) -> PackedStates:
        assert axis == -1
        *lead, d = tensor.shape  # (..., tokens, head_dim)
        q, scale, zero = quantize_groups(tensor.reshape(-1, d), self.nbits, min(self.q_group_size, d), symmetric=False)
        return PackedStates(pack(q, self.nbits).view(*lead, -1), scale.view(*lead, -1), zero.view(*lead, -1))

    def _dequantize(self, q: PackedStates) -> torch.Tensor:
        """The parent class's interface; `update` writes the past beside the window itself."""
        *lead, _, packed = q.codes.shape
        empty = torch.empty(*lead, 0, packed * 8 // self.nbits, dtype=self.dtype, device=q.codes.device)
        return _dequantized_cat(q.codes, q.scales, q.zeros, empty, self.nbits)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)  # empty residual, dtype, device
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)  # the residual window, (B, H, r, D)
        self.values = torch.cat([self.values, value_states], dim=-2)
        keys, values = self.keys, self.values
        if self.packed is not None:
            q = self.packed
            keys = _dequantized_cat(q.codes[0], q.scales[0], q.zeros[0], keys, self.nbits)
            values = _dequantized_cat(q.codes[1], q.scales[1], q.zeros[1], values, self.nbits)
        overflow = self.keys.shape[-2] - self.residual_length
        if overflow >= FLUSH_TOKENS:
            new = self._quantize(torch.stack([self.keys[:, :, :overflow], self.values[:, :, :overflow]]), axis=-1)
            self.packed = new if self.packed is None else self.packed.cat(new)
            # clone: a slice would keep the whole old buffer alive behind the smaller window
            self.keys, self.values = self.keys[:, :, overflow:].clone(), self.values[:, :, overflow:].clone()
        return keys, values

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
            kept = self.packed.tokens - (drop - from_window)
            self.packed = self.packed.head(kept) if kept else None
        self.cumulative_length -= drop

    def reset(self) -> None:
        super().reset()
        self.packed = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self.packed is not None:
            self.packed = self.packed.select(idx)

    def cache_bytes(self) -> int:
        """Bytes held, as stored: packed codes + float16 scales + uint8 zeros + the full-precision residual window."""
        if not self.is_initialized:
            return 0
        packed = self.packed.nbytes if self.packed is not None else 0
        return packed + self.keys.nbytes + self.values.nbytes


# --- building caches for a model ----------------------------------------------------------------


def _text_config(model: nn.Module):
    return model.config.get_text_config()


def head_dim(model: nn.Module) -> int:
    cfg = _text_config(model)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def check_fits(model: nn.Module, bits: int, group_size: int, where: str) -> None:
    """The model-dependent rules: a KV cache at all, group_size against head_dim, int4 packing, full attention only."""
    if family(model) == "recurrent":
        raise TechniqueError(
            f"{where}: {describe(model)} models keep no KV cache but a fixed-size state, with nothing to quantize here; supported: Transformers with full attention"
        )
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
