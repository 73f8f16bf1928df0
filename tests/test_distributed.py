"""Data-parallel training under real torchrun: 2 processes, gloo on CPU, a tiny Llama."""

import math

import pytest
import torch

from frugalm.cli import ddp_train
from frugalm.errors import ConfigError
from frugalm.training.distributed import ByteCounter, CommConfig, DistInfo, make_wrapper

STEPS = 5


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp") / "store.db"


@pytest.fixture(scope="module")
def runs(store):
    doc = ddp_train.launch(["--store", str(store), "--model", "tiny", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
                            "--compression", "none,fp16,bf16,powersgd", "--powersgd-rank", "4",
                            "--powersgd-start-step", "2", "--no-count-flops",
                            "--bucket-cap-mb", "0.25"])  # fmt: skip
    assert doc["world_size"] == 2 and doc["backend"] == "gloo"
    # Small buckets: the 1.3 MB of gradients travel in several, as a real model's do.
    assert all(run["calls_per_step"][1] >= 3 for run in doc["runs"])  # after DDP's rebuild at step 1
    return {run["compression"]: run for run in doc["runs"]}


def test_uncompressed_bytes_are_the_fp32_gradients_every_step(runs):
    run = runs["none"]
    expected = 4 * run["trainable_params"]
    assert run["expected_grad_bytes_per_step"] == expected
    assert abs(run["total_bytes"] - expected * STEPS) <= 0.01 * expected * STEPS
    assert run["bytes_per_step"] == [expected] * STEPS  # all-reduce of fp32 buckets: exact
    assert run["bucket_bytes_per_step"] == [expected] * STEPS and run["compressed_steps"] == []


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_16_bit_compression_halves_the_bytes(runs, compression):
    run = runs[compression]
    assert run["bytes_per_step"] == [run["expected_grad_bytes_per_step"] // 2] * STEPS
    assert run["reduction_x"] == pytest.approx(2.0)


def test_powersgd_rank4_sends_at_least_4x_less_once_started(runs):
    run, expected = runs["powersgd"], runs["powersgd"]["expected_grad_bytes_per_step"]
    assert run["compressed_steps"] == [3, 4, 5]  # steps 1-2: plain allreduce (PowerSGD's warm-up)
    assert run["bytes_per_step"][:2] == [expected, expected]
    assert all(b * 4 <= expected for b in run["bytes_per_step"][2:])
    assert run["reduction_compressed_steps_x"] >= 4
    assert run["calls_per_step"][2] == 3 * run["calls_per_step"][1]  # per bucket: uncompressed part, P, Q


def test_both_loss_curves_are_returned(runs):
    plain, compressed = runs["none"]["loss_per_step"], runs["powersgd"]["loss_per_step"]
    assert len(plain) == len(compressed) == STEPS
    assert all(math.isfinite(x) for x in plain + compressed)
    # Same seed and data, and identical updates until PowerSGD starts: the losses before step 3's update agree.
    assert compressed[:3] == pytest.approx(plain[:3], rel=1e-6)
    assert plain[0] == pytest.approx(math.log(256), rel=0.1)  # random init: about uniform over bytes
    assert len(runs["none"]["step_time_s"]) == STEPS and runs["none"]["wall_time_s"] > 0


def test_the_store_holds_each_run_with_its_bytes_and_loss_curve(runs, store):
    from frugalm.store import Store

    with Store(store) as db:
        stored = {r.config["compression"]["compression"]: r for r in db.runs() if r.kind == "training-ddp"}
        assert set(stored) == set(runs) and db.integrity_check() == "ok"
        for name, run in stored.items():
            figures = {m.metric: m for m in db.measurements(run.id)}
            comm = figures["produce_comm_bytes"]
            assert comm.method == "counted" and comm.unit == "B" and comm.value == runs[name]["total_bytes"]
            assert run.config["loss_per_step"] == runs[name]["loss_per_step"] and figures["produce_wall_s"].value > 0
        expected = runs["none"]["expected_grad_bytes_per_step"] * STEPS
        assert (
            abs({m.metric: m for m in db.measurements(stored["none"].id)}["produce_comm_bytes"].value - expected)
            <= 0.01 * expected
        )


def test_counter_summary():
    counter = ByteCounter(compression="fp16")
    counter.add_bucket(800, compressed=False)
    counter.add_collective([torch.zeros(100, dtype=torch.float16), torch.zeros(50)])
    assert counter.end_step().bytes == 400
    counter.add_collective([torch.zeros(200, dtype=torch.float16)])
    counter.end_step()
    summary = counter.summary(expected_bytes_per_step=800)
    assert (
        summary["bytes_per_step"] == [400, 400]
        and summary["reduction_x"] == 2.0
        and summary["total_vs_expected"] == 0.5
    )


def test_bad_options_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(ConfigError, match="unknown compression 'powersdg'; did you mean 'powersgd'"):
        make_wrapper(CommConfig(compression="powersdg"), DistInfo(0, 1, 0, "gloo", torch.device("cpu")))
    code = ddp_train.main(
        ["--compression", "none,zstd", "--powersgd-start-step", "1", "--out", str(tmp_path / "x.json")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "unknown compression 'zstd'" in err and "powersgd_start_step=1 must be >= 2" in err
    code = ddp_train.main(["--out", str(tmp_path / "x.json")])
    assert code == 2 and "not launched by torchrun" in capsys.readouterr().err
