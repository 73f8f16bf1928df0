"""Offloading the SmolLM2-135M stand-in to disk: memory, outputs and decode speed, warm and cold.

    .venv/bin/python benchmarks/bench_offload.py [--frac 0.4] [--repetitions 3]

The random-weight stand-in (bench_foundation.build_standin, float32) is saved once as an
`offload` variant keeping `--frac` of its weights' bytes in memory; both it and the in-memory
model are measured by `frugalm bench` (each in its own measuring child, `chat` workload: 128-token
prompt, 64 new tokens, batch 1; 2,048 evaluation tokens of the built-in text). Printed:

- weights in memory (counted) and peak RSS over the child's baseline during the workload
  (measured, HWM reset before it), each over the model's full weights;
- outputs: KL and top-1 agreement of the offloaded variant against the in-memory model over the
  evaluated positions (its reference), 0 and 1 when identical;
- bytes read from the weight files per decode step (counted at accelerate's loader);
- decode: warm (page cache holds the file) tpot and tok/s, cold tpot (file evicted with
  posix_fadvise DONTNEED before each step), and the in-memory model's tpot.

Run alone: it times speed, and 2 shared cores swing with any other load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, build_standin, figure, frugalm  # noqa: E402


def build_variant(base: Path, frac: float) -> Path:
    from frugalm.models import load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context

    out = ROOT / ".cache" / "variants" / f"smollm2-135m-offload{round(100 * frac)}"
    if out.exists():
        return out
    lm = load_model(base, fast_kernels=False)
    ctx = Context()
    technique = get_technique("offload")
    model = technique.apply(lm.model, technique.config_cls(max_memory_frac=frac), ctx)
    save_variant(model, lm.tokenizer, out, {"changes": ctx.changes})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frac", type=float, default=0.4, help="share of the weights kept in memory")
    parser.add_argument("--repetitions", default="3")
    args = parser.parse_args()

    base = build_standin()
    variant = build_variant(base, args.frac)
    common = ["--workload", "chat", "--repetitions", args.repetitions, "--eval-tokens", "2048", "--robust-tokens", "512",
              "--speedup", "no"]  # fmt: skip
    dense, dense_s = frugalm(str(base), *common)
    off, off_s = frugalm(str(variant), *common, "--reference", str(base))
    full = figure(dense, "weights_mib")["value"]
    resident = figure(off, "weights_mib")["value"]
    peak_off = figure(off, "peak_mem_mib", "chat")["value"]
    peak_dense = figure(dense, "peak_mem_mib", "chat")["value"]
    print(f"stand-in weights {full:.1f} MiB (counted); offload keeps {args.frac:.0%} of the bytes in memory")
    print(f"  weights in memory: offloaded {resident:.1f} MiB = {resident / full:.3f}x of the weights")
    print(f"  peak RSS over baseline during chat: offloaded {peak_off:.1f} MiB = {peak_off / full:.3f}x of the weights; "
          f"in memory {peak_dense:.1f} MiB = {peak_dense / full:.3f}x")  # fmt: skip
    kl, top1 = figure(off, "kl_ref_nats")["value"], figure(off, "top1_agree_frac")["value"]
    print(f"  outputs against the in-memory model: KL {kl:.3g} nats, top-1 agreement {top1:.4f} (2,048 positions)")
    read = figure(off, "offload_read_mib_per_tok", "chat")["value"]
    print(f"  read from the weight files per decode step: {read:.1f} MiB (counted)")
    tp, cold, tp_dense = (figure(off, "tpot_p50_ms", "chat"), figure(off, "tpot_cold_ms", "chat"),
                          figure(dense, "tpot_p50_ms", "chat"))  # fmt: skip
    print(f"  decode, warm page cache: tpot p50 {tp['value']:.1f} ms ({1e3 / tp['value']:.2f} tok/s); "
          f"cold: {cold['value']:.1f} ms ({1e3 / cold['value']:.2f} tok/s); in memory {tp_dense['value']:.1f} ms "
          f"({1e3 / tp_dense['value']:.2f} tok/s)")  # fmt: skip
    print(f"  wall: in-memory scorecard {dense_s:.0f} s, offloaded {off_s:.0f} s")


if __name__ == "__main__":
    main()
