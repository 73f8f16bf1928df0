"""Weight-only int8 and int4 layers on their packed CPU kernels (int8: frugalm's int8_rows, int4: ATen's): decode and prefill against float32, and their quality.

    .venv/bin/python benchmarks/bench_kernels.py [--threads 2] [--budget 20] [--only speed|quality|small|int8]

Speed, on the random-weight SmolLM2-135M stand-in (real shapes; bench_foundation.py), each variant
loaded as it runs (frugalm.load_model: packed at load time from the stored codes) and timed
against the float32 model in one process, paired and interleaved (frugalm.measure.paired,
95% Student-t intervals): `decode` is one greedy step at batch 1 from a 128-token cache (the
call `frugalm bench --reference` times), `prefill` the 128-token prompt pass and first argmax.
The same variant run dequantized (fast_kernels=False: the float32 path it had before) is timed
beside it.

Small layers (`--only small`): where quant_linear.SMALL_LAYER_WEIGHTS draws the line between the
fused loop over int8-held codes in a compiled graph (quant_linear.fused_rows, as CodesLinear
runs it) and the packed int4 kernel. For each shape, int4 group-32 codes of random weights as
both layers, each compiled as a decode graph would be (torch.compile with inductor's C++
wrapper) into a chain of 8 one-row calls (out x in, then in x out, so the chain closes; 16 layers
a call, which spreads the graph's own call overhead), timed paired and interleaved: the fused
loop's speed over the packed kernel's. Then the same layers called eagerly on one row (20 calls
a sample, paired): CodesLinear dequantizing per call against the packed kernel, which is why
eager calls keep the kernel.

int8 (`--only int8`): frugalm's int8_rows against ATen's _weight_int8pack_mm on one row of the
stand-in's int8 layer shapes, the same codes, paired and interleaved; each call cycles through
copies of the layer (256 MiB of codes) so the weights come from memory, as in a decode step.

Quality, on the real stories260K and the built-in model: perplexity of each variant as it runs
(bfloat16 activations; the perplexity windows are prefill rows, so bfloat16 dequantized weights),
with the packed decode kernel forced onto every row, and the same codes dequantized in float32,
under frugalm's protocol (16,384 tokens of TinyStories; the built-in held-out text).
On stories260K only layers whose shapes the kernels take run fast (its 172-wide MLP does not),
so the built-in model is the full check.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression_speed import VARIANTS, build_variant  # noqa: E402
from bench_foundation import build_standin  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
SPEED = ("w8a16", "int4-g32", "int4-channel", "w8a16+head", "int4-g32+head")


def speed(args) -> None:
    import torch

    from frugalm.measure.paired import PairedConfig, time_paired
    from frugalm.measure.speedup import decode_call, ttft_call
    from frugalm.models import load_model
    from frugalm.runtime.modules import kernel_summary

    torch.set_num_threads(args.threads)
    base = build_standin()
    fp32 = load_model(base).model
    ids = torch.randint(5, fp32.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    config = PairedConfig(budget_s=args.budget)
    ref = {"decode": decode_call(fp32, ids, None), "prefill": ttft_call(fp32, ids, None)}
    print(f"threads {args.threads}; {config}", flush=True)
    for name in args.variants:
        folder, _ = build_variant(base, name)
        for fast in (True, False):
            model = load_model(folder, fast_kernels=fast).model
            calls = {"decode": decode_call(model, ids, None), "prefill": ttft_call(model, ids, None)}
            for phase, call in calls.items():
                for fn in (call, ref[phase], call, ref[phase]):
                    fn()
                r = time_paired(call, ref[phase], config)
                print(f"{name:<13} {'packed' if fast else 'dequantized':<11} {phase:<7} vs float32: {r.speedup:.3f}x "
                      f"[{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.n_blocks} blocks, {r.stopped_by}); kernels {kernel_summary(model)}",
                      flush=True)  # fmt: skip
            del model


SMALL_SHAPES = ((64, 64), (172, 64), (192, 576), (576, 576), (1536, 576), (2048, 5632))
"""(out, in): stories260K's attention and MLP, the 135M stand-in's k/v, q/o and MLP, a 1B-class MLP."""


def small(args) -> None:
    import torch

    from frugalm.measure.paired import PairedConfig, time_paired
    from frugalm.runtime.quant_linear import (
        CodesLinear,
        PackedWeightLinear,
        QuantLinear,
        packed_eligible,
        quantize_groups,
    )

    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # every chain below is one more graph of the same function
    config = PairedConfig(budget_s=args.budget)
    gen = torch.Generator().manual_seed(0)

    def layer(out_f: int, in_f: int) -> QuantLinear:
        # per channel where 32 does not divide the width (as llama.cpp falls back)
        group = 32 if in_f % 32 == 0 else in_f
        q, s, z = quantize_groups(torch.randn(out_f, in_f, generator=gen) * 0.05, 4, group, True)
        return QuantLinear.from_codes(q, s, z, 4, None)

    def chain(a, b):
        def run(x):
            for _ in range(8):
                x = b(a(x))
            return x

        graph = torch.compile(run, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        x = torch.randn(1, 1, a.in_features, generator=gen)
        return lambda: graph(x)

    print(f"threads {args.threads}; {config}", flush=True)
    for out_f, in_f in SMALL_SHAPES:
        a, b = layer(out_f, in_f), layer(in_f, out_f)
        if not all(packed_eligible(m) for m in (a, b)):
            print(f"{out_f}x{in_f}: the packed kernel does not take this shape (CodesLinear has no rival)", flush=True)
            continue
        with torch.inference_mode():
            rivals = [PackedWeightLinear(a), PackedWeightLinear(b)]
            for m in rivals:
                m.fused = False  # the packed kernel itself, whatever the layer's size
            codes, packed = chain(CodesLinear(a), CodesLinear(b)), chain(*rivals)
            for fn in (codes, packed, codes, packed):
                fn()
            r = time_paired(codes, packed, config)
            x = torch.randn(1, 1, in_f, generator=gen)
            eager = [m(a) for m in (CodesLinear, PackedWeightLinear)]
            e = time_paired(*[lambda m=m: [m(x) for _ in range(20)] for m in eager], config)
        print(f"{out_f}x{in_f} (+ {in_f}x{out_f}), {out_f * in_f:,} weights: compiled, fused loop / packed int4 kernel "
              f"{r.speedup:.3f}x [{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.n_blocks} blocks, {r.stopped_by}); eager {out_f}x{in_f}, "
              f"dequantized per call / packed int4 kernel {e.speedup:.3f}x [{e.ci_low:.3f}, {e.ci_high:.3f}]", flush=True)  # fmt: skip


INT8_SHAPES = ((576, 576), (1536, 576), (576, 1536), (49152, 576))
"""(out, in): the 135M stand-in's q/o, gate/up, down and output head."""


def int8(args) -> None:
    import statistics

    import torch

    from frugalm.measure.paired import PairedConfig, time_paired
    from frugalm.runtime import cpu_kernels

    if not cpu_kernels.available():
        print("frugalm's CPU kernels could not be built here: nothing to compare")
        return
    torch.set_num_threads(args.threads)
    config = PairedConfig(budget_s=args.budget)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}; {config}", flush=True)
    for out_f, in_f in INT8_SHAPES:
        # copies of the layer cycled through, 256 MiB of codes in all: each call reads its weights from
        # memory, as a decode step reads each layer once, not from a cache warmed by the call before
        copies = max(1, (256 << 20) // (out_f * in_f))
        ws = [torch.randint(-128, 128, (out_f, in_f), generator=gen, dtype=torch.int8) for _ in range(copies)]
        scale = (torch.rand(out_f, generator=gen) * 0.01).bfloat16()
        x = torch.randn(1, in_f, generator=gen).bfloat16()

        def calls(op):
            return lambda: [op(x, w, scale) for w in ws]

        ours, aten = calls(torch.ops.frugalm.int8_rows), calls(torch.ops.aten._weight_int8pack_mm)
        for fn in (ours, aten, ours, aten):
            fn()
        r = time_paired(ours, aten, config)
        gbs = [out_f * in_f * copies / statistics.median(t) / 1e9 for t in (r.seconds_a, r.seconds_b)]
        print(f"{out_f}x{in_f}, one row, {copies} copies: int8_rows / ATen int8pack {r.speedup:.3f}x "
              f"[{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.n_blocks} blocks, {r.stopped_by}); codes read at {gbs[0]:.1f} "
              f"against {gbs[1]:.1f} GB/s (from the medians)", flush=True)  # fmt: skip


def quality(args) -> None:
    import tempfile

    import torch

    from frugalm.assets import DEFAULT_EVAL_PATH, DEFAULT_MODEL_DIR
    from frugalm.measure.quality import PerplexityProtocol, measure_quality
    from frugalm.models import context_length, load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.runtime import quant_linear
    from frugalm.runtime.modules import kernel_summary
    from frugalm.techniques.base import Context
    from frugalm.text.encode import evaluated_documents

    torch.set_num_threads(args.threads)
    protocol = PerplexityProtocol(max_tokens=16_384)
    decode_rows = quant_linear.DECODE_ROWS
    models = {"stories260K": (ASSETS / "models" / "stories260K", ASSETS / "data" / "tinystories_valid_0000-0499.txt"),
              "built-in": (DEFAULT_MODEL_DIR, DEFAULT_EVAL_PATH)}  # fmt: skip
    for label, (model_dir, text) in models.items():
        if not model_dir.exists():
            print(f"{label}: not found, skipped")
            continue
        for name in ("w8a16", "int4-g32", "int4-channel"):
            technique_name, options = VARIANTS[name]
            if label == "stories260K" and name == "int4-g32":  # 32 does not divide its MLP's 172 columns
                options = {**options, "targets": ("*.self_attn.*", "*.mlp.gate_proj", "*.mlp.up_proj")}
            technique = get_technique(technique_name)
            lm = load_model(model_dir, fast_kernels=False)
            model = technique.apply(lm.model, technique.config_cls(**options), Context())
            with tempfile.TemporaryDirectory() as tmp:
                save_variant(model, lm.tokenizer, Path(tmp) / "v", {"changes": [], "recipe": {}})
                ppl = {}
                for path in ("packed", "kernel", "float32"):  # kernel: the decode kernel forced for every row
                    v = load_model(Path(tmp) / "v", fast_kernels=path != "float32")
                    quant_linear.DECODE_ROWS = 10**9 if path == "kernel" else decode_rows
                    docs = evaluated_documents(text, v.tokenizer, protocol.max_tokens)
                    figures = measure_quality(v.model, v.tokenizer, docs, protocol, context=context_length(v.model.config),
                                              data_desc={})  # fmt: skip
                    ppl[path] = next(m.value for m in figures if m.metric == "ppl_tok")
                    if path == "packed":
                        fast_kernels = kernel_summary(v.model)
                quant_linear.DECODE_ROWS = decode_rows
            print(f"{label:<12} {name:<13} ppl_tok as it runs (bfloat16) {ppl['packed']:.4f} ({100 * (ppl['packed'] / ppl['float32'] - 1):+.3f}%), "
                  f"decode kernel on every row {ppl['kernel']:.4f} ({100 * (ppl['kernel'] / ppl['float32'] - 1):+.3f}%), "
                  f"dequantized float32 {ppl['float32']:.4f}; kernels {fast_kernels}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of paired timing per figure at most")
    parser.add_argument("--only", choices=("speed", "quality", "small", "int8"), default=None)
    parser.add_argument("--variants", nargs="*", default=list(SPEED), choices=SPEED, help="variants to time")
    args = parser.parse_args()
    if args.only in (None, "speed"):
        speed(args)
    if args.only in (None, "quality"):
        quality(args)
    if args.only in (None, "small"):
        small(args)
    if args.only in (None, "int8"):
        int8(args)


if __name__ == "__main__":
    main()
