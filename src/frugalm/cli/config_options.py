"""Command-line options generated from the API's config dataclasses: one definition of each default.

An option's help is the docstring under its field, and the default it states is the field's
default; an option left out stays out of the config (`configure` replaces only what was given),
so the command runs exactly what the same call from Python runs. The help needs the defaults
before the API is imported (it imports torch, seconds; `frugalm --help` must stay instant), so
they are read from the dataclass's source with `ast`: a literal, a module-level constant (`X =
literal`, or imported `from` another frugalm module), or the keywords of a call (`Cls(a=1)`,
`field(default_factory=lambda: Cls(a=1))`). Anything else is not shown; tests/test_cli_defaults.py
checks every shown default against the imported dataclass.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

UNKNOWN = object()
"""A default the source does not state as a literal: the help shows none."""


@dataclass(frozen=True)
class Option:
    flag: str
    field: str
    """The config field it sets; `protocol.max_tokens` for a field of a nested config."""
    argparse: dict = field(default_factory=dict)
    """Extra add_argument keywords (type, action, metavar); `action="append"` gives a tuple."""
    remark: str = ""
    """What only the command line needs to say (`repeatable`, where to list the choices)."""


@dataclass(frozen=True)
class FieldSource:
    default: Any
    """The literal default; a dict of keyword overrides when the default is a config call; or UNKNOWN."""
    doc: str
    nested: tuple[str, str] | None = None
    """(module, class) of a nested config field, whose own defaults apply under the overrides."""


def add_overrides_option(p) -> None:
    """`--set KEY=VALUE`, repeatable: a recipe value overridden (recipe.apply_overrides), for run and validate."""
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. stages.0.bits=4 (repeatable)")  # fmt: skip


def add_options(p, options: list[Option], module: str, cls: str, owner: tuple[str, str, str] | None = None) -> None:
    """Add `options` (fields of `module.cls`) to parser `p`; defaults shown are those of `owner`'s
    field (module, class, field) when given: the config a command's API starts from."""
    defaults = source_defaults(module, cls)
    if owner:
        defaults = _merge(defaults, dataclass_fields(owner[0], owner[1])[owner[2]].default)
    for o in options:
        *path, name = o.field.split(".")
        fields, shown = _nested_fields(module, cls, path), defaults
        for part in path:
            shown = shown[part]
        keywords = (
            {"metavar": o.flag.lstrip("-").upper().replace("-", "_")}
            if o.argparse.get("action") not in ("store_true", "store_false")
            else {}
        )
        p.add_argument(
            o.flag,
            dest=o.field.replace(".", "__"),
            default=None,
            help=_help(fields[name].doc, o.remark, shown[name]),
            **{**keywords, **o.argparse},
        )


def configure(base, options: list[Option], args):
    """`base` with the options given on the command line replaced (lists from `append` as tuples)."""
    given: dict = {}
    for o in options:
        value = getattr(args, o.field.replace(".", "__"))
        if value is not None:
            *path, name = o.field.split(".")
            target = given
            for part in path:
                target = target.setdefault(part, {})
            target[name] = tuple(value) if isinstance(value, list) else value
    return _replace(base, given)


def _replace(config, given: dict):
    return dataclasses.replace(
        config, **{k: _replace(getattr(config, k), v) if isinstance(v, dict) else v for k, v in given.items()}
    )


def source_defaults(module: str, cls: str) -> dict:
    """{field: default} of a config class read from its source, nested configs as dicts."""
    out = {}
    for name, src in dataclass_fields(module, cls).items():
        out[name] = _merge(source_defaults(*src.nested), src.default) if src.nested else src.default
    return out


def _nested_fields(module: str, cls: str, path: list[str]) -> dict[str, FieldSource]:
    fields = dataclass_fields(module, cls)
    for part in path:
        fields = dataclass_fields(*fields[part].nested)
    return fields


def _merge(defaults: dict, overrides) -> dict:
    if not isinstance(overrides, dict):  # a default the source does not spell out: show none below it
        return {k: _merge(v, UNKNOWN) if isinstance(v, dict) else UNKNOWN for k, v in defaults.items()}
    return {
        k: _merge(v, overrides[k]) if isinstance(v, dict) and k in overrides else overrides.get(k, v)
        for k, v in defaults.items()
    }


def _help(doc: str, remark: str, default) -> str:
    """The field's doc in argparse's style (lower case, no full stop), then the remark and the default."""
    text = doc[:1].lower() + doc[1:] if doc[1:2].islower() else doc
    shown = _show(default)
    notes = [n for n in (remark, shown and f"default: {shown}") if n]
    return (text.rstrip(".") + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")


def _show(value) -> str:
    if value is UNKNOWN or value is None or isinstance(value, bool):
        return ""  # None and off are said by the doc ("by default ...") and by the flag itself
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def _module_tree(module: str) -> ast.Module | None:
    spec = importlib.util.find_spec(module)  # imports the parent packages only: frugalm's are light
    try:
        return ast.parse(Path(spec.origin).read_text())
    except (AttributeError, TypeError, OSError, SyntaxError):  # no source shipped: the help shows no defaults
        return None


@functools.cache
def dataclass_fields(module: str, cls: str) -> dict[str, FieldSource]:
    """{field: FieldSource} for the fields of `cls` in `module` that have a default."""
    tree = _module_tree(module)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None) if tree else None
    if node is None:
        return {}
    out = {}
    for stmt, nxt in zip(node.body, [*node.body[1:], None]):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None):
            continue
        doc = (
            nxt.value.value
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            else ""
        )
        out[stmt.target.id] = FieldSource(
            _value(stmt.value, module), " ".join(doc.split()), _nested(stmt.annotation, module)
        )
    return out


def _nested(annotation: ast.expr, module: str) -> tuple[str, str] | None:
    """(module, class) when the field's type is a config class defined in or imported into `module`."""
    if not isinstance(annotation, ast.Name):
        return None
    where = _defined_in(annotation.id, module)
    return (
        (where, annotation.id)
        if where and isinstance(_find(_module_tree(where), annotation.id), ast.ClassDef)
        else None
    )


def _value(node: ast.expr, module: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        pass
    if isinstance(node, ast.Name):
        where = _defined_in(node.id, module)
        found = _find(_module_tree(where), node.id) if where else None
        return _value(found.value, where) if isinstance(found, (ast.Assign, ast.AnnAssign)) and found.value else UNKNOWN
    if isinstance(node, ast.Call) and not node.args:
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(node.func, ast.Name) and node.func.id == "field":
            factory = keywords.get("default_factory")
            if isinstance(factory, ast.Lambda):
                return _value(factory.body, module)
            if isinstance(factory, ast.Name):
                return {}  # the nested class's own defaults
            return _value(keywords["default"], module) if "default" in keywords else UNKNOWN
        if None not in keywords:  # no **kwargs
            return {k: _value(v, module) for k, v in keywords.items()}
    return UNKNOWN


def _defined_in(name: str, module: str) -> str | None:
    """The module whose top level defines `name`: `module` itself, or where it imports it from."""
    tree = _module_tree(module)
    if tree is None:
        return None
    for stmt in tree.body:
        if (
            isinstance(stmt, ast.ImportFrom)
            and stmt.level == 0
            and any((a.asname or a.name) == name and a.name == name for a in stmt.names)
        ):
            return _defined_in(name, stmt.module) if (stmt.module or "").startswith("frugalm") else None
    return module if _find(tree, name) is not None else None


def _find(tree: ast.Module | None, name: str):
    for stmt in tree.body if tree else ():
        if isinstance(stmt, ast.ClassDef) and stmt.name == name:
            return stmt
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
            return stmt
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
            return stmt
    return None
