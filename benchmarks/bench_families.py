"""Recurrent state against a Transformer's KV cache, and eager against sdpa attention, at the long workload.

    .venv/bin/python benchmarks/bench_families.py [--only state|attention] [--tiny] [--threads 2] [--budget 60]

state      Random-weight models of about 130M parameters (the memory does not depend on the weights):
           the shapes of Mamba-130m, Mamba2-130m and RWKV-4-169m against the SmolLM2-135M stand-in
           (bench_foundation.py), float32, batch 1, each through frugalm's cache interface
           (runtime/families). At 256 and 1,536 tokens of context (the long workload's prompt):
           - cache: the bytes the KV cache or recurrent state holds after the prompt and one decode
             step (counted from the cache object's tensors, as kv_cache_mib and state_mib are);
           - kept: the RSS the process keeps after the prompt pass with the cache alive and freed
             memory handed back to the OS (glibc malloc_trim), minus the RSS before (measured);
           - peak: the RSS high-water mark over the prompt pass and 8 decode steps, reset before,
             minus the RSS before (measured; activations included).
           Memory only, one model after another in this process; no timings.
attention  eager against sdpa attention (`frugalm bench --attn-implementation`) on the SmolLM2-135M
           stand-in at the long workload: the prompt pass (1,536 tokens, the speedup_ttft call) and
           one decode step from its cache (the speedup_decode call), timed paired in ABBA blocks in
           one process (measure/paired.py, 95% Student-t intervals), then the peak memory of one
           whole long-workload generation (1,536 + 256 tokens) per implementation (RSS high-water
           mark, reset before each, measured one after the other in this process). Timings need a
           quiet machine: run this section alone.

experts   A mixture-of-experts model compressed per expert, as `load_model` runs it: a random-weight
           Mixtral of 8 blocks, hidden 512, 8 experts of width 1,024 (top 2), float32, against its
           int8 (per channel) and int4 (groups of 32) RTN variants on the CPU kernels (FastExperts)
           and the int4 one dequantized (fast_kernels off): one decode step at the chat workload's
           128-token context and the 128-token prompt pass, each timed paired against the float model
           in ABBA blocks (95% intervals), and each variant's weights in memory (counted). Timings
           need a quiet machine: run this section alone.

--tiny runs every section on 64-wide, 2-layer models in seconds: a check that the script runs, not figures.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

CONTEXTS = (256, 1536)
VOCAB = 49152  # SmolLM2's, for every model: the embeddings are the same size in all four
SHAPES = {  # public configs of models of about 130M parameters
    "mamba": dict(hidden_size=768, num_hidden_layers=24, state_size=16, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=768,
        num_hidden_layers=24,
        state_size=128,
        expand=2,
        conv_kernel=4,
        num_heads=24,
        head_dim=64,
        n_groups=1,
        chunk_size=256,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "rwkv": dict(hidden_size=768, num_hidden_layers=12, attention_hidden_size=768, intermediate_size=3072),
}
TINY = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    ),  # fmt: skip
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=64,
        num_hidden_layers=2,
        state_size=16,
        expand=2,
        conv_kernel=4,
        num_heads=8,
        head_dim=16,
        n_groups=1,
        chunk_size=64,
    ),  # fmt: skip
    "rwkv": dict(hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128),
}
MIB = 1 << 20


def _release() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _model(arch: str, tiny: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from frugalm.runtime import families

    torch.manual_seed(0)
    if arch == "llama" and not tiny:
        from bench_foundation import build_standin

        model = AutoModelForCausalLM.from_pretrained(build_standin())
    else:
        config = AutoConfig.for_model(arch, vocab_size=300 if tiny else VOCAB, **(TINY if tiny else SHAPES)[arch])
        model = AutoModelForCausalLM.from_config(config)
    return families.install(model.eval())


def state_at(model, context: int) -> tuple[int, float, float]:
    """(cache bytes counted, kept RSS MiB, peak RSS MiB over the start) after `context` tokens and 8 decode steps."""
    import torch
    from transformers import DynamicCache

    from frugalm.measure import compute, memory

    ids = compute.prompt_ids(model, 1, context, torch.device("cpu"))
    _release()
    before = memory.current_rss_bytes()
    with memory.PeakMemory(torch.device("cpu"), before) as peak, torch.inference_mode():
        cache = DynamicCache(config=model.config)
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(8):
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
        del out
    counted = compute.cache_bytes(cache)
    _release()
    kept = (memory.current_rss_bytes() - before) / MIB
    del cache
    return counted, kept, peak.peak_over_baseline_mib


def state_section(args) -> None:
    from frugalm.measure.memory import params_count
    from frugalm.runtime import families

    print(f"{'model':<28} {'params':>7} {'context':>7} {'cache MiB':>10} {'kept MiB':>9} {'peak MiB':>9}  cache is")
    for arch in ("llama", "mamba", "mamba2", "rwkv"):
        model = _model(arch, args.tiny)
        state_at(model, 16)  # warm-up: weights read from a memory-mapped file are paged in on first use
        label = "SmolLM2-135M stand-in" if arch == "llama" and not args.tiny else families.describe(model)
        kind = "KV cache" if families.family(model) != "recurrent" else "recurrent state"
        for context in CONTEXTS:
            counted, kept, peak = state_at(model, context)
            print(f"{label:<28} {params_count(model) / 1e6:>6.1f}M {context:>7} {counted / MIB:>10.3f} {kept:>9.1f} "
                  f"{peak:>9.1f}  {kind} (counted); kept, peak: RSS (measured)", flush=True)  # fmt: skip
        del model
        _release()


def attention_section(args) -> None:
    import torch

    from frugalm.measure import compute, memory
    from frugalm.measure.paired import PairedConfig, time_paired
    from frugalm.measure.speedup import decode_call, ttft_call
    from frugalm.measure.workloads import WORKLOADS
    from frugalm.models import load_model

    w = WORKLOADS["long"]
    folder = _tiny_llama_folder() if args.tiny else _standin()
    models = {impl: load_model(folder, attn_implementation=impl).model for impl in ("eager", "sdpa")}
    ids = compute.prompt_ids(models["sdpa"], 1, w.prompt_tokens, torch.device("cpu"))
    config = PairedConfig(budget_s=args.budget, target_halfwidth=0.02)
    calls = {
        f"prompt pass, {w.prompt_tokens} tokens": {impl: ttft_call(m, ids, None) for impl, m in models.items()},
        f"decode step at {w.prompt_tokens} tokens": {
            impl: decode_call(m, ids, None, w.prompt_tokens + 1) for impl, m in models.items()
        },
    }
    print(f"eager vs sdpa, {'tiny llama' if args.tiny else 'SmolLM2-135M stand-in'}, long workload, "
          f"{torch.get_num_threads()} threads; time(eager) / time(sdpa), 95% interval (paired ABBA, one process)")  # fmt: skip
    for label, run in calls.items():
        for fn in (run["sdpa"], run["eager"], run["sdpa"], run["eager"]):
            fn()
        r = time_paired(run["sdpa"], run["eager"], config)
        print(f"  {label:<32} {r.speedup:.3f}x [{r.ci_low:.3f}, {r.ci_high:.3f}]  ({r.n_blocks} blocks, {r.stopped_by}; "
              f"eager {sorted(r.seconds_b)[len(r.seconds_b) // 2] * 1e3:.2f} ms, sdpa {sorted(r.seconds_a)[len(r.seconds_a) // 2] * 1e3:.2f} ms median)",
              flush=True)  # fmt: skip
    print(
        f"peak memory of one whole generation ({w.prompt_tokens} + {w.output_tokens} tokens), RSS over the start, measured:"
    )
    for impl, model in models.items():
        _release()
        with memory.PeakMemory(torch.device("cpu"), memory.current_rss_bytes()) as peak:
            compute.generate_timed(model, ids, w.output_tokens, torch.device("cpu"))
        print(f"  {impl:<6} {peak.peak_over_baseline_mib:8.1f} MiB ({peak.method})", flush=True)


MOE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
           num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=2048)  # fmt: skip


def experts_section(args) -> None:
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from frugalm.measure import compute, memory
    from frugalm.measure.paired import PairedConfig, time_paired
    from frugalm.measure.speedup import decode_call, ttft_call
    from frugalm.measure.workloads import WORKLOADS
    from frugalm.models import load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.runtime.modules import kernel_summary
    from frugalm.techniques.base import Context

    w = WORKLOADS["chat"]
    root = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    tokenizer = load_model(_tiny_llama_folder()).tokenizer
    shape = {**MOE, **(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4) if args.tiny else {})}  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", vocab_size=32000, **shape)).save_pretrained(
        root / "float"
    )
    tokenizer.save_pretrained(root / "float")
    rtn = get_technique("rtn_quant")
    for name, options in (("int8", dict(bits=8)), ("int4-g32", dict(bits=4, group_size=32))):
        lm = load_model(root / "float")
        save_variant(rtn.apply(lm.model, rtn.config_cls(**options), Context()), tokenizer, root / name, {})
    models = {"float32": load_model(root / "float").model, "int8": load_model(root / "int8").model,
              "int4-g32": load_model(root / "int4-g32").model,
              "int4-g32 dequantized": load_model(root / "int4-g32", fast_kernels=False).model}  # fmt: skip
    ids = compute.prompt_ids(models["float32"], 1, w.prompt_tokens, torch.device("cpu"))
    config = PairedConfig(budget_s=args.budget, target_halfwidth=0.02)
    print(f"mixture-of-experts per expert, Mixtral {shape['num_hidden_layers']} blocks x {shape['num_local_experts']} experts "
          f"(hidden {shape['hidden_size']}, width {shape['intermediate_size']}, top 2), random weights, {torch.get_num_threads()} threads; "
          "time(float32) / time(variant), 95% interval (paired ABBA, one process)")  # fmt: skip
    base = models["float32"]
    for name, model in models.items():
        kernels = ", ".join(f"{k}: {n}" for k, n in kernel_summary(model).items())
        print(f"  {name:<22} weights {memory.weights_bytes(model) / memory.MIB:7.1f} MiB (counted); kernels {kernels}")
        if model is base:
            continue
        for label, make in (("decode step", lambda m: decode_call(m, ids, None, w.prompt_tokens + 1)),
                            (f"prompt pass ({w.prompt_tokens})", lambda m: ttft_call(m, ids, None))):  # fmt: skip
            fast, slow = make(model), make(base)
            for fn in (slow, fast, slow, fast):
                fn()
            r = time_paired(fast, slow, config)
            print(f"    {label:<20} {r.speedup:.3f}x [{r.ci_low:.3f}, {r.ci_high:.3f}]  ({r.n_blocks} blocks, {r.stopped_by}; "
                  f"float {sorted(r.seconds_b)[len(r.seconds_b) // 2] * 1e3:.2f} ms, variant {sorted(r.seconds_a)[len(r.seconds_a) // 2] * 1e3:.2f} ms median)",
                  flush=True)  # fmt: skip


def _standin() -> Path:
    from bench_foundation import build_standin

    return build_standin()


def _tiny_llama_folder() -> Path:
    """A 64-wide, 2-layer Llama with the stand-in's tokenizer, saved once under .cache (for --tiny)."""
    import torch
    from bench_foundation import ASSETS, ROOT
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = ROOT / ".cache" / "standins" / "tiny-llama"
    if not (folder / "model.safetensors").exists():
        torch.manual_seed(0)
        config = AutoConfig.for_model("llama", vocab_size=32000, **TINY["llama"])
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        AutoTokenizer.from_pretrained(ASSETS / "tokenizers" / "llama2-32k").save_pretrained(folder)
    return folder


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=("state", "attention", "experts"))
    p.add_argument("--tiny", action="store_true", help="64-wide, 2-layer models: checks that the script runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=60.0, help="seconds of paired timing per attention figure")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "state"):
        state_section(args)
    if args.only in (None, "attention"):
        attention_section(args)
    if args.only in (None, "experts"):
        experts_section(args)


if __name__ == "__main__":
    main()
