"""Measuring a deduplication: a generated corpus with planted near-duplicates, and exact ground truth.

The corpus is families of documents. Each family has one original of random words (from a
seeded vocabulary of random letter strings) and, for some families, light copies (a few word
edits: the Jaccard of word shingles with the original stays high, typically 0.85-0.98) and heavy
copies (many edits: typically 0.3-0.7, near but not duplicates, to test precision). Originals of
different families share no shingle in practice (independent random words), which
`cross_family_max_jaccard` checks on a sample. The documents are shuffled.

Ground truth applies the same rule as `frugalm.text.dedup.minhash_dedup`, exactly: in order, a
document is a duplicate when the exact Jaccard of its word n-gram set (Python sets of word
tuples, independent of the hashing in frugalm.text.dedup) with some earlier kept document is at
least the threshold. Only pairs inside a family are compared (all pairs when the corpus is
small enough), since pairs across families have Jaccard ~0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from frugalm.text.dedup import DedupResult


@dataclass(frozen=True)
class PlantedCorpus:
    docs: list[str]
    family: list[int]
    """family[i]: the family (original and its copies) document i belongs to."""


def _edit(words: list[str], n_edits: int, vocab: list[str], rng: random.Random) -> list[str]:
    """Apply n_edits random word substitutions, insertions and deletions."""
    out = list(words)
    for _ in range(n_edits):
        op, pos = rng.choice(("substitute", "insert", "delete")), rng.randrange(len(out))
        if op == "substitute":
            out[pos] = rng.choice(vocab)
        elif op == "insert":
            out.insert(pos, rng.choice(vocab))
        elif len(out) > 1:
            del out[pos]
    return out


def planted_corpus(
    n_families: int,
    seed: int = 0,
    *,
    words: tuple[int, int] = (150, 400),
    dup_fraction: float = 0.3,
    vocab_size: int = 20_000,
) -> PlantedCorpus:
    """`n_families` originals of `words` (min, max) random words; a `dup_fraction` of them get 1-3
    light copies (1 edit per 60 words, at least 1) and a heavy copy (1 edit per 8-15 words)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(vocab_size)]
    docs: list[tuple[int, str]] = []
    for fam in range(n_families):
        original = rng.choices(vocab, k=rng.randint(*words))
        docs.append((fam, " ".join(original)))
        if rng.random() < dup_fraction:
            for _ in range(rng.randint(1, 3)):
                light = rng.randint(1, max(1, len(original) // 60))
                docs.append((fam, " ".join(_edit(original, light, vocab, rng))))
            heavy = len(original) // rng.randint(8, 15)
            docs.append((fam, " ".join(_edit(original, heavy, vocab, rng))))
    rng.shuffle(docs)
    return PlantedCorpus(docs=[d for _, d in docs], family=[f for f, _ in docs])


def word_shingles(doc: str, ngram: int) -> set[tuple[str, ...]]:
    """The set of runs of `ngram` lowercased words (the whole document when shorter)."""
    words = doc.lower().split()
    n = min(ngram, max(len(words), 1))
    return {tuple(words[i : i + n]) for i in range(max(len(words) - n + 1, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def true_duplicates(corpus: PlantedCorpus, threshold: float, ngram: int, all_pairs: bool = False) -> set[int]:
    """Indices an exact greedy keep-first deduplication removes (see the module docstring)."""
    sets = [word_shingles(d, ngram) for d in corpus.docs]
    kept_by_family: dict[int, list[int]] = {}
    kept_all: list[int] = []
    removed = set()
    for i, fam in enumerate(corpus.family):
        pool = kept_all if all_pairs else kept_by_family.get(fam, [])
        if any(jaccard(sets[i], sets[j]) >= threshold for j in pool):
            removed.add(i)
        else:
            kept_by_family.setdefault(fam, []).append(i)
            kept_all.append(i)
    return removed


def cross_family_max_jaccard(corpus: PlantedCorpus, ngram: int, pairs: int = 2000, seed: int = 0) -> float:
    """Largest exact Jaccard over `pairs` random pairs of documents from different families."""
    rng = random.Random(seed)
    n, best = len(corpus.docs), 0.0
    for _ in range(pairs):
        i, j = rng.randrange(n), rng.randrange(n)
        if corpus.family[i] != corpus.family[j]:
            best = max(best, jaccard(word_shingles(corpus.docs[i], ngram), word_shingles(corpus.docs[j], ngram)))
    return best


def precision_recall(result: DedupResult, truth: set[int]) -> tuple[float, float]:
    """Precision and recall of the removed documents against the true duplicates (1.0 when empty)."""
    predicted = {d.index for d in result.removed}
    hits = len(predicted & truth)
    return (hits / len(predicted) if predicted else 1.0, hits / len(truth) if truth else 1.0)
