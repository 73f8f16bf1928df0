"""`frugalm optimize` end to end on a tiny model: report, resume after SIGKILL, bad input."""

import json
import os
from pathlib import Path

import pytest

from conftest import complete_keys
from frugalm.cli import main
from frugalm.store import Store

FAST = [
    "--eval-tokens",
    "256",
    "--repetitions",
    "2",
    "--workload",
    "chat",
    "--speedup-budget",
    "1",
    "--quiet",
    "--recipe",
    "int8",
    "--recipe",
    "magnitude50",
]


def test_optimize_writes_report_and_resumes(tiny_llama, text_file, tmp_path, capsys):
    out, db = tmp_path / "out", tmp_path / "s.db"
    args = ["optimize", str(tiny_llama), "--data", str(text_file), "--out", str(out), "--store", str(db), *FAST]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "## Pareto fronts" in first.out
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0
    keys = complete_keys(db)
    assert len(keys) == 4 and set(keys.values()) == {1}  # baseline, 2 variants, baseline again (noise): once each
    _speed_is_judged_from_paired_intervals(json.loads((out / "report.json").read_text()))
    _saved_variants_reproduce_their_perplexity(out, db, text_file, tmp_path)
    assert main(args) == 0  # a rerun measures nothing again
    assert capsys.readouterr().err.count("already measured") == 4
    assert complete_keys(db) == keys
    # Another setting (more repetitions) is another key: never mixed with the first results.
    assert main([*args, "--repetitions", "3", "--recipe", "int8"]) == 0
    assert len(complete_keys(db)) > 4


def _speed_is_judged_from_paired_intervals(report: dict) -> None:
    """Every variant carries a decode speedup with its interval; speed, energy and money headlines are the
    paired ratios; the verdict follows the interval; the baseline timed against itself is reported."""
    assert [report["headline"][r]["metric"] for r in ("computation", "energy", "money")] == [
        "speedup_decode",
        "energy_ratio_decode",
        "cost_ratio_decode",
    ]
    base, *variants = report["variants"]
    assert (
        base["figures"]["speedup_decode@chat"]["value"] == 1.0
        and base["figures"]["speedup_decode@chat"]["method"] == "reference"
    )
    for v in variants:
        f = v["figures"]["speedup_decode@chat"]
        lo, hi = f["ci"]
        assert lo <= f["value"] <= hi and f["margin"] == pytest.approx((hi - lo) / 2)
        assert f["verdict"] == ("tie" if lo <= 1 <= hi else "better" if lo > 1 else "worse")
        energy = v["figures"]["energy_ratio_decode@chat"]
        assert energy["verdict"] == {"better": "better", "worse": "worse", "tie": "tie"}[f["verdict"]]
    check = report["self_check"]
    assert check["metric"] == "speedup_decode" and check["ci"][0] <= check["value"] <= check["ci"][1]
    assert "paired" in report["tie_rule"]


def _saved_variants_reproduce_their_perplexity(out: Path, db: Path, text_file: Path, tmp_path: Path) -> None:
    """Each kept artifact, benchmarked afresh under its stored protocol, gives exactly its stored ppl_tok."""
    from frugalm.benchmark.api import BenchConfig, bench
    from frugalm.measure.quality import PerplexityProtocol

    with Store(db) as store:
        runs = {
            Path(r.model_path).name: (r, next(m.value for m in store.measurements(r.id) if m.metric == "ppl_tok"))
            for r in store.runs()
            if r.kind == "variant" and r.status == "complete"
        }
    saved = sorted((out / "variants").iterdir())
    assert saved, "no variant on a front was kept"
    for folder in saved:
        run, stored = runs[folder.name]
        config = BenchConfig(
            data=str(text_file),
            workloads=("chat",),
            metrics=("ppl_tok",),
            protocol=PerplexityProtocol(**run.config["protocol"]),
        )
        again = bench(folder, config, store=tmp_path / "again.db")
        assert next(m.value for m in again.measurements if m.metric == "ppl_tok") == stored, folder.name


def test_bad_input_is_one_line(tiny_llama, text_file, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    huge = tmp_path / "huge"
    huge.mkdir()
    for f in tiny_llama.iterdir():
        if f.suffix != ".safetensors":
            (huge / f.name).write_bytes(f.read_bytes())
    with open(huge / "model.safetensors", "wb") as f:  # sparse: 10 TiB on paper, nothing on disk
        f.truncate(10 * 2**40)
    base = ["optimize", "--data", str(text_file), "--store", str(tmp_path / "s.db"), "--quiet"]
    cases = {
        "unknown profile": ([str(tiny_llama), "--profile", "cloud-h1000"], "did you mean 'cloud-h100'"),
        "unknown constraint metric": (
            [str(tiny_llama), "--constraint", "perplexity<=+5%"],
            "unknown metric 'perplexity'",
        ),
        "out is a file": ([str(tiny_llama), "--out", str(a_file)], "is a file"),
        "unknown recipe": ([str(tiny_llama), "--recipe", "int9"], "did you mean 'int8'"),
        "does not fit memory": ([str(huge)], "needs about"),
    }
    for label, (extra, expected) in cases.items():
        assert main([*base, *extra]) == 2, label
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, (label, err)
    assert not (tmp_path / "s.db").exists() or not Store(tmp_path / "s.db").runs()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_unwritable_out_folder(tiny_llama, text_file, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert main(["optimize", str(tiny_llama), "--data", str(text_file), "--out", str(ro / "out"), "--quiet"]) == 2
    assert "not writable" in capsys.readouterr().err


def test_warm_children_start_ahead_and_leave_none_behind(tiny_llama, text_file, tmp_path):
    from frugalm.benchmark import runner
    from frugalm.benchmark.api import BenchConfig, bench
    from frugalm.measure.quality import PerplexityProtocol

    config = BenchConfig(
        data=str(text_file),
        workloads=("chat",),
        metrics=("ppl_tok",),
        warmup=0,
        repetitions=1,
        protocol=PerplexityProtocol(max_tokens=256),
    )
    ppl = lambda result: next(m.value for m in result.measurements if m.metric == "ppl_tok")  # noqa: E731
    with runner.warm_children():
        first = runner._spare
        a = bench(tiny_llama, config, store=tmp_path / "s.db")
        assert first.proc.poll() is not None and runner._spare not in (None, first)  # used, gone; the next one started
        runner._spare.proc.kill()  # a spare that dies while waiting is replaced, not used
        runner._spare.proc.wait()
        b = bench(tiny_llama, config, store=tmp_path / "s.db")
        last = runner._spare
    assert runner._spare is None and last.proc.poll() is not None  # none left behind
    assert ppl(a) == ppl(b)
