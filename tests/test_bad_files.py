"""Damaged inputs are one-line errors (exit 2), never tracebacks: corrupt or truncated
safetensors weights, sharded or not, and a --store file that is not a SQLite database."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from frugalm.cli import main
from frugalm.errors import ConfigError, ModelError
from frugalm.models import check_weights, load_model, resolve_model
from frugalm.store import Store

QUICK = ["--eval-tokens", "256", "--repetitions", "1", "--workload", "chat", "--quiet"]


def _copy(tiny_llama, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    return folder


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8 : 8 + n]), raw


def _truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _garbage_header(path):
    n, _, raw = _header(path)
    path.write_bytes(raw[:8] + b"{not json" + b" " * (n - 9) + raw[8 + n :])


def _huge_length(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 1 << 60) + raw[8:])


def _tiny_file(path):
    path.write_bytes(b"abc")


def _offsets_past_end(path):
    n, header, raw = _header(path)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 10 << 20
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])


DAMAGES = {
    "truncated": _truncate,
    "garbage header": _garbage_header,
    "huge header length": _huge_length,
    "3-byte file": _tiny_file,
    "offsets past the end": _offsets_past_end,
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_safetensors_is_one_line_model_error(tiny_llama, tmp_path, damage):
    folder = _copy(tiny_llama, tmp_path)
    DAMAGES[damage](folder / "model.safetensors")
    with pytest.raises(ModelError) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message and "re-download or re-save" in message, message


def _shard(tiny_llama, tmp_path):
    """The tiny model saved as two shards plus model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    return folder, shards


def test_sharded_weights_are_checked(tiny_llama, tmp_path):
    folder, shards = _shard(tiny_llama, tmp_path)
    check_weights(resolve_model(folder))  # intact shards pass
    _truncate(shards[-1])
    with pytest.raises(ModelError, match=f"{shards[-1].name}.*re-download or re-save"):
        load_model(folder)
    shards[-1].unlink()
    with pytest.raises(ModelError, match=f"index.json.*{shards[-1].name}.*missing") as info:
        load_model(folder)
    assert "\n" not in str(info.value)
    (folder / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(ModelError, match="model.safetensors.index.json.*re-download or re-save"):
        load_model(folder)


def test_intact_weights_pass(tiny_models):
    for folder in tiny_models.values():
        check_weights(resolve_model(folder))


def test_cli_on_truncated_weights_exits_2_with_one_line(tiny_llama, text_file, tmp_path):
    folder = _copy(tiny_llama, tmp_path)
    _truncate(folder / "model.safetensors")
    db = tmp_path / "s.db"
    proc = subprocess.run(
        [sys.executable, "-m", "frugalm", "bench", str(folder), "--data", str(text_file), "--store", str(db), *QUICK],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert (
        "\n" not in err and "Traceback" not in err and "model.safetensors" in err and "re-download or re-save" in err
    ), err
    assert not db.exists()  # failed before anything was stored


# --- a --store that is not a SQLite database ---------------------------------------------------

NOT_A_DB = b"these are my notes, not a database\n" * 200


def test_store_that_is_not_a_database_is_config_error_and_untouched(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(NOT_A_DB)
    with pytest.raises(ConfigError) as info:
        Store(path)
    message = str(info.value)
    assert (
        "\n" not in message and str(path) in message and "not a SQLite database" in message and "--store" in message
    ), message
    assert path.read_bytes() == NOT_A_DB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no -wal/-shm/-journal left beside it


def test_cli_store_not_a_database_exits_2_one_line_file_untouched(tiny_llama, text_file, tmp_path, capsys):
    path = tmp_path / "notes.db"
    path.write_bytes(NOT_A_DB)
    for args in (
        ["bench", str(tiny_llama), "--data", str(text_file), "--store", str(path), *QUICK],
        ["ls", "runs", "--store", str(path)],
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and "not a SQLite database" in err, err
        assert path.read_bytes() == NOT_A_DB
    proc = subprocess.run(
        [sys.executable, "-m", "frugalm", "ls", "runs", "--store", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )
    assert path.read_bytes() == NOT_A_DB
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("notes")) == ["notes.db"]
