"""Benchmark of `frugalm bench` itself, on a real small model and a real-size stand-in.

    .venv/bin/python benchmarks/bench_foundation.py [--repetitions N] [--skip-standin]

1. stories260K (real, pretrained) on TinyStories: perplexity under the reference protocol of
   ../shared/assets/README.md (non-overlapping 512-token windows, first 65,536 tokens) beside
   the reference figure, then the full default scorecard, with its wall time.
2. A random-weight SmolLM2-135M stand-in (the real shapes from ../shared/assets/configs/, with
   the Llama-2 32k tokenizer from the assets; quality figures of random weights mean nothing):
   the full scorecard and its wall time (target: under 5 minutes on 2 CPU cores).
3. This machine's memory read bandwidth (torch sum over a 1 GiB tensor, repeated), and the
   decode throughput at batch 1 against the bandwidth limit: weights bytes read per token /
   bandwidth is the fastest a memory-bound decode step can be.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"
TINYSTORIES = ASSETS / "data" / "tinystories_valid_0000-0499.txt"
REFERENCE_PPL = 3.682  # ../shared/assets/README.md, "Measured perplexity"
STANDIN = ROOT / ".cache" / "standins" / "smollm2-135m"


def frugalm(*args: str) -> tuple[dict, float]:
    """Run `frugalm bench ... --json` as a user would; return the document and the wall time."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "frugalm", "bench", *args, "--json", "--quiet"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout), time.perf_counter() - t0


def figure(doc: dict, metric: str, workload: str | None = None) -> dict:
    return next(m for m in doc["metrics"] if m["metric"] == metric and m["workload"] == workload)


def print_scorecard(doc: dict) -> None:
    from frugalm.measure.metrics import Measurement
    from frugalm.report.scorecard import format_scorecard
    from frugalm.store import Run

    run = Run(
        id=doc["run_id"],
        model_ref=doc["model"],
        benchmark_version=doc["benchmark_version"],
        config=doc["config"],
        environment=doc["environment"],
        wall_s=doc["wall_s"],
    )
    ms = [
        Measurement(m["metric"], m["value"], m["unit"], m["method"], m["workload"], m["n"], m["spread"], m["protocol"])
        for m in doc["metrics"]
    ]
    print(format_scorecard(run, ms))


def build_standin() -> Path:
    """Random-weight SmolLM2-135M (seed 0), saved once as safetensors with a real tokenizer."""
    if (STANDIN / "model.safetensors").exists():
        return STANDIN
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((ASSETS / "configs" / "smollm2-135m.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "llama2-32k")
    cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = STANDIN.with_name(STANDIN.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(STANDIN)
    return STANDIN


def read_bandwidth_gbs(gib: float = 1.0, reps: int = 7) -> tuple[float, float]:
    """Median and spread of read bandwidth (GB/s) of torch.sum over a float32 tensor of `gib` GiB."""
    import torch

    x = torch.ones(int(gib * 2**30 / 4))
    x.sum()  # warm-up: page in
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), statistics.stdev(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", default="5")
    parser.add_argument("--skip-standin", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("FRUGALM_STORE", str(ROOT / ".cache" / "bench-foundation.db"))
    data = ["--data", str(TINYSTORIES)]

    ref, wall = frugalm(str(STORIES), *data, "--stride", "512", "--metric", "ppl_tok")
    ppl = figure(ref, "ppl_tok")["value"]
    print(
        f"stories260K perplexity, reference protocol (window 512, stride 512, first 65,536 tokens): {ppl:.4f} "
        f"vs {REFERENCE_PPL} in the assets README ({100 * (ppl / REFERENCE_PPL - 1):+.2f}%), {wall:.1f} s"
    )

    doc, wall = frugalm(str(STORIES), *data, "--repetitions", args.repetitions)
    print(
        f"\n=== stories260K, default protocol (window 512, stride 256): ppl_tok {figure(doc, 'ppl_tok')['value']:.4f}; `frugalm bench` wall time {wall:.1f} s"
    )
    print_scorecard(doc)
    if args.skip_standin:
        return

    t0 = time.perf_counter()
    folder = build_standin()
    print(f"\n(stand-in ready in {time.perf_counter() - t0:.1f} s: {folder})")
    doc, wall = frugalm(str(folder), *data, "--eval-tokens", "4096", "--repetitions", args.repetitions)
    print(
        f"\n=== SmolLM2-135M random-weight stand-in: `frugalm bench` wall time {wall:.1f} s (target < 300 s); quality figures of random weights are meaningless"
    )
    print_scorecard(doc)

    bw, bw_sd = read_bandwidth_gbs()
    weights = figure(doc, "weights_mib")["value"] * 2**20
    limit = bw * 1e9 / weights
    decode = figure(doc, "decode_tok_s", "chat")
    print(f"\nmemory read bandwidth (torch.sum over 1 GiB float32, median of 7): {bw:.2f} ± {bw_sd:.2f} GB/s")
    print(
        f"bandwidth limit for batch-1 decode: {bw:.2f} GB/s / {weights / 1e6:.1f} MB of weights per token = {limit:.2f} tok/s"
    )
    print(
        f"measured batch-1 decode (workload chat): {decode['value']:.2f} ± {decode['spread']:.2f} tok/s (n={decode['n']}) "
        f"= {decode['value'] / limit:.2f} of the bandwidth limit"
    )


if __name__ == "__main__":
    main()
