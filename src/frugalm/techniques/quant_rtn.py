"""Round-to-nearest weight-only quantization (RTN; the baseline of GPTQ and AWQ).

Each targeted Linear (or GPT-2 Conv1D) weight (out, in) is cut into groups of `group_size`
input columns per output row (or one group per row: per-channel), each group gets a scale (and
a zero point when asymmetric), and every weight is rounded to the nearest code. The layer is
replaced by a `QuantLinear` holding the packed codes: int8 ≈ 0.26x and int4 group 128 ≈ 0.13x
the float32 bytes. Needs no calibration data and takes seconds.

Does not look at activations: at 8 bits that costs almost nothing; at 4 bits per-channel it
can hurt small models badly, which is what GPTQ (error feedback) and AWQ (activation-aware
scaling) recover. Format (`activations`, see quant_pack): weight-only w8a16/w4a16 layers compute
by dequantizing, so they save memory and storage, not time, and export to compressed-tensors;
`activations: dynamic-int8` makes int8 per-channel symmetric layers w8a8-dynamic, which
`load_model` runs on fbgemm's int8 kernel on x86 CPUs (speed), at the price of the quality lost
to quantizing each input tensor, and which does not export.

The shape checks, module swap and byte accounting here are shared by `quant_gptq` and `quant_awq`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.experts import BANK_WEIGHTS, QuantExperts
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings, weight_out_in
from frugalm.runtime.quant_linear import QuantLinear, format_name, quantize_groups
from frugalm.techniques._arch import DEFAULT_TARGETS
from frugalm.techniques.base import Context, Technique, check_config, record_change, select_banks, select_linears


@dataclass(frozen=True, kw_only=True)
class WeightQuantOptions:
    """The options every weight quantization technique shares (rtn_quant, gptq_quant, awq_quant)."""

    bits: Literal[4, 8] = 8
    """Bits per weight: 8 (near lossless) or 4 (packed two per byte)."""
    group_size: int = -1
    """Input columns sharing one scale; -1: one scale per output channel. Must divide in_features."""
    symmetric: bool = True
    """Zero point fixed at the middle code (needed by the fbgemm int8 kernel); False: per-group zero point."""
    activations: Literal["none", "dynamic-int8"] = "none"
    """none: weight-only, format w8a16 (w4a16 at 4 bits): float activations, dequantized weights; exports to compressed-tensors. dynamic-int8: format w8a8-dynamic: each input tensor is quantized on the fly as fbgemm does (one range per tensor, codes 0..127) and x86 CPUs run fbgemm's int8 matmul: the fast CPU path, with that activation rounding's quality cost; not exportable. Needs bits 8, group_size -1, symmetric true."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """fnmatch patterns over module names; the output head is excluded unless named."""
    indivisible: Literal["per_channel", "error"] = "per_channel"
    """A layer whose in_features group_size does not divide: per_channel (that layer gets one scale per output channel, as llama.cpp gives such tensors another type; the record lists them as per_channel_layers), so one group size serves models of any width; or error (refuse, naming the layer)."""

    def problems(self) -> list[str]:
        return quant_problems(self.bits, self.group_size, self.activations, self.symmetric)

    def group_for(self, in_features: int) -> int:
        """The group size a layer of `in_features` columns gets: group_size, or -1 where it does not divide and `indivisible` allows."""
        g = self.group_size
        return -1 if g > 0 and in_features % g and self.indivisible == "per_channel" else g


@dataclass(frozen=True, kw_only=True)
class RTNQuantConfig(WeightQuantOptions):
    """Round-to-nearest takes the shared options only."""


# --- shared by the weight quantization techniques -----------------------------------------------


def quant_problems(bits: int, group_size: int, activations: str = "none", symmetric: bool = True) -> list[str]:
    """Rules on bits, group_size and the format that need no model."""
    problems = []
    if bits not in (4, 8):
        problems.append(f"bits must be 4 or 8 (the packed formats), got {bits!r}")
    if group_size == 0 or group_size < -1:
        problems.append(
            f"group_size must be -1 (per output channel) or a positive divisor of in_features (e.g. 128), got {group_size}"
        )
    if activations == "dynamic-int8" and (bits, group_size, symmetric) != (8, -1, True):
        needs = [
            need
            for need, ok in (("bits 8", bits == 8), ("group_size -1", group_size == -1), ("symmetric true", symmetric))
            if not ok
        ]
        problems.append(
            f"activations dynamic-int8 (format w8a8-dynamic, fbgemm's kernel) needs {', '.join(needs)}; or use activations none (weight-only, w8a16 / w4a16)"
        )
    return problems


def quant_targets(
    technique: str, config: WeightQuantOptions, model: nn.Module, *, experts: bool = False
) -> list[tuple[str, nn.Module]]:
    """The layers a weight quantization config targets in `model`, after every check that needs no calibration.

    `experts`: the technique quantizes banks of experts too (expert_targets), so targets covering them are allowed."""
    check_config(technique, config)
    layers = select_linears(model, config.targets, technique=technique, experts=experts)
    check_widths(technique, [(n, weight_out_in(m).shape[1]) for n, m in layers], config.bits, config.group_for)
    return layers


def expert_targets(technique: str, config: WeightQuantOptions, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The float banks of experts `config.targets` covers, checked like linear layers, each weight per expert."""
    banks = select_banks(model, config.targets, technique)
    if banks and config.activations != "none":
        raise TechniqueError(
            f"{technique}: experts are stored weight-only (w{config.bits}a16); activations {config.activations} applies to "
            "linear layers only: use activations none, or leave the experts out of `targets` (e.g. ['*.self_attn.*'])"
        )
    widths = [(f"{n}.{w}", getattr(b, w).shape[2]) for n, b in banks for w in BANK_WEIGHTS]
    check_widths(technique, widths, config.bits, config.group_for)
    return banks


def quantize_bank(bank: nn.Module, bits: int, codes_of) -> QuantExperts:
    """A bank as packed experts: `codes_of(weight name, expert, w (out, in))` gives each expert's (q, scale, zero)."""
    codes = {w: [codes_of(w, e, getattr(bank, w)[e]) for e in range(bank.num_experts)] for w in BANK_WEIGHTS}
    return QuantExperts.from_codes(bank, codes, bits)


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def check_widths(technique: str, widths: list[tuple[str, int]], bits: int, group_for) -> None:
    """Every weight's in_features (given as (name, in_features)) must split into groups
    (`group_for(in_features)` columns; and be even for int4); name the first that does not."""
    for name, in_features in widths:
        group_size = group_for(in_features)
        if group_size > 0 and in_features % group_size:
            valid = ", ".join(str(d) for d in _divisors(in_features)[:12])
            raise TechniqueError(
                f"{technique}: group_size {group_size} does not divide in_features {in_features} of layer '{name}'; use -1 (per channel), a group size dividing {in_features} ({valid}), indivisible: per_channel, or narrow `targets`"
            )
        if bits == 4 and in_features % 2:
            raise TechniqueError(
                f"{technique}: int4 packs two weights per byte, but layer '{name}' has odd in_features {in_features}; use bits 8 or leave it out of `targets`"
            )


def group_details(
    config: WeightQuantOptions, layers: list[tuple[str, nn.Module]], banks: list[tuple[str, nn.Module]] = ()
) -> dict:
    """group_size for the record, the layers (and expert weights) it did not divide (quantized per
    channel) if any, and the banks of experts quantized."""
    widths = [(n, weight_out_in(m).shape[1]) for n, m in layers]
    widths += [(f"{n}.{w}", getattr(b, w).shape[2]) for n, b in banks for w in BANK_WEIGHTS]
    fallback = [n for n, width in widths if config.group_for(width) != config.group_size]
    experts = {"expert_banks": [n for n, _ in banks], "experts_per_bank": banks[0][1].num_experts} if banks else {}
    return {"group_size": config.group_size, **({"per_channel_layers": fallback} if fallback else {}), **experts}


def replace_module_(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is (setattr on its parent).

    Replacing an output head that is tied to the input embedding unties them: the embedding
    keeps its float weights for lookups, the head gets its own (quantized) copy, and the
    config says so, so the artifact saves and reloads both.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and model.get_submodule(name) is head and getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quant_linear(module: nn.Module, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> QuantLinear:
    """A QuantLinear from codes q (out, in), scale and zero (out, groups), keeping `module`'s bias and device."""
    return QuantLinear.from_codes(q, scale, zero, bits, module.bias).to(module.weight.device)


def stored_bytes(module: nn.Module) -> int:
    """Bytes of a quantized layer's (or bank's) weights: packed codes + float16 scales + uint8 zero points."""
    return sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))


class ByteCount:
    """Float32 bytes of the original weights against the bytes stored for them once quantized."""

    def __init__(self) -> None:
        self.layers = self.params = self.float32_bytes = self.quant_bytes = 0

    def add(self, params: int, quantized: nn.Module) -> None:
        self.layers += 1
        self.params += params
        self.float32_bytes += params * 4
        self.quant_bytes += stored_bytes(quantized)

    def details(self) -> dict:
        return {
            "weight_bytes_float32": self.float32_bytes,
            "weight_bytes_quantized": self.quant_bytes,
            "weight_bytes_ratio": self.quant_bytes / max(1, self.float32_bytes),
        }


def set_format_(model: nn.Module, layers: list[str], bits: int, activations: str) -> str:
    """Give the quantized `layers` their activations and list them under their format in the
    model's inference settings (saved in frugalm.json as inference.linear_formats, read back by
    load_model to pick each layer's kernel). Returns the format's name."""

    fmt = format_name(bits, activations)
    for name in layers:
        model.get_submodule(name).activations = activations
    settings = inference_settings(model)
    formats = {f: [n for n in names if n not in layers] for f, names in settings.get("linear_formats", {}).items()}
    formats[fmt] = [*formats.get(fmt, []), *layers]
    setattr(model, INFERENCE_ATTR, {**settings, "linear_formats": {f: names for f, names in formats.items() if names}})
    return fmt


def record_quant_change(
    ctx: Context,
    technique: str,
    layers: list[str],
    count: ByteCount,
    model: nn.Module,
    *,
    bits: int,
    activations: str,
    **details,
) -> None:
    """Set the layers' format (set_format_), then record_change with it and the byte counts of the quantized layers."""
    fmt = set_format_(model, layers, bits, activations)
    record_change(
        ctx,
        technique,
        layers,
        count.params,
        model,
        bits=bits,
        activations=activations,
        format=fmt,
        **details,
        **count.details(),
    )


# --- the technique ------------------------------------------------------------------------------


@torch.no_grad()
def apply(model: nn.Module, config: RTNQuantConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    layers = quant_targets(name, config, model, experts=True)
    banks = expert_targets(name, config, model)
    count = ByteCount()
    for i, (layer_name, module) in enumerate(layers):
        w = weight_out_in(module)  # (out, in)
        q, scale, zero = quantize_groups(w, config.bits, config.group_for(w.shape[1]), config.symmetric)
        new = quant_linear(module, q, scale, zero, config.bits)
        count.add(w.numel(), new)
        replace_module_(model, layer_name, new)
        ctx.report(name, i + 1, len(layers) + len(banks))
    for i, (bank_name, bank) in enumerate(banks):
        new = quantize_bank(
            bank,
            config.bits,
            lambda _, e, w: quantize_groups(w, config.bits, config.group_for(w.shape[1]), config.symmetric),
        )
        count.add(new.packed_params(), new)
        replace_module_(model, bank_name, new)
        ctx.report(name, len(layers) + i + 1, len(layers) + len(banks))
    record_quant_change(
        ctx,
        name,
        [n for n, _ in layers + banks],
        count,
        model,
        bits=config.bits,
        activations=config.activations,
        symmetric=config.symmetric,
        **group_details(config, layers, banks),
    )
    return model


TECHNIQUE = Technique(
    name="rtn_quant", config_cls=RTNQuantConfig, apply=apply, kind="quantization", needs_calibration=False
)
