"""Bytes and speed of compressed variants of a real-size model, measured side by side in one run.

    .venv/bin/python benchmarks/bench_compression_speed.py [--repetitions N]

On the random-weight SmolLM2-135M stand-in (real shapes; see bench_foundation.py), builds:
- int8: RTN int8 per-channel symmetric on every decoder linear, w8a8-dynamic (fbgemm's int8 kernel),
- int8+head: the same plus the output head (untied from the embedding),
- int4-g64: RTN int4, group 64 (no int4 kernel on this CPU: runs dequantized, said so),
- structured25: 25% of MLP channels physically removed (magnitude importance),
saves each as an artifact, then measures the float32 model and each variant with
`frugalm bench` (fresh child process each): batch-1 decode on `chat`, batch 8 x 256-token
prefill on `prefill`, weights in memory, artifact size. Quality figures of random weights mean
nothing and are not shown.

Measurements are interleaved: each of `--rounds` rounds measures float32 and every variant once
(the order rotated from round to round), and a variant's speed-up is taken per round against
that round's float32, so a slow spell on a shared machine hits both sides of a ratio. The
table gives the mean ratio over the rounds with its standard deviation, next to the pooled
throughputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ROOT, build_standin, figure, frugalm  # noqa: E402

VARIANTS = {
    "int8": ("rtn_quant", {"bits": 8, "group_size": -1, "symmetric": True, "activations": "dynamic-int8"}),
    "int8+head": (
        "rtn_quant",
        {
            "bits": 8,
            "group_size": -1,
            "symmetric": True,
            "activations": "dynamic-int8",
            "targets": ("*.mlp.*", "*.self_attn.*", "lm_head"),
        },
    ),
    "int4-g64": ("rtn_quant", {"bits": 4, "group_size": 64, "symmetric": False}),
    "w8a16": ("rtn_quant", {"bits": 8, "group_size": -1, "symmetric": True, "activations": "none"}),
    "int4-g32": ("rtn_quant", {"bits": 4, "group_size": 32, "symmetric": False}),
    "int4-channel": ("rtn_quant", {"bits": 4, "group_size": -1, "symmetric": False}),
    "w8a16+head": (
        "rtn_quant",
        {
            "bits": 8,
            "group_size": -1,
            "symmetric": True,
            "activations": "none",
            "targets": ("*.mlp.*", "*.self_attn.*", "lm_head"),
        },
    ),  # fmt: skip
    "int4-g32+head": (
        "rtn_quant",
        {"bits": 4, "group_size": 32, "symmetric": False, "targets": ("*.mlp.*", "*.self_attn.*", "lm_head")},
    ),
    "structured25": ("structured_prune", {"unit": "mlp_channels", "fraction": 0.25, "importance": "magnitude"}),
}
METRICS = ["decode_tok_s", "prefill_tok_s", "weights_mib", "artifact_mib", "peak_mem_mib"]


def build_variant(base: Path, name: str) -> tuple[Path, float]:
    from frugalm.models import load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context

    out = ROOT / ".cache" / "variants" / f"smollm2-135m-{name}-v2"  # v2: int8 says its format (w8a8-dynamic)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", default="3", help="timed repetitions per workload inside one measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (float32 and every variant once per round)"
    )
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    base = build_standin()
    common = [
        "--workload",
        "chat",
        "--workload",
        "prefill",
        "--repetitions",
        args.repetitions,
        *sum((["--metric", m] for m in METRICS), []),
    ]
    folders = {"float32": base}
    for name in args.only:
        folders[name], seconds = build_variant(base, name)
        print(f"{name}: built in {seconds:.1f} s (nan: reused)", flush=True)
    names = list(folders)
    docs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            doc, wall = frugalm(str(folders[name]), *common)
            docs[name].append(doc)
            print(
                f"round {r + 1}: {name} measured in {wall:.0f} s; kernels {figure(doc, 'decode_tok_s', 'chat').get('protocol', {}).get('kernels')}",
                flush=True,
            )

    def values(name, metric, workload):
        return [figure(d, metric, workload)["value"] for d in docs[name]]

    def cell(name, metric, workload):
        v = values(name, metric, workload)
        ratios = [a / b for a, b in zip(v, values("float32", metric, workload))]
        sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        return f"{statistics.mean(v):8.2f} ({statistics.mean(ratios):.2f}x ± {sd:.2f})"

    print(
        f"\n{args.rounds} interleaved rounds x {args.repetitions} repetitions; ratio = mean over rounds of variant / float32 in the same round, ± sd over rounds"
    )
    print(
        "variant        decode tok/s (chat, b=1)   prefill tok/s (8x256)     weights MiB   artifact MiB   peak MiB (chat)"
    )
    for name in names:
        last = docs[name][-1]
        row = f"{name:<14} {cell(name, 'decode_tok_s', 'chat')}    {cell(name, 'prefill_tok_s', 'prefill')}"
        row += f"   {figure(last, 'weights_mib')['value']:8.1f}     {figure(last, 'artifact_mib')['value']:8.1f}     {statistics.mean(values(name, 'peak_mem_mib', 'chat')):8.1f}"
        print(row)
    print(
        "per round, decode tok/s: "
        + "; ".join(f"{n} " + ", ".join(f"{v:.1f}" for v in values(n, "decode_tok_s", "chat")) for n in names)
    )


if __name__ == "__main__":
    main()
