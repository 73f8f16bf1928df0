"""lm-evaluation-harness through `frugalm eval`: lm-eval's figures on a model as it runs, offline.

The cross-check: lm-eval's rolling log-likelihood (word perplexity) of TinyStories documents in a
local jsonl equals frugalm's own perplexity code on the same documents, the same BOS and the same
windows. Skipped only where the eval extra is not installed.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sqlite3

import pytest

from conftest import STORIES, TINYSTORIES, error_message, needs_assets

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval (the eval extra) is not installed: pip install -e '.[eval]'")

L = 64
"""lm-eval's max_length in the cross-check: frugalm's window is L + 1 tokens, its stride L."""


def _yaml(name: str, data: str, cache: str, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
        f"test_split: test\n{body}"
    )


def _cut_to_windows(tokenizer, doc: str) -> str | None:
    """The longest prefix of `doc` ending at a word whose tokens are a whole number (>= 2) of L-token
    windows: lm-eval and frugalm then use the very same windows (see the windows test below)."""
    from frugalm.text.encode import encode_text

    for end in reversed([m.end() for m in re.finditer(r"\S+", doc)]):
        n = len(encode_text(tokenizer, doc[:end])["input_ids"])
        if n % L == 0:
            return doc[:end] if n >= 2 * L else None
    return None


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of task YAMLs over jsonl files of TinyStories documents; (folder, rolling documents)."""
    from frugalm.models import load_tokenizer, resolve_model
    from frugalm.text.files import iter_documents

    if not STORIES.is_dir():
        pytest.skip(f"shared assets not found at {STORIES.parent.parent}")
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    tokenizer = load_tokenizer(resolve_model(STORIES))
    stories = [d for d, _ in itertools.islice(iter_documents(TINYSTORIES), 24)]
    rolling = [c for c in (_cut_to_windows(tokenizer, d) for d in stories[:6]) if c][:4]
    rolling.append(stories[6].split(". ")[0] + ".")  # one short document: a single window
    sentences = [d.split(". ") for d in stories[8:]]
    choice = [
        {"context": s[0] + ".", "choices": [s[1]] + [o[1] for o in sentences[i + 1 : i + 4]], "label": 0}
        for i, s in enumerate(sentences[:12])
    ]
    generate = [{"prompt": s[0] + ".", "answer": s[1]} for s in sentences[:6]]
    for name, rows in (("docs", [{"text": d} for d in rolling]), ("choice", choice), ("generate", generate)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yamls = root / "yaml"
    yamls.mkdir()
    cache = root / "hf-datasets"
    (yamls / "ppl.yaml").write_text(_yaml("stories_ppl", root / "docs.jsonl", cache, (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))  # fmt: skip
    (yamls / "choice.yaml").write_text(_yaml("stories_choice", root / "choice.jsonl", cache, (
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))  # fmt: skip
    (yamls / "generate.yaml").write_text(_yaml("stories_generate", root / "generate.jsonl", cache, (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: ' {{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 16\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))  # fmt: skip
    return yamls, rolling


def test_lm_eval_rolling_windows_are_frugalms_but_for_a_partial_last_one():
    """lm-eval's windows (max_length L, context 1) over [start] + n tokens are frugalm's
    rolling_windows(n + 1, L + 1, L), except that lm-eval slides a partial last window back to a
    full L tokens of context: equal when n <= L or n is a multiple of L."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from frugalm.measure.quality import rolling_windows

    for length in (1, 2, 5, 8):
        for n in range(1, 30):
            # token i sits at position i of [0] + tokens, so a window's tokens are its positions
            theirs = []
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(list(range(1, n + 1)), 0, length, 1)):
                seen = (ctx + cont)[-(length + 1) :]
                theirs.append((seen[0], seen[-1] + 1, cont[0]))
            ours = rolling_windows(n + 1, length + 1, length)
            if n <= length or n % length == 0:
                assert theirs == ours, (length, n)
            else:
                assert theirs[:-1] == ours[:-1] and theirs[-1][1:] == ours[-1][1:], (length, n)
                assert theirs[-1][0] < ours[-1][0] and theirs[-1][1] - theirs[-1][0] == length + 1, (length, n)


@pytest.mark.integration
@needs_assets()
def test_lm_eval_word_perplexity_equals_frugalms_ppl_word(tasks):
    """The issue's cross-check, within 0.1%: lm-eval's word_perplexity through a YAML task with
    output_type loglikelihood_rolling against frugalm's score_text, per document, BOS first."""
    from frugalm.benchmark.harness import HarnessConfig, evaluate
    from frugalm.measure.quality import score_text
    from frugalm.models import load_model
    from frugalm.text.encode import encode_documents

    folder, docs = tasks
    figures = {
        m.metric: m for m in evaluate(STORIES, ["stories_ppl"], include_path=folder, config=HarnessConfig(max_length=L))
    }
    lm = load_model(STORIES)
    encoded = [encode_documents(lm.tokenizer, [d]) for d in docs]
    assert max(len(e.ids) for e in encoded) > 2 * L and min(len(e.ids) for e in encoded) <= L  # multi- and one-window
    nll = sum(score_text(lm.model, e, L + 1, L).nll_sum for e in encoded)
    words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval's count_words
    assert words == sum(e.n_words for e in encoded)  # frugalm's word count agrees on these documents
    ppl_word = math.exp(nll / words)
    word = figures["lm_eval_word_ppl"]
    print(f"lm-eval word_perplexity {word.value:.6f}, frugalm ppl_word {ppl_word:.6f}")
    assert abs(word.value / ppl_word - 1) < 1e-3
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    assert figures["lm_eval_byte_ppl"].value == pytest.approx(math.exp(nll / n_bytes), rel=1e-3)
    assert figures["lm_eval_bits_per_byte"].value == pytest.approx(nll / n_bytes / math.log(2), rel=1e-3)
    assert word.workload == "stories_ppl:word_perplexity" and word.method == "measured" and word.n == len(docs)
    [data] = word.protocol["data_files"]
    assert data["path"].endswith("docs.jsonl") and len(data["sha256"]) == 64
    assert word.protocol["lm_eval"] == lm_eval.__version__ and word.protocol["num_fewshot"] == 0


@pytest.mark.integration
@needs_assets()
def test_a_model_paired_with_itself_differs_by_nothing(tasks):
    from frugalm.benchmark.harness import evaluate

    folder, _ = tasks
    figures = evaluate(STORIES, ["stories_choice"], include_path=folder, reference=STORIES)
    assert {m.workload for m in figures} == {"stories_choice:acc", "stories_choice:acc_norm"}
    for m in figures:
        paired = m.protocol["paired"]
        assert paired["delta"] == 0 and paired["ci"] == [0.0, 0.0] and paired["discordant"] == 0
        assert paired["items"] == m.n == 12 and m.protocol["reference"]["value"] == m.value
        assert m.spread == m.protocol["stderr"] and m.spread > 0  # lm-eval's stderr
        assert len(m.samples) == 12 and sum(m.samples) / 12 == pytest.approx(m.value)


@pytest.mark.integration
@needs_assets()
def test_packed_int4_variant_scored_and_stored_with_its_paired_interval(tasks, tmp_path, capsys):
    """`frugalm eval` on a packed int4 artifact (its kernels) against its base: one stored run."""
    from frugalm.benchmark.api import BenchConfig
    from frugalm.cli import main
    from frugalm.recipe import load_recipe
    from frugalm.run import RunConfig, run_recipe
    from frugalm.store import Store

    folder, _ = tasks
    config = RunConfig(out_dir=str(tmp_path / "int4"), bench=BenchConfig(data=str(TINYSTORIES)), measure=False)
    variant = run_recipe(load_recipe("src/frugalm/recipes/int4-rtn.yaml"), STORIES, config).artifact
    db = tmp_path / "runs.db"
    argv = ["eval", str(variant), "--task", "stories_choice", "--task", "stories_generate", "--include", str(folder)]
    assert main([*argv, "--reference", str(STORIES), "--store", str(db)]) == 0
    out = capsys.readouterr().out
    assert "stories_choice:acc " in out and "(paired, 95%)" in out
    with Store(db) as store:
        [run] = store.runs()
        figures = {m.workload: m for m in store.measurements(run.id)}
    assert run.kind == "lm_eval" and run.config["tasks"] == ["stories_choice", "stories_generate"]
    assert set(figures) == {"stories_choice:acc", "stories_choice:acc_norm", "stories_generate:exact_match"}
    for m in figures.values():
        assert m.metric == "lm_eval_acc" and m.unit == "fraction" and 0 <= m.value <= 1 and m.spread is not None
        lo, hi = m.protocol["paired"]["ci"]
        assert lo <= m.protocol["paired"]["delta"] <= hi
    assert "packed_layers" in (variant / "frugalm.json").read_text()
    assert figures["stories_choice:acc"].protocol["inference"]["linear_formats"]  # scored as it runs: packed


@pytest.mark.integration
@needs_assets()
def test_kv_quantized_variant_is_scored_through_its_cache(tasks, tmp_path):
    """The harness scores a kv_cache_quant variant as frugalm's perplexity does: through its cache."""
    from lm_eval.api.instance import Instance

    from frugalm.benchmark.api import BenchConfig
    from frugalm.benchmark.harness_lm import HarnessLM
    from frugalm.measure.quality import score_text
    from frugalm.models import load_model
    from frugalm.recipe import load_recipe
    from frugalm.run import RunConfig, run_recipe
    from frugalm.text.encode import encode_documents

    _, docs = tasks
    config = RunConfig(out_dir=str(tmp_path / "kv"), bench=BenchConfig(data=str(TINYSTORIES)), measure=False)
    kv = load_model(run_recipe(load_recipe("src/frugalm/recipes/kv-int4.yaml"), STORIES, config).artifact)
    plain = load_model(STORIES)
    # one window of the longest document: past the cache's full-precision residual (128 tokens)
    encoded = max((encode_documents(kv.tokenizer, [d]) for d in docs), key=lambda e: len(e.ids))
    n = len(encoded.ids)
    assert n > 256
    request = [Instance("loglikelihood_rolling", {}, (encoded.docs[0],), 0)]
    through_cache = -HarnessLM(kv, n).loglikelihood_rolling(request)[0]
    assert through_cache == pytest.approx(score_text(kv.model, encoded, n + 1, n).nll_sum, rel=1e-6)
    assert through_cache != pytest.approx(-HarnessLM(plain, n).loglikelihood_rolling(request)[0], rel=1e-6)


@pytest.mark.integration
@needs_assets()
def test_generate_until_is_greedy_and_stops_at_the_stop_string():
    import torch
    from lm_eval.api.instance import Instance

    from frugalm.benchmark.harness_lm import HarnessLM
    from frugalm.models import load_model

    lm = load_model(STORIES)
    context = "Once upon a time, there was a little girl named"
    [text] = HarnessLM(lm).generate_until(
        [Instance("generate_until", {}, (context, {"until": ["."], "max_gen_toks": 24}), 0)]
    )
    ids = torch.tensor([[lm.tokenizer.bos_token_id, *lm.tokenizer(context, add_special_tokens=False)["input_ids"]]])
    greedy = lm.model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    expected = lm.tokenizer.decode(greedy, skip_special_tokens=True).split(".")[0]
    assert text == expected and text.strip() and "." not in text


def test_cli_refuses_a_missing_task_folder_in_one_line_and_stores_nothing(tmp_path, capsys, tiny_llama):
    from frugalm.cli import main

    db = tmp_path / "runs.db"
    assert main(["eval", str(tiny_llama), "--task", "x", "--include", str(tmp_path / "nope"), "--store", str(db)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err and "(--include) is not a folder" in err
    assert not db.exists()


def test_cli_refuses_an_unknown_task_and_stores_no_run(tmp_path, capsys, tiny_llama):
    from frugalm.cli import main

    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "t.yaml").write_text(
        _yaml("mine", tmp_path / "d.jsonl", tmp_path, "output_type: loglikelihood\n")
    )
    db = tmp_path / "runs.db"
    assert (
        main(["eval", str(tiny_llama), "--task", "mien", "--include", str(tmp_path / "yaml"), "--store", str(db)]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown lm-eval task 'mien'" in err
    assert sqlite3.connect(db).execute("SELECT count(*) FROM runs").fetchone() == (0,)


def test_task_data_that_is_not_local_is_refused_in_one_line(tmp_path):
    from frugalm.benchmark.harness import import_lm_eval, load_tasks, task_manager
    from frugalm.errors import DataError

    import_lm_eval()
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "t.yaml").write_text(
        _yaml("mine", tmp_path / "gone.jsonl", tmp_path, "output_type: loglikelihood\n")
    )
    with pytest.raises(DataError) as exc:
        load_tasks(task_manager(tmp_path / "yaml", ["mine"]), ["mine"])
    assert "task 'mine'" in error_message(exc) and "gone.jsonl" in error_message(exc)
    with pytest.raises(DataError) as exc:  # a built-in task: its data are not in this machine's cache
        load_tasks(task_manager(None, ["lambada_openai"]), ["lambada_openai"])
    assert "task 'lambada_openai'" in error_message(exc) and "give a built-in task local data files" in error_message(
        exc
    )


def test_a_metric_that_fits_no_frugalm_metric_is_refused():
    from frugalm.benchmark.harness import frugalm_metric
    from frugalm.errors import ConfigError

    assert frugalm_metric("t", "acc_norm", True) == "lm_eval_acc"
    assert frugalm_metric("t", "word_perplexity", False) == "lm_eval_word_ppl"
    for name, higher in (("bleu", True), ("acc", False), ("word_perplexity", True)):
        with pytest.raises(ConfigError) as exc:
            frugalm_metric("t", name, higher)
        assert f"metric '{name}'" in error_message(exc)


def test_missing_extra_names_the_install_command(monkeypatch):
    import sys

    from frugalm.benchmark.harness import import_lm_eval
    from frugalm.errors import ConfigError

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(ConfigError) as exc:
        import_lm_eval()
    assert error_message(exc) == "lm-eval is not installed; pip install -e '.[eval]'"
