"""KV-cache quantization at inference time: keys and values cached as packed int8 or int4 codes.

In the spirit of KIVI (Liu et al. 2024, arXiv:2402.02750): the newest `residual_length` tokens
of each layer (and up to 15 more between flushes) stay in full precision; older ones are stored
quantized and dequantized on the fly when attention reads them. It helps where the cache, not
the weights, fills memory: long contexts and large batches. Bytes per cached head vector against
float32 (one group per head): int8 0.34x at head_dim 8, 0.30x at 16, 0.26x at 64; int4 0.22x,
0.19x, 0.14x. Needs no calibration data.

Layout (`PackedKVLayer`): keys and values alike are quantized per token, in groups of
`group_size` consecutive channels of one head vector (a group never spans heads; a group_size
>= head_dim gives one group per head vector). Asymmetric round-to-nearest with the weight
helpers of `quant_pack`: codes packed (int8: one per byte, int4: two per byte), one float16
scale and one uint8 zero point per group. Per-token grouping lets tokens be appended as they
leave the residual window without re-quantizing the past. KIVI quantizes keys per channel
(groups along the token axis) because a few key channels carry outliers; that matters at 2 bits
and is not done here.

`apply` changes no weight: it records the inference setting on the model (see
`frugalm.models.inference_settings`), which `save_variant` writes into frugalm.json as
`"inference": {"kv_cache": {...}}` and `load_model` restores. Whoever runs the model asks
`cache_factory(model)` for a fresh cache per sequence batch (the benchmark's timed generation and
its perplexity passes do). Dequantizing the past costs time every decode step: on CPU this saves
memory, not time; no fused low-bit attention kernel is used. Greedy/sampled decoding only: the
cache cannot be cropped (assisted decoding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.cache_utils import Cache, QuantizedLayer

from frugalm.models import INFERENCE_ATTR, inference_settings
from frugalm.techniques.base import Context, Technique, TechniqueError, record_change
from frugalm.techniques.quant_pack import dequantize_groups, pack, quantize_groups, unpack


@dataclass(frozen=True, kw_only=True)
class KVCacheQuantConfig:
    bits: Literal[4, 8] = 8
    """Bits per cached key/value: 8 (near lossless) or 4 (packed two per byte)."""
    group_size: int = 64
    """Channels of one head vector sharing a scale and zero point; must divide head_dim, or be >= head_dim (one group per head vector)."""
    residual_length: int = 128
    """Newest tokens per layer always kept in full precision (older ones leave in blocks of 16, see FLUSH_TOKENS)."""

    def problems(self) -> list[str]:
        problems = []
        if self.bits not in (4, 8):
            problems.append(f"bits must be 4 or 8 (the packed formats), got {self.bits!r}")
        if self.group_size < 1:
            problems.append(f"group_size must be a positive number of channels (e.g. 32 or 64), got {self.group_size}")
        if self.residual_length < 0:
            problems.append(f"residual_length must be 0 or more tokens (e.g. 128), got {self.residual_length}")
        return problems


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
        return PackedStates(*(torch.cat([a, b], dim=2) for a, b in ((self.codes, other.codes), (self.scales, other.scales), (self.zeros, other.zeros))))

    def select(self, batch_idx: torch.Tensor) -> PackedStates:
        return PackedStates(self.codes.index_select(0, batch_idx), self.scales.index_select(0, batch_idx), self.zeros.index_select(0, batch_idx))


class PackedKVLayer(QuantizedLayer):
    """One layer's cache: packed codes for old tokens, full precision for the newest `residual_length`.

    `update` is append-only (the parent class re-quantizes the whole past at every flush and
    quantizes a prompt whole, keeping no recent tokens in full precision): the states passed in
    are attended in full precision at their own step, then join the residual window; once the
    window is FLUSH_TOKENS past `residual_length`, its oldest tokens are quantized (once) and
    appended to the packed storage.
    """

    is_croppable = False

    def __init__(self, bits: int, group_size: int, residual_length: int):
        # axis -1: groups run along head_dim, one token at a time, for keys and values alike.
        super().__init__(nbits=bits, axis_key=-1, axis_value=-1, q_group_size=group_size, residual_length=residual_length)

    def _quantize(self, tensor: torch.Tensor, axis: int) -> PackedStates:
        assert axis == -1
        b, h, s, d = tensor.shape  # (batch, kv_heads, tokens, head_dim)
        q, scale, zero = quantize_groups(tensor.reshape(b * h * s, d), self.nbits, min(self.q_group_size, d), symmetric=False)
        return PackedStates(pack(q, self.nbits).view(b, h, s, -1), scale.view(b, h, s, -1), zero.view(b, h, s, -1))

    def _dequantize(self, q: PackedStates) -> torch.Tensor:
        b, h, s, _ = q.codes.shape
        codes = unpack(q.codes.reshape(b * h * s, -1), self.nbits)
        return dequantize_groups(codes, q.scales.reshape(b * h * s, -1), q.zeros.reshape(b * h * s, -1), self.dtype).view(b, h, s, -1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
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

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self._quantized_keys is not None:
            self._quantized_keys, self._quantized_values = self._quantized_keys.select(idx), self._quantized_values.select(idx)

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
        raise TechniqueError(f"{where}: group_size {group_size} does not divide head_dim {d}; use a divisor of {d} ({valid}) or any value >= {d} for one group per head vector")
    if bits == 4 and d % 2:
        raise TechniqueError(f"{where}: int4 packs two values per byte, but head_dim {d} is odd; use bits 8")
    layer_types = set(getattr(_text_config(model), "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise TechniqueError(f"{where}: the model has {sorted(layer_types - {'full_attention'})} layers; only full-attention caches can be quantized here, use a model without sliding-window or linear-attention layers")


def make_cache(model: nn.Module, settings: dict) -> Cache | None:
    """A fresh cache for one generation as `settings` ({"kv_cache": {...}}) says; None: the model's default cache."""
    kv = settings.get("kv_cache")
    if not kv:
        return None
    check_fits(model, kv["bits"], kv["group_size"], "kv_cache setting")
    n_layers = _text_config(model).num_hidden_layers
    return Cache(layers=[PackedKVLayer(kv["bits"], kv["group_size"], kv["residual_length"]) for _ in range(n_layers)])


def cache_factory(model: nn.Module, settings: dict | None = None) -> Callable[[], Cache] | None:
    """A maker of fresh caches for `model` (settings default to the model's own); None when it runs with the default cache."""
    settings = inference_settings(model) if settings is None else settings
    if not settings.get("kv_cache"):
        return None
    return lambda: make_cache(model, settings)


# --- the technique ------------------------------------------------------------------------------


def apply(model: nn.Module, config: KVCacheQuantConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    problems = config.problems()
    if problems:
        raise TechniqueError(f"{name}: " + "; ".join(problems))
    check_fits(model, config.bits, config.group_size, name)
    attention = [n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    if not attention:
        raise TechniqueError(f"{name}: found no attention module (a class named *Attention) in {type(model).__name__}; this model's cache cannot be quantized here")
    d = head_dim(model)
    kv = {"bits": config.bits, "group_size": config.group_size, "residual_length": config.residual_length}
    setattr(model, INFERENCE_ATTR, {**inference_settings(model), "kv_cache": kv})
    group = min(config.group_size, d)
    float32_bytes, quant_bytes = d * 4, d * config.bits // 8 + (d // group) * 3  # per cached head vector
    record_change(ctx, name, attention, 0, model, inference={"kv_cache": kv}, head_dim=d, group_size_effective=group,
                  bytes_per_head_vector_float32=float32_bytes, bytes_per_head_vector_quantized=quant_bytes, kv_bytes_ratio=quant_bytes / float32_bytes)
    return model


TECHNIQUE = Technique(name="kv_cache_quant", config_cls=KVCacheQuantConfig, apply=apply, kind="quantization", needs_calibration=False)
