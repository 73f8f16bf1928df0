"""Bytes and speed of compressed variants of a real-size model, measured side by side in one run.

    .venv/bin/python benchmarks/bench_compression_speed.py [--repetitions N]

On the random-weight SmolLM2-135M stand-in (real shapes; see bench_foundation.py), builds:
- int8: RTN int8 per-channel symmetric on every decoder linear (runs fbgemm's int8 kernel),
- int8+head: the same plus the output head (untied from the embedding),
- int4-g64: RTN int4, group 64 (no int4 kernel on this CPU: runs dequantized, said so),
- structured25: 25% of MLP channels physically removed (magnitude importance),
saves each as an artifact, then measures the float32 model and each variant with
`frugalm bench` (fresh child process each): batch-1 decode on `chat`, batch 8 x 256-token
prefill on `prefill`, weights in memory, artifact size. Ratios to float32 are printed with the
spread of the repetitions. Quality figures of random weights mean nothing and are not shown.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, build_standin, figure, frugalm  # noqa: E402

VARIANTS = {
    "int8": ("rtn_quant", {"bits": 8, "group_size": -1, "symmetric": True}),
    "int8+head": ("rtn_quant", {"bits": 8, "group_size": -1, "symmetric": True, "targets": ("*.mlp.*", "*.self_attn.*", "lm_head")}),
    "int4-g64": ("rtn_quant", {"bits": 4, "group_size": 64, "symmetric": False}),
    "structured25": ("structured_prune", {"unit": "mlp_channels", "fraction": 0.25, "importance": "magnitude"}),
}
METRICS = ["decode_tok_s", "prefill_tok_s", "weights_mib", "artifact_mib", "peak_mem_mib"]


def build_variant(base: Path, name: str) -> tuple[Path, float]:
    from frugalm.models import load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context

    out = ROOT / ".cache" / "variants" / f"smollm2-135m-{name}"
    technique_name, options = VARIANTS[name]
    technique = get_technique(technique_name)
    config = technique.config_cls(**options)
    if out.exists():
        return out, float("nan")
    lm = load_model(base, fast_kernels=False)
    ctx = Context()
    t0 = time.perf_counter()
    model = technique.apply(lm.model, config, ctx)
    seconds = time.perf_counter() - t0
    save_variant(model, lm.tokenizer, out, {"changes": ctx.changes, "recipe": {"technique": technique_name, **options}})
    return out, seconds


def ratio(a: dict, b: dict) -> str:
    """a/b with the spread propagated from both figures' standard deviations (first order)."""
    r = a["value"] / b["value"]
    rel = math.sqrt(sum(((f["spread"] or 0) / f["value"]) ** 2 for f in (a, b)))
    return f"{r:.2f}x ± {r * rel:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", default="5")
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    base = build_standin()
    common = ["--workload", "chat", "--workload", "prefill", "--repetitions", args.repetitions, *sum((["--metric", m] for m in METRICS), [])]
    docs = {}
    doc, wall = frugalm(str(base), *common)
    docs["float32"] = doc
    print(f"float32: measured in {wall:.0f} s", flush=True)
    for name in args.only:
        folder, seconds = build_variant(base, name)
        doc, wall = frugalm(str(folder), *common)
        docs[name] = doc
        print(f"{name}: built in {seconds:.1f} s (nan: reused), measured in {wall:.0f} s; kernels {figure(doc, 'decode_tok_s', 'chat').get('protocol', {}).get('kernels')}", flush=True)
    base_doc = docs["float32"]
    print("\nvariant        decode tok/s (chat, b=1)      prefill tok/s (8x256)         weights MiB   artifact MiB   peak MiB (chat)")
    for name, doc in docs.items():
        dec, pre = figure(doc, "decode_tok_s", "chat"), figure(doc, "prefill_tok_s", "prefill")
        row = f"{name:<14} {dec['value']:8.2f} ± {dec['spread'] or 0:5.2f} ({ratio(dec, figure(base_doc, 'decode_tok_s', 'chat'))})"
        row += f"   {pre['value']:8.1f} ± {pre['spread'] or 0:6.1f} ({ratio(pre, figure(base_doc, 'prefill_tok_s', 'prefill'))})"
        row += f"   {figure(doc, 'weights_mib')['value']:8.1f}     {figure(doc, 'artifact_mib')['value']:8.1f}     {figure(doc, 'peak_mem_mib', 'chat')['value']:8.1f}"
        print(row)


if __name__ == "__main__":
    main()
