"""Prompt pruning: the least informative prompt tokens go before the prefill; its cost and saving are counted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import load
from frugalm.errors import TechniqueError
from frugalm.measure import compute
from frugalm.measure.workloads import Workload
from frugalm.runtime import prompt_pruning
from frugalm.runtime.decoding import layer_view
from frugalm.runtime.modules import INFERENCE_ATTR
from frugalm.techniques import prompt_pruning as stage
from frugalm.techniques.base import Context


def _pruning(tiny_llama, **options):
    model = load(tiny_llama)
    stage.apply(model, stage.PromptPruningConfig(**options), Context())
    return model


def test_drops_the_least_informative_tokens_and_keeps_order(tiny_llama):
    model = _pruning(tiny_llama, ratio=0.3, scorer_layers=1, keep_recent=4)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    kept = prompt_pruning.pruned(model, ids)
    assert kept.shape == (2, prompt_pruning.kept_count(40, 0.3)) == (2, 29)  # 11 of the 38 inner tokens go
    scorer = layer_view(model, "model.layers", 1)
    with torch.no_grad():
        logp = F.log_softmax(scorer(ids[:, :36]).logits[:, :-1], -1)
    info = -logp.gather(-1, ids[:, 1:36, None]).squeeze(-1)
    for row in range(2):
        dropped = sorted(info[row].argsort()[:11].tolist())  # the 11 lowest self-information among tokens 1..35
        keep = [i for i in range(40) if i - 1 not in dropped or i == 0]
        assert kept[row].tolist() == ids[row, keep].tolist()
        assert kept[row, 0] == ids[row, 0] and kept[row, -4:].tolist() == ids[row, -4:].tolist()


def test_short_prompts_are_left_alone(tiny_llama):
    model = _pruning(tiny_llama, keep_recent=32)
    ids = torch.arange(3, 30)[None]
    assert torch.equal(prompt_pruning.pruned(model, ids), ids)  # all of it is recent
    plain = load(tiny_llama)
    assert torch.equal(prompt_pruning.pruned(plain, ids), ids)  # no setting: no pruning


def test_prefill_flops_count_the_scorer_and_the_shorter_prefill(tiny_llama):
    model = _pruning(tiny_llama, ratio=0.3, scorer_layers=0, keep_recent=8)
    plain = load(tiny_llama)
    w = Workload("w", prompt_tokens=100, output_tokens=2, batch_size=1, description="")
    pruned_per_tok, _ = compute.flops_per_token(model, w, "cpu")
    dense_per_tok, _ = compute.flops_per_token(plain, w, "cpu")
    ids = compute.prompt_ids(plain, 1, 100, "cpu")
    n_kept = prompt_pruning.kept_count(100, 0.3)
    scorer = compute.count_flops(lambda: layer_view(plain, "model.layers", 0)(ids[:, :92]))
    setattr(model, INFERENCE_ATTR, {})
    prefill = compute.count_flops(lambda: model(ids[:, :n_kept], use_cache=True, **compute.forward_kwargs(model)))
    assert pruned_per_tok == (scorer + prefill) // 100
    assert prefill <= 0.72 * 100 * dense_per_tok  # the prefill itself: 71 of the 100 tokens
    assert pruned_per_tok < 0.9 * dense_per_tok  # with the scorer (here the embedding and head over 92 tokens)


def test_tasks_score_from_pruned_contexts(tiny_llama):
    from test_tasks import PROSE
    from transformers import AutoTokenizer

    from frugalm.measure.tasks import TaskProtocol, build_items, measure_tasks, score_items

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model, plain = _pruning(tiny_llama, ratio=0.5, keep_recent=2), load(tiny_llama)
    protocol = TaskProtocol(tasks=("choice",))
    items, _ = build_items("choice", PROSE, protocol)
    pruned, whole = (score_items(m, tok, items, "choice", protocol) for m in (model, plain))
    assert all(a != b for a, b in zip(pruned.option_scores, whole.option_scores))  # every context was cut
    figure = measure_tasks(model, tok, PROSE, protocol, data_desc={}, reference=plain)[0]
    assert figure.samples == pruned.correct
    assert figure.protocol["paired"]["reference_value"] == sum(whole.correct) / len(items)


def test_bad_options_are_refused(tiny_llama):
    with pytest.raises(TechniqueError, match="ratio must be in"):
        _pruning(tiny_llama, ratio=1.0)
    with pytest.raises(TechniqueError, match="saves nothing"):
        _pruning(tiny_llama, scorer_layers=2)
