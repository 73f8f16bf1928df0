"""KV-cache quantization at inference time: keys and values cached as packed int8 or int4 codes.

In the spirit of KIVI (Liu et al. 2024, arXiv:2402.02750): the newest `residual_length` tokens
of each layer (and up to 15 more between flushes) stay in full precision; older ones are stored
quantized, and attention reads them packed or dequantized on the fly. It helps where the cache, not
the weights, fills memory: long contexts and large batches. Bytes per cached head vector against
float32 (one group per head): int8 0.34x at head_dim 8, 0.30x at 16, 0.26x at 64 (0.29x with the
8 bytes of float factors head vectors of 32 or more keep for attention over the codes); int4
0.22x, 0.19x, 0.14x (0.17x). Decode steps over the codes add a float workspace of one layer's
keys and values, shared by the layers and counted with the cache (1/n_layers of the float
cache, up to 1.5x that as it grows). Needs no calibration data.

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
its perplexity passes do). A decode step attends over the packed codes directly (cast once into a
workspace the layers share, scales applied to the scores and probabilities:
runtime/kv_cache.packed_attention) when the group spans the head vector and the model runs sdpa;
otherwise, and for multi-token steps, attention reads the past dequantized in place beside the
full-precision window (runtime/kv_cache._dequantized_cat). The cache crops (assisted decoding, the
benchmark's step-and-restore) without re-quantizing anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.kv_cache import check_fits, head_dim
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class KVCacheQuantConfig:
    bits: Literal[4, 8] = 8
    """Bits per cached key/value: 8 (near lossless) or 4 (packed two per byte)."""
    group_size: int = 64
    """Channels of one head vector sharing a scale and zero point; must divide head_dim, or be >= head_dim (one group per head vector, which also lets decode steps attend over the codes directly)."""
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


# --- the technique ------------------------------------------------------------------------------


def apply(model: nn.Module, config: KVCacheQuantConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    check_fits(model, config.bits, config.group_size, name)
    if inference_settings(model).get("compiled_decode"):
        raise TechniqueError(
            f"{name}: this variant decodes compiled (compile_decode) on a static cache, which cannot hold packed codes; drop one of the two stages"
        )
    attention = [n for n, m in model.named_modules() if type(m).__name__.endswith("Attention")]
    if not attention:
        raise TechniqueError(
            f"{name}: found no attention module (a class named *Attention) in {type(model).__name__}; this model's cache cannot be quantized here"
        )
    d = head_dim(model)
    kv = {"bits": config.bits, "group_size": config.group_size, "residual_length": config.residual_length}
    setattr(model, INFERENCE_ATTR, {**inference_settings(model), "kv_cache": kv})
    group = min(config.group_size, d)
    float32_bytes, quant_bytes = d * 4, d * config.bits // 8 + (d // group) * 3  # per cached head vector
    record_change(
        ctx,
        name,
        attention,
        0,
        model,
        inference={"kv_cache": kv},
        head_dim=d,
        group_size_effective=group,
        bytes_per_head_vector_float32=float32_bytes,
        bytes_per_head_vector_quantized=quant_bytes,
        kv_bytes_ratio=quant_bytes / float32_bytes,
    )
    return model


TECHNIQUE = Technique(
    name="kv_cache_quant", config_cls=KVCacheQuantConfig, apply=apply, kind="quantization", needs_calibration=False
)
