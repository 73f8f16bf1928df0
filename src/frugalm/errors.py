"""User-facing errors, the did-you-mean helpers and the one formatter for a list of problems.

The CLI prints a FrugalmError as one line and exits 2; anything else is a bug.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FrugalmError(Exception):
    """A mistake the user can fix: the message names the bad value, where it came from, and the fix."""


class ModelError(FrugalmError):
    """A model reference that cannot be loaded."""


class DataError(FrugalmError):
    """Evaluation or training text that cannot be used."""


class ConfigError(FrugalmError):
    """A bad option, workload, metric, profile or recipe."""


class TechniqueError(FrugalmError):
    """A technique's options do not fit the model (no layer matched, a width not divisible...)."""


class MeasurementError(FrugalmError):
    """A measurement that could not be completed (the child failed, timed out or was killed)."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """ "; did you mean 'X'?" when a close match exists, else ""."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def suggest(value: str, choices: Iterable[str]) -> str:
    """The did-you-mean hint, then the valid choices: append to "unknown X 'value'"."""
    choices = sorted(choices)
    return f"{did_you_mean(value, choices)} Valid choices: {', '.join(choices)}"


def problems_message(origin: str, problems: Iterable[str], closing: str = "Fix these options.") -> str:
    """The one-line message for a list of problems: "origin: a; b. Fix these options."

    Repeats are dropped (order kept) and line breaks flattened, so the CLI prints one line.
    `closing` ends the message ("" for none); no "." is added after a problem that ends a sentence.
    """
    text = "; ".join(dict.fromkeys(" ".join(p.splitlines()) for p in problems))
    if not closing:
        return f"{origin}: {text}"
    return f"{origin}: {text}{'' if text.endswith(('.', '?', '!')) else '.'} {closing}"
