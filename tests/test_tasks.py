"""Tasks as quality figures: items built from text, scored as the model runs, compared paired."""

from __future__ import annotations

import os
import random
import shutil

import pytest
import torch

from conftest import STORIES, TINYSTORIES, load, needs_assets
from frugalm.errors import ConfigError
from frugalm.measure.stats import bootstrap_delta
from frugalm.measure.tasks import TaskProtocol, _encode_item, build_items, measure_tasks, score_items

PROSE = [
    "Tom had a red ball. He threw the ball to his dog Max. Max ran after the ball and brought it back. "
    "Tom laughed and hugged Max. They played until the sun went down.",
    "Anna liked to paint. One day she painted a big blue whale. Her mother put the picture on the wall. "
    "Anna was very proud of her whale.",
    "The old tree stood by the river. Birds made nests in its branches every spring. "
    "A little girl sat under it to read her books.",
]
CODE = [
    "def area(width, height):\n    result = width * height\n    return result\n",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n        return item\n",
]


def test_items_come_from_the_text_and_are_seeded():
    p = TaskProtocol(items=50, seed=3)
    cloze, n = build_items("cloze", PROSE, p)
    assert n == len(cloze) > 5  # fewer candidates than items: all of them
    for item in cloze:
        doc = PROSE[item.doc]
        assert doc[: item.at].rstrip() == item.context and doc[item.at :].startswith(item.options[0].strip())
        assert item.options[0].startswith(" ") and len(item.context.split()) >= 8
    assert {i.options[0].strip() for i in cloze} >= {"back", "down", "whale", "books"}
    choice, _ = build_items("choice", PROSE, p)
    for item in choice:
        assert len(item.options) == 4 and item.options[0].strip() in PROSE[item.doc]
        assert all(o.strip() not in PROSE[item.doc] for o in item.options[1:])  # distractors: other documents
    code, _ = build_items("code", CODE, p)
    assert {i.options[0].strip() for i in code} == {"width", "height", "result", "item"}  # names used before
    assert build_items("choice", PROSE, p) == build_items("choice", PROSE, p)  # the same items every time
    assert (
        build_items("choice", PROSE, TaskProtocol(items=3, seed=4))[0]
        != build_items("choice", PROSE, TaskProtocol(items=3, seed=5))[0]
    )


def test_multiple_choice_needs_other_documents():
    with pytest.raises(ConfigError, match="too few sentences in other documents"):
        build_items("choice", PROSE[:1], TaskProtocol())
    assert build_items("choice", PROSE[:1], TaskProtocol(), strict=False)[0] == []


def test_protocol_is_checked():
    with pytest.raises(ConfigError, match="unknown task"):
        TaskProtocol(tasks=("clozee",)).check()
    with pytest.raises(ConfigError, match="choices >= 2"):
        TaskProtocol(choices=1).check()


def test_cloze_score_is_greedy_exact_match(tiny_llama):
    """An item is correct exactly when greedy generation from its context reproduces the answer."""
    from transformers import AutoTokenizer

    model, tok = load(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    items, _ = build_items("cloze", PROSE, TaskProtocol())
    # make half the items answerable: the answer is what the model itself generates greedily
    for item in items[::2]:
        ids = torch.tensor([[tok.bos_token_id, *tok(item.context, add_special_tokens=False)["input_ids"]]])
        out = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1] :]
        item.options = [tok.decode(out[:1])]
    scores = score_items(model, tok, items, "cloze", TaskProtocol())
    for item, correct in zip(items, scores.correct):
        context, (answer,) = _encode_item(tok, item, 128, None)
        out = model.generate(torch.tensor([context]), max_new_tokens=len(answer), do_sample=False)
        assert correct == float(out[0, len(context) :].tolist() == answer)
    assert 0 < sum(scores.correct) < len(items)


def test_a_model_against_itself_differs_by_nothing(tiny_llama):
    from transformers import AutoTokenizer

    model, tok = load(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    figures = measure_tasks(model, tok, PROSE, TaskProtocol(tasks=("cloze", "choice")), data_desc={}, reference=model)
    assert [m.metric for m in figures] == ["acc_cloze", "acc_choice"]
    for m in figures:
        assert m.protocol["paired"]["delta"] == 0 and m.protocol["paired"]["ci"] == [0, 0]
        assert len(m.samples) == m.n == m.protocol["items"] and m.value == sum(m.samples) / m.n


def test_paired_interval_is_narrower_when_items_agree():
    rng = random.Random(0)
    base = [float(rng.random() < 0.6) for _ in range(300)]
    variant = [b if rng.random() < 0.95 else 1 - b for b in base]
    d = bootstrap_delta(variant, base)
    assert d["delta"] == pytest.approx(sum(variant) / 300 - sum(base) / 300)
    paired, unpaired = d["ci"][1] - d["ci"][0], d["ci_unpaired"][1] - d["ci_unpaired"][0]
    assert paired < 0.6 * unpaired and d["ci"][0] <= d["delta"] <= d["ci"][1]
    assert bootstrap_delta(variant, base) == d  # seeded
    with pytest.raises(ValueError, match="same, non-zero number"):
        bootstrap_delta([1.0], [1.0, 0.0])


@pytest.mark.integration
@needs_assets()
def test_tasks_separate_damage_from_noise_on_stories260k(tmp_path):
    """The issue's acceptance: 2:4 Wanda is separated from the baseline (paired interval excludes 0),
    weight-only int8 is not (it contains 0), and the paired interval is narrower than the unpaired one."""
    from frugalm.benchmark.api import BenchConfig
    from frugalm.models import load_model
    from frugalm.recipe import load_recipe
    from frugalm.run import RunConfig, run_recipe
    from frugalm.text.encode import evaluated_documents

    base = load_model(STORIES)
    docs = evaluated_documents(TINYSTORIES, base.tokenizer, 65_536)
    protocol = TaskProtocol(tasks=("cloze", "choice"))
    results = {}
    for name in ("wanda-2of4", "int8-w8a16"):
        recipe = load_recipe(f"src/frugalm/recipes/{name}.yaml")
        config = RunConfig(out_dir=str(tmp_path / name), bench=BenchConfig(data=str(TINYSTORIES)), measure=False)
        variant = load_model(run_recipe(recipe, STORIES, config).artifact)
        figures = measure_tasks(variant.model, variant.tokenizer, docs, protocol, data_desc={}, reference=base.model)
        results[name] = {m.metric: m.protocol["paired"] for m in figures}
    for metric in ("acc_cloze", "acc_choice"):
        wanda, int8 = results["wanda-2of4"][metric], results["int8-w8a16"][metric]
        assert wanda["ci"][1] < 0, (metric, wanda)
        assert int8["ci"][0] <= 0 <= int8["ci"][1], (metric, int8)
        halfwidth = lambda ci: (ci[1] - ci[0]) / 2  # noqa: E731
        assert halfwidth(int8["ci"]) <= 0.6 * halfwidth(int8["ci_unpaired"]), (metric, int8)


def test_cascade_sweep_counts_every_threshold():
    from frugalm.measure.cascade import ESCALATE_ALL, choose, front, sweep

    small = [1.0, 0.0, 1.0, 0.0]
    large = [1.0, 1.0, 1.0, 0.0]
    confidence = [0.9, 0.2, 0.6, 0.2]  # two items tie at 0.2: one threshold escalates both
    points = sweep(small, large, confidence, [1.0] * 4, [4.0] * 4)
    assert [p["tau"] for p in points] == [0.2, 0.6, 0.9, ESCALATE_ALL]
    assert [p["escalated"] for p in points] == [0, 0.5, 0.75, 1.0]
    assert [p["accuracy"] for p in points] == [0.5, 0.75, 0.75, 0.75]
    assert [p["cost_ratio"] for p in points] == [0.25, 0.75, 1.0, 1.25]  # 4 small + 4 per escalated, over 16
    assert front(points) == points[:2]
    assert choose(points, large_accuracy=0.75, max_drop=0.0) == points[1]
    assert choose(points, large_accuracy=0.75, max_drop=0.3) == points[0]


def test_cascade_variant_answers_through_its_small_model(tiny_llama, tmp_path):
    """Items the small model is sure of are its own; the rest are the large model's; the variant reloads as a cascade."""
    from transformers import AutoTokenizer

    from frugalm.models import load_model, save_variant
    from frugalm.runtime import cascade
    from frugalm.runtime.modules import INFERENCE_ATTR
    from frugalm.techniques import cascade as stage
    from frugalm.techniques.base import Context

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    docs = PROSE * 4
    model = load(tiny_llama)
    ctx = Context(tokenizer=tok, training_documents=docs)
    stage.apply(model, stage.CascadeConfig(items=20, tau=0.5, confidence="max_prob"), ctx)
    assert ctx.changes[-1]["sweep"]["small_cost_ratio"] == pytest.approx(1.0)  # int4 weight-only: the same FLOPs
    folder = save_variant(model, tok, tmp_path / "cascade", {})
    again = load_model(folder)
    assert again.inference["cascade"]["tau"] == 0.5 and (folder / "cascade" / "config.json").is_file()
    protocol = TaskProtocol(tasks=("choice",))
    figures = {m.metric: m for m in measure_tasks(again.model, tok, docs, protocol, data_desc={})}
    items, _ = build_items("choice", docs, protocol)
    small = score_items(cascade.small_of(again.model), tok, items, "choice", protocol)
    plain = load_model(folder).model
    setattr(plain, INFERENCE_ATTR, {})
    large = score_items(plain, tok, items, "choice", protocol)
    want = [lg if c < 0.5 else sm for sm, lg, c in zip(small.correct, large.correct, small.confidence["max_prob"])]
    assert figures["acc_choice"].samples == want
    escalated = sum(c < 0.5 for c in small.confidence["max_prob"]) / len(items)
    assert figures["cascade_escalated_frac"].value == pytest.approx(escalated)
    counted = score_items(plain, tok, items, "choice", protocol, flops=True).flops  # int4: the same FLOPs per item
    up = sum(f for f, c in zip(counted, small.confidence["max_prob"]) if c < 0.5)
    assert figures["cascade_cost_ratio"].value == pytest.approx((sum(counted) + up) / sum(counted))


def test_the_reference_is_scored_once_per_store(tiny_llama, tmp_path):
    """optimize's variants share one reference: its item scores are kept in the store under a key
    of everything they depend on, and a later run with the same key uses them instead of rescoring."""
    from frugalm.benchmark.api import BenchConfig, bench, prepare, reference_score_keys
    from frugalm.store import Store

    text = tmp_path / "prose.txt"
    text.write_text("\n\n".join(PROSE * 3))
    reference = shutil.copytree(tiny_llama, tmp_path / "reference")
    config = BenchConfig(data=str(text), metrics=("acc_cloze",), tasks=TaskProtocol(tasks=("cloze",)),
                         reference=str(reference), workloads=("chat",), warmup=0, repetitions=1)  # fmt: skip
    first, again = (bench(tiny_llama, config, store=tmp_path / "s.db").measurements for _ in range(2))
    (a,), (b,) = first, again
    assert a.protocol["paired"]["reference_scored"] == "in this run"
    assert b.protocol["paired"]["reference_scored"] == "in an earlier run (same files, items, settings)"
    assert a.protocol["paired"] == {**b.protocol["paired"], "reference_scored": "in this run"}
    keys = reference_score_keys(prepare(tiny_llama, config))
    with Store(tmp_path / "s.db") as store:
        assert store.reference_scores(keys["cloze"]) == b.samples  # the reference is a copy of the model
    # anything the scores depend on changes the key: here the reference's files
    os.utime(reference / "config.json", ns=(1, 1))
    assert reference_score_keys(prepare(tiny_llama, config)) != keys


def test_reference_scores_given_are_used_and_missing_ones_filled(tiny_llama):
    from transformers import AutoTokenizer

    model, tok = load(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    protocol = TaskProtocol(tasks=("cloze", "choice"))
    n = len(build_items("cloze", PROSE, protocol)[0])
    known = {"cloze": [0.0] * n}
    figures = measure_tasks(model, tok, PROSE, protocol, data_desc={}, reference=model, reference_scores=known)
    assert figures[0].protocol["paired"]["reference_value"] == 0  # the scores given, not the model's
    assert known["choice"] == figures[1].samples  # scored on the reference (the model itself) and kept
