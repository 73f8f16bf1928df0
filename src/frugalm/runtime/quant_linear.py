"""Packed low-bit weights: the storage every weight-only quantization technique writes.

A quantized Linear keeps, per output row and per group of `group_size` input columns, unsigned
integer codes q in [0, 2^bits) with a scale s and a zero point z, so that w ≈ (q - z) * s.
Symmetric quantization is the special case z = 2^(bits-1). Codes are packed: int8 one per
byte, int4 two per byte (low nibble = even column). Scales are float16, zero points uint8.
Bytes per weight: int8 per-channel ≈ 1 + 3/in_features; int4 group 128 ≈ 0.5 + 3/128.

Each quantized layer has a *format*, which says how it computes, not only what it stores:

- `w8a16` / `w4a16` (activations "none"): weight-only. Activations stay float; the weights are
  dequantized for a float matmul. What compressed-tensors' weight-only schemes describe (export).
- `w8a8-dynamic` (activations "dynamic-int8"; int8 per-channel symmetric only): each forward
  quantizes its input on the fly the way fbgemm's `linear_dynamic` does: one asymmetric scale
  and zero point for the whole input tensor (all tokens of the batch), codes 0..127 (fbgemm's
  reduce_range, which keeps its uint8 x int8 products from saturating), then an int8 x int8
  matmul. Coarser than the per-token W8A8 schemes of compressed-tensors/vLLM, so it is never
  exported as one of them.

`QuantLinear` is the module holding that storage. It computes by unpacking to the activation
dtype and calling a dense matmul: correct everywhere, faster nowhere (`kernel = "dequantize"`);
a w8a8-dynamic QuantLinear quantizes its input first (an emulation of fbgemm: same numerics, no
speed). `Int8Linear` runs fbgemm's int8 matmul instead (`kernel = "fbgemm"`): a real speed
kernel on x86 CPUs, used for w8a8-dynamic layers. `PackedWeightLinear` runs the weight-only
formats on CPU kernels: int4 on ATen's `_weight_int4pack_mm_for_cpu`, int8 on frugalm's
`int8_rows` (same contract and rounding as ATen's `_weight_int8pack_mm`, which it falls back to
where it cannot be built; see cpu_kernels.py for why), packed at load time from the stored
codes so artifacts stay portable. Those kernels are fast only with bfloat16 activations, so a
fast weight-only layer computes in bfloat16 (16-bit activations, as the format's name says) and
returns the model's dtype; its quality is measured that way. Inside a compiled decode graph a
small layer (at most `SMALL_LAYER_WEIGHTS` weights) skips the packed kernel: its int8-held codes
become one fused multiply-and-sum loop in the model's dtype (`fused_rows`), where the kernel's
call and conversions cost more than its bytes save. A small
weight-only layer the packed kernels refuse (say 172 rows) is a `CodesLinear`: int8-held codes,
dequantized per call, the same fused loop when compiled. `fast_layer` chooses, `to_fast_kernels_`
swaps them all in.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.runtime import cpu_kernels

ACTIVATIONS = ("none", "dynamic-int8")
"""How a quantized layer treats its input: float (weight-only) or quantized per forward (fbgemm's dynamic int8)."""
W8A8_DYNAMIC = "w8a8-dynamic"
REDUCED_RANGE_QMAX = 127
"""fbgemm's dynamic activation codes span 0..127 (reduce_range), not 0..255."""


def format_name(bits: int, activations: str) -> str:
    """The format of a quantized layer: w8a8-dynamic, w8a16 or w4a16."""
    return W8A8_DYNAMIC if activations == "dynamic-int8" else f"w{bits}a16"


def dynamic_int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x quantized and dequantized as fbgemm's linear_dynamic does (see module doc), with a straight-through gradient.

    One range for the whole tensor, widened to include 0; zero point nudged to an integer.
    """
    xf = x.detach().float()
    lo, hi = xf.min().clamp(max=0), xf.max().clamp(min=0)
    scale = float((hi - lo) / REDUCED_RANGE_QMAX)
    if scale == 0.0 or math.isinf(1.0 / scale):
        scale = 0.1  # fbgemm's fallback for an all-zero input
    zero = min(max(round(-float(lo) / scale), 0), REDUCED_RANGE_QMAX)
    q = torch.round(xf / scale + zero).clamp_(0, REDUCED_RANGE_QMAX)
    xq = ((q - zero) * scale).to(x.dtype)
    return x + (xq - x).detach()


def range_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-exact, as float32) and zero point for value ranges [lo, hi] (symmetric: hi = absmax).

    The symmetric grid spans codes -2^(b-1) .. 2^(b-1)-1 around z = 2^(b-1), with
    scale = absmax / ((2^b - 1) / 2): int4 absmax/7.5, int8 absmax/127.5, as compressed-tensors
    (llm-compressor's format) does, so both tools round the same weights to the same codes.
    """
    qmax = 2**bits - 1
    if symmetric:
        scale = hi.clamp(min=1e-8) / (qmax / 2)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale.half().float(), zero  # the stored precision, so codes are chosen against it


def quantize_groups(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes of w (out, in): (q uint8 (out, in), scale (out, G), zero (out, G))."""
    out_f, in_f = w.shape
    g = in_f if group_size <= 0 else group_size
    wg = w.float().reshape(out_f, in_f // g, g)  # (out, G, g)
    hi = wg.abs().amax(-1) if symmetric else wg.amax(-1)
    scale, zero = range_params(-hi if symmetric else wg.amin(-1), hi, bits, symmetric)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, 2**bits - 1)
    return q.reshape(out_f, in_f).to(torch.uint8), scale.half(), zero.to(torch.uint8)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = (q.reshape(out_f, groups, in_f // groups).to(dtype) - zero[..., None].to(dtype)) * scale[..., None].to(dtype)
    return w.reshape(out_f, in_f)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.contiguous()
    assert bits == 4 and q.shape[1] % 2 == 0
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # (out, in/2)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2], out[:, 1::2] = packed & 0x0F, packed >> 4
    return out


class QuantLinear(nn.Module):
    """A Linear whose weight is stored packed (see module doc); computes via dequantization."""

    kernel = "dequantize"

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.activations = "none"  # or "dynamic-int8" (w8a8-dynamic); saved in frugalm.json (inference.linear_formats)
        self.group_size = in_features if group_size <= 0 else group_size
        groups = in_features // self.group_size
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device)
        )
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_codes(cls, q, scale, zero, bits: int, bias: torch.Tensor | None) -> QuantLinear:
        out_f, in_f = q.shape
        m = cls(in_f, out_f, bits, in_f // scale.shape[1], bias is not None, device=q.device)
        m.qweight.copy_(pack(q, bits))
        m.scales.copy_(scale)
        m.zeros.copy_(zero)
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def packed_params(self) -> int:
        """Weights held as packed codes (buffers, which `parameters()` does not count)."""
        return self.in_features * self.out_features

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_groups(unpack(self.qweight, self.bits), self.scales, self.zeros, dtype)

    @property
    def format(self) -> str:
        return format_name(self.bits, self.activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if self.activations == "dynamic-int8":
            x = dynamic_int8_activations(x)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, format={self.format}, kernel={self.kernel}"


class Int8Linear(nn.Module):
    """A w8a8-dynamic layer run by fbgemm's dynamic-quantized matmul (x86 CPU).

    Activations are quantized on the fly, one range per input tensor, codes 0..127 (see module
    doc); the int8 x int8 product accumulates in int32 and is rescaled to float32. The packed
    weight lives inside an fbgemm object that `parameters()` cannot see, so `weight_bytes()`
    reports it.
    """

    kernel = "fbgemm"
    format = W8A8_DYNAMIC
    activations = "dynamic-int8"

    def __init__(self, source: QuantLinear):
        super().__init__()
        assert source.bits == 8 and source.group_size == source.in_features
        self.in_features, self.out_features, self.bits, self.group_size = (
            source.in_features,
            source.out_features,
            8,
            source.in_features,
        )
        int8 = (source.qweight.to(torch.int16) - source.zeros.to(torch.int16)).to(torch.int8)  # (out, in), zero = 128
        scales = source.scales[:, 0].double()
        qw = torch._make_per_channel_quantized_tensor(int8, scales, torch.zeros_like(scales, dtype=torch.long), 0)
        bias = source.bias.detach().float() if source.bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        self._bytes = int8.numel() + scales.numel() * 2 + (bias.numel() * 4 if bias is not None else 0)
        self._params = int8.numel() + (bias.numel() if bias is not None else 0)

    def packed_params(self) -> int:
        """Weights and bias held inside the fbgemm object, out of `parameters()`' sight."""
        return self._params

    def weight_bytes(self) -> int:
        """int8 codes + float16 scales + float32 bias, as held by the packed fbgemm weight."""
        return self._bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(
            x.reshape(-1, shape[-1]).float(), self._packed, True
        )  # reduce_range=True
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, per-channel, kernel=fbgemm"


DECODE_ROWS = 8
"""Inputs of at most this many rows (tokens x batch) take the packed kernel: batch-1 to batch-8
decode. More rows (prefill) dequantize to bfloat16 once per call and run a dense bfloat16 matmul,
measured faster there than the packed kernels (benchmarks/bench_kernels.py)."""


SMALL_LAYER_WEIGHTS = 200_000
"""Weight-only layers with at most this many weights decode through `fused_rows` in a compiled graph:
about where the fused loop stops beating the packed int4 kernel there, measured on this 2-core machine
(AVX-512) at 2 threads (benchmarks/bench_kernels.py --only small, chains of int4 group-32 layers,
paired; two runs): 1.09-1.21x the packed kernel's speed at 64x64, 1.10-1.17x at 192x576 (110,592
weights), 0.86-0.90x at 576x576 (331,776), 0.75-0.76x at 1536x576, 0.37-0.42x at 2048x5632; the
two middle points cross between 170,000 and 210,000. Eager calls keep the packed kernel (the same
bench: dequantizing per call ran at 0.83x of its speed at 64x64, 0.36x at 192x576)."""


def is_small(module: nn.Module) -> bool:
    """At most SMALL_LAYER_WEIGHTS weights: decoded through `fused_rows` inside compiled graphs."""
    return module.in_features * module.out_features <= SMALL_LAYER_WEIGHTS


def fused_rows(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias) -> torch.Tensor:
    """x @ W.T for a few rows, W = codes (out, in; int8, zero point removed) x scales (out, groups),
    written as one multiply-and-sum so that inductor generates a single loop reading each code once
    (eager, this would materialize the product: only compiled graphs call it). In x's dtype."""
    (out_f, groups), rows = scales.shape, x.numel() // codes.shape[1]
    w = codes.view(out_f, groups, -1).to(x.dtype) * scales[..., None].to(x.dtype)
    y = (x.reshape(rows, 1, groups, -1) * w).sum((-1, -2)).reshape(*x.shape[:-1], out_f)
    return y + bias.to(y.dtype) if bias is not None else y


def signed_codes(source: QuantLinear) -> torch.Tensor:
    """q - z per weight as int8 (out, in): fits for int4 with any zero point and int8 with zero point 128."""
    q = unpack(source.qweight, source.bits).to(torch.int16)
    return (q - source.zeros.to(torch.int16).repeat_interleave(source.group_size, dim=1)).to(torch.int8)


def dequantize_signed(codes: torch.Tensor, scales: torch.Tensor, dtype) -> torch.Tensor:
    out_f, groups = scales.shape
    return (codes.view(out_f, groups, -1).to(dtype) * scales[..., None].to(dtype)).view(out_f, -1)


class _WeightOnlyLayer(nn.Module):
    """What the CPU's weight-only layers share: QuantLinear's shape and format, its bias, the weights it holds."""

    kernel: str

    def __init__(self, source: QuantLinear):
        super().__init__()
        self.in_features, self.out_features, self.bits = source.in_features, source.out_features, source.bits
        self.group_size, self.activations = source.group_size, "none"
        self.bias = source.bias

    @property
    def format(self) -> str:
        return format_name(self.bits, "none")

    def packed_params(self) -> int:
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}"


class PackedWeightLinear(_WeightOnlyLayer):
    """A w8a16 or w4a16 layer on packed CPU kernels, computing in bfloat16 (see module doc).

    int8: per-channel symmetric codes (zero point 128) as int8 with one scale per row, frugalm's
    `int8_rows` (or ATen's `_weight_int8pack_mm`). int4: tinygemm's CPU layout
    (`_convert_weight_to_int4pack_for_cpu`) with per-group (scale, offset) where w = (q - 8) * scale + offset, offset = (8 - z) * scale (any zero
    point). The kernels take bfloat16 scales, which round the stored float16 ones: part of the
    bfloat16 path whose perplexity the benchmark measures. Prefill rows dequantize per call from
    int8 codes (minus the zero point), which an int4 layer therefore holds beside tinygemm's layout
    (which has no unpacking op): 1.5 bytes per weight in memory, not 0.5, and its buffers say so to
    `weights_mib`; the artifact keeps 0.5.
    """

    def __init__(self, source: QuantLinear):
        super().__init__(source)
        # per phase: decode rows on the packed kernel, prefill rows on bfloat16 weights dequantized per call
        ours = source.bits == 8 and cpu_kernels.available()
        self.int8_op = torch.ops.frugalm.int8_rows if ours else torch.ops.aten._weight_int8pack_mm
        decode = "int4pack" if source.bits == 4 else "frugalm-int8-rows" if ours else "int8pack"
        self.kernel = f"{decode}-bf16 decode, bf16-dequantize prefill"
        self.fused = is_small(source)
        if self.fused:
            self.kernel += ", fused loop in compiled decode"
        if source.bits == 8:
            self.register_buffer("codes", signed_codes(source))
            self.register_buffer("scales", source.scales.clone())  # (out, 1) float16
            self.register_buffer("kernel_scales", source.scales[:, 0].bfloat16())
        else:
            self.kernel_group = kernel_group(source)
            repeat = source.group_size // self.kernel_group  # a wider group is exactly several blocks sharing its scale
            scales = source.scales.float().repeat_interleave(repeat, dim=1)
            offsets = (8 - source.zeros.float().repeat_interleave(repeat, dim=1)) * scales
            q = unpack(source.qweight, source.bits).to(torch.int32)
            self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
            self.register_buffer("kernel_scales", torch.stack([scales.t(), offsets.t()], -1).bfloat16().contiguous())
            # Prefill dequantizes from int8 codes minus zero point: one conversion and one multiply per
            # call, where unpacking nibbles and subtracting zero points made prefill 0.65x float32.
            self.register_buffer("signed_codes", signed_codes(source))
            self.register_buffer("scales", source.scales.clone())

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_signed(self.codes if self.bits == 8 else self.signed_codes, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and torch.compiler.is_compiling() and x.numel() <= DECODE_ROWS * self.in_features:
            return fused_rows(x, self.codes if self.bits == 8 else self.signed_codes, self.scales, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).bfloat16()
        if x2.shape[0] <= DECODE_ROWS:
            if self.bits == 8:
                y = self.int8_op(x2, self.codes, self.kernel_scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.codes, self.kernel_group, self.kernel_scales)
        else:
            y = F.linear(x2, self.dequantized_weight(torch.bfloat16))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class CodesLinear(_WeightOnlyLayer):
    """A small weight-only layer the packed kernels refuse, computing in the model's dtype from its codes held as int8.

    Holds q - z per weight (int4 codes and any zero point, or int8 symmetric ones, fit int8) and the
    stored float16 scales: 1 byte per weight in memory (QuantLinear holds 0.5, and unpacks nibbles
    and subtracts zero points at every call). Numerics are QuantLinear's (dequantize, then a float
    matmul) up to summation order. Inside a compiled graph, a call of at most DECODE_ROWS rows is
    `fused_rows`; everywhere else the layer dequantizes per call and runs a dense matmul.
    """

    kernel = "int8-codes: fused loop (compiled decode), dequantize (else)"

    def __init__(self, source: QuantLinear):
        super().__init__(source)
        assert codes_fit(source), "int4, or int8 with zero point 128, so that q - z fits int8"
        self.register_buffer("codes", signed_codes(source))
        self.register_buffer("scales", source.scales.clone())

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_signed(self.codes, self.scales, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() and x.numel() <= DECODE_ROWS * self.in_features:
            return fused_rows(x, self.codes, self.scales, self.bias)
        y = F.linear(x, self.dequantized_weight(x.dtype))
        return y + self.bias.to(y.dtype) if self.bias is not None else y


def codes_fit(module: QuantLinear) -> bool:
    """Weight-only, and q - z fits int8: any int4 layer, or int8 with zero point 128 (symmetric)."""
    if module.activations != "none":
        return False
    return module.bits == 4 or (module.bits == 8 and bool((module.zeros == 128).all()))


KERNEL_GROUPS = (256, 128, 64, 32)
"""Group sizes ATen's int4 CPU kernel takes."""


def kernel_group(module: QuantLinear) -> int:
    """The widest group the int4 kernel takes that divides the layer's own (per-channel included), or 0."""
    return next((g for g in KERNEL_GROUPS if module.group_size % g == 0 and module.in_features % g == 0), 0)


def packed_eligible(module: QuantLinear) -> bool:
    """A weight-only layer ATen's CPU kernels take: int8 per-channel symmetric, or int4 whose groups
    are whole blocks of 32..256 columns; rows and columns multiples of 16. (torch 2.13's
    `_weight_int8pack_mm` crashes the process on 8+ rows of an input whose width is not a multiple
    of 16, e.g. stories260K's 172; tinygemm refuses rows that are not: such layers stay dequantized.)"""
    if module.activations != "none" or module.in_features % 16 or module.out_features % 16:
        return False
    if module.bits == 8:
        return fbgemm_eligible(module)
    return module.bits == 4 and kernel_group(module) > 0


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def fbgemm_eligible(module: QuantLinear) -> bool:
    """int8, one symmetric scale per output channel (zero point 128): the weights fbgemm's kernel takes."""
    return module.bits == 8 and module.group_size == module.in_features and bool((module.zeros == 128).all())


def fast_layer(module: QuantLinear, fbgemm: bool) -> nn.Module | None:
    """The module a CPU runs `module` on (see module doc), or None where it stays dequantized:
    w8a8-dynamic on fbgemm (Int8Linear) where the CPU has it; a weight-only layer that ATen's
    packed kernels take as PackedWeightLinear; a small one they refuse as CodesLinear."""
    if module.activations == "dynamic-int8":
        assert not fbgemm or fbgemm_eligible(module), "w8a8-dynamic needs int8 per-channel symmetric weights"
        return Int8Linear(module) if fbgemm else None
    if packed_eligible(module):
        return PackedWeightLinear(module)
    return CodesLinear(module) if is_small(module) and codes_fit(module) else None


def to_fast_kernels_(model: nn.Module) -> list[str]:
    """Swap the CPU's speed kernels in (`fast_layer`); returns the names of swapped modules.

    Other weight-only layers (say large int4 ones in groups of 16) keep running dequantized, and
    the scorecard says so ("no speed kernel").
    """
    fbgemm = has_fbgemm()
    if fbgemm:
        torch.backends.quantized.engine = "fbgemm"
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantLinear) or module.qweight.device.type != "cpu":
            continue
        fast = fast_layer(module, fbgemm)
        if fast is None:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fast)
        swapped.append(name)
    return swapped


def set_linear_formats_(model: nn.Module, formats: dict[str, list[str]] | None) -> None:
    """Give each QuantLinear the activations of its format, as listed in frugalm.json (inference.linear_formats).

    None: an artifact saved before formats were recorded; its int8 per-channel symmetric layers
    were measured on fbgemm, so they load as w8a8-dynamic and reproduce their stored figures.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if formats is None:
        for m in layers.values():
            m.activations = "dynamic-int8" if fbgemm_eligible(m) else "none"
        return
    for fmt, names in formats.items():
        for name in names:
            if name in layers:
                layers[name].activations = "dynamic-int8" if fmt == W8A8_DYNAMIC else "none"


def format_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """Quantized layers by format, then by the kernel that runs them: {"w8a8-dynamic": {"fbgemm": 14}}."""
    out: dict[str, dict[str, int]] = {}
    for m in model.modules():
        fmt = getattr(m, "format", None) if isinstance(m, (QuantLinear, Int8Linear, _WeightOnlyLayer)) else None
        if fmt:
            kernels = out.setdefault(fmt, {})
            kernels[m.kernel] = kernels.get(m.kernel, 0) + 1
    return out
