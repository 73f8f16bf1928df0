"""`frugalm ls KIND [--json]`: every listing is one JSON document, and the table says the same."""

import json

import pytest

from frugalm.cli import build_parser, main
from frugalm.cli.ls import KINDS
from frugalm.measure.metrics import BENCHMARK_VERSION, METRICS, Measurement
from frugalm.measure.workloads import DEFAULT_WORKLOADS, WORKLOADS
from frugalm.store import Run, Store


def _ls_json(capsys, *args) -> dict:
    assert main(["ls", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # one document: anything else on stdout fails here


def test_ls_runs_json(tmp_path, capsys):
    db = tmp_path / "s.db"
    assert _ls_json(capsys, "runs", "--store", str(db)) == {"store": str(db), "runs": []}
    run = Run(model_ref="m", benchmark_version=BENCHMARK_VERSION, config={}, environment={}, wall_s=1.5, key="k")
    with Store(db) as store:
        store.add_run(
            run, [Measurement("params_count", 10, method="counted"), Measurement("ppl_tok", 3.5, method="measured")]
        )
    [got] = _ls_json(capsys, "runs", "--store", str(db))["runs"]
    assert (
        got["id"] == run.id
        and got["status"] == "complete"
        and got["figures"] == 2
        and got["wall_s"] == 1.5
        and got["key"] == "k"
    )
    assert main(["ls", "runs", "--store", str(db)]) == 0
    assert run.id in capsys.readouterr().out


def test_ls_metrics_json(capsys):
    doc = _ls_json(capsys, "metrics")
    assert doc["benchmark_version"] == BENCHMARK_VERSION
    assert [m["name"] for m in doc["metrics"]] == list(METRICS)
    assert doc["metrics"][0] == {
        "name": "ppl_tok",
        "unit": "ppl",
        "higher_is_better": False,
        "method": "measured",
        "resource": "quality",
        "description": METRICS["ppl_tok"].description,
        "per_workload": False,
    }


def test_ls_workloads_json(capsys):
    doc = _ls_json(capsys, "workloads")
    assert [w["name"] for w in doc["workloads"]] == list(WORKLOADS)
    assert [w["name"] for w in doc["workloads"] if w["default"]] == list(DEFAULT_WORKLOADS)
    assert doc["workloads"][0]["prompt_tokens"] == WORKLOADS["chat"].prompt_tokens


def test_ls_profiles_json(tmp_path, capsys):
    extra = tmp_path / "profiles.yaml"
    extra.write_text(
        "my-box:\n  description: a test box\n  usd_per_hour: 1.5\n  usd_per_kwh: 0.2\n  gco2e_per_kwh: 300\n  watts_idle: 10\n  watts_max: 100\n"
    )
    profiles = {p["name"]: p for p in _ls_json(capsys, "profiles", "--profiles", str(extra))["profiles"]}
    assert profiles["my-box"]["usd_per_hour"] == 1.5 and len(profiles) > 1


def test_ls_techniques_json(capsys):
    from frugalm.registry import TECHNIQUES

    doc = _ls_json(capsys, "techniques")
    assert [t["name"] for t in doc["techniques"]] == list(TECHNIQUES)
    for t in doc["techniques"]:
        assert t["kind"] and t["summary"] and t["needs_calibration"] in (True, False, "some options"), t["name"]
        assert all({"name", "type", "default", "doc"} == set(o) for o in t["options"]), t["name"]
    gptq = next(t for t in doc["techniques"] if t["name"] == "gptq_quant")
    assert next(o for o in gptq["options"] if o["name"] == "bits")["default"] == 4


def test_ls_help_names_every_kind(capsys):
    with pytest.raises(SystemExit):
        main(["ls", "--help"])
    out = capsys.readouterr().out
    assert all(kind in out.split("positional arguments")[0] for kind in KINDS)  # in the description, not only the usage
    [line] = [
        ln for ln in build_parser().format_help().splitlines() if ln.split()[:1] == ["ls"]
    ]  # `frugalm --help`'s line
    assert all(kind in line for kind in KINDS), line
