"""Reports: golden files from a fixture database, and the HTML opened in a real headless Chromium."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest

from frugalm.measure.metrics import METRICS, Measurement
from frugalm.report.build import build_report_data, render_all
from frugalm.store import Run, Store

GOLDEN = Path(__file__).parent / "golden"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# name -> (ppl_tok, decode_tok_s, peak_mem_mib, weights_mib, energy_j_per_tok, cost_usd_per_mtok, ship_compressed_mib)
VARIANTS = {
    "baseline": (3.60, 200.0, 18.0, 0.99, 0.030, 0.12, 0.93),
    "int8": (3.65, 260.0, 12.0, 0.35, 0.024, 0.09, 0.34),
    "int4-gptq": (3.90, 240.0, 10.0, 0.20, 0.026, 0.10, 0.19),
    "wanda50": (4.60, 205.0, 18.0, 0.99, 0.031, 0.12, 0.58),
}
HEADLINE = [
    "ppl_tok",
    "decode_tok_s",
    "peak_mem_mib",
    "weights_mib",
    "energy_j_per_tok",
    "cost_usd_per_mtok",
    "ship_compressed_mib",
]
# What the measuring child reports about each variant's linear layers (measure/scorecard.kernel_protocol)
KERNELS = {
    "baseline": {"kernels": {"dense": 15}, "formats": {}},
    "int8": {
        "kernels": {"fbgemm": 14, "dense": 1},
        "formats": {"w8a8-dynamic": {"fbgemm": 14}},
        "quantized_engine": "fbgemm",
    },
    "int4-gptq": {"kernels": {"dequantize": 14, "dense": 1}, "formats": {"w4a16": {"dequantize": 14}}},
    "wanda50": {"kernels": {"dense": 15}, "formats": {}},
}
# name -> (acc_cloze, its paired 95% interval against the baseline on the same 200 items)
TASKS = {
    "baseline": (0.40, None),
    "int8": (0.39, (-0.03, 0.01)),  # within the paired interval: a tie
    "int4-gptq": (0.36, (-0.065, -0.015)),  # worse
    "wanda50": (0.20, (-0.25, -0.15)),  # worse
}
HOSTILE = "<script>alert(1)</script> \"'</script><!-- a|b"
"""A recipe name and a model path that would run as script, or break out of an attribute, a <script> or a table cell."""


def _measurements(values, kernels: dict | None = None) -> list[Measurement]:
    out = []
    for name, value in zip(HEADLINE, values):
        metric = METRICS[name]
        method = "estimated" if name in ("energy_j_per_tok", "cost_usd_per_mtok") else metric.method
        spread = value * 0.02 if metric.method == "measured" and metric.per_workload else None
        protocol = dict(kernels or {}) if metric.per_workload else {}
        out.append(
            Measurement(
                name,
                value,
                metric.unit,
                method,
                "chat" if metric.per_workload else None,
                n=5 if spread else 1,
                spread=spread,
                protocol=protocol,
            )
        )
    return out


def _task_figure(acc: float, ci: tuple[float, float] | None) -> Measurement:
    items = 200
    samples = [1.0] * round(acc * items) + [0.0] * (items - round(acc * items))
    protocol = {"task": "cloze", "items": items}
    if ci:
        protocol["paired"] = {"delta": acc - TASKS["baseline"][0], "ci": list(ci), "items": items}
    return Measurement("acc_cloze", acc, method="measured", n=items, protocol=protocol, samples=samples)


def make_fixture_db(path: Path, names: dict[str, str] | None = None, model: str = "fixture-model") -> Run:
    """The fixture store; `names` renames variants (recipe names and artifact paths), `model` is the model reference."""
    names = names or {}
    env = {"device": "cpu", "cpu": "Fixture CPU", "torch": "2.13.0+cpu", "transformers": "5.23.0"}
    config = {
        "workloads": [{"name": "chat", "prompt_tokens": 128, "output_tokens": 64, "batch_size": 1}],
        "data": {"data": "fixture.txt"},
        "protocol": {"window": 512, "stride": 256},
    }
    ids = {}
    with Store(path) as db:
        for i, (key, values) in enumerate(VARIANTS.items()):
            name = names.get(key, key)
            recipe = (
                None
                if key == "baseline"
                else {
                    "version": 1,
                    "name": name,
                    "stages": [{"technique": "rtn_quant" if "int" in key else "wanda_prune"}],
                }
            )
            run = Run(
                id=f"run-{i}",
                created_at=f"2026-11-23T12:00:0{i}+0000",
                kind="baseline" if i == 0 else "variant",
                model_ref=model,
                model_path=f"/fixture/{name}",
                benchmark_version="frugalm-bench v1",
                environment=env,
                config={**config, "variant": {"recipe": recipe, "changes": [], "produce_wall_s": 1.5}}
                if recipe
                else config,
            )
            ids[name] = db.add_run(run, _measurements(values, KERNELS[key]) + [_task_figure(*TASKS[key])])
        # The baseline measured again, last: its decode speed differs by 5% (run-to-run noise).
        control = Run(
            id="run-control",
            created_at="2026-11-23T12:00:09+0000",
            kind="baseline",
            model_ref=model,
            model_path="/fixture/baseline",
            benchmark_version="frugalm-bench v1",
            environment=env,
            config=config,
        )
        db.add_run(control, _measurements((3.60, 190.0, *VARIANTS["baseline"][2:]), KERNELS["baseline"]))
        variants = {names.get(k, k): ids[names.get(k, k)] for k in VARIANTS if k != "baseline"}
        session = Run(
            id="session-1",
            created_at="2026-11-23T12:01:00+0000",
            kind="optimize",
            model_ref=model,
            benchmark_version="frugalm-bench v1",
            environment=env,
            config={
                "baseline": ids["baseline"],
                "control": "run-control",
                "variants": variants,
                "skipped": {names.get("int4-awq", "int4-awq"): "group size 128 does not divide 172"},
                "constraint_specs": ["ppl_tok<=+5%", "ppl_tok<=+20%"],
                "out_dir": "/fixture/out",
            },
        )
        db.add_run(session, [])
    return session


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    session = make_fixture_db(tmp / "fixture.db")
    with Store(tmp / "fixture.db") as db:
        data = build_report_data(db, session)
    return data, render_all(data, tmp / "report")


def test_fronts_and_recommendations(report):
    data, _ = report
    assert data["fronts"]["computation"] == ["baseline", "int8"]  # int4-gptq and wanda50 are slower or worse
    assert data["fronts"]["weights"] == ["baseline", "int8", "int4-gptq"]
    five = data["recommendations"][0]
    assert five["satisfied_by"] == ["baseline", "int8"] and five["best"]["weights"]["variant"] == "int8"
    assert data["recommendations"][1]["best"]["weights"]["variant"] == "int4-gptq"
    assert not [v for v in data["variants"] if v["name"] == "wanda50"][0]["on_front"]


def test_differences_within_the_run_to_run_noise_are_ties(report):
    data, _ = report
    assert data["noise"] == {"decode_tok_s@chat": pytest.approx(10 / 195)}  # baseline 200 then 190 tok/s
    decode = {v["name"]: v["figures"]["decode_tok_s@chat"] for v in data["variants"]}
    assert decode["wanda50"]["tie"] and not decode["int8"]["tie"]  # +2.5% is noise, +30% is not
    assert decode["wanda50"]["margin"] == pytest.approx(205 * 10 / 195)


@pytest.mark.parametrize("suffix", ["md", "json", "html"])
def test_golden_files(report, suffix):
    _, paths = report
    text = paths[suffix].read_text()
    golden = GOLDEN / f"report.{suffix}"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), (
        f"report.{suffix} changed; if intended, rerun with UPDATE_GOLDEN=1 and review the diff"
    )


def test_dequantizing_variants_say_they_have_no_speed_kernel(report):
    data, paths = report
    notes = {v["name"]: v["speed_kernel"] for v in data["variants"]}
    assert (
        notes["baseline"] is None and notes["int8"] is None and notes["wanda50"] is None
    )  # fbgemm and dense are real kernels
    assert notes["int4-gptq"]["dequantized_layers"] == 14 and notes["int4-gptq"]["formats"] == {"w4a16": 14}
    assert "no speed kernel on this device" in notes["int4-gptq"]["text"] and "w4a16" in notes["int4-gptq"]["text"]
    kernels = {v["name"]: v["kernels"] for v in data["variants"]}
    assert kernels["int8"] == "w8a8-dynamic on fbgemm: 14 layers; dense: 1"
    md = paths["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| int4-gptq"))
    assert "no speed kernel" in row.split(" | ")[2]  # beside its decode speed
    assert "no speed kernel" not in next(line for line in md.splitlines() if line.startswith("| int8 "))
    html = paths["html"].read_text()
    assert html.count("class=nokernel") >= 2  # the table cell and the bar of int4-gptq's decode speed


def test_bench_json_carries_the_speed_kernel_verdict():
    from frugalm.report.scorecard import format_scorecard, scorecard_json

    run = Run(
        id="run-1",
        created_at="2026-11-23T12:00:00+0000",
        kind="bench",
        model_ref="m",
        model_path="/m",
        benchmark_version="frugalm-bench v1",
        environment={"device": "cpu"},
        config={},
    )
    slow = scorecard_json(run, _measurements(VARIANTS["int4-gptq"], KERNELS["int4-gptq"]))
    assert slow["speed_kernel"]["dequantized_layers"] == 14 and slow["speed_kernel"]["formats"] == {"w4a16": 14}
    assert slow["kernels"] == {"kernels": {"dequantize": 14, "dense": 1}, "formats": {"w4a16": {"dequantize": 14}}}
    fast = scorecard_json(run, _measurements(VARIANTS["int8"], KERNELS["int8"]))
    assert fast["speed_kernel"] is None and fast["kernels"]["formats"] == {"w8a8-dynamic": {"fbgemm": 14}}
    text = format_scorecard(run, _measurements(VARIANTS["int8"], KERNELS["int8"]))
    assert "kernels: w8a8-dynamic on fbgemm: 14 layers; dense: 1" in text and "no speed kernel" not in text
    assert "no speed kernel on this device for 14 quantized layer(s) (w4a16: 14)" in format_scorecard(
        run, _measurements(VARIANTS["int4-gptq"], KERNELS["int4-gptq"])
    )


def test_json_is_the_whole_data(report):
    data, paths = report
    assert json.loads(paths["json"].read_text())["fronts"] == data["fronts"]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_report_renders_in_headless_chromium(report):
    from playwright.sync_api import sync_playwright

    _, paths = report
    ARTIFACTS.mkdir(exist_ok=True)
    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=flags)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
        page.goto(paths["html"].as_uri())
        assert errors == [] and requests == []  # no console errors, nothing fetched from a network
        assert page.locator("svg.plot").count() == 6
        assert page.locator("svg.plot .pt").count() == 6 * len(VARIANTS)
        assert page.locator("svg.plot .pt.estimated").count() == 2 * len(VARIANTS)  # energy and money plots
        assert "(J/tok) — estimated" in page.locator("svg.plot").nth(3).text_content()
        page.hover("svg.plot .pt circle >> nth=1")
        assert page.locator("#tip").is_visible() and "int8" in page.locator("#tip").text_content()
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        browser.close()


# --- hostile strings: recipe names and model paths are data, never markup ----------------------


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    session = make_fixture_db(
        tmp / "fixture.db", names={"int8": HOSTILE, "int4-awq": HOSTILE + " skipped"}, model=f"/models/{HOSTILE}/m"
    )
    with Store(tmp / "fixture.db") as db:
        data = build_report_data(db, session)
    return data, render_all(data, tmp / "report")


def test_markdown_escapes_hostile_names(hostile_report):
    _, paths = hostile_report
    md = paths["md"].read_text()
    assert "<script" not in md and "</script" not in md and "<!--" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    header = next(line for line in md.splitlines() if line.startswith("| variant"))
    row = next(line for line in md.splitlines() if "alert(1)" in line and line.startswith("| "))
    cells = lambda line: [c for c in re.split(r"(?<!\\)\|", line)][1:-1]  # noqa: E731  (GFM splits cells at unescaped pipes)
    assert len(cells(row)) == len(cells(header))
    assert "a\\|b" in row


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)")
def test_hostile_names_render_as_text_in_headless_chromium(hostile_report):
    from playwright.sync_api import sync_playwright

    data, paths = hostile_report
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
        )
        page = browser.new_page()
        dialogs, errors = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(paths["html"].as_uri())
        page.evaluate("document.querySelectorAll('details').forEach(function (d) { d.open = true; })")
        assert dialogs == [] and errors == []
        assert page.locator("script").count() == 2  # the tooltip script and the JSON data, nothing injected
        text = page.locator("body").inner_text()
        assert text.count(HOSTILE) >= 4  # bars, the table header, the recipe, the skipped list
        assert f"/fixture/{HOSTILE}" in text and f"/models/{HOSTILE}/m" in page.locator("h1").inner_text()
        assert page.title() == f"frugalm report: /models/{HOSTILE}/m"
        embedded = page.evaluate("JSON.parse(document.getElementById('frugalm-data').textContent)")
        assert embedded["model"] == data["model"] and embedded["variants"][1]["name"] == HOSTILE
        page.hover("svg.plot .pt circle >> nth=1")
        assert HOSTILE in page.locator("#tip").text_content()
        browser.close()


def _paired_fixture(path: Path) -> Run:
    """A session whose variants were timed against the baseline: speedups with intervals, the ratios derived."""
    workload = {"name": "chat", "prompt_tokens": 128, "output_tokens": 64, "batch_size": 1}
    config = {"workloads": [workload], "data": {"data": "fixture.txt"}, "protocol": {}}
    env = {"device": "cpu", "cpu": "Fixture CPU"}
    # name -> (ppl_tok, speedup_decode, its 95% interval, whether another process competed)
    paired = {
        "fast": (3.7, 1.40, (1.33, 1.47), False),
        "tied": (3.8, 1.01, (0.97, 1.05), True),
        "slow": (3.65, 0.60, (0.58, 0.62), False),
        "barely": (3.9, math.exp(0.015), (math.exp(0.015 - 0.01327), math.exp(0.015 + 0.01327)), False),
    }
    # Per-block ratios of "barely": its 95% interval alone excludes 1, not once widened for 4 comparisons.
    blocks = {"barely": [math.exp(d) for d in [0.035, -0.005] * 6]}

    def figures(ppl, speedup=None, ci=None, competed=False, overhead=None, samples=None) -> list[Measurement]:
        out = [Measurement("ppl_tok", ppl, method="measured")]
        if speedup is not None:
            p = {"ci": list(ci), "competed": competed, "other_cores": 0.6 if competed else 0.0}
            out.append(Measurement("speedup_decode", speedup, method="measured", workload="chat",
                                   spread=(ci[1] - ci[0]) / 2, protocol=p, samples=samples))  # fmt: skip
            inverse = {"ci": [1 / ci[1], 1 / ci[0]]}
            for name in ("energy_ratio_decode", "cost_ratio_decode"):
                out.append(Measurement(name, 1 / speedup, method="estimated", workload="chat",
                                       spread=(1 / ci[0] - 1 / ci[1]) / 2, protocol=inverse))  # fmt: skip
        if overhead is not None:
            out.append(Measurement("decode_overhead_frac", overhead, method="estimated", workload="chat"))
        return out

    with Store(path) as db:

        def add(run_id, kind, measurements, recipe=None):  # fmt: skip
            cfg = {**config, "variant": {"recipe": recipe, "changes": []}} if recipe else config
            run = Run(id=run_id, created_at="2026-12-02T00:00:00+0000", kind=kind, model_ref="m",
                      model_path=f"/fixture/{run_id}", benchmark_version="frugalm-bench v3", environment=env,
                      config=cfg)  # fmt: skip
            return db.add_run(run, measurements)

        base = add("base", "baseline", figures(3.6, overhead=0.93))
        control = add("control", "baseline", figures(3.6, 0.99, (0.97, 1.02)))
        variants = {
            name: add(
                name,
                "variant",
                figures(ppl, s, ci, c, samples=blocks.get(name)),
                {"version": 1, "name": name, "stages": []},
            )
            for name, (ppl, s, ci, c) in paired.items()
        }
        session = Run(id="session-p", created_at="2026-12-02T00:01:00+0000", kind="optimize", model_ref="m",
                      benchmark_version="frugalm-bench v3", environment=env,
                      config={"baseline": base, "control": control, "variants": variants,
                              "constraint_specs": ["ppl_tok<=+20%"], "out_dir": "/fixture/out"})  # fmt: skip
        db.add_run(session, [])
    return session


def test_paired_speedups_decide_speed_energy_and_money(tmp_path):
    session = _paired_fixture(tmp_path / "p.db")
    with Store(tmp_path / "p.db") as db:
        data = build_report_data(db, session)
    heads = {r: h["metric"] for r, h in data["headline"].items()}
    assert heads["computation"] == "speedup_decode" and heads["energy"] == "energy_ratio_decode"
    assert heads["money"] == "cost_ratio_decode" and heads["memory"] == "peak_mem_mib"
    rows = {v["name"]: v["figures"] for v in data["variants"]}
    assert rows["baseline"]["speedup_decode@chat"]["value"] == 1.0
    verdicts = {n: (f["speedup_decode@chat"]["verdict"], f["energy_ratio_decode@chat"]["verdict"]) for n, f in rows.items() if n != "baseline"}  # fmt: skip
    assert verdicts == {"fast": ("better", "better"), "tied": ("tie", "tie"), "slow": ("worse", "worse"),
                        "barely": ("tie", "tie")}  # fmt: skip
    barely = rows["barely"]["speedup_decode@chat"]
    assert barely["ci_alone"][0] > 1 > barely["ci"][0] and data["simultaneous"]["variants"] == 4
    assert data["simultaneous"]["each"] == pytest.approx(1 - 0.05 / 4) and "Bonferroni" in data["tie_rule"]
    # A tie cannot push the baseline off the speed front; with worse quality it, and the slow one, are dominated.
    assert data["fronts"]["computation"] == ["baseline", "fast"]
    best = data["recommendations"][0]["best"]["computation"]
    assert best["variant"] == "fast" and best["tied"] == []
    assert data["self_check"] == {"metric": "speedup_decode", "workload": "chat", "value": 0.99, "ci": [0.97, 1.02],
                                  "halfwidth": pytest.approx(0.025), "contains_1": True}  # fmt: skip
    kinds = {w["kind"]: w["text"] for w in data["warnings"]}
    assert "1 of 6 runs" in kinds["competing_load"] and "chat 93%" in kinds["overhead_bound"]
    assert "paired" in data["tie_rule"]


def test_task_ties_are_decided_by_the_paired_interval(report):
    data, paths = report
    verdicts = {v["name"]: v["figures"]["acc_cloze"]["verdict"] for v in data["variants"][1:]}
    assert verdicts == {"int8": "tie", "int4-gptq": "worse", "wanda50": "worse"}
    md = paths["md"].read_text()
    assert "0.39 (Δ -1.0 pts [-3.0, +1.0] paired, ≈)" in md and "0.36 (Δ -4.0 pts [-6.5, -1.5] paired)" in md


def _ranking(db_path, session, rates):
    from frugalm.report.utility import parse_rates

    with Store(db_path) as db:
        data = build_report_data(db, session, parse_rates(rates))
    return [row["variant"] for row in data["utility"]["ranking"]], data


def test_utility_ranking_follows_the_rates(tmp_path):
    session = make_fixture_db(tmp_path / "u.db")
    quality_only = ["computation=0", "memory=0", "energy=0", "money=0", "network=0"]
    order, data = _ranking(tmp_path / "u.db", session, quality_only)
    assert order == ["baseline", "int8", "int4-gptq", "wanda50"]  # by task accuracy alone
    assert data["utility"]["ranking"][0]["utility"] == pytest.approx(40.0)
    # int4-gptq has the smallest peak memory (10 MiB against 18): a high enough memory rate puts it first
    order, data = _ranking(tmp_path / "u.db", session, [*quality_only, "memory=20"])
    assert order[0] == "int4-gptq"
    row = next(r for r in data["utility"]["ranking"] if r["variant"] == "int4-gptq")
    assert row["parts"]["memory"] == pytest.approx(-20 * math.log2(10 / 18))
    # the fastest variant (int8: 260 tok/s against 200) first when speed is worth enough
    assert _ranking(tmp_path / "u.db", session, [*quality_only, "computation=20"])[0][0] == "int8"


def test_utility_rates_are_checked():
    from frugalm.errors import ConfigError
    from frugalm.report.utility import parse_rates

    for bad, says in [
        ("speed=2", "computation"),
        ("memory=x", "not a number"),
        ("memory=-1", ">= 0"),
        ("memory", "RESOURCE=POINTS"),
    ]:
        with pytest.raises(ConfigError, match=says):
            parse_rates([bad])
