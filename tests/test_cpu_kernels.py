"""frugalm's CPU kernels (runtime/cpu_kernels): built here; int8_rows is ATen's int8pack bit for bit, any
shape, inside a compiled graph, ATen's kernel where it cannot be built; the KV cache's attention on bytes."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from frugalm.runtime import cpu_kernels, quant_linear
from frugalm.runtime.quant_linear import PackedWeightLinear, QuantLinear, quantize_groups

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the kernel")


@pytest.fixture(autouse=True)
def built():
    """The ops exist once the kernels are loaded: each test may be its worker's first."""
    if shutil.which("c++") is not None:
        assert cpu_kernels.available()  # a compiler here: a silent fallback would hide a broken build


def _operands(rows: int, out_f: int, in_f: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_f, generator=g).bfloat16()
    w = torch.randint(-128, 128, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_f, generator=g) * 0.01).bfloat16()
    return x, w, scale


@needs_compiler
@pytest.mark.parametrize("rows,out_f,in_f", [(1, 576, 1536), (1, 1536, 576), (3, 96, 128), (8, 48, 64)])
def test_the_kernel_is_atens_int8pack_bit_for_bit(rows, out_f, in_f):
    x, w, scale = _operands(rows, out_f, in_f, seed=rows)
    ours = torch.ops.frugalm.int8_rows(x, w, scale)
    assert ours.dtype == torch.bfloat16 and ours.shape == (rows, out_f)
    assert torch.equal(ours, torch.ops.aten._weight_int8pack_mm(x, w, scale))


@needs_compiler
@pytest.mark.parametrize("rows,out_f,in_f", [(1, 19, 37), (2, 5, 16), (5, 7, 100), (1, 3, 7)])
def test_the_kernel_takes_shapes_atens_refuses(rows, out_f, in_f):
    """Rows not a multiple of the four-row block, widths not of the vector: the scalar tails."""
    x, w, scale = _operands(rows, out_f, in_f, seed=out_f)
    ref = (x.float() @ w.float().t()) * scale.float()
    ours = torch.ops.frugalm.int8_rows(x, w, scale).float()
    assert (ours - ref).abs().max() <= 4e-3 * ref.abs().max()  # one bfloat16 rounding of the output


@needs_compiler
def test_a_compiled_graph_calls_the_kernel():
    x, w, scale = _operands(1, 96, 128, seed=7)

    def step(x, w, scale):
        return torch.ops.frugalm.int8_rows(x.bfloat16(), w, scale).float() * 2

    graph = torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    assert torch.equal(graph(x.float(), w, scale), step(x.float(), w, scale))


@needs_compiler
def test_w8a16_layers_decode_on_it_and_prefill_on_bfloat16_weights():
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    q, s, z = quantize_groups(w, 8, 128, True)
    source = QuantLinear.from_codes(q, s, z, 8, None)
    layer = PackedWeightLinear(source)
    assert layer.kernel.startswith("frugalm-int8-rows-bf16 decode")
    x = torch.randn(1, 128)
    expected = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.codes, layer.kernel_scales).float()
    assert torch.equal(layer(x), expected)


def _attention_reference(q, codes, scale, shift, keys, values, mask, bits):
    c = codes.float() if bits == 8 else torch.stack([codes & 15, codes >> 4], -1).flatten(-2).float()
    k = torch.cat([scale[0][..., None] * c[0] - shift[0][..., None], keys], -2)  # s (c - z) = s c - s z
    v = torch.cat([scale[1][..., None] * c[1] - shift[1][..., None], values], -2)
    scores = q @ k.transpose(-1, -2) + (0 if mask is None else mask)
    return scores.softmax(-1) @ v


@needs_compiler
@pytest.mark.parametrize(
    "batch,heads,queries,past,window,head_dim,bits,masked",
    [(1, 3, 3, 600, 130, 64, 8, False), (2, 2, 1, 17, 5, 40, 8, True), (1, 1, 4, 300, 3, 64, 4, True),
     (2, 3, 3, 0, 9, 16, 8, False), (1, 2, 2, 300, 1, 16, 4, False)],
)  # fmt: skip
def test_attention_over_the_codes_equals_attention_over_the_dequantized_past(
    batch, heads, queries, past, window, head_dim, bits, masked
):
    """One call scores and mixes the codes as bytes (int8, int4 two per byte), spans of 256 tokens
    combined, masks included; the codes a view cut short along the tokens (a crop), scales strided."""
    g = torch.Generator().manual_seed(past + window)
    q = torch.randn(batch, heads, queries, head_dim, generator=g) * 0.3
    stacked = torch.randint(0, 256, (2, batch, heads, past + 3, head_dim * bits // 8), generator=g, dtype=torch.uint8)
    codes = stacked[:, :, :, :past]
    factors = torch.rand(2, batch, heads, past, 2, generator=g) * 0.02
    scale, shift = factors[..., 0], factors[..., 1] * 100 * factors[..., 0]  # s and s z, z up to 100
    keys, values = torch.randn(2, batch, heads, window, head_dim, generator=g)
    mask = None
    if masked:  # the first half of the first sequence padded away
        mask = torch.zeros(batch, 1, 1, past + window)
        mask[0, ..., : past // 2 + 1] = float("-inf")
    ours = torch.ops.frugalm.codes_attention(q, codes, scale, shift, keys, values, mask, bits)
    reference = _attention_reference(q, codes, scale, shift, keys, values, mask, bits)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_without_a_build_w8a16_layers_keep_atens_kernel(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'frugalm_int8_rows': c++: not found")

    cpu_kernels.available.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    try:
        with caplog.at_level(logging.WARNING, logger=cpu_kernels.__name__):
            assert not cpu_kernels.available()
        assert "could not be built (Error building extension 'frugalm_int8_rows': c++: not found)" in caplog.text
        w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.05
        q, s, z = quantize_groups(w, 8, 64, True)
        layer = PackedWeightLinear(QuantLinear.from_codes(q, s, z, 8, None))
        assert layer.kernel.startswith("int8pack-bf16 decode") and layer.int8_op is torch.ops.aten._weight_int8pack_mm
        x = torch.randn(quant_linear.DECODE_ROWS, 64)
        assert torch.equal(
            layer(x), torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layer.codes, layer.kernel_scales).float()
        )
    finally:
        cpu_kernels.available.cache_clear()  # the next caller loads the real build again
