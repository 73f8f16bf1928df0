"""The packed KV cache: keys and values cached as int8 or int4 codes (see techniques/kv_cache_quant).

The newest `residual_length` tokens of each layer (and up to 15 more between flushes) stay in
full precision; older ones are stored quantized per token in groups of channels. A one-token
(decode) step attends over the packed codes themselves where the model's attention allows
(`packed_attention`: one group per head vector, a model on sdpa, which make_cache switches to
ATTENTION): on a float32 CPU model in one call of frugalm's kernel (cpu_kernels.codes_attention,
which reads each code once, as a byte), elsewhere with torch ops over the codes cast into a
shared workspace; other steps read the past dequantized, written in place beside the window
(`_dequantized_cat`). A variant whose frugalm.json says `"inference": {"kv_cache": ...}` (or
`{"compiled_decode": ...}`: a static cache) runs with `cache_factory(model)`'s caches, whoever
measures or serves it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.cache_utils import Cache, QuantizedLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from frugalm.errors import TechniqueError
from frugalm.runtime import compiled, cpu_kernels
from frugalm.runtime.families import describe, family
from frugalm.runtime.modules import inference_settings
from frugalm.runtime.quant_linear import (
    pack,
    quantize_groups,
)

# --- the cache ----------------------------------------------------------------------------------

FACTORS_MIN_HEAD_DIM = 32
"""Head vectors at least this long keep each packed token's float scale and scale * zero (8 bytes,
at most a quarter of its int8 codes) for attention over the codes; shorter ones derive them at
every step (two more small ops per layer) rather than nearly double their bytes."""

FLUSH_TOKENS = 16
"""Tokens leave the full-precision window in blocks of at least this many: quantizing and appending
costs ~25 small ops per layer whatever the count, so one token per step would slow decoding by
about a quarter. The window thus holds residual_length to residual_length + 15 tokens."""


def _codes_into(out: torch.Tensor, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Write the unscaled codes (..., S, D*bits/8) into the float `out` (..., S, D) (one cast pass); returns out."""
    if bits == 8:
        return out.copy_(codes)
    pairs = out.view(*out.shape[:-1], out.shape[-1] // 2, 2)  # pack(): even channels low nibble, odd high
    pairs[..., 0].copy_(codes & 0x0F)
    pairs[..., 1].copy_(codes >> 4)
    return out


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
    past = _codes_into(out[..., :s, :], codes, bits)
    grouped = past.view(*lead, s, g, d // g)
    grouped.sub_(zeros.to(window.dtype)[..., None]).mul_(scales.to(window.dtype)[..., None])
    out[..., s:, :].copy_(window)
    return out


@dataclass
class PackedStates:
    """Quantized keys and values of one layer, stacked: codes (2, B, H, S, D*bits/8) uint8, scales
    float16 and zeros uint8 (2, B, H, S, D/group). Tokens run along dim -2, the batch along dim 1.
    `factors` (2, B, H, S, 2), in the model's dtype, only where attention reads the codes (one group
    per head vector of FACTORS_MIN_HEAD_DIM or more channels): each token's scale and scale * zero,
    derived once as it is packed rather than at every step."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    factors: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._fields() if t is not None)

    def _fields(self) -> tuple:
        return self.codes, self.scales, self.zeros, self.factors

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    def _map(self, fn) -> PackedStates:
        return PackedStates(*(None if t is None else fn(t) for t in self._fields()))

    def cat(self, other: PackedStates) -> PackedStates:
        return PackedStates(*(None if a is None else torch.cat([a, b], dim=-2)
                              for a, b in zip(self._fields(), other._fields(), strict=True)))  # fmt: skip

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

    def __init__(
        self, bits: int, group_size: int, residual_length: int,
        attend: PretrainedConfig | None = None, workspace: Workspace | None = None,
    ):  # fmt: skip
        # axis -1: groups run along head_dim, one token at a time, for keys and values alike.
        super().__init__(
            nbits=bits, axis_key=-1, axis_value=-1, q_group_size=group_size, residual_length=residual_length
        )
        self.packed: PackedStates | None = None
        # attend: a config whose ATTENTION reads the packed past on one-token steps (one group per head vector)
        self.attend, self.workspace = attend, workspace or Workspace()

    def _quantize(self, tensor: torch.Tensor, axis: int) -> PackedStates:
        assert axis == -1
        *lead, d = tensor.shape  # (..., tokens, head_dim)
        q, scale, zero = quantize_groups(tensor.reshape(-1, d), self.nbits, min(self.q_group_size, d), symmetric=False)
        scale, zero = scale.view(*lead, -1), zero.view(*lead, -1)
        factors = None
        if self.attend is not None and d >= FACTORS_MIN_HEAD_DIM:  # what packed_attention applies: s and s z
            factors = torch.cat([scale.to(tensor.dtype), scale.to(tensor.dtype) * zero], dim=-1)
        return PackedStates(pack(q, self.nbits).view(*lead, -1), scale, zero, factors)

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
        if self.packed is not None and self._hand_over(key_states):
            _pending.step = _Step(self, self.packed, keys, values)  # the window only is returned
        elif self.packed is not None:
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

    def _hand_over(self, key_states: torch.Tensor) -> bool:
        """Whether this step's attention reads the packed past itself: a one-token step of a model
        whose attention is (still) ATTENTION."""
        return self.attend is not None and key_states.shape[-2] == 1 and self.attend._attn_implementation == ATTENTION

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
        """Bytes held, as stored: packed codes + float16 scales + uint8 zeros (+ the derived factors where
        attention reads the codes) + the full-precision residual window, and the attention workspace
        where this layer allocated it."""
        if not self.is_initialized:
            return 0
        packed = self.packed.nbytes if self.packed is not None else 0
        return packed + self.keys.nbytes + self.values.nbytes + self.workspace.nbytes(self)


# --- attention over the packed past ------------------------------------------------------------

ATTENTION = "frugalm_packed_kv"
"""The attention implementation of a model decoding with a packed cache (make_cache switches an sdpa
model to it): a one-token step attends over the packed past without dequantizing it
(`_packed_step_attention`); every other call goes to transformers' sdpa unchanged, masks included."""

_pending = threading.local()
"""The hand-over from a layer's `update` to the attention call that follows it in the same module."""


class Workspace:
    """A float buffer the layers of one cache share for their attention steps, kept between steps.

    Reused because a fresh multi-MiB tensor per layer and step costs page faults (here, in a VM:
    ~0.6 ms for the 135M stand-in's 1,536-token layer, more than the attention itself). Grown in
    steps of 1.5x; the layer whose step grew it counts its bytes (cache_bytes), so a cache's bytes
    include it once."""

    def __init__(self):
        self.buffer, self.owner, self.view = None, None, None

    def take(self, shape: tuple[int, ...], like: torch.Tensor, layer) -> torch.Tensor:
        if self.view is not None and self.view.shape == shape and self.view.dtype == like.dtype:
            return self.view  # the layers after the first in a step
        n = math.prod(shape)
        if self.buffer is None or self.buffer.numel() < n or self.buffer.dtype != like.dtype:
            self.buffer, self.owner = like.new_empty(max(n, int(1.5 * n) if self.buffer is not None else n)), layer
        self.view = self.buffer[:n].view(shape)
        return self.view

    def nbytes(self, layer) -> int:
        return self.buffer.nbytes if self.owner is layer else 0


@dataclass
class _Step:
    layer: PackedKVLayer
    past: PackedStates
    keys: torch.Tensor  # the full-precision window `update` returned, (B, H, R, D)
    values: torch.Tensor


def _packed_step_attention(step: _Step, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """(B, 1, Hq, D): softmax(q k^T * scaling + mask) v over [packed past, window] for one query token.

    One group per head vector: a past token's key is k = s (c - z), so q . k = s (q . c) - s z sum(q).
    The codes are cast into the workspace (one pass; dequantizing was three) beside the window, one
    matmul scores all keys, and the scales correct the past's scores in place; values likewise,
    sum_t p s (c - z) = (p s) @ c - sum_t p s z. Written for few ops, each costing ~10 us of
    dispatch here: ~17 in all, against the dequantizing path's ~16 plus two full passes and SDPA
    (whose grouped-head CPU kernel was also slower than these matmuls for one query row).
    """
    past, layer = step.past, step.layer
    b, hq, _, d = query.shape
    h, s, r = past.codes.shape[2], past.tokens, step.keys.shape[-2]
    rep = hq // h
    if query.dtype == torch.float32 and query.device.type == "cpu" and cpu_kernels.available():
        return _codes_step_attention(step, query.view(b, h, rep, d) * scaling, mask).view(b, hq, 1, d).transpose(1, 2)
    buf = layer.workspace.take((2, b, h, s + r, d), query, layer)
    _codes_into(buf[..., :s, :], past.codes, layer.nbits)
    buf[0, ..., s:, :].copy_(step.keys)
    buf[1, ..., s:, :].copy_(step.values)
    if past.factors is not None:
        factors = past.factors.transpose(-1, -2)  # (2, B, H, 2, S)
        scale, shift = factors[..., :1, :], factors[..., 1:, :]  # s and s z, (2, B, H, 1, S)
    else:
        scale = past.scales.to(query.dtype).transpose(-1, -2)
        shift = scale * past.zeros.transpose(-1, -2)
    q = query.view(b, h, rep, d) * scaling
    scores = q @ buf[0].transpose(-1, -2)  # (B, H, rep, S + R)
    scores[..., :s].mul_(scale[0]).addcmul_(q.sum(-1, keepdim=True), shift[0], value=-1)
    if mask is not None:  # (B, 1 or Hq, 1, S + R): bool (True: attend) or additive
        mask = mask.reshape(b, h if mask.shape[1] > 1 else 1, -1, mask.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = scores.softmax(-1)
    correction = p[..., :s] @ shift[1].transpose(-1, -2)  # (B, H, rep, 1)
    p[..., :s].mul_(scale[1])
    return (p @ buf[1]).sub_(correction).view(b, hq, 1, d).transpose(1, 2)


def _codes_step_attention(step: _Step, q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, H, rep, D): `_packed_step_attention` in one call of frugalm's CPU kernel, which scores and
    mixes the codes as bytes (cpu_kernels.codes_attention): no workspace, no cast pass, no small
    ops. Same algebra; q is already scaled, (B, H, rep, D)."""
    past = step.past
    if past.factors is not None:  # (2, B, H, S, 2): s and s z, in the model's dtype (float32 here)
        scale, shift = past.factors[..., 0], past.factors[..., 1]
    else:  # one group per head vector
        scale = past.scales[..., 0].float()
        shift = scale * past.zeros[..., 0]
    if mask is not None:  # (B, 1 or Hq, 1, S + R) -> additive float (B, 1 or H, 1 or rep, S + R)
        b, h = q.shape[:2]
        mask = mask.reshape(b, h if mask.shape[1] > 1 else 1, -1, mask.shape[-1])
        mask = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask.float()
    return torch.ops.frugalm.codes_attention(
        q, past.codes, scale, shift, step.keys, step.values, mask, step.layer.nbits
    )


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered ATTENTION function: the packed path for a step `update` handed over, else sdpa."""
    step, _pending.step = getattr(_pending, "step", None), None
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if step is None or step.keys is not key:  # no packed past (or a stale hand-over): plain sdpa
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    kv = step.past.tokens + key.shape[-2]
    plain = (
        query.shape[2] == 1 and not (dropout and module.training)
        and (attention_mask is None or attention_mask.shape[-1] == kv)
        and not any(kwargs.get(k) is not None for k in ("softcap", "sliding_window", "s_aux", "position_bias"))
    )  # fmt: skip
    if not plain:  # anything else attends over the dequantized past, as before
        past, bits = step.past, step.layer.nbits
        key = _dequantized_cat(past.codes[0], past.scales[0], past.zeros[0], key, bits)
        value = _dequantized_cat(past.codes[1], past.scales[1], past.zeros[1], value, bits)
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _packed_step_attention(step, query, attention_mask, scaling), None


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks sdpa gets


def _attend_packed(model: nn.Module, kv: dict) -> PretrainedConfig | None:
    """The text config whose ATTENTION reads the packed past on one-token steps, switching an sdpa model
    to it (ATTENTION behaves as sdpa for everything else); None where the dequantizing path stays: a
    group smaller than a head vector, or a model on eager/flash attention or one that does not go
    through transformers' attention interface."""
    cfg = _text_config(model)
    if kv["group_size"] < head_dim(model):
        return None
    if cfg._attn_implementation == "sdpa" and getattr(model, "_supports_attention_backend", False):
        model.set_attn_implementation(ATTENTION)
    return cfg if cfg._attn_implementation == ATTENTION else None


def kernel(model: nn.Module, kv: dict) -> str:
    """How this model's attention reads its packed cache (the benchmark's protocol records it)."""
    dequantized = "the past dequantized in place beside the full-precision window, then the model's attention"
    if _text_config(model)._attn_implementation != ATTENTION:
        return f"{dequantized}, at every step"
    how = ("frugalm's CPU kernel, which scores and mixes the codes as bytes" if cpu_kernels.available()
           else "cast once")  # fmt: skip
    return (f"one-token steps: attention over the packed codes ({how}; scales applied to the scores and "
            f"probabilities; runtime/kv_cache.packed_attention); longer steps: {dequantized}")  # fmt: skip


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
        attend = _attend_packed(model, kv)
        shared = Workspace()
        return Cache(layers=[
            PackedKVLayer(kv["bits"], kv["group_size"], kv["residual_length"], attend, shared) for _ in range(n_layers)
        ])  # fmt: skip
    if settings.get(compiled.SETTING):
        return compiled.static_cache(model, max_tokens)
    return None


def cache_factory(model: nn.Module, settings: dict | None = None) -> Callable[[int], Cache] | None:
    """A maker of fresh caches for `model`, given the tokens per sequence each must hold (settings
    default to the model's own); None when it runs with the default cache."""
    settings = inference_settings(model) if settings is None else settings
    if not (settings.get("kv_cache") or settings.get(compiled.SETTING)):
        return None
    if settings.get("kv_cache"):
        _attend_packed(model, settings["kv_cache"])  # settled before anyone measures
    return lambda max_tokens: make_cache(model, settings, max_tokens)
