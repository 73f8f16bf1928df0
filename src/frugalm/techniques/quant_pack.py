"""Packed low-bit weights: the storage every weight-only quantization technique writes.

A quantized Linear keeps, per output row and per group of `group_size` input columns, unsigned
integer codes q in [0, 2^bits) with a scale s and a zero point z, so that w ≈ (q - z) * s.
Symmetric quantization is the special case z = 2^(bits-1). Codes are packed: int8 one per
byte, int4 two per byte (low nibble = even column). Scales are float16, zero points uint8.
Bytes per weight: int8 per-channel ≈ 1 + 3/in_features; int4 group 128 ≈ 0.5 + 3/128.

`QuantLinear` is the module holding that storage. It computes by unpacking to the activation
dtype and calling a dense matmul: correct everywhere, faster nowhere (`kernel = "dequantize"`).
`Int8Linear` (int8, per-channel, symmetric, CPU) runs fbgemm's dynamic-quantized int8 matmul
instead (`kernel = "fbgemm"`): a real speed kernel on x86 CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        self.group_size = in_features if group_size <= 0 else group_size
        groups = in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, kernel={self.kernel}"


class Int8Linear(nn.Module):
    """int8 per-channel symmetric weights run by fbgemm's dynamic-quantized matmul (x86 CPU).

    Activations are quantized per batch on the fly (dynamic quantization), the int8 x int8
    product accumulates in int32, and the result is rescaled to float32. The packed weight lives
    inside an fbgemm object that `parameters()` cannot see, so `weight_bytes()` reports it.
    """

    kernel = "fbgemm"

    def __init__(self, source: QuantLinear):
        super().__init__()
        assert source.bits == 8 and source.group_size == source.in_features
        self.in_features, self.out_features, self.bits, self.group_size = source.in_features, source.out_features, 8, source.in_features
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
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).float(), self._packed, True)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, per-channel, kernel=fbgemm"


def has_fbgemm() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def to_fast_kernels_(model: nn.Module) -> list[str]:
    """Swap every int8 per-channel QuantLinear for an fbgemm Int8Linear where the CPU has fbgemm.

    Returns the names of swapped modules. Other formats keep running dequantized.
    """
    if not has_fbgemm():
        return []
    torch.backends.quantized.engine = "fbgemm"
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear) and module.bits == 8 and module.group_size == module.in_features and module.qweight.device.type == "cpu" and bool((module.zeros == 128).all()):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8Linear(module))
            swapped.append(name)
    return swapped
