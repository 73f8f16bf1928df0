"""Data-parallel training with counted gradient communication: the entry point torchrun starts.

    torchrun --nproc-per-node 2 -m frugalm.cli.ddp_train --model tiny --steps 10 \\
        --compression none,fp16,powersgd --out ddp.json [--store frugalm.db]

Each process runs frugalm.training.ddp_train.run; rank 0 writes the JSON document atomically and,
with --store, one stored run per compression. `launch()` runs it under torchrun from Python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from frugalm.atomic import write_text_atomic
from frugalm.errors import FrugalmError
from frugalm.training.ddp_train import run, store_runs
from frugalm.training.distributed import COMPRESSIONS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc-per-node N -m frugalm.cli.ddp_train", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--model", default="tiny", help="'tiny', a config .json (random weights) or a model folder / reference"
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else UTF-8 bytes)")
    p.add_argument("--layers", type=int, help="cut a config's depth to this many layers")
    p.add_argument("--data", help="training text (default: frugalm's built-in evaluation text)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="windows per process per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compression", default="none", help=f"comma-separated list, one run each: {', '.join(COMPRESSIONS)}"
    )
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--powersgd-start-step", type=int, default=2)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--no-count-flops", action="store_true", help="skip counting one step's FLOPs before training")
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0, atomically)")
    p.add_argument(
        "--store", help="also store each run, with its communicated bytes and loss curve, in this frugalm results store"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        doc = run(args)
    except FrugalmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        write_text_atomic(args.out, json.dumps(doc, indent=1))
        if args.store:
            store_runs(doc, args.store)
    return 0


def launch(args: list[str], nproc: int = 2, timeout_s: float = 600) -> dict:
    """Run this entry point under torchrun with `args` (no --out) and return rank 0's JSON document."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "frugalm.cli.ddp_train", *args, "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            tail = errors[0] if errors else " | ".join(proc.stderr.strip().splitlines()[-5:])
            raise FrugalmError(f"data-parallel run failed (exit {proc.returncode}): {tail}")
        return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
