"""Search spaces and `frugalm optimize --search N`: spaces validated like recipes, the portfolio as
points of the default space, layer groups, the study loop (counting, repeats, resume), and end to
end on stories260K: screening, SIGKILL and resume, the report's search section, and a real local
Ray cluster giving the same stored figures as a local search."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest

from conftest import STORIES, TINY_CONFIGS, TINYSTORIES, complete_keys, needs_assets
from frugalm.cli import main
from frugalm.errors import ConfigError
from frugalm.pareto import Constraint
from frugalm.recipe import SHIPPED_DIR, load_recipe
from frugalm.search import Objective, Outcome, SearchConfig, run_search
from frugalm.space import Layout, load_space, parse_space
from frugalm.store import Store
from frugalm.techniques._arch import DEFAULT_TARGETS
from frugalm.techniques.base import select_linears

# --- spaces ------------------------------------------------------------------------------------


def test_the_default_space_holds_the_portfolio():
    space = load_space("default")
    layout = Layout("llama", 30)
    inside = {p.stem for p in SHIPPED_DIR.glob("*.yaml") if space.point_of(load_recipe(p), layout) is not None}
    outside = {p.stem for p in SHIPPED_DIR.glob("*.yaml")} - inside
    # the w8a8-dynamic recipes: a format with one bits/group combination, not a slot's option
    assert outside == {"int8", "int8-head", "wanda30-int8", "spec-distilled", "early-exit-self-spec"}, outside


def test_every_point_builds_the_recipe_it_is_found_in():
    space = load_space("default")
    layout = Layout("llama", 6)
    for seed in range(40):
        rng = random.Random(seed)
        point = space.sample(lambda name, d: rng.choice(d.choices) if d.choices else d.low)
        recipe = space.recipe(point, layout)
        if recipe is None:
            assert not any(v is True for k, v in point.items() if k.endswith(".on"))
            continue
        assert space.point_of(recipe, layout) == point, seed
        assert space.recipe(point, layout) == recipe  # named by content: the same point, the same name


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_layer_groups_split_the_linears_without_overlap(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    layers = {"gpt2": "n_layer"}.get(arch, "num_hidden_layers")
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(arch, vocab_size=300, **{**TINY_CONFIGS[arch], layers: 4})
    )
    layout = Layout.of(model.config)
    groups = ("attention", "mlp", "ends")
    chosen = {g: {n for n, _ in select_linears(model, layout.targets(g, groups))} for g in groups}
    assert all(chosen.values())
    assert not (chosen["attention"] & chosen["mlp"] or chosen["ends"] & (chosen["attention"] | chosen["mlp"]))
    whole = {n for g in ("attention", "mlp") for n, _ in select_linears(model, layout.targets(g, ()))}
    assert set.union(*chosen.values()) == whole == {n for n, _ in select_linears(model, DEFAULT_TARGETS)}
    assert all(".0." in n or ".3." in n for n in chosen["ends"])
    two_blocks = Layout(layout.model_type, 2)
    assert two_blocks.targets("attention", groups) == ()  # no middle blocks: the group is empty, and left out


def test_a_grouped_slot_samples_each_group_on_its_own():
    space = parse_space(
        {"stages": [{"technique": "rtn_quant", "bits": [4, 8], "groups": ["attention", "mlp"]}]}, "s.yaml"
    )
    point = {"s0.attention.bits": 4, "s0.mlp.bits": 8}
    recipe = space.recipe(point, Layout("llama", 4))
    assert [(s.config.bits, s.config.targets) for s in recipe.stages] == [
        (4, ("model.layers.*.self_attn.*",)),
        (8, ("model.layers.*.mlp.*",)),
    ]
    assert space.point_of(recipe, Layout("llama", 4)) == point
    with pytest.raises(ConfigError, match="drop `groups`"):
        space.recipe(point, Layout("mamba", 4))


BAD_SPACES = {
    "unknown option": ({"technique": "gptq_quant", "groupsize": [32]}, "did you mean 'group_size'"),
    "empty range": ({"technique": "wanda_prune", "sparsity": {"low": 0.6, "high": 0.2}}, "empty range"),
    "empty list": ({"technique": "gptq_quant", "bits": []}, "lists no values"),
    "value the technique refuses": ({"technique": "gptq_quant", "bits": [3, 4]}, "option 'bits' must be 4 | 8, got 3"),
    "unknown technique": ({"technique": ["gptq_quant", "gptq"]}, "unknown technique 'gptq'"),
    "unknown group": ({"technique": "rtn_quant", "groups": ["atention"]}, "did you mean 'attention'"),
}


@pytest.mark.parametrize("label", BAD_SPACES)
def test_a_bad_space_is_one_located_line(label):
    stage, expected = BAD_SPACES[label]
    with pytest.raises(ConfigError) as info:
        parse_space({"stages": [stage]}, "space.yaml")
    message = str(info.value)
    assert message.startswith("space.yaml: stages[0]") and expected in message and "\n" not in message, message


def test_bad_search_input_stops_optimize_before_anything_is_stored(tiny_llama, text_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nstages:\n  - technique: gptq_quant\n    group_size: {low: 128, high: 32}\n")
    db = tmp_path / "s.db"
    base = [
        "optimize",
        str(tiny_llama),
        "--data",
        str(text_file),
        "--store",
        str(db),
        "--quiet",
        "--out",
        str(tmp_path / "o"),
    ]
    cases = {
        "empty range": (["--search", "2", "--space", str(bad)], "empty range"),
        "unknown space": (["--search", "2", "--space", "defualt"], "did you mean 'default'"),
        "unknown objective": (["--search", "2", "--objective", "perplexity"], "unknown metric 'perplexity'"),
        "unreachable Ray": (["--search", "2", "--ray", "127.0.0.1:9"], "no Ray cluster answers at '127.0.0.1:9'"),
        "negative budget": (["--search", "-1"], "--search must be >= 0"),
    }
    for label, (extra, expected) in cases.items():
        assert main([*base, *extra]) == 2, label
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err, (label, err)
    assert not db.exists() or not Store(db).runs()


# --- the study loop, on a synthetic space (no model) ---------------------------------------------

SYNTHETIC = {
    "stages": [
        {"technique": "wanda_prune", "optional": True, "sparsity": [0.3, 0.5]},
        {"technique": ["rtn_quant", "gptq_quant"], "bits": [4, 8], "group_size": [32, -1]},
    ]
}


def _synthetic_figures(point: dict) -> dict:
    """A made-up trade-off: fewer bits and more sparsity, smaller and worse."""
    bits = point["s1.bits"]
    sparsity = point.get("s0.sparsity", 0.0) if point.get("s0.on") else 0.0
    gptq = point.get("s1.technique") == "gptq_quant"
    ppl = (
        10 * (1 + (8 - bits) / 20 * (0.5 if gptq else 1) + sparsity**2) * (0.99 if point["s1.group_size"] == 32 else 1)
    )
    mib = bits / 8 * (1.06 if point["s1.group_size"] == 32 else 1.0)
    return {"ppl_tok": ppl, "weights_mib": mib}


class Interrupted(Exception):
    pass


def test_the_study_counts_new_points_answers_repeats_and_resumes_after_a_cut(tmp_path):
    space = parse_space(SYNTHETIC, "synthetic.yaml")
    layout = Layout("llama", 4)
    objectives = [Objective("ppl_tok"), Objective("weights_mib")]
    bounds = [(Constraint.parse("ppl_tok<=13"), 13.0)]
    calls: list[str] = []
    cut_at = {"n": 3}

    def evaluate(point):
        recipe = space.recipe(point, layout)
        calls.append(recipe.name)
        if len(calls) == cut_at["n"]:
            raise Interrupted  # the process dies mid-trial: that trial stays RUNNING in the journal
        return Outcome("complete", recipe.name, None, _synthetic_figures(point))

    config = SearchConfig(trials=8, seed=1)
    kwargs = dict(journal=tmp_path / "search.journal", identity="study-1", say=lambda line: None)
    with pytest.raises(Interrupted):
        run_search(space, layout, config, objectives, bounds, evaluate, **kwargs)
    cut_at["n"] = -1
    result = run_search(space, layout, config, objectives, bounds, evaluate, **kwargs)
    assert result.new == 8
    counted = [t for t in result.trials if t["counted"]]
    assert len(counted) == 8 and len({t["name"] for t in counted}) == 8  # eight distinct points
    assert calls[2] == calls[3]  # the cut trial's point was retried first ...
    assert len(calls) == 8 + 1 and len(set(calls)) == 8  # ... and nothing else was evaluated twice
    assert all(t["figures"] for t in counted)
    again = run_search(space, layout, config, objectives, bounds, evaluate, **kwargs)
    assert again.new == 8 and len(calls) == 9  # complete: a rerun evaluates nothing


def test_a_finite_space_is_exhausted_not_looped_on(tmp_path):
    space = parse_space({"stages": [{"technique": "rtn_quant", "bits": [4, 8]}]}, "tiny.yaml")
    objectives = [Objective("weights_mib")]
    seen = []

    def evaluate(point):
        seen.append(point["s0.bits"])
        return Outcome("complete", f"b{point['s0.bits']}", None, {"weights_mib": point["s0.bits"] / 8})

    result = run_search(space, Layout("llama", 2), SearchConfig(trials=5, sampler="random"), objectives, [], evaluate,
                        journal=tmp_path / "j", identity="s", say=lambda line: None)  # fmt: skip
    assert sorted(seen) == [4, 8] and result.new == 2


# --- end to end on stories260K: screen, SIGKILL, resume, report; Ray ------------------------------

SPACE = """version: 1
name: e2e
calibration: {samples: 8, seq_len: 128}
stages:
  - technique: magnitude_prune
    optional: true
    sparsity: [0.9]
  - technique: rtn_quant
    bits: [4, 8]
    group_size: [32, -1]
"""
E2E = ["--metric", "ppl_tok", "--metric", "weights_mib", "--objective", "ppl_tok", "--objective", "weights_mib",
       "--eval-tokens", "2048", "--screen-tokens", "512", "--workload", "chat", "--repetitions", "1", "--warmup", "0",
       "--no-portfolio", "--quiet", "--constraint", "ppl_tok<=+20%"]  # fmt: skip


def _search_args(tmp_path, name: str, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return ["optimize", str(STORIES), "--data", str(TINYSTORIES), "--out", str(tmp_path / name), "--store",
            str(tmp_path / f"{name}.db"), "--space", str(space), *E2E, *extra]  # fmt: skip


def _trials(out) -> list[dict]:
    return json.loads((out / "report.json").read_text())["search"]["trials"]


@needs_assets()
@pytest.mark.integration
def test_search_killed_midway_resumes_and_a_ray_cluster_stores_the_same_figures(tmp_path):
    """SIGKILL during a search, rerun: no stored trial redone, the study complete, the store whole,
    the report's search section written. Then the same search on a real local Ray cluster: the same
    stored quality figures for the same configurations."""
    args = _search_args(tmp_path, "out", "--search", "3", "--search-seed", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "frugalm", *args]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    seen = []
    for line in proc.stderr:  # the first trial is stored; kill while the next one runs
        seen.append(line)
        if line.startswith("search: trial 0 "):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    first = complete_keys(tmp_path / "out.db")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    final = complete_keys(tmp_path / "out.db")
    assert set(final.values()) == {1} and all(k in final for k in first)  # nothing stored twice
    out = tmp_path / "out"
    counted = [t for t in _trials(out) if t["counted"]]
    assert len(counted) == 3
    with Store(tmp_path / "out.db") as db:
        for t in counted:
            run = db.get_run(t["run_id"])
            if "magnitude_prune" in t["settings"]:  # 90% of weights zeroed: the screen stops it
                assert t["state"] == "pruned" and run.kind == "screen" and "screen:" in t["reason"]
                assert not (out / "variants" / t["name"]).exists()
            else:
                assert t["state"] == "complete" and run.kind == "variant"
    assert any(t["state"] == "complete" for t in counted)
    md = (out / "report.md").read_text()
    assert "## Search" in md and "Hypervolume by trial" in md and "Front over all trials" in md
    html = (out / "report.html").read_text()
    assert "<h2>Search</h2>" in html and "hvcurve" in html

    pytest.importorskip("ray", reason="the [ray] extra is not installed")
    ray_args = _search_args(tmp_path, "ray", "--search", "2", "--search-seed", "0", "--ray", "local")
    on_ray = subprocess.run(
        [sys.executable, "-m", "frugalm", *ray_args], capture_output=True, text=True, env=env, timeout=900
    )
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    local = {t["name"]: t for t in counted}
    remote = {t["name"]: t for t in _trials(tmp_path / "ray") if t["counted"]}
    assert len(remote) == 2 and remote.keys() & local.keys()
    for name in remote.keys() & local.keys():  # quality exactly (weights are counted)
        there, here = remote[name], local[name]
        assert there["state"] == here["state"], name
        assert [there["figures"].get(m) for m in ("ppl_tok", "weights_mib")] == [
            here["figures"].get(m) for m in ("ppl_tok", "weights_mib")
        ], name
    with Store(tmp_path / "ray.db") as db:
        assert db.integrity_check() == "ok"
        for t in remote.values():
            if t["state"] == "complete":  # the artifact came back to the coordinator's folder
                assert db.get_run(t["run_id"]).model_path == str(tmp_path / "ray" / "variants" / t["name"])


def test_a_pruned_trial_teaches_the_sampler_but_counts_nowhere(tmp_path):
    from optuna.trial import TrialState

    from frugalm.search import hypervolume_curve

    space = parse_space({"stages": [{"technique": "rtn_quant", "bits": [4, 8], "group_size": [32, -1]}]}, "s.yaml")
    objectives = [Objective("ppl_tok"), Objective("weights_mib")]
    bounds = [(Constraint.parse("ppl_tok<=11"), 11.0)]

    def evaluate(point):
        name = f"b{point['s0.bits']}g{point['s0.group_size']}"
        if point["s0.bits"] == 4:  # the screen says: too far from the float model
            return Outcome("pruned", name, None, {"ppl_tok": 30.0}, "screen: ppl_tok 30 breaks the bound")
        return Outcome("complete", name, None, {"ppl_tok": 10.0, "weights_mib": 1.0 + (point["s0.group_size"] > 0)})

    worst = {"ppl_tok": 15.0, "weights_mib": 3.0}
    result = run_search(space, Layout("llama", 2), SearchConfig(trials=4, sampler="grid"), objectives, bounds, evaluate,
                        journal=tmp_path / "j", identity="s", worst=worst, say=lambda line: None)  # fmt: skip
    pruned = [t for t in result.study.trials if t.user_attrs["outcome"]["state"] == "pruned"]
    assert len(pruned) == 2 and result.new == 4
    for t in pruned:  # told as complete and infeasible, at the worst values
        assert t.state == TrialState.COMPLETE and t.values == [15.0, 3.0]
        assert t.system_attrs["constraints:ppl_tok<=11"] > 0
    records = {t["name"]: t for t in result.trials}
    assert records["b4g32"]["state"] == "pruned"
    curve = hypervolume_curve(result.trials, objectives, worst)
    measured_only = hypervolume_curve([t for t in result.trials if t["state"] == "complete"], objectives, worst)
    assert curve[-1]["hypervolume"] == measured_only[-1]["hypervolume"] > 0
