"""Mixed precision under a budget in ms per decode step: predicted against measured.

    .venv/bin/python benchmarks/bench_mixed_latency.py [--threads 1]

On the built-in model (its widths take ATen's packed int8/int4 CPU kernels), RTN, calibration
from its held-out text after the evaluated part (16 x 256 tokens, 1,024 probe tokens). The float
model's decode step (one token from a 128-token cache, batch 1) is measured first; the stage's
own latency profile gives the cheapest allocation's predicted step. Budgets: the cheapest + 10%,
midway to the float step, and the float step. For each, printed: the allocation's formats, the
stage's predicted step, and the variant as loaded (packed kernels) measured in this process,
alternating with the float model (7 rounds, medians), with the paired ratio.

Run alone: it times speed, and 2 shared cores swing with any other load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from frugalm.assets import DEFAULT_EVAL_PATH
    from frugalm.errors import TechniqueError
    from frugalm.models import load_model, save_variant
    from frugalm.techniques._calibrate import sample_calibration
    from frugalm.techniques._layer_latency import step_ns
    from frugalm.techniques.base import Context
    from frugalm.techniques.quant_mixed import TECHNIQUE, MixedPrecisionConfig
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    torch.set_num_threads(args.threads)
    base = load_model(fast_kernels=False)
    docs = split_documents(read_text(DEFAULT_EVAL_PATH))
    evaluated = len(encode_documents(base.tokenizer, docs, 16384).docs)
    calibration = sample_calibration(base.tokenizer, docs[evaluated:], 16, 256, 0)
    float_ms = step_ns(base.model) / 1e6

    def run(budget):
        lm = load_model(fast_kernels=False)
        ctx = Context(calibration=calibration)
        model = TECHNIQUE.apply(lm.model, MixedPrecisionConfig(method="rtn", budget=budget, budget_unit="ms",
                                                               probe_tokens=1024), ctx)  # fmt: skip
        return model, lm.tokenizer, ctx.changes[-1]

    _, _, loose = run(1e6)  # no limit: its latency profile gives the cheapest allocation's predicted step
    profile = loose["latency_profile"]
    cheapest = (profile["outside_layers_ns"] + sum(min(d.values()) for d in profile["layer_ns"].values())) / 1e6
    print(f"built-in model, {args.threads} thread(s): float decode step {float_ms:.4f} ms (measured, median of 7 x 10); "
          f"cheapest allocation predicted {cheapest:.4f} ms")  # fmt: skip
    for budget in (cheapest * 1.25, (cheapest + float_ms) / 2, float_ms):
        try:
            model, tokenizer, change = run(budget)
        except TechniqueError as exc:  # each run profiles anew: on a noisy machine the cheapest step moves
            print(f"  budget {budget:.4f} ms: refused: {exc}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_variant(model, tokenizer, Path(tmp) / "v", {"changes": [change]})
            variant = load_model(folder).model  # packed kernels, as a user runs it
            pairs = [(step_ns(variant, rounds=1), step_ns(base.model, rounds=1)) for _ in range(7)]
        measured = statistics.median(v for v, _ in pairs) / 1e6
        ratio = statistics.median(f / v for v, f in pairs)
        print(f"  budget {budget:.4f} ms: {change['layers_per_format']}; predicted {change['budget_used']:.4f} ms, "
              f"measured {measured:.4f} ms ({'within' if measured <= budget else 'over'} budget); "
              f"float/variant step {ratio:.3f}x (median of 7 alternating pairs)")  # fmt: skip


if __name__ == "__main__":
    main()
