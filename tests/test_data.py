import pytest

from frugalm.errors import DataError
from frugalm.text.files import read_text
from frugalm.text.noise import add_char_noise


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"  \n\t", "is empty"),
        (b"\x89PNG\x00\x00", "binary"),
        (b"caf\xe9", "not valid UTF-8"),
    ],
)
def test_bad_text_is_one_line_error(tmp_path, content, match):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_text(path)
    assert "\n" not in str(info.value)


def test_folder_and_unreadable(tmp_path):
    with pytest.raises(DataError, match="is a folder"):
        read_text(tmp_path)
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    try:
        open(path).close()
        pytest.skip("running as a user who can read mode-000 files (root)")
    except PermissionError:
        with pytest.raises(DataError, match="cannot be read"):
            read_text(path)


def test_noise_is_seeded_and_at_the_stated_rate():
    text = "the quick brown fox jumps over the lazy dog " * 200
    a, b = add_char_noise(text, 0.1, seed=3), add_char_noise(text, 0.1, seed=3)
    assert a == b and a != add_char_noise(text, 0.1, seed=4)
    assert add_char_noise(text, 0.0, seed=3) == text
    changed = sum(x != y for x, y in zip(text.split(), a.split())) / len(text.split())
    assert 0.2 < changed < 0.5  # ~3.5 letters per word at 10%: 1 - 0.9**3.5 ~ 0.31 of words touched
    assert abs(len(a) - len(text)) < 0.02 * len(text)


# --- streaming reads: the same documents as split_documents(read_text(...)), in bounded memory ---

STREAM_TEXTS = [
    "a\n<|endoftext|>\nb\nc\n<|endoftext|>\n",
    "no separator here",
    "x\r\n<|endoftext|>\r\ny\r\nz\r\n  <|endoftext|>  \r\n\r\nw",
    "caf\u00e9 \u00e9t\u00e9\n<|endoftext|>\n\u4f60\u597d\u4e16\u754c\n<|endoftext|>\n\n<|endoftext|>\nemoji \U0001f600 end\n",
    "one\u2028two\x85three\n<|endoftext|>\u2029four\n",
    "\n\n<|endoftext|>\n<|endoftext|>\n   \n",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 7, 1 << 20])
def test_iter_documents_matches_split_documents(tmp_path, text, chunk_bytes):
    from frugalm.text.files import iter_documents, split_documents

    path = tmp_path / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    streamed = list(iter_documents(path, chunk_bytes=chunk_bytes))
    assert [d for d, _ in streamed] == split_documents(text)
    assert all(complete for _, complete in streamed)


def test_iter_documents_caps_a_long_document_and_stops(tmp_path):
    from frugalm.text.files import iter_documents

    path = tmp_path / "t.txt"
    path.write_text("short\n<|endoftext|>\n" + "long line " * 1000 + "\n<|endoftext|>\nnever read\n")
    docs = list(iter_documents(path, max_doc_chars=100, chunk_bytes=16))
    assert docs[0] == ("short", True)
    ((prefix, complete),) = docs[1:]
    assert not complete and ("long line " * 1000).startswith(prefix) and 80 <= len(prefix) <= 100


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"  \n\t", "is empty"),
        (b"\x89PNG\x00\x00", "binary"),
        (b"caf\xe9", "not valid UTF-8"),
        (b"ok" * 5000 + b"\xff", "not valid UTF-8"),
    ],
)
def test_check_text_file_refuses_what_read_text_refuses(tmp_path, content, match):
    from frugalm.text.files import check_text_file

    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        check_text_file(path, chunk_bytes=1024)
    assert "\n" not in str(info.value)


def test_check_text_file_hashes_the_bytes_as_before(tmp_path):
    import hashlib

    from frugalm.text.files import check_text_file

    path = tmp_path / "t.txt"
    text = "caf\u00e9\r\n<|endoftext|>\n" * 1000
    path.write_bytes(text.encode("utf-8"))
    assert check_text_file(path, chunk_bytes=7) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def _big_file(path, mb: int, separators: bool):
    line = b"Once upon a time there was a little model. It wanted to run on a small computer.\n"
    block = (line * 20 + (b"<|endoftext|>\n" if separators else b"")) * 600  # ~1 MB
    with open(path, "wb") as f:
        for _ in range(mb):
            f.write(block)
    return path


def test_reading_a_large_file_takes_little_memory(tmp_path):
    import tracemalloc

    from frugalm.text.files import check_text_file, iter_documents

    path = _big_file(tmp_path / "big.txt", 200, separators=False)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        check_text_file(path)
        [(prefix, complete)] = list(iter_documents(path, max_doc_chars=1 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not complete and len(prefix) <= 1 << 20
    assert peak < size / 20, f"peak {peak / 2**20:.1f} MiB for a {size / 2**20:.0f} MiB file"
