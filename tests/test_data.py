import pytest

from frugalm.data import add_char_noise, read_text
from frugalm.errors import DataError


@pytest.mark.parametrize(
    "content, match",
    [(None, "does not exist"), (b"", "is empty"), (b"  \n\t", "is empty"), (b"\x89PNG\x00\x00", "binary"), (b"caf\xe9", "not valid UTF-8")],
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
