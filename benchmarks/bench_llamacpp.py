"""frugalm side by side with llama.cpp on CPU: the same weights, the same token windows, the same batch-1 decode.

    .venv/bin/python benchmarks/bench_llamacpp.py --setup     # once: llama-cpp-python built from source
    .venv/bin/python benchmarks/bench_llamacpp.py [--threads 2] [--budget 20] [--models stories260K,standin]

Opt-in: llama.cpp runs in its own venv (.venv-llamacpp), where `--setup` builds the pinned
llama-cpp-python (llamacpp-requirements.txt) from its source distribution, which bundles
llama.cpp (cmake and a C++ compiler needed; built for the instruction sets this CPU has, AMX excepted: see `_cmake_args`). Its side
runs in llamacpp_worker.py, a child that frugalm's side talks to in JSON lines; the two share
token ids only.

For each model (the real stories260K; the random-weight SmolLM2-135M stand-in of
bench_foundation.py) and each pair:
- float32: frugalm's float32 model against `frugalm export --format gguf` of it (F32);
- int4: frugalm's symmetric int4 group-32 RTN variant (packed int4 kernel, bfloat16 activations
  for decode rows) against its GGUF export, whose codes map exactly to Q4_0 (`--with-head`: also
  with the output head quantized, untied, on both sides). llama.cpp's Q4_0
  matmul quantizes activations to 8 bits per block, so logits differ slightly with the same
  weights. On stories260K the 172-wide down projections stay float (172 is no multiple of 32).

Perplexity: both score the same non-overlapping windows of the same token ids (frugalm's
tokenization of the TinyStories text; window 512; each window from an empty cache); the gap is
frugalm's / llama.cpp's - 1. Decode: K greedy steps at batch 1 from the same 128-token prompt,
then both caches are rolled back, timed paired and interleaved (frugalm.measure.paired): A is
frugalm in this process, eager and then on the compiled decode path (runtime/compiled; its
compile time printed), B a request to the waiting llama.cpp child (its round trip, measured
alone, is printed; it is inside B's time). The ratio is time(llama.cpp) / time(frugalm): frugalm's
decode tok/s over llama.cpp's. Both run `--threads` threads on the same cores, one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import ASSETS, ROOT, STORIES, TINYSTORIES, build_standin  # noqa: E402

HERE = Path(__file__).resolve().parent
VENV = ROOT / ".venv-llamacpp"
PYTHON = VENV / "bin" / "python"
CACHE = ROOT / ".cache" / "llamacpp"
WINDOW, PROMPT = 512, 128


def setup() -> None:
    """Create the llama.cpp venv and build llama-cpp-python from source into it (minutes on 2 cores)."""
    if not PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2), "CMAKE_ARGS": _cmake_args()}
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--force-reinstall", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                    "-r", str(HERE / "llamacpp-requirements.txt")], check=True, env=env)  # fmt: skip


def _cmake_args() -> str:
    """The instruction sets this CPU has, named explicitly (GGML_NATIVE off): AVX2/FMA/F16C, and
    AVX-512 (VNNI, BF16) where the CPU lists it, as torch uses it. Never AMX: on this VM the CPU
    lists it, but llama.cpp's AMX matmul dies with SIGILL (tileloadd) in Q4_0 layers."""
    flags = set()
    with contextlib.suppress(OSError):
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    on = ["AVX", "AVX2", "FMA", "F16C"]
    if "avx512f" in flags:
        on += ["AVX512"] + [name for name, flag in (("AVX512_VNNI", "avx512_vnni"), ("AVX512_BF16", "avx512_bf16"),
                                                   ("AVX512_VBMI", "avx512vbmi")) if flag in flags]  # fmt: skip
    if "avx_vnni" in flags:
        on.append("AVX_VNNI")
    return " ".join(["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
                    + [f"-DGGML_{name}=ON" for name in on])  # fmt: skip


class LlamaCpp:
    """The llama.cpp child: one request, one answer."""

    def __init__(self, gguf: Path, threads: int):
        self.proc = subprocess.Popen([str(PYTHON), str(HERE / "llamacpp_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)  # fmt: skip
        self.ask("load", path=str(gguf), n_ctx=WINDOW, threads=threads)

    def ask(self, cmd: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp worker stopped (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def _variant(base: Path, name: str, targets: tuple[str, ...]) -> Path:
    from frugalm.models import load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context

    out = CACHE / f"{base.name}-{name}"
    if not out.exists():
        technique = get_technique("rtn_quant")
        lm = load_model(base, fast_kernels=False)
        config = technique.config_cls(bits=4, group_size=32, symmetric=True, targets=targets)
        ctx = Context()
        model = technique.apply(lm.model, config, ctx)
        save_variant(model, lm.tokenizer, out, {"changes": ctx.changes})
    return out


def _gguf(folder: Path, name: str) -> Path:
    from frugalm.export_gguf import export_gguf

    out = CACHE / f"{name}.gguf"
    if not out.exists():
        done = export_gguf(folder, out)
        print(f"  exported {out.name}: {done.tensor_types}")
    return out


def frugalm_nll(model, windows) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    total, n = 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            x = torch.tensor([ids])
            logp = F.log_softmax(model(x).logits[0, :-1].float(), -1)
            total += -logp.gather(1, x[0, 1:, None]).double().sum().item()
            n += len(ids) - 1
    return total, n


def frugalm_steps(model, ids, steps: int, make_cache=None):
    """K greedy steps from the prompt's cache, then cropped back: the same call as the worker's decode."""
    import torch

    from frugalm.measure.compute import forward_kwargs

    kw = forward_kwargs(model)
    with torch.inference_mode():
        out = model(ids, past_key_values=make_cache(ids.shape[1] + steps) if make_cache else None, use_cache=True, **kw)
    cache, first = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def run() -> None:
        token = first
        with torch.inference_mode():
            for _ in range(steps):
                token = model(token, past_key_values=cache, use_cache=True, **kw).logits[:, -1:].argmax(-1)
        cache.crop(-steps)

    return run


def compare(label: str, folder: Path, gguf: Path, windows, prompt, args) -> None:
    import torch

    from frugalm.measure.paired import PairedConfig, time_paired
    from frugalm.models import load_model
    from frugalm.runtime import compiled
    from frugalm.runtime.kv_cache import cache_factory
    from frugalm.runtime.modules import kernel_summary

    model = load_model(folder).model
    peer = LlamaCpp(gguf, args.threads)
    try:
        t = time.perf_counter()
        ours, n = frugalm_nll(model, windows)
        ours_s = time.perf_counter() - t
        t = time.perf_counter()
        theirs = peer.ask("nll", windows=windows)
        theirs_s = time.perf_counter() - t
        assert theirs["n"] == n
        ppl, ppl_peer = math.exp(ours / n), math.exp(theirs["nll_sum"] / n)
        print(f"{label:<22} perplexity over {n} predicted tokens ({len(windows)} windows of {WINDOW}): frugalm {ppl:.4f} "
              f"({ours_s:.1f} s), llama.cpp {ppl_peer:.4f} ({theirs_s:.1f} s); gap {100 * (ppl / ppl_peer - 1):+.3f}%")  # fmt: skip
        peer.ask("prompt", ids=prompt)
        t = time.perf_counter()
        for _ in range(20):
            peer.ask("noop")
        rtt = (time.perf_counter() - t) / 20
        run_peer = lambda: peer.ask("decode", steps=args.steps)  # noqa: E731
        print(f"{'':<22} decode: {args.steps} greedy steps per call, batch 1, {PROMPT}-token prompt; frugalm kernels "
              f"{kernel_summary(model)}; round trip to llama.cpp {1e6 * rtt:.0f} us per call (inside its time)")  # fmt: skip
        setting = {"mode": "default"}
        for path in ("eager", "compiled"):
            make_cache = None
            if path == "compiled":
                compiled.install(model, setting)
                make_cache = cache_factory(model, {compiled.SETTING: setting})
            run_ours = frugalm_steps(model, torch.tensor([prompt]), args.steps, make_cache)
            t = time.perf_counter()
            run_ours()
            first = time.perf_counter() - t
            for fn in (run_ours, run_peer, run_ours, run_peer):
                fn()
            r = time_paired(run_ours, run_peer, PairedConfig(budget_s=args.budget))
            medians = [sorted(x)[len(x) // 2] / args.steps for x in (r.seconds_a, r.seconds_b)]
            print(f"{'':<22}   frugalm {path:<8} / llama.cpp tok/s {r.speedup:.3f}x [{r.ci_low:.3f}, {r.ci_high:.3f}] "
                  f"({r.n_blocks} blocks, {r.stopped_by}); medians {1 / medians[0]:.1f} vs {1 / medians[1]:.1f} tok/s"
                  + (f"; compiled in {first:.1f} s (first call)" if path == "compiled" else ""), flush=True)  # fmt: skip
    finally:
        peer.close()


def run_model(name: str, base: Path, int4_targets: tuple[str, ...], args) -> None:
    from frugalm.models import load_tokenizer, resolve_model
    from frugalm.text.encode import encode_documents

    tokenizer = load_tokenizer(resolve_model(base))
    docs = TINYSTORIES.read_text().split("<|endoftext|>")
    ids = encode_documents(tokenizer, docs, args.tokens).ids
    windows = [list(map(int, ids[i : i + WINDOW])) for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
    prompt = list(map(int, ids[:PROMPT]))
    print(f"\n=== {name}")
    compare("float32 vs F32", base, _gguf(base, f"{name}-f32"), windows, prompt, args)
    int4 = _variant(base, "int4-g32-sym", int4_targets)
    compare("int4 g32 vs Q4_0", int4, _gguf(int4, f"{name}-int4-g32-sym"), windows, prompt, args)
    if args.with_head:  # the output head quantized too, on both sides (untied from the embedding)
        head = _variant(base, "int4-g32-sym-head", (*int4_targets, "lm_head"))
        compare("int4 g32+head vs Q4_0", head, _gguf(head, f"{name}-int4-g32-sym-head"), windows, prompt, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="build llama-cpp-python into .venv-llamacpp, then stop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per paired decode figure")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per timed call")
    parser.add_argument("--tokens", type=int, default=16384, help="evaluated tokens (before cutting into windows)")
    parser.add_argument("--models", default="stories260K,standin")
    parser.add_argument(
        "--with-head", action="store_true", help="also the int4 variants with the output head quantized"
    )
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if not PYTHON.exists():
        sys.exit(f"no llama.cpp venv at {VENV}: run `{sys.executable} {__file__} --setup` first (builds from source)")
    import torch

    torch.set_num_threads(args.threads)
    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"threads {args.threads}; assets {ASSETS}")
    for name in args.models.split(","):
        if name == "stories260K":
            run_model(name, STORIES, ("*.self_attn.*", "*.mlp.gate_proj", "*.mlp.up_proj"), args)
        elif name == "standin":
            run_model("smollm2-135m-standin", build_standin(), ("*.mlp.*", "*.self_attn.*"), args)
        else:
            sys.exit(f"unknown model {name!r}: stories260K or standin")


if __name__ == "__main__":
    main()
