"""The decode step's own speed: compiled against eager, against the bandwidth limit, and the quantized KV cache's cost.

    .venv/bin/python benchmarks/bench_decode.py [--threads 2] [--budget 20] [--only compiled|guards|kv] [--variants float32 ...]

On the random-weight SmolLM2-135M stand-in (real shapes; bench_foundation.py), timed with the
calls `frugalm bench --reference` times (frugalm.measure.speedup: one greedy step at batch 1,
cropped back after each call), paired and interleaved in one process (frugalm.measure.paired,
95% Student-t intervals on per-block ratios):

compiled  The compiled decode path (runtime/compiled: static KV cache, torch.compile of the
          one-token step) against the eager float32 model with transformers' DynamicCache, on
          the chat workload's shape (128-token prompt, cache for 192 tokens), for float32 and
          the packed weight-only variants of bench_kernels.py. Compile time (measured, first
          call) is printed beside each, and each compiled packed variant is also paired against
          the compiled float32 step (when float32 is among the variants). Then the fraction of the bandwidth limit: tok/s of the
          step paired against reading the weights' bytes once (torch.sum over a float32 tensor
          of that size), for the eager and the compiled float32 step: the ratio, read time
          over step time, is the step's fraction of the bandwidth limit, with its interval.
guards    What dynamo's guards cost the compiled step: stories260K (real, shared assets) and the
          stand-in, float32, each compiled twice in this process, once keeping every guard dynamo
          makes and once as shipped (runtime/compiled.call_guards: the call's guards only), the
          same one-step call (chat shape), paired: the ratio is the shipped step's speed over
          the fully guarded one's. The guards kept and dropped are counted.
kv        The packed int8 and int4 KV caches (techniques/kv_cache_quant, group 64, 128 recent
          tokens in float) against the float cache at the long workload (1,536-token prompt):
          the decode step's paired ratio, and the cache's bytes (counted; the packed cache's
          attention workspace included) against the float cache's after the prompt and one step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_compression_speed import build_variant  # noqa: E402
from bench_foundation import STORIES, build_standin  # noqa: E402

PACKED = ("w8a16", "w8a16+head", "int4-g32", "int4-g32+head")


def _timed(label, call, ref, config):
    from frugalm.measure.paired import time_paired

    for fn in (call, ref, call, ref):
        fn()
    r = time_paired(call, ref, config)
    print(
        f"{label:<34} {r.speedup:.3f}x [{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.n_blocks} blocks, {r.stopped_by})",
        flush=True,
    )
    return r


def compiled_section(args, base) -> None:
    import torch

    from frugalm.measure.memory import weights_bytes
    from frugalm.measure.paired import PairedConfig
    from frugalm.measure.speedup import decode_call
    from frugalm.models import load_model
    from frugalm.runtime import compiled
    from frugalm.runtime.kv_cache import cache_factory

    config = PairedConfig(budget_s=args.budget)
    eager = load_model(base).model
    ids = torch.randint(5, eager.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    tokens = 128 + 64
    ref = decode_call(eager, ids, None, tokens)
    print(f"decode step at batch 1 from a 128-token prompt vs eager float32 (DynamicCache); {config}")
    float_call = None
    for name in ("float32", *PACKED):
        if name not in args.variants:
            continue
        folder = base if name == "float32" else build_variant(base, name)[0]
        model = load_model(folder).model
        if name != "float32":
            _timed(f"{name} eager", decode_call(model, ids, None, tokens), ref, config)
        setting = {"mode": "default"}
        compiled.install(model, setting)
        call = decode_call(model, ids, cache_factory(model, {compiled.SETTING: setting}), tokens)
        t = time.perf_counter()
        call()
        print(f"  ({name}: compiled in {time.perf_counter() - t:.1f} s, measured: first call)")
        _timed(f"{name} compiled", call, ref, config)
        if name == "float32":
            float_call = call
        elif float_call is not None:
            _timed(f"{name} compiled vs float32 compiled", call, float_call, config)
        del model, call
    if float_call is None:
        return
    weights = weights_bytes(eager)
    block = torch.ones(weights // 4)  # as many bytes as the float32 weights a step reads
    block.sum()  # paged in
    print(f"\nthe bandwidth limit, paired: one torch.sum over {weights / 1e6:.1f} MB of float32 (the weights' bytes) "
          f"against one float32 step; the ratio is the step's fraction of the limit (read time / step time)")  # fmt: skip
    for label, call in (("eager", ref), ("compiled", float_call)):
        r = _timed(f"float32 {label} step vs reading its weights", call, block.sum, config)
        print(f"  {1 / statistics.median(r.seconds_a):.2f} tok/s against a limit of {1 / statistics.median(r.seconds_b):.2f} "
              f"tok/s ({weights / statistics.median(r.seconds_b) / 1e9:.2f} GB/s), medians")  # fmt: skip


def guards_section(args, base) -> None:
    import torch

    from frugalm.measure.paired import PairedConfig
    from frugalm.measure.speedup import decode_call
    from frugalm.models import load_model
    from frugalm.runtime import compiled
    from frugalm.runtime.kv_cache import cache_factory

    config = PairedConfig(budget_s=args.budget)
    print(
        f"compiled decode step at batch 1 from a 128-token prompt (cache for 192): the call's guards vs every guard; {config}"
    )
    shipped = compiled.call_guards
    for name, folder in (("stories260K", STORIES), ("135M stand-in", base)):
        calls, kept = {}, {}
        for kind in ("every guard", "the call's"):
            decisions = kept[kind] = []

            def counted(model_as, kind=kind, decisions=decisions):
                choose = shipped(model_as) if kind == "the call's" else lambda entries: [True] * len(entries)

                def keep(entries):
                    kept = choose(entries)
                    decisions.extend(kept)
                    return kept

                return keep

            compiled.call_guards = counted  # this model's graph only
            try:
                model = load_model(folder).model
                compiled.install(model, {"mode": "default"})
                ids = torch.randint(5, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
                calls[kind] = decode_call(
                    model, ids, cache_factory(model, {compiled.SETTING: {"mode": "default"}}), 192
                )
                calls[kind]()  # compiles (the filter runs here)
            finally:
                compiled.call_guards = shipped
        decisions = kept["the call's"]
        print(f"{name}: {sum(decisions)} of {len(decisions)} guards kept (counted)")
        _timed(f"{name}: the call's guards / every guard", calls["the call's"], calls["every guard"], config)


def kv_section(args, base) -> None:
    import torch

    from frugalm.measure.compute import cache_bytes
    from frugalm.measure.paired import PairedConfig
    from frugalm.measure.speedup import decode_call
    from frugalm.models import load_model
    from frugalm.runtime.kv_cache import make_cache

    config = PairedConfig(budget_s=args.budget)
    model = load_model(base).model
    ids = torch.randint(5, model.config.vocab_size, (1, 1536), generator=torch.Generator().manual_seed(0))
    ref = decode_call(model, ids, None)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        model(torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)  # one step, as below
        float_bytes = cache_bytes(cache)
    print(f"decode step at batch 1 from a 1,536-token prompt vs the float32 DynamicCache; {config}")
    for bits in (8, 4):
        settings = {"kv_cache": {"bits": bits, "group_size": 64, "residual_length": 128}}
        _timed(f"kv-int{bits}", decode_call(model, ids, lambda n, s=settings: make_cache(model, s, n)), ref, config)
        cache = make_cache(model, settings, 0)
        with torch.no_grad():
            out = model(ids, past_key_values=cache, use_cache=True)
            model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)  # one step: the workspace too
        print(f"  cache after the prompt and one step: {cache_bytes(cache) / 2**20:.2f} MiB vs float32 "
              f"{float_bytes / 2**20:.2f} MiB = {cache_bytes(cache) / float_bytes:.3f}x (counted, attention workspace included)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per paired figure")
    parser.add_argument("--only", choices=("compiled", "guards", "kv"))
    parser.add_argument(
        "--variants",
        nargs="*",
        default=("float32", *PACKED),
        choices=("float32", *PACKED),
        help="compiled section: which variants",
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    base = build_standin()
    print(f"threads {args.threads}")
    if args.only in (None, "compiled"):
        compiled_section(args, base)
    if args.only in (None, "guards"):
        guards_section(args, base)
    if args.only in (None, "kv"):
        kv_section(args, base)


if __name__ == "__main__":
    main()
