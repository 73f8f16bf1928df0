"""Benchmark of data-parallel training with measured gradient communication (2 processes, gloo, CPU).

    .venv/bin/python benchmarks/bench_ddp.py [--steps 6] [--layers N] [--json out.json]

Trains random-weight SmolLM2-135M stand-ins (the real shapes of ../shared/assets/configs/
smollm2-135m.json; --layers cuts the depth when memory or time forces it, and the output says
so) on TinyStories with the Llama-2 32k tokenizer from the assets, one torchrun launch of
frugalm.cli.ddp_train: the same seed and data for each gradient communication (none = fp32
allreduce, fp16 compression, PowerSGD rank 4 after 2 plain steps). Prints, per compression, the
bytes each process handed to all-reduce per step (counted inside torch's DDP comm hooks), the
reduction against the fp32 gradient bytes (4 x parameters), median step time, and the loss
curves of none and PowerSGD. With 2 processes a ring all-reduce moves about the payload itself
over each process's link (2 (W - 1) / W = 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from frugalm.cli.ddp_train import launch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--layers", type=int, help="cut the stand-in to this many layers (default: all 30)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", help="also write the raw result document here")
    args = parser.parse_args()

    cli = ["--model", str(ASSETS / "configs" / "smollm2-135m.json"), "--tokenizer", str(ASSETS / "tokenizers" / "llama2-32k"),
           "--data", str(ASSETS / "data" / "tinystories_valid_0000-0499.txt"), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", "1e-3", "--warmup-steps", "2",
           "--compression", "none,fp16,powersgd", "--powersgd-rank", "4", "--powersgd-start-step", "2", "--no-count-flops"]  # fmt: skip
    if args.layers:
        cli += ["--layers", str(args.layers)]
    doc = launch(cli, nproc=2, timeout_s=3600)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1))
    runs = {run["compression"]: run for run in doc["runs"]}
    base = runs["none"]
    print(
        f"model: {doc['model']}; {base['trainable_params']:,} trainable parameters; "
        f"{doc['world_size']} processes, {doc['backend']}, {doc['threads_per_process']} thread(s) each, torch {doc['torch']}"
    )
    print(
        f"batch {args.batch_size} x {args.seq_len} tokens per process per step, {args.steps} steps, "
        f"expected fp32 gradient bytes per step {base['expected_grad_bytes_per_step']:,}"
    )
    print(f"{'compression':12s} {'bytes/step (each step)':>60s}  {'vs fp32':>8s}  {'median step s':>13s}")
    for name, run in runs.items():
        per_step = ", ".join(f"{b / 1e6:.2f}" for b in run["bytes_per_step"])
        factor = run["reduction_compressed_steps_x"] if name == "powersgd" else run["reduction_x"]
        print(f"{name:12s} {per_step + ' MB':>60s}  {factor:7.1f}x  {statistics.median(run['step_time_s']):13.2f}")
    ps = runs["powersgd"]
    print(
        f"powersgd: compressed steps {ps['compressed_steps']} (earlier steps: plain fp32 allreduce); "
        f"{ps['reduction_compressed_steps_x']:.1f}x fewer bytes on compressed steps, {ps['reduction_x']:.2f}x over the whole run; "
        f"none total {base['total_bytes'] / base['expected_total_bytes']:.4f} x expected"
    )
    for name in ("none", "powersgd"):
        print(f"loss curve {name:9s}: " + " ".join(f"{x:.3f}" for x in runs[name]["loss_per_step"]))
    print(
        "step times s: " + "; ".join(f"{n} " + " ".join(f"{t:.2f}" for t in r["step_time_s"]) for n, r in runs.items())
    )


if __name__ == "__main__":
    main()
