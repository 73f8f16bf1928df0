"""Benchmark of MinHash near-duplicate removal (frugalm.text.dedup): recall, precision, throughput.

    .venv/bin/python benchmarks/bench_dedup.py [--mb 30] [--threshold 0.8] [--num-perm 128]

Generates a corpus of about `--mb` MB with planted near-duplicates (tests/dedup_ground_truth.py: random
word documents, light copies with a few word edits, heavy copies as near misses), computes the
exact ground truth (Jaccard of word 5-gram sets, within families; a random sample of pairs across
families checks that those are ~0), then runs the deduplication with each verification mode and
prints recall, precision, documents removed and throughput (input MB per second of wall time,
one process, this machine).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "tests")
)  # the planted corpus and its exact ground truth are test code
from dedup_ground_truth import (  # noqa: E402
    cross_family_max_jaccard,
    planted_corpus,
    precision_recall,
    true_duplicates,
)
from frugalm.text.dedup import DedupConfig, minhash_dedup

BYTES_PER_FAMILY = 3_300  # measured mean of planted_corpus's defaults (originals + copies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30.0, help="approximate corpus size in MB")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    corpus = planted_corpus(int(args.mb * 1e6 / BYTES_PER_FAMILY), seed=args.seed)
    size_mb = sum(len(d.encode()) for d in corpus.docs) / 1e6
    truth = true_duplicates(corpus, args.threshold, ngram=5)
    cross = cross_family_max_jaccard(corpus, ngram=5)
    print(
        f"corpus: {len(corpus.docs):,} documents, {size_mb:.1f} MB, {len(truth):,} true near-duplicates "
        f"(Jaccard >= {args.threshold} on word 5-grams; max cross-family Jaccard in 2,000 sampled pairs {cross:.3f}); "
        f"generated and ground truth in {time.perf_counter() - t0:.0f} s"
    )
    print(f"machine: {platform.processor() or platform.machine()}, one process")
    for verify in ("exact", "minhash"):
        config = DedupConfig(threshold=args.threshold, num_perm=args.num_perm, ngram=5, verify=verify)
        result = minhash_dedup(corpus.docs, config)
        precision, recall = precision_recall(result, truth)
        print(
            f"verify={verify:7s} num_perm={args.num_perm} bands={result.lsh_bands}: recall {recall:.4f}  "
            f"precision {precision:.4f}  removed {len(result.removed):,}  "
            f"wall {result.wall_s:.1f} s  throughput {size_mb / result.wall_s:.2f} MB/s"
        )


if __name__ == "__main__":
    main()
