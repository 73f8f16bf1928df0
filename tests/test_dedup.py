import numpy as np
import pytest

from dedup_ground_truth import (
    cross_family_max_jaccard,
    jaccard,
    planted_corpus,
    precision_recall,
    true_duplicates,
    word_shingles,
)
from frugalm.errors import ConfigError, DataError
from frugalm.text.dedup import (
    DedupConfig,
    dedup_text,
    lsh_bands,
    minhash_dedup,
    shingle_hashes,
)
from frugalm.text.files import DOC_SEPARATOR

THRESHOLD, NGRAM = 0.8, 5


@pytest.fixture(scope="module")
def corpus():
    return planted_corpus(250, seed=7)


@pytest.fixture(scope="module")
def truth(corpus):
    # All pairs compared: checks the family shortcut the benchmark relies on, too.
    removed = true_duplicates(corpus, THRESHOLD, NGRAM, all_pairs=True)
    assert removed == true_duplicates(corpus, THRESHOLD, NGRAM)
    return removed


def test_corpus_plants_duplicates_on_both_sides_of_the_threshold(corpus, truth):
    family_pairs = [
        jaccard(word_shingles(corpus.docs[i], NGRAM), word_shingles(corpus.docs[j], NGRAM))
        for i in range(len(corpus.docs))
        for j in range(i)
        if corpus.family[i] == corpus.family[j]
    ]
    js = np.array(family_pairs)
    assert ((js >= 0.8) & (js < 0.85)).sum() >= 10  # near the threshold, not only easy copies
    assert ((js >= 0.5) & (js < 0.8)).sum() >= 30  # near misses that must be kept
    assert len(truth) >= 50
    assert cross_family_max_jaccard(corpus, NGRAM) < 0.05


@pytest.mark.parametrize("verify", ["exact", "minhash"])
def test_recall_and_precision_against_exact_jaccard(corpus, truth, verify):
    result = minhash_dedup(corpus.docs, DedupConfig(threshold=THRESHOLD, ngram=NGRAM, verify=verify))
    precision, recall = precision_recall(result, truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert len(result.kept) + len(result.removed) == len(corpus.docs)
    kept = set(result.kept_indices)
    for dup in result.removed:  # every removal names a kept, earlier document
        assert dup.duplicate_of in kept and dup.duplicate_of < dup.index
        true_j = jaccard(
            word_shingles(corpus.docs[dup.index], NGRAM), word_shingles(corpus.docs[dup.duplicate_of], NGRAM)
        )
        assert abs(dup.jaccard_est - true_j) < 0.2
        if verify == "exact":
            assert dup.jaccard == pytest.approx(true_j, abs=1e-3)  # 32-bit hashes: collisions are rare


def test_seeded_and_char_shingles_find_copies():
    docs = [
        "The cat sat on the mat and looked at the dog for a long while.",
        "Completely different words about compilers and registers here.",
        "the cat sat on the mat and looked at the dog for a long while!",
    ]
    for shingle in ("word", "char"):
        config = DedupConfig(shingle=shingle, ngram=3, threshold=0.7)
        a, b = minhash_dedup(docs, config), minhash_dedup(docs, config)
        assert a.removed == b.removed and [d.index for d in a.removed] == [2]
        assert a.removed[0].duplicate_of == 0
    assert minhash_dedup(docs, DedupConfig(lowercase=False, ngram=2, threshold=0.95)).removed == []


def test_short_and_empty_documents_are_one_shingle():
    assert len(shingle_hashes("two words", DedupConfig(ngram=5))) == 1
    result = minhash_dedup(["", "", "one"])
    assert [(d.index, d.duplicate_of) for d in result.removed] == [(1, 0)]


def test_lsh_bands_catch_pairs_at_the_threshold():
    for t in (0.5, 0.8, 0.9):
        b, r = lsh_bands(t, 128)
        assert b * r <= 128 and 1 - (1 - t**r) ** b >= 0.99


def test_dedup_text_report():
    story = "Once upon a time a small model learned to read many stories in the evening."
    text = f"{story}\n{DOC_SEPARATOR}\nA different tale of ships and the sea and stars.\n{DOC_SEPARATOR}\n{story}\n"
    out, result = dedup_text(text)
    assert out.count(DOC_SEPARATOR) == 1 and out.count("Once upon") == 1
    report = result.to_dict()
    assert report["docs_in"] == 3 and report["docs_removed"] == 1
    assert report["removed"] == [{"index": 2, "duplicate_of": 0, "jaccard_est": 1.0, "jaccard": 1.0}]
    assert report["bytes_kept"] < report["bytes_in"]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(threshold=0), "threshold=0 must be in"),
        (dict(threshold=1.5), "threshold=1.5"),
        (dict(num_perm=1), "num_perm=1"),
        (dict(shingle="chars"), "did you mean 'char'"),
        (dict(ngram=0), "ngram=0"),
        (dict(seed=-1), "seed=-1"),
        (dict(verify="approx"), "unknown verify 'approx'"),
    ],
)
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ConfigError, match=match) as info:
        minhash_dedup(["a b c"], DedupConfig(**options))
    assert "\n" not in str(info.value)


def test_bad_documents_are_one_line_errors():
    with pytest.raises(DataError, match="list of document strings"):
        minhash_dedup("a single string")
    with pytest.raises(DataError, match="no documents"):
        minhash_dedup([])
    with pytest.raises(DataError, match="no documents"):
        dedup_text(f"\n{DOC_SEPARATOR}\n  \n")


def test_dedup_data_stage_hands_later_training_stages_the_kept_documents(tmp_path):
    from conftest import tiny_tokenizer
    from frugalm.recipe import parse_recipe
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context
    from frugalm.techniques.training_stage import TrainingOptions, training_tokens

    words = [f"w{i}" for i in range(400)]
    docs = [" ".join(words[i * 40 : (i + 1) * 40]) for i in range(10)]
    docs += [docs[0].replace("w1 ", "x1 "), docs[3] + " tail"]  # two near-copies (Jaccard >= 0.8)
    recipe, problems = parse_recipe(
        {"version": 1, "name": "dd", "stages": [{"technique": "dedup_data", "threshold": 0.8}]}
    )
    assert problems == []
    stage = recipe.stages[0]
    ctx = Context(tokenizer=tiny_tokenizer(), training_documents=docs, held_out_documents=[docs[9]])
    get_technique("dedup_data").apply(None, stage.config, ctx)
    change = ctx.changes[-1]["data"]
    assert change["docs_in"] == 12 and change["docs_removed"] == 2
    assert {(r["index"], r["duplicate_of"]) for r in change["removed"]} == {(10, 0), (11, 3)}
    assert ctx.training_documents == docs[:10] and "dedup_data" in ctx.training_source
    _, desc = training_tokens(TrainingOptions(seq_len=16), ctx, "full_finetune", 16)
    assert desc["documents"] == 9 and desc["held_out_documents_dropped"] == 1  # the kept ones, minus the evaluated one

    file = tmp_path / "train.txt"
    file.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n")
    ctx = Context(training_documents=None, held_out_documents=[docs[9]])
    from_file, _ = parse_recipe(
        {"version": 1, "name": "dd", "stages": [{"technique": "dedup_data", "data": str(file)}]}
    )
    get_technique("dedup_data").apply(None, from_file.stages[0].config, ctx)
    assert ctx.changes[-1]["data"]["docs_in"] == 11  # the evaluated document never enters
    with pytest.raises(DataError, match="no training text"):
        get_technique("dedup_data").apply(None, stage.config, Context())
