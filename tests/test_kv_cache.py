"""KV-cache quantization: generation close to the float cache, bytes as packed, scoring, artifacts, errors."""

import json
import math

import pytest
import torch
from transformers import DynamicCache

from frugalm.errors import FrugalmError
from frugalm.measure.compute import cache_bytes, time_workload
from frugalm.measure.quality import PerplexityProtocol, measure_quality, score_text
from frugalm.measure.workloads import Workload
from frugalm.models import load_model, save_variant
from frugalm.recipe import build_config
from frugalm.runtime import cpu_kernels
from frugalm.runtime.kv_cache import (
    FLUSH_TOKENS,
    PackedKVLayer,
    cache_factory,
    make_cache,
)
from frugalm.runtime.kv_cache import (
    _dequantized_cat as _DEQUANTIZED_CAT,
)
from frugalm.runtime.modules import inference_settings
from frugalm.techniques.base import Context
from frugalm.techniques.kv_cache_quant import TECHNIQUE, KVCacheQuantConfig
from frugalm.text.encode import encode_documents

CPU = torch.device("cpu")
HEAD_DIM, KV_HEADS, LAYERS = 16, 2, 2  # the tiny Llama of conftest.py


def _kv(bits=8, group_size=64, residual_length=8) -> dict:
    return {"kv_cache": {"bits": bits, "group_size": group_size, "residual_length": residual_length}}


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, fast_kernels=False)


@torch.inference_mode()
def _decode(model, ids, tokens, cache):
    """Prefill `ids`, then feed `tokens` one by one (teacher forcing); logits before each token and after the last."""
    out = model(ids, past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    for t in range(tokens.shape[1]):
        out = model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)  # (batch, steps, vocab)


@torch.inference_mode()
def _greedy(model, ids, n, cache):
    out = model(ids, past_key_values=cache, use_cache=True)
    tokens = []
    for _ in range(n):
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        out = model(nxt, past_key_values=cache, use_cache=True)
    return torch.cat(tokens, 1)


def test_quantized_cache_tracks_the_float_cache(tiny):
    model = tiny.model
    ids = torch.randint(4, 300, (2, 64), generator=torch.Generator().manual_seed(0))
    reference = _greedy(model, ids, 24, DynamicCache(config=model.config))
    ref_logits = _decode(model, ids, reference, DynamicCache(config=model.config))
    errors = {}
    for bits in (8, 4):
        logits = _decode(model, ids, reference, make_cache(model, _kv(bits), 0))
        assert torch.isfinite(logits).all()
        errors[bits] = (logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
        if bits == 8:
            assert errors[8] < 0.003, errors
            assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.95
            free = _greedy(model, ids, 24, make_cache(model, _kv(8), 0))
            assert (free == reference).float().mean() >= 0.8
    assert errors[8] < errors[4] < 0.05, errors


@pytest.mark.parametrize("residual, keep", [(16, 60), (0, 60), (0, 50)])  # (0, 50): into the packed past
def test_crop_forgets_the_newest_tokens_without_requantizing(tiny, residual, keep):
    # crop(-n), used by the paired decode timing and assisted decoding, equals never having seen them
    model = tiny.model
    ids = torch.randint(4, 300, (1, 70), generator=torch.Generator().manual_seed(1))
    fresh, cropped = make_cache(model, _kv(8, 16, residual), 0), make_cache(model, _kv(8, 16, residual), 0)
    with torch.no_grad():
        model(ids[:, :keep], past_key_values=fresh, use_cache=True)
        model(ids[:, :60], past_key_values=cropped, use_cache=True)
        model(ids[:, 60:], past_key_values=cropped, use_cache=True)
        cropped.crop(keep - 70)
        assert cropped.get_seq_length() == keep
        nxt = ids[:, keep : keep + 1]
        a = model(nxt, past_key_values=fresh, use_cache=True).logits
        b = model(nxt, past_key_values=cropped, use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="negative"):
        cropped.crop(3)


def _per_token_bytes(bits: int, group: int) -> int:
    # one head vector: packed codes + float16 scale and uint8 zero per group
    return HEAD_DIM * bits // 8 + (HEAD_DIM // group) * 3  # no factors below FACTORS_MIN_HEAD_DIM


@pytest.mark.parametrize("bits, limit", [(8, 0.3), (4, 0.2)])
def test_cache_bytes_are_the_packed_storage(tiny, bits, limit):
    model, batch, prompt, new, residual = tiny.model, 2, 80, 20, 16
    ids = torch.randint(4, 300, (batch, prompt))
    plain, quant = DynamicCache(config=model.config), make_cache(model, _kv(bits, 16, residual), 0)
    for cache in (plain, quant):
        _greedy(model, ids, new, cache)
    tokens = prompt + new  # the last greedy step feeds its token too
    vectors = batch * KV_HEADS * LAYERS * 2  # head vectors per cached token (keys and values)
    assert cache_bytes(plain) == tokens * vectors * HEAD_DIM * 4
    window = quant.layers[0].keys.shape[-2]  # full-precision tokens, flushed in blocks of FLUSH_TOKENS
    assert residual <= window < residual + FLUSH_TOKENS and all(
        layer.keys.shape[-2] == window for layer in quant.layers
    )
    packed = vectors * (tokens - window) * _per_token_bytes(bits, 16)
    assert quant.layers[1].workspace is quant.layers[0].workspace
    if cpu_kernels.available():  # attention reads the codes as bytes: no float workspace
        assert quant.layers[0].workspace.buffer is None
        workspace = 0
    else:  # the attention workspace (one layer's keys and values in float32, grown by 1.5x), counted once
        workspace = quant.layers[0].workspace.buffer.nbytes
        one_layer = batch * KV_HEADS * 2 * (tokens - 1) * HEAD_DIM * 4  # as the last step read them
        assert one_layer <= workspace <= 1.5 * one_layer
    assert cache_bytes(quant) == packed + vectors * window * HEAD_DIM * 4 + workspace
    assert packed <= limit * vectors * (tokens - window) * HEAD_DIM * 4  # against float32, beyond the window
    assert all(isinstance(layer, PackedKVLayer) for layer in quant.layers)


def test_chunked_scoring_with_a_plain_cache_equals_whole_windows(tiny, text_file):
    model = tiny.model
    encoded = encode_documents(tiny.tokenizer, [text_file.read_text()], 600)
    whole = score_text(model, encoded, 200, 100)
    chunked = score_text(model, encoded, 200, 100, cache_factory=lambda n: DynamicCache(config=model.config))
    assert chunked.n_predicted == whole.n_predicted
    assert chunked.nll_sum == pytest.approx(whole.nll_sum, rel=1e-4)
    int4 = score_text(model, encoded, 200, 100, cache_factory=lambda n: make_cache(model, _kv(4, 4, 0), n))
    assert int4.nll_sum != pytest.approx(whole.nll_sum, rel=1e-6) and math.isfinite(int4.nll_sum)


def test_apply_save_load_round_trips_the_setting(tiny_llama, tmp_path, text_file):
    lm = load_model(tiny_llama, fast_kernels=False)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ctx = Context()
    model = TECHNIQUE.apply(lm.model, KVCacheQuantConfig(bits=4, group_size=8, residual_length=32), ctx)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no weight changes
    change = ctx.changes[-1]
    assert (
        change["params_changed"] == 0
        and len(change["layers"]) == LAYERS
        and change["kv_bytes_ratio"] == pytest.approx((8 + 2 * 3) / 64)
    )
    folder = save_variant(model, lm.tokenizer, tmp_path / "kv", {"changes": ctx.changes})
    setting = {"bits": 4, "group_size": 8, "residual_length": 32}
    assert json.loads((folder / "frugalm.json").read_text())["inference"] == {"kv_cache": setting}
    again = load_model(folder, fast_kernels=False)
    assert again.inference == {"kv_cache": setting} and inference_settings(again.model) == again.inference
    assert isinstance(cache_factory(again.model)(64).layers[0], PackedKVLayer)
    assert cache_factory(load_model(tiny_llama).model) is None  # a plain model keeps its default cache
    ms = {
        m.metric: m
        for m in measure_quality(
            again.model,
            again.tokenizer,
            [text_file.read_text()],
            PerplexityProtocol(window=128, stride=128, max_tokens=300, robust_tokens=128),
            context=256,
            data_desc={},
        )
    }
    assert (
        ms["ppl_tok"].protocol["scoring"].startswith("chunked prefill")
        and ms["ppl_tok"].protocol["kv_cache"] == setting
    )


@pytest.mark.parametrize(
    "bits, factors, kernels",
    [(8, False, True), (8, False, False), (4, False, True), (4, False, False), (8, True, True)],
)
def test_one_token_steps_attend_over_the_packed_codes(tiny_llama, bits, factors, kernels, monkeypatch):
    # the packed-codes attention equals attention over the dequantized past, padding masks included;
    # longer steps (a speculative verify, a prompt chunk) still read the dequantized past. The codes
    # go through frugalm's CPU kernel where it builds (no float workspace), else torch ops (kernels False).
    import frugalm.runtime.kv_cache as kv

    if not kernels:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    if factors:  # the stored scale and scale * zero of longer head vectors (head_dim 16 here)
        monkeypatch.setattr(kv, "FACTORS_MIN_HEAD_DIM", HEAD_DIM)

    model = load_model(tiny_llama, fast_kernels=False).model
    ids = torch.randint(4, 300, (2, 70), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    dequantized = []
    monkeypatch.setattr(kv, "_dequantized_cat", lambda *a: dequantized.append(1) or _DEQUANTIZED_CAT(*a))

    @torch.inference_mode()
    def steps(cache):
        model(ids[:, :50], attention_mask=mask[:, :50], past_key_values=cache, use_cache=True)
        logits = [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache).logits
                  for t in range(50, 67)]  # fmt: skip
        one_token_steps_dequantized = bool(dequantized)
        dequantized.clear()
        logits.append(model(ids[:, 67:], attention_mask=mask, past_key_values=cache).logits)  # three tokens
        return torch.cat(logits, 1), one_token_steps_dequantized

    packed = make_cache(model, _kv(bits, 16, 8), 0)
    assert model.config._attn_implementation == kv.ATTENTION and packed.layers[0].attend is not None
    fused, read_dequantized = steps(packed)
    assert (packed.layers[0].packed.factors is not None) == factors
    on_bytes = cpu_kernels.available()
    assert (packed.layers[0].workspace.buffer is None) == on_bytes, "the kernels read the codes with no workspace"
    assert not read_dequantized and dequantized, "one-token steps read the codes, the three-token step does not"
    plain = make_cache(model, _kv(bits, 16, 8), 0)
    for layer in plain.layers:
        layer.attend = None  # the dequantizing path at every step
    reference, read_dequantized = steps(plain)
    assert read_dequantized and torch.allclose(fused, reference, atol=1e-5, rtol=1e-4)


def test_packed_attention_needs_one_group_per_head_vector_and_sdpa(tiny_llama):
    import frugalm.runtime.kv_cache as kv

    model = load_model(tiny_llama, fast_kernels=False).model
    assert make_cache(model, _kv(8, 4, 8), 0).layers[0].attend is None  # 4 groups per head vector
    assert model.config._attn_implementation == "sdpa"  # left as it was
    model = load_model(tiny_llama, fast_kernels=False, attn_implementation="eager").model
    assert make_cache(model, _kv(8, 16, 8), 0).layers[0].attend is None
    assert model.config._attn_implementation == "eager" and "at every step" in kv.kernel(model, _kv()["kv_cache"])


def test_timed_workload_runs_with_the_cache_and_counts_its_bytes(tiny):
    model, w = tiny.model, Workload("t", 48, 8, 2, "")
    plain = time_workload(model, w, CPU, warmup=0, repetitions=1)
    made = []
    quant = time_workload(
        model, w, CPU, warmup=0, repetitions=1,
        cache_factory=lambda n: made.append(make_cache(model, _kv(8, 16, 0), n)) or made[-1],
    )  # fmt: skip
    assert len(quant.decode_step_s[0]) == 7
    assert plain.cache_bytes == [(48 + 7) * 2 * KV_HEADS * LAYERS * 2 * HEAD_DIM * 4]
    buffer = made[-1].layers[0].workspace.buffer  # counted too where there is one (no frugalm CPU kernels)
    workspace = 0 if buffer is None else buffer.nbytes
    assert quant.cache_bytes[0] - workspace < 0.5 * plain.cache_bytes[0]  # 48 of 55 tokens packed (7 in the window)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "qwen2"])
def test_other_architectures_run_with_the_cache(tiny_models, arch):
    model = load_model(tiny_models[arch]).model
    TECHNIQUE.apply(model, KVCacheQuantConfig(bits=4, residual_length=4), Context())
    cache = cache_factory(model)(32)
    tokens = _greedy(model, torch.randint(4, 300, (1, 24)), 8, cache)
    assert tokens.shape == (1, 8) and cache.get_seq_length() == 32 and cache_bytes(cache) > 0


@pytest.mark.parametrize(
    "options, fix, recipe_fix",
    [
        ({"bits": 3}, "bits must be 4 or 8", "option 'bits' must be 4 | 8, got 3"),
        (
            {"group_size": 12},
            "group_size 12 does not divide head_dim 16; use a divisor of 16 (1, 2, 4, 8, 16) or any value >= 16",
            None,
        ),
        ({"group_size": 0}, "group_size must be a positive number", "group_size must be a positive number"),
        (
            {"residual_length": -1},
            "residual_length must be 0 or more tokens",
            "residual_length must be 0 or more tokens",
        ),
    ],
)
def test_bad_options_give_one_line_errors(tiny_llama, options, fix, recipe_fix):
    model = load_model(tiny_llama).model
    with pytest.raises(FrugalmError) as err:
        TECHNIQUE.apply(model, KVCacheQuantConfig(**options), Context())
    assert fix in str(err.value) and "\n" not in str(err.value)
    assert inference_settings(model) == {}
    if recipe_fix:  # rules that need no model also show in a recipe check (`frugalm validate`)
        _, problems = build_config(KVCacheQuantConfig, options, "stages[0] (kv_cache_quant)")
        assert len(problems) == 1 and recipe_fix in problems[0]


@pytest.mark.parametrize("bits, group", [(8, 16), (8, 4), (4, 16), (4, 4)])
def test_the_in_place_dequantization_equals_the_reference_one(bits, group):
    from frugalm.runtime.kv_cache import _dequantized_cat
    from frugalm.runtime.quant_linear import dequantize_groups, unpack

    layer = PackedKVLayer(bits, group, 0)
    for n in (37, 40):
        q = layer._quantize(torch.randn(2, KV_HEADS, n, HEAD_DIM), -1)
        window = torch.randn(2, KV_HEADS, 5, HEAD_DIM)
        rows = 2 * KV_HEADS * n
        reference = dequantize_groups(unpack(q.codes.reshape(rows, -1), bits), q.scales.reshape(rows, -1),
                                      q.zeros.reshape(rows, -1)).view(2, KV_HEADS, n, HEAD_DIM)  # fmt: skip
        assert torch.equal(
            _dequantized_cat(q.codes, q.scales, q.zeros, window, bits), torch.cat([reference, window], 2)
        )
