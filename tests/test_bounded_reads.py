"""`--data` and the child's log are read in bounded memory, and only what the protocol evaluates
travels to the measuring child; the evaluated text (hence every perplexity) is unchanged."""

import json
import tracemalloc
from dataclasses import asdict, replace

import pytest

from conftest import ASSETS, STORIES, needs_assets
from frugalm.benchmark.api import BenchConfig, prepare
from frugalm.measure.quality import PerplexityProtocol
from frugalm.models import ModelSource, load_tokenizer
from frugalm.text.encode import encode_documents, evaluated_documents
from frugalm.text.files import read_text, split_documents

LINE = b"Once upon a time there was a little model. It wanted to run on a small computer.\n"


def _big_file(path, mb: int, separators: bool):
    block = (LINE * 20 + (b"<|endoftext|>\n" if separators else b"")) * 600  # ~1 MB
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
    return path


@pytest.mark.parametrize("separators", [False, True])
def test_prepare_on_a_large_file_takes_little_memory_and_ships_little(tiny_llama, tmp_path, separators):
    path = _big_file(tmp_path / "big.txt", 200, separators)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        spec = prepare(tiny_llama, BenchConfig(data=str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 10, (
        f"prepare peaked at {peak / 2**20:.1f} MiB of Python memory for a {size / 2**20:.0f} MiB file"
    )
    shipped = len(json.dumps(asdict(spec)))
    assert shipped < 4 << 20, f"the child's spec is {shipped / 2**20:.1f} MiB"
    # what is shipped is what the protocol evaluates, and covers its tokens
    tok = load_tokenizer(ModelSource("tiny", tiny_llama))
    assert len(encode_documents(tok, spec.docs, 65_536).ids) == 65_536
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    assert spec.data_desc == {"data": str(path), "data_sha256": h.hexdigest()}


def test_prepare_ships_no_text_when_no_quality_metric_is_asked(tiny_llama, text_file):
    spec = prepare(tiny_llama, BenchConfig(data=str(text_file), metrics=("params_count",)))
    assert spec.docs == []


def _assert_same_evaluation(tokenizer, path, max_tokens):
    """The documents shipped encode to exactly what the whole text encoded to before."""
    whole = encode_documents(tokenizer, split_documents(read_text(path)), max_tokens)
    shipped = encode_documents(tokenizer, evaluated_documents(path, tokenizer, max_tokens), max_tokens)
    assert shipped.docs == whole.docs
    assert shipped.ids.tolist() == whole.ids.tolist()
    robust = PerplexityProtocol().robust_tokens
    assert (
        encode_documents(tokenizer, shipped.docs, robust).ids.tolist()
        == encode_documents(tokenizer, whole.docs, robust).ids.tolist()
    )


@pytest.mark.parametrize("max_tokens", [0, 2, 3, 100, 4096, 65_536, 300_000])
def test_evaluated_text_is_unchanged_on_the_tiny_model(tiny_llama, text_file, tmp_path, max_tokens):
    tok = load_tokenizer(ModelSource("tiny", tiny_llama))
    one_doc = tmp_path / "one.txt"
    one_doc.write_bytes(LINE * 20_000)  # a single document far longer than the first guess
    for path in (text_file, one_doc):
        _assert_same_evaluation(tok, path, max_tokens)


@needs_assets()
@pytest.mark.parametrize(
    "name", ["wikitext2_test_raw.txt", "wikitext2_valid_tokens.txt", "tinystories_valid_0000-0499.txt"]
)
@pytest.mark.parametrize("tokenizer", [STORIES, ASSETS / "tokenizers" / "llama2-32k"])
def test_evaluated_text_is_unchanged_on_real_text(name, tokenizer):
    tok = load_tokenizer(ModelSource("t", tokenizer))
    for max_tokens in (1000, 65_536, 200_000):
        _assert_same_evaluation(tok, ASSETS / "data" / name, max_tokens)


def test_unbounded_protocol_ships_every_document(tiny_llama, text_file):
    config = BenchConfig(data=str(text_file), protocol=replace(PerplexityProtocol(), max_tokens=0))
    assert prepare(tiny_llama, config).docs == split_documents(read_text(text_file))


def test_child_log_tail_is_read_from_the_end(tmp_path):
    from frugalm.benchmark.runner import read_tail

    log = tmp_path / "child.log"
    with open(log, "wb") as f:
        for _ in range(100):
            f.write(b"x" * (1 << 20))
        f.write("\nlast words \u00e9\u4f60\n".encode())
    tracemalloc.start()
    try:
        tail = read_tail(log, 4000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tail.endswith("\nlast words \u00e9\u4f60\n") and len(tail) == 4000
    assert peak < 1 << 20
    small = tmp_path / "small.log"
    small.write_text("only this")
    assert read_tail(small, 4000) == "only this"
    assert read_tail(tmp_path / "missing.log", 4000) == ""
