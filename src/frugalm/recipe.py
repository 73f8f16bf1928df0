"""Recipes: strict, versioned YAML naming a model and the stages to apply to it.

    version: 1
    name: prune30-int4
    model: path/or/hub-id          # optional: the CLI's MODEL argument wins
    calibration:                   # optional; techniques that need data say so
      data: calib.txt
      samples: 128
      seq_len: 512
      seed: 0
    stages:
      - technique: wanda_prune
        sparsity: 0.3

Loading checks everything that needs no model and reports every problem at once, each located
(`recipe.yaml: stages[1] (gptq): unknown option 'groupsize'; did you mean 'group_size'?`).
Precedence is defaults < recipe < `--set` overrides; `dump_recipe` writes the resolved recipe
(every option, defaults included), and `load_recipe(dump_recipe(r))` gives `r` back.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from frugalm.errors import ConfigError, did_you_mean, problems_message
from frugalm.registry import TECHNIQUES, get_technique
from frugalm.text.yaml_input import load_yaml, read_yaml_file, short

RECIPE_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "recipes"
"""The recipes frugalm ships (the portfolio `frugalm optimize` runs)."""
TOP_KEYS = ("version", "name", "model", "calibration", "stages")
NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A recipe name names folders (frugalm-out/<name>, variants/<name>): an identifier, never a path."""


@dataclass(frozen=True, kw_only=True)
class Calibration:
    data: str | None = None
    """Calibration text file (UTF-8); None: the built-in held-out text."""
    samples: int = 128
    """Number of token sequences sampled from the text."""
    seq_len: int = 512
    """Tokens per sequence (capped at the model's context)."""
    seed: int = 0
    """Seeds where the sequences start in the text."""

    def problems(self) -> list[str]:
        return [
            f"{k} must be >= 1, got {v}" for k, v in (("samples", self.samples), ("seq_len", self.seq_len)) if v < 1
        ]


@dataclass(frozen=True)
class Stage:
    technique: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    name: str
    stages: tuple[Stage, ...]
    model: str | None = None
    calibration: Calibration = field(default_factory=Calibration)
    version: int = RECIPE_VERSION


class RecipeError(ConfigError):
    def __init__(self, origin: str, problems: list[str]):
        self.problems = problems
        super().__init__(problems_message(origin, problems, closing=""))  # each problem names its place and fix


# --- option parsing --------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def coerce(value, tp):
    """Return `value` as type `tp`, or raise TypeError naming what was expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg)
            except TypeError:
                continue
        raise TypeError(_type_name(tp))
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise TypeError(_type_name(tp))
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError(_type_name(tp))
        return tuple(coerce(v, typing.get_args(tp)[0]) for v in items)
    if tp is type(None):
        if value is None:
            return None
        raise TypeError("null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("bool (true/false)")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("int")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError("float")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError("string")
    raise TypeError(_type_name(tp))


def build_config(config_cls, options: dict, where: str) -> tuple[Any, list[str]]:
    """Instantiate `config_cls` from `options`, collecting every problem with its place."""
    hints = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    problems, kwargs = [], {}
    for key, value in options.items():
        if key not in names:
            problems.append(
                f"{where}: unknown option {short(key)}{did_you_mean(str(key), names)} (options: {', '.join(names)})"
            )
            continue
        try:
            kwargs[key] = coerce(value, hints[key])
        except TypeError as exc:
            problems.append(f"{where}: option '{key}' must be {exc}, got {short(value)}")
    if problems:
        return None, problems
    config = config_cls(**kwargs)
    check = getattr(config, "problems", None)
    return config, [f"{where}: {p}" for p in (check() if check else [])]


# --- loading ---------------------------------------------------------------------------------


def _stage(raw, i: int) -> tuple[Stage | None, list[str]]:

    where = f"stages[{i}]"
    if not isinstance(raw, dict) or "technique" not in raw:
        return None, [f"{where}: must be a mapping with a 'technique' key, got {short(raw)}"]
    name = raw["technique"]
    if name not in TECHNIQUES:
        return None, [
            f"{where}: unknown technique {short(name)}{did_you_mean(str(name), TECHNIQUES)} (see `frugalm ls techniques`)"
        ]
    technique = get_technique(name)
    options = {k: v for k, v in raw.items() if k != "technique"}
    config, problems = build_config(technique.config_cls, options, f"{where} ({name})")
    return (Stage(name, config) if not problems else None), problems


def parse_recipe(data, overrides: list[str] = ()) -> tuple[Recipe | None, list[str]]:
    if not isinstance(data, dict):
        return None, ["must be a mapping with keys " + ", ".join(TOP_KEYS)]
    data = apply_overrides(data, overrides)
    stages, calibration, problems = parse_document(data, TOP_KEYS, RECIPE_VERSION, _stage, "stages")
    for key in ("name", "model"):
        if data.get(key) is not None and not isinstance(data[key], str):
            problems.append(f"'{key}' must be a string, got {short(data[key])}")
    problems += name_problems(data.get("name"))
    if problems:
        return None, problems
    return Recipe(
        name=data.get("name") or "unnamed", model=data.get("model"), stages=tuple(stages), calibration=calibration
    ), []


def parse_document(data: dict, keys, version: int, item, items: str) -> tuple[list, Calibration | None, list[str]]:
    """What recipes and search spaces share: their keys, version, non-empty `stages` (each parsed by
    `item(raw, i)` into (value, problems)) and calibration; (stages, calibration, every problem)."""
    problems = [
        f"unknown key {short(k)}{did_you_mean(str(k), keys)} (keys: {', '.join(keys)})" for k in data if k not in keys
    ]
    if data.get("version", version) != version:
        problems.append(f"version {short(data.get('version'))} is not supported; this frugalm reads version {version}")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append(f"'stages' must be a non-empty list of {items} (each with a 'technique' key)")
        raw_stages = []
    stages = []
    for i, raw in enumerate(raw_stages):
        stage, errs = item(raw, i)
        problems += errs
        stages.append(stage)
    calibration, errs = build_config(Calibration, data.get("calibration") or {}, "calibration")
    return stages, calibration, problems + errs


def name_problems(name, label: str = "'name'") -> list[str]:
    """Why `name` cannot name a recipe (it becomes a folder name), or nothing."""
    if not isinstance(name, str) or NAME_RULE.fullmatch(name):
        return []
    return [
        f"{label} {short(name)} is not an identifier: a name starts with a letter or digit and holds only letters, digits, '.', '_' and '-' (it names the output folder); rename it, e.g. 'my-recipe'"
    ]


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file; raise RecipeError listing every problem."""
    data = read_yaml_file(path, f"recipe '{path}'", "pass the path of a recipe YAML file", origin=str(path))
    recipe, problems = parse_recipe(data, overrides)
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.0.c=value` overrides (values parsed as YAML) to a copy of the raw recipe."""

    data = copy.deepcopy(data)
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set '{item}' must look like stages.0.bits=4")
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = _place(node, key, item)
        value = load_yaml(raw, f"--set '{item}'")
        if isinstance(node, list):
            node[_index(node, last, item)] = value
        else:
            node[last] = value
    return data


def _index(node: list, key: str, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(
            f"--set '{item}': '{key}' is not an index of a list of {len(node)} (stages are numbered from 0)"
        )
    return int(key)


def _place(node, key: str, item: str):
    if isinstance(node, list):
        return node[_index(node, key, item)]
    if isinstance(node, dict):
        return node.setdefault(key, {})
    raise ConfigError(f"--set '{item}': '{key}' is inside a value, not a mapping or list")


def recipe_to_dict(recipe: Recipe) -> dict:
    out = {"version": recipe.version, "name": recipe.name}
    if recipe.model is not None:
        out["model"] = recipe.model
    out["calibration"] = dataclasses.asdict(recipe.calibration)
    out["stages"] = [
        {
            "technique": s.technique,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s.config).items()},
        }
        for s in recipe.stages
    ]
    return out


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def option_docs(config_cls) -> list[tuple[str, str, Any, str]]:
    """(option, type, default, doc) for each field; the doc is the string literal under the field."""

    docs: dict[str, str] = {}
    for cls in reversed(
        [c for c in config_cls.__mro__ if dataclasses.is_dataclass(c)]
    ):  # inherited options too; a subclass's doc wins
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        except (OSError, TypeError):
            body = []
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(nxt, ast.Expr)
                and isinstance(getattr(nxt, "value", None), ast.Constant)
            ):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    hints = typing.get_type_hints(config_cls)
    return [
        (
            f.name,
            _type_name(hints[f.name]),
            f.default if f.default is not dataclasses.MISSING else None,
            docs.get(f.name, ""),
        )
        for f in dataclasses.fields(config_cls)
    ]
