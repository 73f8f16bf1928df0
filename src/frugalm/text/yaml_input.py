"""YAML from users, read safely: `yaml.safe_load` plus a bound on what aliases expand to.

safe_load builds no objects but plain data, yet a 180-byte file of nested aliases
(`a: &a [x, x]`, `b: &b [*a, *a]`, ...) stands for a structure that grows 10x per level:
harmless while shared in memory, ruinous once printed in an error message, dumped to JSON or
deep-copied. So the composed node graph is measured with aliases expanded (in linear time, by
memoising shared nodes) before anything is built from it.
"""

from __future__ import annotations

import reprlib
from pathlib import Path

import yaml

from frugalm.errors import ConfigError

MAX_VALUES = 100_000
"""The most scalar and collection values a user's YAML may expand to (a recipe has a few dozen)."""

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 6
_short.maxlevel = 3


def short(value) -> str:
    """`repr(value)` cut to a readable length: what error messages echo of a user's value."""
    return _short.repr(value)


def read_yaml_file(path, what: str, fix: str, origin: str | None = None):
    """Read and parse a user's YAML file; one-line ConfigError naming `what` and the `fix` when it cannot be read."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{what} cannot be read ({reason}); {fix}") from None
    return load_yaml(text, origin or what)


def load_yaml(text: str, origin: str):
    """Parse `text` as YAML (safe types only); ConfigError naming `origin` for bad syntax or alias bombs."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_VALUES:
            raise ConfigError(
                f"{origin}: its YAML aliases expand to more than {MAX_VALUES:,} values; write the values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{origin}: not valid YAML{at} ({short(getattr(exc, 'problem', None) or str(exc))}); fix the syntax"
        ) from None
    except RecursionError:
        raise ConfigError(f"{origin}: YAML nested too deeply; flatten it") from None
    finally:
        loader.dispose()


def _expanded_size(node, memo: dict[int, int], open_: set[int]) -> int:
    """Number of values `node` stands for once every alias is expanded (capped past MAX_VALUES)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_:
        raise ConfigError("YAML alias refers to a value that contains it (a recursive structure); write the values out")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, memo, open_)
        if size > MAX_VALUES:
            break
    open_.discard(key)
    memo[key] = size
    return size
