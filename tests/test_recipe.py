from pathlib import Path

import pytest

from frugalm.cli import main
from frugalm.errors import ConfigError
from frugalm.recipe import (
    SHIPPED_DIR,
    RecipeError,
    dump_recipe,
    load_recipe,
    option_docs,
)
from frugalm.registry import TECHNIQUES, get_technique

RECIPES = sorted(SHIPPED_DIR.glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


GOOD = """
version: 1
name: prune-then-int8
stages:
  - technique: magnitude_prune
    sparsity: 0.3
  - technique: rtn_quant
    bits: 8
"""


def test_round_trip_and_defaults(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD))
    assert recipe.stages[0].config.sparsity == 0.3 and recipe.stages[1].config.bits == 8
    dumped = dump_recipe(recipe)
    assert "group_size" in dumped  # defaults are resolved into the dump
    assert load_recipe(_write(tmp_path, dumped)) == recipe


def test_every_problem_is_reported_once_located(tmp_path):
    text = """
version: 1
name: bad
stags: []
stages:
  - technique: rtn_quant
    groupsize: 128
    bits: 3
  - technique: magnitude_prune
    sparsity: 1.0
  - technique: gptq_quantt
"""
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, text))
    msg, problems = str(info.value), info.value.problems
    assert "\n" not in msg
    assert any("unknown key 'stags'; did you mean 'stages'" in p for p in problems)
    assert any("stages[0] (rtn_quant): unknown option 'groupsize'; did you mean 'group_size'" in p for p in problems)
    assert any("stages[0] (rtn_quant): option 'bits' must be 4 | 8, got 3" in p for p in problems)
    assert any("stages[1] (magnitude_prune)" in p and "sparsity" in p for p in problems)
    assert any("stages[2]: unknown technique 'gptq_quantt'" in p for p in problems)


def test_wrong_type_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="option 'sparsity' must be float, got 'half'"):
        load_recipe(
            _write(tmp_path, "version: 1\nname: x\nstages:\n  - technique: magnitude_prune\n    sparsity: half\n")
        )
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(_write(tmp_path, "stages: [\n"))


def test_overrides_take_precedence(tmp_path):
    recipe = load_recipe(_write(tmp_path, GOOD), ["stages.1.bits=4", "stages.0.sparsity=0.5", "name=other"])
    assert recipe.stages[1].config.bits == 4 and recipe.stages[0].config.sparsity == 0.5 and recipe.name == "other"
    with pytest.raises(ConfigError, match="not an index"):
        load_recipe(_write(tmp_path, GOOD), ["stages.5.bits=4"])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    load_recipe(path)


def test_every_technique_documents_its_options():
    for name in TECHNIQUES:
        for option, _type, _default, doc in option_docs(get_technique(name).config_cls):
            assert doc, f"{name}.{option} has no doc string"


def test_validate_cli(tmp_path, capsys):
    assert main(["validate", str(_write(tmp_path, GOOD))]) == 0
    assert "ok (2 stage(s)" in capsys.readouterr().out
    assert main(["validate", str(_write(tmp_path, GOOD.replace("sparsity: 0.3", "sparsty: 0.3")))]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'sparsity'" in err and err.count("\n") == 1
    assert main(["ls", "techniques"]) == 0
    assert "rtn_quant" in capsys.readouterr().out
