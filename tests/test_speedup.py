"""Paired speedups against a reference, measured in the child (no assertion on how fast anything is)."""

import json
import shutil

import pytest

from frugalm.benchmark.api import BenchConfig, bench
from frugalm.cli import main
from frugalm.errors import ConfigError
from frugalm.measure.paired import PairedConfig
from frugalm.measure.quality import PerplexityProtocol

FAST = PairedConfig(budget_s=0.5, min_sample_s=0.01, min_blocks=3)


def _config(reference, **kw) -> BenchConfig:
    kw.setdefault("workloads", ("chat",))
    return BenchConfig(
        metrics=("speedup_ttft", "speedup_decode", "energy_ratio_decode", "cost_ratio_decode", "decode_overhead_frac",
                 "tpot_p50_ms", "ppl_tok"), warmup=0, repetitions=1,
        protocol=PerplexityProtocol(max_tokens=128), reference=str(reference), paired=FAST, **kw,
    )  # fmt: skip


def test_bench_against_a_reference_stores_paired_speedups_with_intervals(tiny_llama, text_file, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    result = bench(tiny_llama, _config(copy, data=str(text_file)), store=tmp_path / "s.db")
    figures = {m.metric: m for m in result.measurements}
    for metric in ("speedup_ttft", "speedup_decode"):
        m = figures[metric]
        p = m.protocol
        assert m.unit == "x" and m.method == "measured" and m.workload == "chat" and m.value > 0
        assert p["ci"][0] <= m.value <= p["ci"][1] and m.n == p["n_blocks"] >= FAST.min_blocks
        assert p["stopped_by"] in ("target", "budget", "max_blocks") and "one measuring process" in p["models"]
        assert len(m.samples) == m.n and "load_avg_1m" in p["conditions_before"]
    assert "crop" in figures["speedup_decode"].protocol["call"] and "other_cores" in figures["speedup_decode"].protocol


def test_energy_and_cost_ratios_are_the_inverted_decode_speedup(tiny_llama, text_file, tmp_path):
    result = bench(tiny_llama, _config(tiny_llama, data=str(text_file)), store=tmp_path / "s.db")
    figures = {m.metric: m for m in result.measurements}
    decode = figures["speedup_decode"]
    for name in ("energy_ratio_decode", "cost_ratio_decode"):
        m = figures[name]
        assert m.method == "estimated" and m.value == pytest.approx(1 / decode.value)
        assert m.protocol["ci"] == pytest.approx([1 / decode.protocol["ci"][1], 1 / decode.protocol["ci"][0]])
    assert "decode_overhead_frac" not in figures  # with a reference, the speedups stand in its place


def test_decode_overhead_is_timed_against_a_shrunk_twin(tiny_llama, text_file, tmp_path):
    config = BenchConfig(data=str(text_file), workloads=("chat",), metrics=("decode_overhead_frac", "ppl_tok"), warmup=0,
                         repetitions=1, protocol=PerplexityProtocol(max_tokens=128))  # fmt: skip
    overhead = next(m for m in bench(tiny_llama, config, store=tmp_path / "s.db").measurements)
    p = overhead.protocol
    assert overhead.metric == "decode_overhead_frac" and overhead.method == "estimated" and overhead.unit == "fraction"
    assert p["ci"][0] <= overhead.value <= p["ci"][1] and p["ratio"] == "time(twin) / time(model)"
    assert p["twin"]["hidden_size"] == 4 * 4 < 64 and p["twin"]["layers"] == 2


def test_speedups_on_the_workloads_asked_for(tiny_llama, text_file, tmp_path):
    config = _config(tiny_llama, data=str(text_file), workloads=("chat", "batch8"), speedup_workloads=("batch8",))
    speedups = [
        m for m in bench(tiny_llama, config, store=tmp_path / "s.db").measurements if m.metric == "speedup_decode"
    ]
    assert [m.workload for m in speedups] == ["batch8"]
    with pytest.raises(ConfigError, match="not among the workloads measured"):
        bench(
            tiny_llama, _config(tiny_llama, data=str(text_file), speedup_workloads=("long",)), store=tmp_path / "s.db"
        )


def test_a_quantized_cache_is_cropped_back_like_the_float_one(tiny_llama, text_file, tmp_path):
    recipe = tmp_path / "kv.yaml"
    recipe.write_text("version: 1\nname: kv\nstages:\n  - technique: kv_cache_quant\n    bits: 8\n    group_size: 16\n")
    variant = tmp_path / "kv"
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(variant), "--no-measure", "--quiet"]) == 0
    result = bench(variant, _config(tiny_llama, data=str(text_file)), store=tmp_path / "s.db")
    decode = next(m for m in result.measurements if m.metric == "speedup_decode")
    assert "cropped back" in decode.protocol["call"] and decode.value > 0


def test_no_reference_or_speedup_off_means_no_speedups(tiny_llama, text_file, tmp_path, capsys):
    args = ["bench", str(tiny_llama), "--data", str(text_file), "--workload", "chat", "--eval-tokens", "128",
            "--repetitions", "1", "--warmup", "0", "--store", str(tmp_path / "s.db"), "--json", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert not [m for m in json.loads(capsys.readouterr().out)["metrics"] if m["metric"].startswith("speedup")]
    off = ["--reference", str(tiny_llama), "--speedup", "no"]
    assert main([*args, *off]) == 0
    assert not [m for m in json.loads(capsys.readouterr().out)["metrics"] if m["metric"].startswith("speedup")]
    on = ["--reference", str(tiny_llama), "--speedup-budget", "0.5"]
    assert main([*args, *on]) == 0
    figures = {m["metric"]: m for m in json.loads(capsys.readouterr().out)["metrics"]}
    assert {"speedup_ttft", "speedup_decode"} <= figures.keys() and figures["speedup_decode"]["unit"] == "x"


def test_threads_and_cores_are_set_in_the_child_and_recorded(tiny_llama, text_file, tmp_path):
    import os

    import pytest

    from frugalm.errors import ConfigError

    core = sorted(os.sched_getaffinity(0))[0]
    config = BenchConfig(data=str(text_file), workloads=("chat",), metrics=("ppl_tok",), warmup=0, repetitions=1,
                         protocol=PerplexityProtocol(max_tokens=128), threads=1, cpus=(core,))  # fmt: skip
    result = bench(tiny_llama, config, store=tmp_path / "s.db")
    assert result.run.environment["torch_threads"] == 1 and result.run.environment["cpu_affinity"] == [core]
    with pytest.raises(ConfigError, match="not cores this process may run on"):
        bench(tiny_llama, BenchConfig(data=str(text_file), cpus=(10_000,)), store=tmp_path / "s.db")
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        bench(tiny_llama, BenchConfig(data=str(text_file), threads=0), store=tmp_path / "s.db")
