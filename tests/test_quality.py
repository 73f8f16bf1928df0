import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from frugalm.measure.quality import (
    PerplexityProtocol,
    measure_quality,
    rolling_windows,
    score_text,
)
from frugalm.models import load_model
from frugalm.text.encode import encode_documents
from frugalm.text.files import split_documents

DOCS = ["Once upon a time there was a little model.", "It wanted to run on a small computer, cheaply."] * 8


@given(n=st.integers(2, 400), window=st.integers(2, 64), data=st.data())
def test_rolling_windows_score_each_token_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    spans = rolling_windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == sorted(set(scored))  # no token twice, in order
    for begin, end, first in spans:
        assert end - begin <= window and begin < first <= end
    if stride < window:
        assert scored == list(range(1, n))  # every token but the first
    else:  # non-overlapping: the first token of each window has no context
        assert scored == [t for t in range(1, n) if t % window != 0]


def test_encode_documents_records_exactly_the_covered_text(tiny_llama):
    lm = load_model(tiny_llama)
    full = encode_documents(lm.tokenizer, DOCS)
    assert full.docs == DOCS and full.n_bytes == sum(len(d.encode()) for d in DOCS)
    assert full.ids[0].item() == lm.tokenizer.bos_token_id
    cut = encode_documents(lm.tokenizer, DOCS, max_tokens=30)
    assert len(cut.ids) == 30
    # The covered text re-encodes to the same tokens: nothing counted that was not scored.
    again = encode_documents(lm.tokenizer, cut.docs)
    assert again.ids.tolist() == cut.ids.tolist()


def test_uniform_model_has_perplexity_equal_to_vocab(tiny_llama):
    lm = load_model(tiny_llama)
    with torch.no_grad():
        lm.model.lm_head.weight.zero_()  # tied: all logits 0 -> uniform next-token distribution
    enc = encode_documents(lm.tokenizer, DOCS)
    scores = score_text(lm.model, enc, window=32, stride=16)
    assert scores.n_predicted == len(enc.ids) - 1
    assert math.exp(scores.nll_sum / scores.n_predicted) == pytest.approx(lm.model.config.vocab_size, rel=1e-5)


def test_model_against_itself_is_exactly_faithful(tiny_llama):
    a, b = load_model(tiny_llama), load_model(tiny_llama)
    ms = {
        m.metric: m
        for m in measure_quality(
            a.model,
            a.tokenizer,
            DOCS,
            PerplexityProtocol(window=32, stride=16),
            context=256,
            data_desc={},
            reference=b.model,
        )
    }
    assert ms["kl_ref_nats"].value == 0.0
    assert ms["top1_agree_frac"].value == 1.0
    assert ms["ppl_word"].value > ms["ppl_byte"].value  # several bytes per word


def test_other_model_is_not_faithful(tiny_models):
    from conftest import build_tiny_model

    a = load_model(tiny_models["llama"])
    enc = encode_documents(a.tokenizer, DOCS)
    other = load_model(build_tiny_model("llama", tiny_models["llama"].parent / "llama-seed1", seed=1))
    scores = score_text(a.model, enc, 32, 16, reference=other.model)
    assert scores.kl_sum > 0  # (tied random models both predict "repeat the input", so argmaxes agree)


def test_window_is_capped_at_context_and_protocol_recorded(tiny_llama):
    lm = load_model(tiny_llama)
    ms = measure_quality(
        lm.model, lm.tokenizer, DOCS, PerplexityProtocol(window=4096, stride=4096), context=64, data_desc={"data": "x"}
    )
    proto = ms[0].protocol
    assert proto["window"] == 64 and proto["stride"] == 64 and proto["data"] == "x"
    assert {m.metric for m in ms} == {"ppl_tok", "ppl_word", "ppl_byte", "robust_ppl_ratio"}


def test_robustness_reuses_the_clean_score_only_when_it_is_the_same_text(tiny_llama):
    lm = load_model(tiny_llama)
    whole = PerplexityProtocol(window=32, stride=16, max_tokens=0, robust_tokens=0)  # clean text = the scored text
    ms = {m.metric: m for m in measure_quality(lm.model, lm.tokenizer, DOCS, whole, context=64, data_desc={})}
    assert ms["robust_ppl_ratio"].protocol["clean_ppl_byte"] == ms["ppl_byte"].value
    part = PerplexityProtocol(window=32, stride=16, max_tokens=0, robust_tokens=40)  # a prefix: scored on its own
    ms = {m.metric: m for m in measure_quality(lm.model, lm.tokenizer, DOCS, part, context=64, data_desc={})}
    enc = encode_documents(lm.tokenizer, DOCS, 40)
    expected = math.exp(score_text(lm.model, enc, 32, 16).nll_sum / enc.n_bytes)
    assert ms["robust_ppl_ratio"].protocol["clean_ppl_byte"] == expected != ms["ppl_byte"].value


def test_split_documents():
    assert split_documents("a\n<|endoftext|>\nb\nc\n<|endoftext|>\n") == ["a", "b\nc"]
    assert split_documents("no separator here") == ["no separator here"]
