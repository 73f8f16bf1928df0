"""End to end through the `frugalm` command: scorecards, stored runs, bad input, killed runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from frugalm.cli import main
from frugalm.store import Store

QUICK = ["--eval-tokens", "256", "--repetitions", "2", "--workload", "chat", "--quiet"]


def _runs(db: Path):
    if not db.exists():
        return []
    with Store(db) as store:
        assert store.integrity_check() == "ok"
        return store.runs()


def test_bench_json_scorecard_is_stored(tiny_llama, text_file, tmp_path, capsys, monkeypatch):
    db = tmp_path / "s.db"
    zone = tmp_path / "powercap" / "intel-rapl:0"  # a fabricated RAPL counter, read by the measuring child
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text("7000000")
    (zone / "max_energy_range_uj").write_text(str(10**9))
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path / "powercap"))
    assert main(["bench", str(tiny_llama), "--data", str(text_file), "--store", str(db), "--json", *QUICK]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["benchmark_version"] == "frugalm-bench v4" and doc["environment"]["torch"].startswith("2.13")
    metrics = {(m["metric"], m["workload"]): m for m in doc["metrics"]}
    for name in ("ppl_tok", "ppl_byte", "robust_ppl_ratio", "params_count", "ship_compressed_mib"):
        assert (name, None) in metrics
    for name in (
        "ttft_p50_ms",
        "tpot_p99_ms",
        "decode_tok_s",
        "peak_mem_mib",
        "energy_j_per_tok",
        "cost_usd_per_mtok",
        "flops_per_tok_decode",
    ):
        assert (name, "chat") in metrics
    energy = metrics[("energy_j_per_tok", "chat")]
    assert (
        energy["method"] == "measured" and energy["protocol"]["zones"] == ["intel-rapl:0"] and energy["value"] == 0.0
    )  # it stood still
    assert metrics[("ttft_p50_ms", "chat")]["n"] == 2 and metrics[("ttft_p50_ms", "chat")]["spread"] is not None
    [run] = _runs(db)
    assert run.id == doc["run_id"] and run.status == "complete"
    with Store(db) as store:
        assert len(store.measurements(run.id)) == len(doc["metrics"])


def test_table_and_ls(tiny_llama, text_file, tmp_path, capsys):
    db = str(tmp_path / "s.db")
    assert (
        main(
            [
                "bench",
                str(tiny_llama),
                "--data",
                str(text_file),
                "--store",
                db,
                "--metric",
                "ppl_tok",
                "--metric",
                "ttft_p50_ms",
                *QUICK,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "QUALITY" in out and "COMPUTATION" in out and "MEMORY" not in out and "ppl_tok" in out
    assert main(["ls", "runs", "--store", db]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["ls", "metrics"]) == 0
    assert "higher_is_better" not in capsys.readouterr().out  # the listing says "higher"/"lower"


def _bad_inputs(tiny_llama, text_file, tmp_path):
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("x")
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("")
    binary.write_bytes(b"\x00\x01\x02binary")
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text("half:\n  description: a profile with fields missing\n  usd_per_hour: 1\n")
    m, d = str(tiny_llama), ["--data", str(text_file)]
    return {
        "missing path": ([str(tmp_path / "no-such-model"), *d], "does not exist"),
        "not a model": ([str(notmodel), *d], "not a model folder"),
        "empty text": ([m, "--data", str(empty)], "is empty"),
        "binary text": ([m, "--data", str(binary)], "binary"),
        "missing text": ([m, "--data", str(tmp_path / "none.txt")], "does not exist"),
        "unknown workload": ([m, *d, "--workload", "chatt"], "did you mean 'chat'"),
        "unknown metric": ([m, *d, "--metric", "ppl"], "unknown metric 'ppl'"),
        "profile missing fields": ([m, *d, "--profiles", str(profiles), "--profile", "half"], "missing field"),
        "too long workload": ([m, *d, "--workload", "long"], "context is 256"),
    }


def test_bad_input_is_one_line_and_stores_nothing(tiny_llama, text_file, tmp_path, capsys):
    db = tmp_path / "s.db"
    for label, (args, expected) in _bad_inputs(tiny_llama, text_file, tmp_path).items():
        assert main(["bench", *args, "--store", str(db), "--quiet"]) == 2, label
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and expected in err and err.startswith("frugalm bench: error:"), (label, err)
    assert _runs(db) == []


def _frugalm(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "frugalm", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def _wait_for_workload(proc) -> psutil.Process:
    """Read progress lines until timing has started; return the measuring child."""
    for line in proc.stderr:
        if "workload chat" in line:
            [child] = psutil.Process(proc.pid).children()
            return child
    pytest.fail("no progress line; stdout: " + proc.stdout.read())


LONG = ["--eval-tokens", "256", "--repetitions", "400", "--workload", "chat"]


def test_sigkill_of_child_marks_run_failed(tiny_llama, text_file, tmp_path):
    db = tmp_path / "s.db"
    proc = _frugalm(["bench", str(tiny_llama), "--data", str(text_file), "--store", str(db), *LONG])
    _wait_for_workload(proc).kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "killed by signal SIGKILL" in err
    [run] = _runs(db)
    assert run.status == "failed" and "SIGKILL" in run.error
    with Store(db) as store:
        assert store.measurements(run.id) == []


def test_sigkill_of_parent_leaves_store_consistent_and_no_orphan(tiny_llama, text_file, tmp_path):
    db = tmp_path / "s.db"
    Store(db).close()
    proc = _frugalm(["bench", str(tiny_llama), "--data", str(text_file), "--store", str(db), *LONG])
    child = _wait_for_workload(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    child.wait(timeout=30)  # dies with its parent (PR_SET_PDEATHSIG)
    assert _runs(db) == []


def test_timeout_stops_the_child(tiny_llama, text_file, tmp_path, capsys):
    db = tmp_path / "s.db"
    t0 = time.monotonic()
    assert (
        main(
            ["bench", str(tiny_llama), "--data", str(text_file), "--store", str(db), *LONG, "--timeout", "8", "--quiet"]
        )
        == 2
    )
    assert time.monotonic() - t0 < 60
    assert "longer than the timeout" in capsys.readouterr().err
    [run] = _runs(db)
    assert run.status == "failed"
