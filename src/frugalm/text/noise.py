"""Seeded character noise for the robustness figure: the same edits for every variant."""

from __future__ import annotations

import random
import string

NOISE_OPS = ("substitute", "delete", "insert", "swap")


def add_char_noise(text: str, rate: float, seed: int) -> str:
    """Perturb each non-space character with probability `rate` by one seeded edit.

    The edit is drawn uniformly from NOISE_OPS; inserted and substituted characters are ASCII
    letters, so insertions and deletions balance and the text keeps about its length.
    """
    rng = random.Random(seed)
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        c = chars[i]
        if c.isspace() or rng.random() >= rate:
            out.append(c)
        else:
            op = rng.choice(NOISE_OPS)
            if op == "substitute":
                out.append(rng.choice(string.ascii_letters))
            elif op == "insert":
                out += [c, rng.choice(string.ascii_letters)]
            elif op == "swap" and i + 1 < len(chars):
                out += [chars[i + 1], c]
                i += 1
            elif op == "swap":
                out.append(c)
            # delete: append nothing
        i += 1
    return "".join(out)
