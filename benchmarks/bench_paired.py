"""Paired, interleaved speed ratios with confidence intervals, idle and under a competing load.

    .venv/bin/python benchmarks/bench_paired.py [--threads 1] [--budget 60] [--target 0.03]

On the random-weight SmolLM2-135M stand-in (real shapes; bench_foundation.py), in one process:
1. the float32 model against itself (two copies): the speedup's interval must contain 1.0;
2. int8 (RTN per-channel, w8a8-dynamic: fbgemm's kernel, loaded from its artifact as it runs)
   against float32, twice: the two intervals must overlap;
3. the float32 model against itself again with the call the previous version timed (8 decode
   steps per call instead of 1), for the half-width each call length reaches in the same budget.
Each comparison runs idle, then again while a competing process burns one core half the time
(10 ms on, 10 ms off; started and stopped here, bounded by the comparison's own duration); the
cores other processes used during each timing (/proc/stat) are printed beside it.

The timed call is the one `frugalm bench --reference` times (frugalm.measure.speedup.decode_call):
one greedy decode step at batch 1 from a 128-token prompt's KV cache, cropped back after each
call, so every call decodes position 128. Timing is frugalm.measure.paired with its defaults
(ABBA/BAAB blocks, samples of at least 50 ms, Student t on per-block log-ratios) but for the
budget: blocks are added until the 95% interval is within +-target or the budget runs out.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression_speed import build_variant  # noqa: E402
from bench_foundation import build_standin  # noqa: E402

from frugalm.measure.paired import PairedConfig, competition, machine_conditions, result_dict, time_paired  # noqa: E402

PROMPT = 128


def calls(model, steps: int = 1):
    """The product's one-step decode call (steps=1), or the former 8-step one: decode `steps` tokens, crop back."""
    import torch

    from frugalm.measure.speedup import decode_call

    ids = torch.randint(5, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    if steps == 1:
        run = decode_call(model, ids, None)
    else:
        with torch.no_grad():
            out = model(ids, use_cache=True)
        cache, first = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def run():
            nxt = first
            with torch.no_grad():
                for _ in range(steps):
                    nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            cache.crop(-steps)

    for _ in range(3):  # warm-up: allocator, kernels' packing
        run()
    return run


def _burn(stop_at: float) -> None:
    """Busy half of the time on one core until `stop_at` (monotonic): 10 ms on, 10 ms off."""
    while time.monotonic() < stop_at:
        t = time.monotonic() + 0.01
        while time.monotonic() < t:
            pass
        time.sleep(0.01)


def compare(label: str, a, b, config: PairedConfig, threads: int, loaded: bool) -> dict:
    burner = None
    if loaded:
        burner = multiprocessing.Process(target=_burn, args=(time.monotonic() + config.budget_s * 3 + 60,), daemon=True)
        burner.start()
    before = machine_conditions(threads)
    try:
        result = time_paired(a, b, config)
    finally:
        if burner is not None:
            burner.terminate()
            burner.join()
    after = machine_conditions(threads)
    others = competition(before, after).get("other_cores", float("nan"))
    print(f"{label:<40} {'loaded' if loaded else 'idle':<6} speedup {result.speedup:.3f} "
          f"[{result.ci_low:.3f}, {result.ci_high:.3f}] +-{100 * result.halfwidth:.1f}% "
          f"({result.n_blocks} blocks x 4 samples x {result.calls_per_sample} calls, stopped by {result.stopped_by}; "
          f"other processes {others:.2f} cores)", flush=True)  # fmt: skip
    return {"label": label, "loaded": loaded, "result": result_dict(result, config), "before": before, "after": after,
            "other_cores": others}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timing per comparison at most")
    parser.add_argument(
        "--target", type=float, default=0.03, help="relative half-width of the 95%% interval to stop at"
    )
    parser.add_argument("--out", default="paired.json")
    args = parser.parse_args()
    import torch

    from frugalm.models import load_model

    torch.set_num_threads(args.threads)
    base = build_standin()
    int8_folder, _ = build_variant(base, "int8")
    fp32_a, fp32_b = load_model(base).model, load_model(base).model
    int8 = load_model(int8_folder).model
    kernels = sorted({getattr(m, "kernel", None) for m in int8.modules()} - {None})
    print(f"int8 variant runs on: {kernels}; threads {args.threads}", flush=True)
    run = {"fp32": calls(fp32_a), "fp32 copy": calls(fp32_b), "int8": calls(int8)}
    eight = {"fp32": calls(fp32_a, 8), "fp32 copy": calls(fp32_b, 8)}
    config = replace(PairedConfig(), target_halfwidth=args.target, budget_s=args.budget)
    print(f"paired config: {config}", flush=True)
    rows = []
    for loaded in (False, True):
        rows.append(compare("float32 vs itself", run["fp32 copy"], run["fp32"], config, args.threads, loaded))
        for i in (1, 2):
            rows.append(compare(f"int8 (fbgemm) vs float32, run {i}", run["int8"], run["fp32"], config, args.threads, loaded))  # fmt: skip
        rows.append(compare("float32 vs itself, 8-step calls", eight["fp32 copy"], eight["fp32"], config, args.threads, loaded))  # fmt: skip
    Path(args.out).write_text(json.dumps({"threads": args.threads, "prompt": PROMPT, "config": str(config), "rows": rows}, indent=1))  # fmt: skip
    print(f"raw samples: {args.out}")


if __name__ == "__main__":
    main()
