"""Weight-only layers on ATen's packed CPU kernels (runtime/quant_linear.PackedWeightLinear): numerics, eligibility, loading."""

from __future__ import annotations

import pytest
import torch

from conftest import run
from frugalm.measure.memory import weights_bytes
from frugalm.models import load_model, save_variant
from frugalm.runtime import quant_linear
from frugalm.runtime.modules import kernel_summary
from frugalm.runtime.quant_linear import PackedWeightLinear, QuantLinear, packed_eligible, quantize_groups


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


def test_load_model_packs_weight_only_variants_and_keeps_their_codes(tiny_llama, tmp_path):
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


@pytest.mark.parametrize("bits", [8, 4])
def test_the_packed_kernels_count_the_flops_of_the_matmuls_they_replace(bits, tiny_llama, tmp_path):
    from frugalm.measure.compute import count_flops

    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=bits, group_size=-1 if bits == 8 else 32)
    folder = save_variant(lm.model, lm.tokenizer, tmp_path / "v", {})
    fast, slow = load_model(folder).model, load_model(folder, fast_kernels=False).model
    assert kernel_summary(fast).get("dense") == 1  # every layer but the head on a packed kernel
    for rows in (1, 12):  # a decode step (the packed matmul) and a prefill (bfloat16 dequantized)
        ids = torch.randint(4, fast.config.vocab_size, (1, rows))
        assert count_flops(lambda: fast(ids)) == count_flops(lambda: slow(ids)) > 0
