"""End to end on the real pretrained model of ../shared/assets (marker: integration)."""

import pytest

from conftest import STORIES, TINYSTORIES, needs_assets
from frugalm.benchmark.api import BenchConfig, bench
from frugalm.measure.quality import PerplexityProtocol, measure_quality
from frugalm.models import load_model
from frugalm.text.files import read_text, split_documents

pytestmark = [pytest.mark.integration, needs_assets()]
REFERENCE_PPL = 3.682  # ../shared/assets/README.md: 512-token non-overlapping windows, first 65,536 tokens


def test_stories260k_matches_the_reference_perplexity():
    lm = load_model(STORIES)
    docs = split_documents(read_text(TINYSTORIES))
    reference_protocol = PerplexityProtocol(window=512, stride=512, max_tokens=65_536, robust_tokens=512)
    ms = {
        m.metric: m
        for m in measure_quality(lm.model, lm.tokenizer, docs, reference_protocol, context=512, data_desc={})
    }
    assert ms["ppl_tok"].protocol["predicted_tokens"] == 65_408  # as the assets README counts
    assert ms["ppl_tok"].value == pytest.approx(REFERENCE_PPL, rel=0.005)


def test_bench_against_itself_end_to_end(tmp_path):
    config = BenchConfig(
        data=str(TINYSTORIES),
        reference=str(STORIES),
        workloads=("chat",),
        repetitions=2,
        protocol=PerplexityProtocol(max_tokens=8192, robust_tokens=4096),
    )
    result = bench(STORIES, config, store=tmp_path / "s.db")
    ms = {m.metric: m for m in result.measurements if m.workload in (None, "chat")}
    assert ms["kl_ref_nats"].value == 0.0 and ms["top1_agree_frac"].value == 1.0
    assert ms["robust_ppl_ratio"].value >= 1.0
    assert ms["params_count"].value == 260_032
    assert 2.5 < ms["ppl_tok"].value < 5  # a real model on its own domain (8k tokens, stride 256)
