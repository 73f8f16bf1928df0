"""Near-duplicate removal of training documents with MinHash LSH (Broder 1997; Leskovec et al.,
"Mining of Massive Datasets", ch. 3), as in the deduplication of Lee et al. 2022 (arXiv:2107.06499).

Each document becomes a set of shingles; two documents are near-duplicates when the Jaccard
similarity |A ∩ B| / |A ∪ B| of their shingle sets is at least `threshold`. MinHash signatures
(datasketch) estimate that similarity from `num_perm` hash minima, and an LSH index over bands of
the signature finds candidate pairs without comparing every pair.

Shingles (the sets compared):
- `word`: every run of `ngram` consecutive whitespace-separated words (after lowercasing, when
  `lowercase`), so one edited word changes at most `ngram` shingles. A document with fewer than
  `ngram` words is one shingle of all its words.
- `char`: every run of `ngram` consecutive characters, whitespace collapsed to single spaces.

Documents are processed in order and the first of a group of near-duplicates is kept. The LSH
bands are chosen so that a pair exactly at the threshold becomes a candidate with probability
>= 0.99 (more candidates, each then checked): document i is removed when its Jaccard with some
already kept candidate is at least `threshold`, and the report names that kept document with the
MinHash estimate and, with `verify="exact"`, the exact Jaccard. `verify="exact"` (the default)
decides on the exact Jaccard of the hashed shingle sets, which it keeps for the kept documents
(about 4 bytes per word of text); `verify="minhash"` keeps only the signatures and decides on
the estimate, whose standard error is sqrt(J (1 - J) / num_perm) (0.035 at J = 0.8 with 128
permutations), so pairs within a few hundredths of the threshold then go either way.

It does not find duplicated spans inside otherwise different documents (that needs suffix
arrays), and the shingle hashes are 32-bit, so sets of more than ~10^5 distinct shingles start
to collide. It helps when a corpus holds copies of the same text (scraped mirrors, templates):
removing them saves training compute and reduces memorisation.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from datasketch import MinHash, MinHashLSH

from frugalm.errors import ConfigError, DataError, problems_message, suggest
from frugalm.text.files import DOC_SEPARATOR, split_documents

SHINGLES = ("word", "char")
VERIFY = ("exact", "minhash")
CANDIDATE_PROB = 0.99
"""Probability that a pair exactly at the threshold shares an LSH band (so is checked at all)."""
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant of the polynomial shingle hash


@dataclass(frozen=True, kw_only=True)
class DedupConfig:
    threshold: float = 0.8
    """Jaccard similarity of shingle sets at or above which a document is a near-duplicate, in (0, 1]."""
    num_perm: int = 128
    """MinHash permutations: more gives a sharper estimate and a slower run."""
    shingle: str = "word"
    """'word' (runs of words) or 'char' (runs of characters); see the module docstring."""
    ngram: int = 5
    """Words or characters per shingle."""
    lowercase: bool = True
    """Compare documents case-insensitively."""
    seed: int = 1
    """Seeds the MinHash permutations (datasketch's RandomState), in [0, 2**32)."""
    verify: str = "exact"
    """How a candidate pair is decided: 'exact' Jaccard of the hashed shingle sets, or the 'minhash' estimate."""

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.threshold <= 1:
            out.append(f"threshold={self.threshold!r} must be in (0, 1]")
        if not 2 <= self.num_perm <= 8192:
            out.append(f"num_perm={self.num_perm!r} must be in [2, 8192] (128 is typical)")
        if self.shingle not in SHINGLES:
            out.append(f"unknown shingle '{self.shingle}'{suggest(self.shingle, SHINGLES)}")
        if self.ngram < 1:
            out.append(f"ngram={self.ngram!r} must be >= 1")
        if self.verify not in VERIFY:
            out.append(f"unknown verify '{self.verify}'{suggest(self.verify, VERIFY)}")
        if not 0 <= self.seed < 2**32:
            out.append(f"seed={self.seed!r} must be in [0, 2**32)")
        return out


@dataclass(frozen=True)
class Duplicate:
    index: int
    """Position of the removed document in the input."""
    duplicate_of: int
    """Position of the kept document it near-duplicates."""
    jaccard_est: float
    """MinHash estimate of the Jaccard similarity of the two shingle sets."""
    jaccard: float | None
    """Exact Jaccard of the two hashed shingle sets (verify='exact'), else None."""


@dataclass(frozen=True)
class DedupResult:
    kept: list[str]
    kept_indices: list[int]
    removed: list[Duplicate]
    config: DedupConfig
    bytes_in: int
    """UTF-8 bytes of all input documents."""
    bytes_kept: int
    wall_s: float
    lsh_bands: tuple[int, int] = field(default=(0, 0))
    """(bands, rows per band) of the LSH index (see lsh_bands())."""

    def to_dict(self) -> dict:
        """The report, without the kept texts: counts, bytes, and every removal with its match."""
        return {
            "config": asdict(self.config),
            "docs_in": len(self.kept) + len(self.removed),
            "docs_kept": len(self.kept),
            "docs_removed": len(self.removed),
            "bytes_in": self.bytes_in,
            "bytes_kept": self.bytes_kept,
            "wall_s": self.wall_s,
            "lsh_bands": list(self.lsh_bands),
            "removed": [asdict(d) for d in self.removed],
        }


def check_config(config: DedupConfig) -> None:
    if problems := config.problems():
        raise ConfigError(problems_message("DedupConfig", problems))


def _identity(value: int) -> int:
    """The shingles are hashed already (uint32); datasketch mixes them before permuting."""
    return value


class _ShingleHasher:
    """Turns a document into its set of 32-bit shingle hashes, stable across processes and runs."""

    def __init__(self, config: DedupConfig):
        self.config = config
        self.word_hash: dict[str, int] = {}  # word -> 64-bit hash, computed once per distinct word

    def _word_hashes(self, words: list[str]) -> np.ndarray:
        cache = self.word_hash
        for word in set(words).difference(cache):
            cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return np.array(list(map(cache.__getitem__, words)), dtype=np.uint64)  # (n_words,)

    def __call__(self, doc: str) -> np.ndarray:
        text = doc.lower() if self.config.lowercase else doc
        if self.config.shingle == "word":
            tokens = self._word_hashes(text.split())
        else:
            text = " ".join(text.split())
            # code point + 1 so that a NUL still changes the hash; (n_chars,)
            tokens = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64) + np.uint64(1)
        n = min(self.config.ngram, max(len(tokens), 1))
        windows = max(len(tokens) - n + 1, 1)
        h = np.zeros(windows, dtype=np.uint64)
        with np.errstate(over="ignore"):  # polynomial hash mod 2**64: wrap-around is intended
            for j in range(min(n, len(tokens))):
                h = h * _MULT + tokens[j : j + windows]
            folded = (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)
        return np.unique(folded.astype(np.uint32))  # (n_shingles,)


def shingle_hashes(doc: str, config: DedupConfig = DedupConfig()) -> np.ndarray:
    """The document's set of shingles as sorted unique 32-bit hashes (what the MinHash sees)."""
    check_config(config)
    return _ShingleHasher(config)(doc)


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands b, rows r): the most rows per band (fewest chance candidates) such that a pair of
    Jaccard `threshold` shares at least one band with probability 1 - (1 - t^r)^b >= CANDIDATE_PROB."""
    for rows in range(num_perm, 0, -1):
        b = num_perm // rows
        if 1 - (1 - threshold**rows) ** b >= CANDIDATE_PROB:
            return b, rows
    return num_perm, 1


def _decisive(match: tuple[int, float, float | None]) -> float:
    """The figure a decision uses: the exact Jaccard when computed, else the MinHash estimate."""
    return match[2] if match[2] is not None else match[1]


def _best_match(candidates, signature, hashes, signatures, shingles, config):
    """(kept index, MinHash estimate, exact Jaccard or None) of the most similar candidate, or None."""
    best = None
    for j in sorted(candidates):
        estimate = float(np.mean(signatures[j] == signature))
        exact = None
        if config.verify == "exact":
            inter = len(np.intersect1d(hashes, shingles[j], assume_unique=True))
            exact = inter / (len(hashes) + len(shingles[j]) - inter)
        if best is None or _decisive((j, estimate, exact)) > _decisive(best):
            best = (j, estimate, exact)
    return best


def minhash_dedup(docs: Sequence[str], config: DedupConfig = DedupConfig()) -> DedupResult:
    """Remove near-duplicate documents, keeping the first of each group; report every removal."""

    check_config(config)
    if isinstance(docs, (str, bytes)) or not all(isinstance(d, str) for d in docs):
        raise DataError(
            "minhash_dedup: pass a list of document strings (split a text with dedup_text or frugalm.text.files.split_documents)"
        )
    if len(docs) == 0:
        raise DataError("minhash_dedup: no documents to deduplicate; pass at least one document")
    start = time.perf_counter()
    hasher = _ShingleHasher(config)
    bands = lsh_bands(config.threshold, config.num_perm)
    lsh = MinHashLSH(num_perm=config.num_perm, params=bands)
    template = MinHash(num_perm=config.num_perm, seed=config.seed, hashfunc=_identity)
    signatures: dict[int, np.ndarray] = {}  # kept index -> (num_perm,) hash minima
    shingles: dict[int, np.ndarray] = {}  # kept index -> sorted unique shingle hashes (verify='exact')
    kept_indices: list[int] = []
    removed: list[Duplicate] = []
    for i, doc in enumerate(docs):
        hashes = hasher(doc)
        mh = template.copy()
        mh.update_batch(hashes.tolist())
        match = _best_match(lsh.query(mh), mh.hashvalues, hashes, signatures, shingles, config)
        if match is not None and _decisive(match) >= config.threshold:
            removed.append(Duplicate(i, *match))
            continue
        lsh.insert(i, mh, check_duplication=False)
        signatures[i] = mh.hashvalues
        if config.verify == "exact":
            shingles[i] = hashes
        kept_indices.append(i)
    kept = [docs[i] for i in kept_indices]
    return DedupResult(
        kept=kept,
        kept_indices=kept_indices,
        removed=removed,
        config=config,
        bytes_in=sum(len(d.encode()) for d in docs),
        bytes_kept=sum(len(d.encode()) for d in kept),
        wall_s=time.perf_counter() - start,
        lsh_bands=bands,
    )


def dedup_text(text: str, config: DedupConfig = DedupConfig()) -> tuple[str, DedupResult]:
    """Deduplicate a training text whose documents are separated by DOC_SEPARATOR lines.

    Returns the text of the kept documents, joined by separator lines, and the report.
    """
    docs = split_documents(text)
    if not docs:
        raise DataError("dedup_text: the text holds no documents (it is empty or only separators); pass training text")
    result = minhash_dedup(docs, config)
    return f"\n{DOC_SEPARATOR}\n".join(result.kept) + "\n", result
