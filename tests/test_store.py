import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from frugalm.errors import ConfigError
from frugalm.measure.metrics import Measurement
from frugalm.store import MIGRATIONS, Run, Store


def _run(**kw) -> Run:
    return Run(model_ref="m", benchmark_version="frugalm-bench v1", config={"a": 1}, environment={"cpu": "x"}, **kw)


def test_round_trip(tmp_path):
    with Store(tmp_path / "s.db") as store:
        run = _run()
        ms = [
            Measurement(
                "ttft_p50_ms",
                3.5,
                "ms",
                "measured",
                "chat",
                n=5,
                spread=0.2,
                protocol={"w": 1},
                samples=[3.0, 3.5, 4.0, 3.4, 3.6],
            ),
            Measurement("params_count", 10, method="counted"),
        ]
        store.add_run(run, ms)
        assert store.measurements(run.id) == ms
        got = store.get_run(run.id)
        assert got.config == {"a": 1} and got.status == "complete"


def test_migrations_are_named_and_applied_once(tmp_path):
    Store(tmp_path / "s.db").close()
    with Store(tmp_path / "s.db") as store:
        assert store.migrate() == []
        names = [r[0] for r in store.db.execute("SELECT name FROM _migrations")]
    assert names == [n for n, _ in MIGRATIONS]


def test_a_failing_write_leaves_nothing(tmp_path):
    with Store(tmp_path / "s.db") as store:
        bad = [
            Measurement("ttft_p50_ms", 1.0, method="measured"),
            Measurement("ttft_p90_ms", 1.0, method="guessed"),
        ]  # CHECK fails
        with pytest.raises(sqlite3.IntegrityError):
            store.add_run(_run(), bad)
        assert store.runs() == [] and store.db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0] == 0


def test_unknown_run_and_folder_path(tmp_path):
    with Store(tmp_path / "s.db") as store, pytest.raises(ConfigError, match="frugalm ls runs"):
        store.get_run("nope")
    with pytest.raises(ConfigError, match="is a folder"):
        Store(tmp_path)


WRITER = textwrap.dedent(
    """
    import sys
    from frugalm.measure.metrics import Measurement
    from frugalm.store import Run, Store
    store = Store(sys.argv[1])
    print("ready", flush=True)
    while True:
        run = Run(model_ref="m", benchmark_version="v", config={}, environment={})
        store.add_run(run, [Measurement("ttft_p50_ms", float(i), method="measured", workload=f"w{i}", protocol={"pad": "x" * 500}) for i in range(200)])
    """
)


def test_sigkill_mid_write_leaves_every_run_whole(tmp_path):
    db = tmp_path / "s.db"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store(db) as store:
        assert store.integrity_check() == "ok"
        counts = [
            n
            for (n,) in store.db.execute(
                "SELECT COUNT(m.metric) FROM runs r LEFT JOIN measurements m ON m.run_id = r.id GROUP BY r.id"
            )
        ]
    assert counts and set(counts) == {200}


# --- units: each figure's unit is its metric's declared one -------------------------------------


def test_every_declared_metric_builds_with_its_unit():
    from frugalm.measure.metrics import METRICS

    for name, metric in METRICS.items():
        assert Measurement(name, 1.0, method=metric.method).unit == metric.unit
        assert Measurement(name, 1.0, metric.unit, metric.method).unit == metric.unit  # restating it is allowed


def test_a_wrong_unit_or_an_undeclared_metric_cannot_be_built():
    with pytest.raises(ValueError, match=r"'ttft_p50_ms' given in 's', but the metric is declared in 'ms'"):
        Measurement("ttft_p50_ms", 0.0035, "s", "measured")
    with pytest.raises(ValueError, match=r"no metric 'ttft_p50' is declared.*did you mean 'ttft_p50_ms'"):
        Measurement("ttft_p50", 3.5, method="measured")
    with pytest.raises(ValueError, match="has no method"):
        Measurement("ttft_p50_ms", 3.5)


def test_figures_of_an_older_benchmark_version_still_read(tmp_path):
    """Rows are rebuilt as stored, not re-checked: a unit or metric since renamed must not break reading."""
    with Store(tmp_path / "s.db") as store:
        run = _run()
        store.add_run(run, [Measurement("ttft_p50_ms", 3.5, method="measured", workload="chat")])
        store.db.execute("UPDATE measurements SET unit = 'msec'")
        store.db.execute(
            "INSERT INTO measurements VALUES (?, 'latency_ms', '', 2.0, 'msec', 'measured', 1, NULL, '{}', NULL)",
            (run.id,),
        )
        got = {m.metric: m for m in store.measurements(run.id)}
    assert got["ttft_p50_ms"].unit == "msec" and got["latency_ms"].value == 2.0 and got["latency_ms"].protocol == {}
