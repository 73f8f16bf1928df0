"""Weight-only layers on ATen's packed CPU kernels (runtime/quant_linear.PackedWeightLinear) and small ones as
CodesLinear: numerics, eligibility, loading, the fused loop in a compiled graph."""

from __future__ import annotations

import pytest
import torch

from conftest import run
from frugalm.measure.memory import weights_bytes
from frugalm.models import load_model, save_variant
from frugalm.runtime import quant_linear
from frugalm.runtime.modules import kernel_summary
from frugalm.runtime.quant_linear import CodesLinear, PackedWeightLinear, QuantLinear, packed_eligible, quantize_groups


def _layer(bits: int, group_size: int, symmetric: bool, out_f: int = 96, in_f: int = 128, seed: int = 0) -> QuantLinear:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05
    q, s, z = quantize_groups(w, bits, group_size if group_size > 0 else in_f, symmetric)
    return QuantLinear.from_codes(q, s, z, bits, torch.randn(out_f) * 0.01)


@pytest.mark.parametrize(
    "bits,group_size,symmetric",
    [(8, -1, True), (4, 32, False), (4, 64, True), (4, -1, False), (4, 128, False)],
)
def test_packed_layers_compute_the_stored_codes_in_bfloat16(bits, group_size, symmetric):
    source = _layer(bits, group_size, symmetric)
    assert packed_eligible(source)
    packed = PackedWeightLinear(source)
    for rows in (1, 2, quant_linear.DECODE_ROWS, 40):  # the packed kernel, then bfloat16 dequantized (prefill)
        x = torch.randn(rows, source.in_features)
        ref, y = source(x), packed(x)
        assert y.dtype == x.dtype and y.shape == ref.shape
        assert (y - ref).abs().max() <= 1e-2 * ref.abs().max(), rows  # bfloat16 activations and scales
    assert torch.equal(packed.dequantized_weight(), source.dequantized_weight())  # the codes themselves are exact


def test_layers_the_kernels_cannot_take_stay_dequantized():
    assert not packed_eligible(_layer(4, 16, False))  # groups narrower than the kernel's 32
    assert not packed_eligible(_layer(4, 32, False, out_f=100))  # rows not a multiple of 16
    assert not packed_eligible(_layer(8, -1, True, in_f=172))  # int8pack crashes on such widths (torch 2.13)
    assert not packed_eligible(_layer(8, -1, False))  # asymmetric int8: codes minus zero point leave int8
    dynamic = _layer(8, -1, True)
    dynamic.activations = "dynamic-int8"
    assert not packed_eligible(dynamic)  # w8a8-dynamic goes to fbgemm, not here


@pytest.fixture
def as_large(monkeypatch):
    """The tiny models' layers loaded as large ones are: on the packed kernels, not CodesLinear."""
    monkeypatch.setattr(quant_linear, "SMALL_LAYER_WEIGHTS", 0)


def test_load_model_packs_weight_only_variants_and_keeps_their_codes(tiny_llama, tmp_path, as_large):
    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=4, group_size=32, symmetric=False)
    folder = save_variant(lm.model, lm.tokenizer, tmp_path / "int4", {})
    fast, slow = load_model(folder).model, load_model(folder, fast_kernels=False).model
    assert kernel_summary(fast) == {"int4pack-bf16 decode, bf16-dequantize prefill": 14, "dense": 1}
    assert kernel_summary(slow) == {"dequantize": 14, "dense": 1}
    ids = torch.randint(0, fast.config.vocab_size, (1, 12))
    with torch.no_grad():
        a, b = fast(ids).logits, slow(ids).logits
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    # Packed at load: the kernel's layout plus the stored codes for prefill, counted in the weights' bytes.
    layer = fast.model.layers[0].mlp.up_proj
    assert isinstance(layer, PackedWeightLinear) and weights_bytes(fast) > weights_bytes(slow)
    with pytest.raises(AssertionError, match="before swapping in fast kernels"):
        save_variant(fast, lm.tokenizer, tmp_path / "again", {})


@pytest.mark.parametrize("large", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_fast_layers_count_the_flops_of_the_matmuls_they_replace(bits, large, tiny_llama, tmp_path, monkeypatch):
    from frugalm.measure.compute import count_flops

    if large:
        monkeypatch.setattr(quant_linear, "SMALL_LAYER_WEIGHTS", 0)
    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=bits, group_size=-1 if bits == 8 else 32)
    folder = save_variant(lm.model, lm.tokenizer, tmp_path / "v", {})
    fast, slow = load_model(folder).model, load_model(folder, fast_kernels=False).model
    kernel = PackedWeightLinear(next(m for m in slow.modules() if isinstance(m, QuantLinear))).kernel
    assert kernel_summary(fast) == {kernel: 14, "dense": 1}  # every layer but the head on a packed kernel
    assert ("fused loop" in kernel) != large
    for rows in (1, 12):  # a decode step (the packed matmul) and a prefill (bfloat16 dequantized)
        ids = torch.randint(4, fast.config.vocab_size, (1, rows))
        assert count_flops(lambda: fast(ids)) == count_flops(lambda: slow(ids)) > 0


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 32, False), (4, -1, True), (8, -1, True), (4, 16, False)])
def test_small_layers_compute_their_codes_in_float_eager_and_in_one_compiled_loop(bits, group_size, symmetric):
    """CodesLinear: QuantLinear's numerics from int8-held codes, in eager calls and inside a compiled graph."""
    source = _layer(bits, group_size, symmetric, out_f=100, in_f=64)  # shapes and groups the packed kernels refuse
    layer = quant_linear.fast_layer(source, fbgemm=False)
    assert isinstance(layer, CodesLinear) and layer.codes.dtype == torch.int8
    assert torch.equal(layer.dequantized_weight(), source.dequantized_weight())  # the codes themselves are exact
    torch._dynamo.reset()  # the cases share this function's code: without it they would add up to dynamo's recompile limit
    graph = torch.compile(lambda x: layer(x), fullgraph=True, dynamic=False)
    for rows in (1, 3, 40):  # decode rows take the fused loop when compiled; 40 rows a matmul either way
        x = torch.randn(rows, 1, source.in_features)
        with torch.inference_mode():
            ref, eager, compiled = source(x), layer(x), graph(x)
        assert torch.equal(eager, ref)  # the same dequantize-then-matmul
        assert compiled.shape == ref.shape and (compiled - ref).abs().max() <= 1e-5 * ref.abs().max(), rows


def test_small_packed_layers_decode_through_the_fused_loop_when_compiled():
    source = _layer(4, 32, False)
    layer = PackedWeightLinear(source)
    assert layer.fused and "fused loop" in layer.kernel
    torch._dynamo.reset()
    graph = torch.compile(lambda x: layer(x), fullgraph=True, dynamic=False)
    x = torch.randn(2, 1, source.in_features)
    with torch.inference_mode():
        ref, compiled = source(x), graph(x)
    assert (compiled - ref).abs().max() <= 1e-5 * ref.abs().max()  # float32 over the codes, not the bfloat16 kernel


def test_which_fast_layer_a_quantized_layer_gets():
    small, large = _layer(4, 32, False), _layer(4, 32, False, out_f=1024, in_f=512)
    assert quant_linear.fast_layer(small, fbgemm=False).fused  # PackedWeightLinear, the fused loop when compiled
    assert not quant_linear.fast_layer(large, fbgemm=False).fused  # 512K weights: the packed kernel throughout
    assert isinstance(quant_linear.fast_layer(_layer(4, 32, False, out_f=100), fbgemm=False), CodesLinear)
    assert quant_linear.fast_layer(_layer(8, -1, False, out_f=100), fbgemm=False) is None  # q - z leaves int8
    assert quant_linear.fast_layer(_layer(4, 16, False, out_f=1024, in_f=512), fbgemm=False) is None  # large, no kernel
    dynamic = _layer(8, -1, True)
    dynamic.activations = "dynamic-int8"
    assert isinstance(quant_linear.fast_layer(dynamic, fbgemm=True), quant_linear.Int8Linear)
    assert quant_linear.fast_layer(dynamic, fbgemm=False) is None
