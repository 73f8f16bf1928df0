"""Pointing frugalm at your files is safe: no folder escaped or deleted, no leftovers, no lost run."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import complete_keys, error_message
from frugalm.atomic import OWNER_MARK, atomic_folder, sweep_leftovers
from frugalm.cli import main
from frugalm.errors import ConfigError, MeasurementError
from frugalm.recipe import load_recipe
from frugalm.store import Run, Store

RECIPE = """version: 1
name: {name}
stages:
  - technique: magnitude_prune
    sparsity: 0.5
"""
FAST = [
    "--eval-tokens",
    "256",
    "--repetitions",
    "1",
    "--warmup",
    "0",
    "--workload",
    "chat",
    "--speedup-budget",
    "0.5",
    "--quiet",
]


def _optimize(model, data, db, *extra) -> list[str]:
    """`frugalm optimize` arguments on a tiny model, measured fast, into the store `db`."""
    return ["optimize", str(model), "--data", str(data), "--store", str(db), *FAST, *extra]


def _recipe(tmp_path: Path, name: str, file: str = "recipe.yaml") -> Path:
    path = tmp_path / file
    path.write_text(RECIPE.format(name=json.dumps(name)))
    return path


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --- 1. a recipe's name is an identifier, never a path ------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "/tmp/x", "../escape", "a/b", ".hidden", " x"])
def test_recipe_name_that_is_a_path_is_refused_before_anything_is_written(
    name, tiny_llama, tmp_path, monkeypatch, capsys
):
    work = tmp_path / "work"
    (work / "frugalm-out").mkdir(parents=True)
    (work / "frugalm-out" / "keep.txt").write_text("the user's file")
    (work / "precious.txt").write_text("the user's file")
    monkeypatch.chdir(work)
    recipe = _recipe(tmp_path, name)
    before = _tree(work)
    assert main(["validate", str(recipe)]) == 2
    assert "is not an identifier" in capsys.readouterr().err
    assert main(["run", str(recipe), str(tiny_llama), "--no-measure", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "is not an identifier" in err and "letters, digits" in err
    assert _tree(work) == before  # nothing created, nothing removed
    assert not Path("/tmp/x").exists() or name != "/tmp/x"


def test_set_override_cannot_smuggle_a_path_name(tmp_path):
    with pytest.raises(ConfigError, match="is not an identifier"):
        load_recipe(_recipe(tmp_path, "fine"), ["name=.."])


# --- 2. output folders: replaced only when frugalm wrote them -----------------------------------


def test_run_out_refuses_a_folder_frugalm_did_not_write(tiny_llama, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    recipe = _recipe(tmp_path, "m50")
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(home), "--no-measure", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was not written by frugalm" in err and "--force" in err
    assert (home / "thesis.tex").read_text() == "years of work"
    # A folder frugalm wrote is replaced; so is an empty one.
    mine = tmp_path / "mine"
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(mine), "--no-measure", "--quiet"]) == 0
    assert (mine / "frugalm.json").is_file() and not (mine / OWNER_MARK).exists()  # frugalm.json says whose it is
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(mine), "--no-measure", "--quiet"]) == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(empty), "--no-measure", "--quiet"]) == 0
    # --force replaces a foreign folder, as asked.
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(home), "--no-measure", "--quiet", "--force"]) == 0
    assert not (home / "thesis.tex").exists() and (home / "frugalm.json").is_file()


def test_symlinked_output_folder_is_refused_not_followed(tiny_llama, tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    (target / "frugalm.json").write_text("{}")  # even a frugalm folder behind a link is not replaced through it
    link = tmp_path / "link"
    link.symlink_to(target)
    recipe = _recipe(tmp_path, "m50")
    assert main(["run", str(recipe), str(tiny_llama), "--out", str(link), "--no-measure", "--quiet", "--force"]) == 2
    assert "is a symlink" in capsys.readouterr().err
    assert _tree(target) == ["frugalm.json"] and link.is_symlink()


def test_export_out_refuses_a_foreign_folder(tiny_llama, tmp_path, capsys):
    int8 = tmp_path / "int8-recipe.yaml"
    int8.write_text("version: 1\nname: q\nstages:\n  - technique: rtn_quant\n    bits: 8\n")
    variant = tmp_path / "variant"
    assert main(["run", str(int8), str(tiny_llama), "--out", str(variant), "--no-measure", "--quiet"]) == 0
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('hi')")
    assert main(["export", str(variant), "-o", str(project)]) == 2
    assert "--force" in capsys.readouterr().err and (project / "main.py").is_file()
    out = tmp_path / "export"
    assert main(["export", str(variant), "-o", str(out)]) == 0
    assert (out / OWNER_MARK).is_file()  # a compressed-tensors folder has no frugalm file of its own
    assert main(["export", str(variant), "-o", str(out)]) == 0  # its own export is replaced


def test_optimize_out_refuses_a_foreign_folder(tiny_llama, text_file, tmp_path, capsys):
    home = tmp_path / "home"
    (home / "variants" / "int8").mkdir(parents=True)
    (home / "variants" / "int8" / "notes.txt").write_text("mine")
    before = _tree(home)
    assert main(_optimize(tiny_llama, text_file, tmp_path / "s.db", "--out", str(home), "--recipe", "int8")) == 2
    assert "was not written by frugalm" in capsys.readouterr().err
    assert _tree(home) == before


# --- 7. leftovers of killed writes are swept on the next write ----------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_and_old_folders_are_swept_and_the_old_folder_restored(tmp_path):
    dead, out = _dead_pid(), tmp_path / "variant"
    partial = tmp_path / f".variant.partial-{dead}-abc123"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".variant.old-{dead}"  # killed between the two renames: `variant` is missing
    old.mkdir()
    (old / "frugalm.json").write_text("{}")
    live = tmp_path / f".variant.partial-{os.getppid()}-zzz"  # a live process's write is left alone
    live.mkdir()
    other = tmp_path / f".other.partial-{dead}-abc"  # another folder's leftovers are not this write's business
    other.mkdir()
    sweep_leftovers(out)
    assert not partial.exists() and not old.exists() and live.exists() and other.exists()
    assert (out / "frugalm.json").is_file()  # the complete old folder is back
    with atomic_folder(out) as tmp:
        (tmp / "frugalm.json").write_text('{"new": true}')
    assert json.loads((out / "frugalm.json").read_text()) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["variant", live.name, other.name])


def test_measuring_child_leaves_nothing_in_tmp(tiny_llama, text_file, tmp_path, monkeypatch):
    from frugalm.benchmark.api import BenchConfig, bench
    from frugalm.measure.quality import PerplexityProtocol

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    stale = tmp / f"frugalm-child-{_dead_pid()}-abc"  # left by a run killed with SIGKILL
    stale.mkdir()
    (stale / "spec.json").write_text('{"docs": ["the evaluation text"]}')
    config = BenchConfig(
        data=str(text_file),
        workloads=("chat",),
        metrics=("ppl_tok",),
        warmup=0,
        repetitions=1,
        protocol=PerplexityProtocol(max_tokens=256),
    )
    bench(tiny_llama, config, store=tmp_path / "s.db")
    assert list(tmp.iterdir()) == []


# --- 4. non-finite figures and weights: a failed variant with its cause, never a lost run -------


def test_non_finite_figure_stores_a_failed_run_and_keeps_the_store_whole(tmp_path):
    from frugalm.measure.metrics import Measurement

    run = Run(model_ref="m", benchmark_version="v", config={}, environment={})
    with Store(tmp_path / "s.db") as store:
        with pytest.raises(MeasurementError, match=r"ppl_tok = nan"):
            store.add_run(
                run,
                [
                    Measurement("ppl_tok", float("nan"), method="measured"),
                    Measurement("params_count", 10, method="counted"),
                ],
            )
        stored = store.get_run(run.id)
        assert stored.status == "failed" and "ppl_tok = nan" in stored.error and store.measurements(run.id) == []
        assert store.integrity_check() == "ok"


def _model_with_a_huge_weight(tiny_llama: Path, folder: Path) -> Path:
    """The tiny Llama with one weight of 1e7: fine in float32, but its int8 scale overflows float16."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e7
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


def test_stage_leaving_non_finite_weights_fails_the_variant_and_optimize_goes_on(
    tiny_llama, text_file, tmp_path, capsys
):
    model = _model_with_a_huge_weight(tiny_llama, tmp_path / "huge-weight")
    int8 = tmp_path / "q8.yaml"
    int8.write_text("version: 1\nname: q8\nstages:\n  - technique: rtn_quant\n    bits: 8\n")
    out, db = tmp_path / "out", tmp_path / "s.db"
    assert main(["run", str(int8), str(model), "--out", str(tmp_path / "v"), "--no-measure", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "stages[0] (rtn_quant) produced infinite values in model.layers.1.mlp.down_proj" in err
    assert not (tmp_path / "v").exists()
    args = _optimize(model, text_file, db, "--out", str(out), "--recipe", str(int8), "--recipe", "magnitude50")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "q8: failed: stages[0] (rtn_quant) produced infinite values" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["skipped"]["q8"].startswith("failed: ") and {v["name"] for v in report["variants"]} >= {
        "baseline",
        "magnitude50",
    }
    assert "produced infinite values" in (out / "report.md").read_text()


# --- 5. YAML alias bombs ---------------------------------------------------------------------------


def test_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
        f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]" for p, c in zip("abcdefgh", "bcdefghi")
    ]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\n")
    assert bomb.stat().st_size < 700
    with pytest.raises(ConfigError) as exc:
        load_recipe(bomb)
    message = error_message(exc)
    assert "aliases expand to more than" in message and len(message) < 300
    loop = tmp_path / "loop.yaml"
    loop.write_text("stages: &s [*s]\n")
    with pytest.raises(ConfigError):
        load_recipe(loop)


def test_echoed_values_are_shortened(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"version: 1\nname: r\nstages:\n  - technique: magnitude_prune\n    sparsity: {'x' * 100_000}\n")
    with pytest.raises(ConfigError) as exc:
        load_recipe(recipe)
    assert len(error_message(exc)) < 400


# --- 8. resume measures what it says it measured ---------------------------------------------------


def test_resume_rebuilds_missing_artifacts_and_another_out_is_another_run(tiny_llama, text_file, tmp_path, capsys):
    import shutil

    out, db = tmp_path / "out", tmp_path / "s.db"
    args = _optimize(tiny_llama, text_file, db, "--recipe", "int8", "--keep-dominated")
    assert main([*args, "--out", str(out)]) == 0
    shutil.rmtree(out / "variants" / "int8")  # the user removed an artifact
    capsys.readouterr()
    assert main([*args, "--out", str(out)]) == 0
    assert "artifact" in capsys.readouterr().err and (out / "variants" / "int8" / "frugalm.json").is_file()
    other = tmp_path / "other"  # another --out: its own artifacts, measured there (not the first folder's)
    assert main([*args, "--out", str(other)]) == 0
    assert (other / "variants" / "int8" / "frugalm.json").is_file()
    with Store(db) as store:
        variant_paths = Counter(
            Path(r.model_path).parent.parent.name
            for r in store.runs()
            if r.kind == "variant" and r.status == "complete"
        )
    assert variant_paths == {"out": 2, "other": 1}


def test_two_recipe_files_with_one_stem_are_refused(tiny_llama, text_file, tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = _recipe(tmp_path / "a", "x", "same.yaml"), _recipe(tmp_path / "b", "y", "same.yaml")
    args = _optimize(tiny_llama, text_file, tmp_path / "s.db", "--out", str(tmp_path / "o"), "--recipe", str(first))
    assert main([*args, "--recipe", str(second)]) == 2
    assert "two recipes are named 'same'" in capsys.readouterr().err


# --- 9. SIGKILL midway, then resume -----------------------------------------------------------------


def test_optimize_killed_after_its_second_variant_resumes_without_redoing_anything(tiny_llama, text_file, tmp_path):
    out, db = tmp_path / "out", tmp_path / "s.db"
    extra = ["--out", str(out), "--recipe", "int8", "--recipe", "magnitude50", "--recipe", "wanda50"]
    cmd = [sys.executable, "-m", "frugalm", *_optimize(tiny_llama, text_file, db, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True
    )
    seen = []
    for line in proc.stderr:  # "wanda50: ..." starts the third variant: the second is stored
        seen.append(line)
        if line.startswith("wanda50: "):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    first = complete_keys(db)
    assert len(first) == 3 and set(first.values()) == {1}  # baseline, int8, magnitude50
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("already measured") == 3
    final = complete_keys(db)
    assert len(final) == 5 and set(final.values()) == {1}  # + wanda50 and the baseline again, each once
    assert all(final[k] == 1 for k in first)
    leftovers = (
        [p.name for p in (out / "variants").iterdir() if p.name.startswith(".")] if (out / "variants").is_dir() else []
    )
    assert leftovers == []


# --- CI proves the asset-carrying claims: a skipped integration test fails it --------------------


def test_required_assets_turn_a_skipped_integration_test_into_a_failure(tmp_path):
    test = Path(__file__).parent / "test_integration.py"
    env = {**os.environ, "FRUGALM_ASSETS": str(tmp_path / "absent")}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), "-k", "reference"]
    skipped = subprocess.run(
        base, capture_output=True, text=True, env={**env, "FRUGALM_REQUIRE_ASSETS": "0"}, cwd=test.parent.parent
    )
    assert skipped.returncode == 0 and "skipped" in skipped.stdout, skipped.stdout[-1000:]
    required = subprocess.run(
        base, capture_output=True, text=True, env={**env, "FRUGALM_REQUIRE_ASSETS": "1"}, cwd=test.parent.parent
    )
    assert required.returncode == 1 and "skipped although FRUGALM_REQUIRE_ASSETS=1" in required.stdout, required.stdout[
        -1000:
    ]


# --- 6. calibration and training text: read as a stream, bounded -----------------------------------


def test_evaluation_split_matches_the_whole_file_split_and_is_bounded(tiny_llama, tmp_path, monkeypatch):
    from frugalm import run as pipeline
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.quality import PerplexityProtocol
    from frugalm.models import load_tokenizer, resolve_model
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    tokenizer = load_tokenizer(resolve_model(tiny_llama))
    text = tmp_path / "eval.txt"
    text.write_text(
        "".join(f"Document {i} tells a story about number {i}.\n" * (1 + i % 5) + "<|endoftext|>\n" for i in range(400))
    )
    config = BenchConfig(data=str(text), protocol=PerplexityProtocol(max_tokens=300))
    docs = split_documents(read_text(text))
    n = len(encode_documents(tokenizer, docs, 300).docs)
    held_out, rest, source = pipeline.evaluation_split(tokenizer, config)
    assert (held_out, rest) == (docs[:n], docs[n:]) and "the text goes on" not in source
    monkeypatch.setattr(pipeline, "TRAINING_TEXT_MAX_CHARS", 2_000)
    held_out, rest, source = pipeline.evaluation_split(tokenizer, config)
    assert held_out == docs[:n] and rest == docs[n : n + len(rest)] and 0 < sum(map(len, rest)) <= 2_000
    assert "the text goes on; frugalm reads at most 2,000" in source
