"""Search spaces: strict, versioned YAML declaring the recipes a search may try.

    version: 1
    name: quant-and-prune
    calibration: {samples: 64}                    # fixed for every trial, as in a recipe
    stages:                                       # slots, in order, like a recipe's stages
      - technique: [wanda_prune, sparsegpt_prune] # one of these (a string: always this one)
        optional: true                            # the search may also leave the stage out
        sparsity: {low: 0.1, high: 0.6, step: 0.1}  # a range (of ints when low and high are ints)
      - technique: [rtn_quant, gptq_quant]
        bits: [4, 8]                              # a list: one of these values
        group_size: [32, 128, -1]
        indivisible: per_channel                  # a scalar: fixed
        groups: [attention, mlp]                  # one stage per layer group, each with its own options

A range also takes `log: true`. `groups` splits a slot into one stage per layer group, each
sampling its own options: `attention` and `mlp` (the decoder blocks' projections), `head` (the
output head) and `ends` (the first and last blocks, which the attention and MLP groups then
leave out), resolved against the model's architecture when a trial is built.

Loading checks everything that needs no model, as recipes are checked, and reports every
problem located (`space.yaml: stages[1] (gptq_quant): unknown option 'groupsize'; did you mean
'group_size'?`): every technique, every option name, every listed value and both ends of
every range (each against the technique's own option types and rules), and empty ranges.
A combination the options reject together (activations dynamic-int8 with bits 4, say) is found
when a trial draws it: that trial is infeasible, not the space.

A point of the space is a dict of parameter values named `s<i>.on` (an optional slot in use),
`s<i>.technique`, `s<i>.<option>` or `s<i>.<group>.<option>`. `Space.sample` draws one through
a caller's `ask(name, domain)` (the search's Optuna trial), `Space.recipe` turns a point into a
validated Recipe, and `Space.point_of` finds the point a given recipe is, if any (the
portfolio's recipes warm-start the search that way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from frugalm.errors import ConfigError, did_you_mean
from frugalm.recipe import (
    RECIPE_VERSION,
    Calibration,
    Recipe,
    RecipeError,
    Stage,
    build_config,
    parse_document,
    parse_recipe,
    recipe_to_dict,
)
from frugalm.registry import TECHNIQUES, get_technique
from frugalm.techniques._arch import ARCHS
from frugalm.text.yaml_input import read_yaml_file, short

SPACE_VERSION = 1
SHIPPED_SPACES = Path(__file__).resolve().parent / "spaces"
TOP_KEYS = ("version", "name", "calibration", "stages")
SLOT_KEYS = ("technique", "optional", "groups")
GROUPS = ("attention", "mlp", "head", "ends")
NOT_IN = object()
HEAD_NAMES = ("lm_head", "embed_out")


@dataclass(frozen=True)
class Domain:
    """The values one parameter takes: `choices` (categorical), or a range low..high (ints when `integer`)."""

    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    integer: bool = False

    def canonical(self, value):
        """`value` as this domain holds it (the matching choice: 0 for 0.0), or NOT_IN when outside."""
        if self.choices:
            return next(
                (c for c in self.choices if c == value and isinstance(c, bool) == isinstance(value, bool)), NOT_IN
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return NOT_IN
        if self.integer and value != int(value):
            return NOT_IN
        if self.step and not math.isclose(round((value - self.low) / self.step) * self.step, value - self.low):
            return NOT_IN
        return int(value) if self.integer else value

    def values(self) -> tuple:
        """The values to check against a technique's option rules: every choice, or both ends."""
        return self.choices or (self.low, self.high)


@dataclass(frozen=True)
class Slot:
    index: int
    techniques: tuple[str, ...]
    optional: bool
    fixed: dict[str, Any]
    searched: dict[str, Domain]
    groups: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        return f"s{self.index}"

    def param(self, option: str, group: str = "") -> str:
        return f"{self.prefix}.{group}.{option}" if group else f"{self.prefix}.{option}"


@dataclass(frozen=True)
class Layout:
    """What layer groups resolve against: the architecture (config.model_type) and its number of blocks."""

    model_type: str
    num_layers: int

    @classmethod
    def of(cls, config) -> Layout:
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
        return cls(getattr(config, "model_type", "") or "", int(layers))

    def targets(self, group: str, groups: tuple[str, ...]) -> tuple[str, ...]:
        """fnmatch patterns of `group`'s linear layers; attention and MLP leave out the first and
        last blocks when `ends` is one of `groups`."""
        if group == "head":
            return HEAD_NAMES
        arch = ARCHS.get(self.model_type)
        if arch is None:
            raise ConfigError(
                f"layer groups need an architecture frugalm knows ({', '.join(ARCHS)}), and this model is '{self.model_type}'; drop `groups` from the space"
            )
        last = self.num_layers - 1
        if group == "ends":
            return tuple(dict.fromkeys((f"{arch.blocks}.0.*", f"{arch.blocks}.{last}.*")))
        mlp = group == "mlp"
        parts = [p for p in arch.linears if (p.startswith("mlp") or p in ("fc1", "fc2")) == mlp]
        if "ends" not in groups:
            return tuple(f"{arch.blocks}.*.{p}" for p in parts)
        return tuple(f"{arch.blocks}.{i}.{p}" for i in range(1, last) for p in parts)


@dataclass(frozen=True)
class Space:
    name: str
    slots: tuple[Slot, ...]
    calibration: Calibration
    origin: str = "space"

    def sample(self, ask: Callable[[str, Domain], Any]) -> dict[str, Any]:
        """A point, each parameter drawn by `ask(name, domain)` in a fixed order (define-by-run:
        a slot left out draws no options)."""
        point: dict[str, Any] = {}
        for slot in self.slots:
            if slot.optional:
                point[f"{slot.prefix}.on"] = ask(f"{slot.prefix}.on", Domain(choices=(True, False)))
                if not point[f"{slot.prefix}.on"]:
                    continue
            if len(slot.techniques) > 1:
                point[f"{slot.prefix}.technique"] = ask(f"{slot.prefix}.technique", Domain(choices=slot.techniques))
            for group in slot.groups or ("",):
                for option, domain in slot.searched.items():
                    point[slot.param(option, group)] = ask(slot.param(option, group), domain)
        return point

    def domains(self, point: dict[str, Any]) -> dict[str, Domain]:
        """The domain of every parameter `point` sets (what Optuna needs to record a given trial)."""
        out = {}
        for slot in self.slots:
            if slot.optional:
                out[f"{slot.prefix}.on"] = Domain(choices=(True, False))
            if len(slot.techniques) > 1:
                out[f"{slot.prefix}.technique"] = Domain(choices=slot.techniques)
            for group in slot.groups or ("",):
                out.update({slot.param(o, group): d for o, d in slot.searched.items()})
        return {k: out[k] for k in point}

    def stages(self, point: dict[str, Any], layout: Layout) -> list[dict]:
        """The raw recipe stages of `point` (empty when every slot is left out: the base model)."""
        stages = []
        for slot in self.slots:
            if slot.optional and not point[f"{slot.prefix}.on"]:
                continue
            technique = point.get(f"{slot.prefix}.technique", slot.techniques[0])
            for group in slot.groups or ("",):
                options = {**slot.fixed, **{o: point[slot.param(o, group)] for o in slot.searched}}
                if group:
                    options["targets"] = list(layout.targets(group, slot.groups))
                    if not options["targets"]:  # no middle blocks (a model of two): the group is empty
                        continue
                stages.append({"technique": technique, **options})
        return stages

    def recipe(self, point: dict[str, Any], layout: Layout) -> Recipe | None:
        """The validated recipe `point` stands for (named by its content), or None for the base model.

        Raises ConfigError naming the point's problem when its options reject each other.
        """
        stages = self.stages(point, layout)
        if not stages:
            return None
        raw = {"version": RECIPE_VERSION, "calibration": dataclasses.asdict(self.calibration), "stages": stages}
        raw["name"] = "t-" + hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]
        recipe, problems = parse_recipe(raw)
        if problems:
            raise RecipeError(f"{self.origin}: point {point}", problems)
        return recipe

    def point_of(self, recipe: Recipe, layout: Layout) -> dict[str, Any] | None:
        """The point of this space that builds `recipe` (names aside), or None when it is not in the space."""
        if recipe.calibration != self.calibration:
            return None
        stages = recipe_to_dict(recipe)["stages"]
        point: dict[str, Any] = {}
        j = 0
        for slot in self.slots:
            n = max(1, len([g for g in slot.groups if layout.targets(g, slot.groups)]))
            found = self._match(slot, stages[j : j + n], layout)
            if found is not None:
                point.update(found)
                j += n
            elif slot.optional:
                point[f"{slot.prefix}.on"] = False
            else:
                return None
        return point if j == len(stages) else None

    def _match(self, slot: Slot, stages: list[dict], layout: Layout) -> dict[str, Any] | None:
        groups = tuple(g for g in slot.groups if layout.targets(g, slot.groups))
        if len(stages) != max(1, len(groups)) or len({s["technique"] for s in stages}) != 1:
            return None
        technique = stages[0]["technique"]
        if technique not in slot.techniques:
            return None
        defaults = recipe_to_dict(Recipe("d", (Stage(technique, get_technique(technique).config_cls()),)))["stages"][0]
        point = {f"{slot.prefix}.on": True} if slot.optional else {}
        if len(slot.techniques) > 1:
            point[f"{slot.prefix}.technique"] = technique
        for group, stage in zip(groups or ("",), stages):
            expected_targets = list(layout.targets(group, slot.groups)) if group else defaults.get("targets")
            for option, value in stage.items():
                if option == "technique":
                    continue
                if option in slot.searched:
                    value = slot.searched[option].canonical(value)
                    if value is NOT_IN:
                        return None
                    point[slot.param(option, group)] = value
                elif value != _plain(
                    slot.fixed.get(option, expected_targets if option == "targets" else defaults[option])
                ):
                    return None
        return point


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# --- loading ---------------------------------------------------------------------------------


def _domain(value, where: str, option: str) -> tuple[Domain | None, list[str]]:
    if isinstance(value, list):
        if not value:
            return None, [f"{where}: option '{option}' lists no values; give at least one (or a scalar to fix it)"]
        if any(isinstance(v, (list, dict)) for v in value):
            return None, [f"{where}: option '{option}': list values must be scalars, got {short(value)}"]
        return Domain(choices=tuple(dict.fromkeys(value))), []
    keys = ("low", "high", "step", "log")
    unknown = [k for k in value if k not in keys]
    if unknown or "low" not in value or "high" not in value:
        return None, [
            f"{where}: option '{option}': a range is a mapping with low and high (and optionally step, log), got {short(value)}"
        ]
    low, high, step, log = value["low"], value["high"], value.get("step"), value.get("log", False)
    numbers = [v for v in (low, high, step) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers) or not isinstance(log, bool):
        return None, [
            f"{where}: option '{option}': low, high and step must be numbers and log true/false, got {short(value)}"
        ]
    problems = []
    if low > high:
        problems.append(f"{where}: option '{option}': empty range (low {low} > high {high}); swap them")
    if step is not None and step <= 0:
        problems.append(f"{where}: option '{option}': step must be > 0, got {step}")
    if log and (low <= 0 or step is not None):
        problems.append(f"{where}: option '{option}': a log range needs low > 0 and no step")
    integer = all(isinstance(v, int) for v in numbers)
    return (None if problems else Domain(low=low, high=high, step=step, log=log, integer=integer)), problems


def _slot(raw, i: int) -> tuple[Slot | None, list[str]]:
    where = f"stages[{i}]"
    if not isinstance(raw, dict) or "technique" not in raw:
        return None, [f"{where}: must be a mapping with a 'technique' key, got {short(raw)}"]
    names = raw["technique"] if isinstance(raw["technique"], list) else [raw["technique"]]
    unknown = [n for n in names if not isinstance(n, str) or n not in TECHNIQUES]
    if unknown or not names:
        return None, [
            f"{where}: unknown technique {short(n)}{did_you_mean(str(n), TECHNIQUES)} (see `frugalm ls techniques`)"
            for n in unknown or ["(none)"]
        ]
    problems = []
    optional, groups = raw.get("optional", False), raw.get("groups", [])
    if not isinstance(optional, bool):
        problems.append(f"{where}: 'optional' must be true or false, got {short(optional)}")
    if not isinstance(groups, list) or any(g not in GROUPS for g in groups) or len(set(groups)) != len(groups):
        bad = next((g for g in groups if g not in GROUPS), groups) if isinstance(groups, list) else groups
        problems.append(
            f"{where}: 'groups' must list distinct layer groups of {', '.join(GROUPS)}, got {short(bad)}{did_you_mean(str(bad), GROUPS)}"
        )
        groups = []
    if groups and "targets" in raw:
        problems.append(f"{where}: 'groups' sets each stage's targets; drop 'targets' or 'groups'")
    fixed, searched = {}, {}
    for option, value in raw.items():
        if option in SLOT_KEYS:
            continue
        if isinstance(value, (list, dict)) and not (option == "targets" and isinstance(value, list)):
            domain, errs = _domain(value, where, option)
            problems += errs
            if domain is not None:
                searched[option] = domain
        else:
            fixed[option] = value
    for name in names:  # every value must be one the technique takes, as in a recipe
        technique = get_technique(name)
        label = f"{where} ({name})"
        _, errs = build_config(technique.config_cls, fixed, label)
        problems += errs
        for option, domain in searched.items():
            for value in domain.values():
                _, errs = build_config(technique.config_cls, {option: value}, label)
                problems += errs
    if problems:
        return None, list(dict.fromkeys(problems))
    return Slot(i, tuple(dict.fromkeys(names)), optional, fixed, searched, tuple(groups)), []


def parse_space(data, origin: str = "space") -> Space:
    """Validate raw space data; raise RecipeError listing every problem, each located."""
    if not isinstance(data, dict):
        raise RecipeError(origin, ["must be a mapping with keys " + ", ".join(TOP_KEYS)])
    slots, calibration, problems = parse_document(data, TOP_KEYS, SPACE_VERSION, _slot, "slots")
    if not isinstance(data.get("name", ""), str):
        problems.append(f"'name' must be a string, got {short(data['name'])}")
    if problems:
        raise RecipeError(origin, problems)
    return Space(data.get("name") or Path(origin).stem, tuple(slots), calibration, origin)


def load_space(ref: str | Path) -> Space:
    """A space file, or the name of a shipped space (`default`)."""
    path = Path(ref)
    if not path.is_file() and (SHIPPED_SPACES / f"{ref}.yaml").is_file():
        path = SHIPPED_SPACES / f"{ref}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in SHIPPED_SPACES.glob("*.yaml"))
        raise ConfigError(
            f"search space '{ref}' is neither a file nor a shipped space{did_you_mean(str(ref), shipped)} (shipped: {', '.join(shipped)})"
        )
    data = read_yaml_file(path, f"search space '{path}'", "pass the path of a search space YAML file", origin=str(path))
    return parse_space(data, str(path))


def space_to_dict(space: Space) -> dict:
    """The space as data (what a study's identity hashes)."""

    def domain(d: Domain):
        return list(d.choices) if d.choices else {"low": d.low, "high": d.high, "step": d.step, "log": d.log}

    return {
        "version": SPACE_VERSION,
        "calibration": dataclasses.asdict(space.calibration),
        "stages": [
            {
                "technique": list(s.techniques),
                "optional": s.optional,
                "groups": list(s.groups),
                **{k: _plain(v) for k, v in s.fixed.items()},
                **{k: domain(d) for k, d in s.searched.items()},
            }
            for s in space.slots
        ],
    }
