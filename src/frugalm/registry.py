"""THE list of techniques: name -> "module:attribute", imported only when used.

Adding a technique is one module in `frugalm/techniques/` and one line here. Docs, CLI listings
and the contract-test matrix are generated from this dict.
"""

from __future__ import annotations

import importlib

from frugalm.errors import ConfigError, suggest
from frugalm.techniques.base import Technique

TECHNIQUES: dict[str, str] = {
}


def get_technique(name: str) -> Technique:
    if name not in TECHNIQUES:
        raise ConfigError(f"unknown technique '{name}'{suggest(name, TECHNIQUES)}")
    module, attr = TECHNIQUES[name].split(":")
    return getattr(importlib.import_module(module), attr)
