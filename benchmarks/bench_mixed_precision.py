"""Per-layer mixed precision (mixed_precision_quant) against uniform int4 GPTQ and random allocations.

    .venv/bin/python benchmarks/bench_mixed_precision.py [--budget 5.0] [--random 5]

On the real stories260K: calibration is 128 windows of 512 tokens drawn (seed 0) from the
TinyStories documents after the evaluated ones (bench_compression.py's protocol); the quality
figure is the mean next-token KL divergence from the float model (and perplexity) over the first
16,384 evaluated tokens in non-overlapping 512-token windows. Variants, all GPTQ (mse observer,
act order), symmetric, over the technique's default formats (int4/int8, per channel or groups
of 32 where 32 divides the layer's inputs):
- uniform int4 per channel, uniform int4 in groups of 32 where they fit, uniform int8;
- mixed_precision_quant at `--budget` average stored bits per weight (codes, scales, zero points);
- `--random` allocations at the same budget: layers in a seeded random order, each given a
  random costlier format that still fits, quantized the same way.
Then a MiB budget (the narrowest allocation's stored weights + 10%) and how close it comes.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import STORIES, TINYSTORIES  # noqa: E402

WINDOW = 512


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=5.0)
    parser.add_argument("--random", type=int, default=5)
    parser.add_argument("--samples", type=int, default=128)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from frugalm.measure.memory import weights_bytes
    from frugalm.models import load_model
    from frugalm.runtime.modules import weight_out_in
    from frugalm.techniques._calibrate import sample_calibration
    from frugalm.techniques.base import Context, select_linears
    from frugalm.techniques.quant_mixed import TECHNIQUE, MixedPrecisionConfig, format_name, quantize_as, stored_bits
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    torch.set_num_threads(2)
    base = load_model(STORIES, fast_kernels=False)
    docs = split_documents(read_text(TINYSTORIES))
    encoded = encode_documents(base.tokenizer, docs, 16384)
    evaluated = len(encoded.docs)
    calibration = sample_calibration(base.tokenizer, docs[evaluated:], args.samples, WINDOW, 0)
    ids = torch.as_tensor(encoded.ids[: len(encoded.ids) // WINDOW * WINDOW]).view(-1, WINDOW)

    @torch.no_grad()
    def log_probs(model):
        return torch.cat([F.log_softmax(model(ids[i : i + 8]).logits.float(), -1) for i in range(0, len(ids), 8)])

    reference = log_probs(base.model)

    def quality(model) -> tuple[float, float]:
        logp = log_probs(model)
        kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
        nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
        return kl, math.exp(nll)

    def fresh():
        return load_model(STORIES, fast_kernels=False).model

    def quantize(model, allocation) -> None:
        quantize_as(model, allocation, MixedPrecisionConfig(), Context(calibration=calibration))

    config = MixedPrecisionConfig(budget=args.budget)
    layers = [(n, weight_out_in(m).shape) for n, m in select_linears(base.model, config.targets)]
    weights = sum(o * i for _, (o, i) in layers)
    cost = {n: {f: stored_bits(o, i, *f) for f in config.formats(i)} for n, (o, i) in layers}

    def avg_bits(allocation) -> float:
        return sum(cost[n][f] for n, f in allocation.items()) / weights

    print(f"stories260K: {len(layers)} linear layers, {weights} weights; evaluation {ids.numel()} tokens; "
          f"calibration {tuple(calibration.shape)}; formats {sorted({format_name(f) for c in cost.values() for f in c})}")  # fmt: skip
    uniform = {
        "uniform int4 GPTQ per channel": {n: (4, -1) for n in cost},
        "uniform int4 GPTQ g32 (per channel where 32 does not divide)": {n: (4, 32) if (4, 32) in c else (4, -1) for n, c in cost.items()},
        "uniform int8 GPTQ per channel": {n: (8, -1) for n in cost},
    }  # fmt: skip
    kls = {}
    for label, allocation in uniform.items():
        model = fresh()
        quantize(model, allocation)
        kls[label], ppl = quality(model)
        print(f"{label:<62} {avg_bits(allocation):.3f} bits  KL {kls[label]:.5f}  ppl {ppl:.4f}", flush=True)

    model = fresh()
    ctx = Context(calibration=calibration)
    TECHNIQUE.apply(model, config, ctx)
    change = ctx.changes[-1]
    kl, ppl = quality(model)
    print(f"{'mixed_precision_quant':<62} {change['average_bits']:.3f} bits  KL {kl:.5f}  ppl {ppl:.4f}\n"
          f"    {change['layers_per_format']}; sensitivity pass {change['sensitivity_s']:.1f} s (measured); predicted KL "
          f"{change['predicted_kl_nats']:.5f}")  # fmt: skip
    for label, value in kls.items():
        print(f"    KL / {label}: {kl / value:.3f}")

    budget_bits = args.budget * weights
    random_kls = []
    for seed in range(args.random):
        rng = random.Random(seed)
        allocation = {n: min(c, key=c.get) for n, c in cost.items()}
        spent = sum(cost[n][f] for n, f in allocation.items())
        order = list(cost)
        rng.shuffle(order)
        for n in order:  # a random costlier format for each layer in turn, while it fits
            options = [
                f
                for f in cost[n]
                if cost[n][f] > cost[n][allocation[n]] and spent - cost[n][allocation[n]] + cost[n][f] <= budget_bits
            ]
            if options:
                f = rng.choice(options)
                spent += cost[n][f] - cost[n][allocation[n]]
                allocation[n] = f
        model = fresh()
        quantize(model, allocation)
        r_kl, r_ppl = quality(model)
        random_kls.append(r_kl)
        print(f"{'random allocation, seed ' + str(seed):<62} {avg_bits(allocation):.3f} bits  KL {r_kl:.5f}  ppl {r_ppl:.4f}", flush=True)  # fmt: skip
    if random_kls:
        mean = sum(random_kls) / len(random_kls)
        print(f"mixed / mean of {len(random_kls)} random allocations: {kl / mean:.3f} (mean random KL {mean:.5f})")

    int4 = weights_bytes(base.model) * 8 - weights * 32 + sum(min(c.values()) for c in cost.values())
    mib = int4 * 1.10 / 8 / 2**20
    model = fresh()
    ctx = Context(calibration=calibration)
    TECHNIQUE.apply(model, MixedPrecisionConfig(budget=mib, budget_unit="mib"), ctx)
    got = weights_bytes(model) / 2**20
    largest = max(max(c.values()) - min(c.values()) for c in cost.values()) / 8 / 2**20
    print(f"MiB budget {mib:.5f} (the narrowest allocation + 10%): stored weights {got:.5f} MiB (counted), "
          f"{mib - got:.5f} MiB under; the largest single layer step is {largest:.5f} MiB; KL {quality(model)[0]:.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
