"""frugalm's compression techniques side by side with llm-compressor, on stories260K.

    .venv/bin/python benchmarks/bench_compression.py [--skip-peer] [--samples N] [--eval-tokens N] [--repetitions N] [--threads N]

Same model (../shared/assets/models/stories260K, a real pretrained 260K Llama), same
calibration token ids for both tools: `--samples` (128) windows of 512 tokens drawn by
`sample_calibration` (seed 0) from the TinyStories documents AFTER the evaluated ones.

- frugalm: RTN-4, GPTQ-4 and AWQ-4 (per channel, symmetric), magnitude / Wanda / SparseGPT at
  50% unstructured and at 2:4, structured 25% of the MLP channels, through the Python API
  (load_model, get_technique(...).apply with a Context holding the calibration tokens).
- llm-compressor 0.14.0.1 in its own virtualenv (.cache/peer-venv; it pins transformers
  5.15-5.17): GPTQ W4A16-style but per channel (symmetric int4, static act-order, dampening 0.01,
  block 128), Wanda and SparseGPT at 50% and 2:4, by `oneshot` on a `datasets.Dataset` of the
  same token ids. GPTQ runs twice on each side, with the min/max range observer
  (llm-compressor's default) and with the MSE range search (frugalm's default), so that each
  frugalm row has a peer row on the same settings.

Every compression runs in a fresh process that times only the compression call (wall and CPU
seconds; model loading and saving excluded). Every variant is then measured in a fresh process
of this venv with frugalm's own quality code: perplexity under the assets' reference protocol
(non-overlapping 512-token windows over the first `--eval-tokens` tokens, documents split at
`<|endoftext|>`), mean KL(float32 || variant) and top-1 agreement (score_text(reference=...)),
and batch-1 decode speed (128-token prompt, 64 new tokens, 1 warm-up + `--repetitions`).
Weight bytes are those of the changed layers in the saved files: frugalm's packed codes +
scales + zero points; llm-compressor's plain (decompressed) folder, and its own compressed
format (`save_compressed=True`) where it can write one. int4 layers run dequantized on CPU
(no speed kernel), so their decode speed is not a speed-up claim.

Threads: every child runs with `--threads` (default 1) torch threads, both tools alike. On
this project's shared 2-core machines, two intra-op threads on these tiny tensors spend most of
their time waiting for each other whenever another process holds a core (measured: frugalm's
GPTQ MSE range search, 35 calls, 0.39 s with 1 thread, 22.8 s with 2 at load average ~4), which
would make the wall times measure the neighbours, not the tools.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"
TINYSTORIES = ASSETS / "data" / "tinystories_valid_0000-0499.txt"
WORK = ROOT / ".cache" / "bench-compression"
PEER_VENV = ROOT / ".cache" / "peer-venv"
PEER_PACKAGES = ("torch==2.13.0", "llmcompressor==0.14.0.1")
SEQ_LEN = 512  # calibration sequence length and perplexity window (the model's context)
PROMPT_TOKENS, NEW_TOKENS = 128, 64  # decode-speed workload, batch 1
REFERENCE_PPL = 3.682  # ../shared/assets/README.md, "Measured perplexity", TinyStories
CHILD_TIMEOUT_S = 1800
MARK = "@@RESULT@@ "  # prefixes the one JSON line a child prints
CHANGED = {
    "block": re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\."),
    "mlp": re.compile(r"^model\.layers\.\d+\.mlp\."),
}
"""Safetensors keys of the layers a variant changes: every attention/MLP linear, or the MLP only."""


@dataclass(frozen=True)
class Variant:
    key: str  # folder name under WORK
    label: str  # table row
    tool: str  # "frugalm" or "llm-compressor"
    technique: str  # frugalm registry name, or the peer's: gptq / wanda / sparsegpt
    options: dict = field(default_factory=dict)
    changed: str = "block"  # key of CHANGED


F, P = "frugalm", "llm-compressor"
VARIANTS = [  # matched frugalm / peer pairs next to each other, so load drifts hit both alike
    Variant("f-rtn4", "RTN-4 per-channel", F, "rtn_quant", {"bits": 4, "group_size": -1}),
    Variant(
        "f-gptq4-minmax",
        "GPTQ-4 per-channel, minmax",
        F,
        "gptq_quant",
        {"bits": 4, "observer": "minmax", "damp_percent": 0.01},
    ),
    Variant(
        "p-gptq4-minmax",
        "GPTQ-4 per-channel, minmax",
        P,
        "gptq",
        {"bits": 4, "observer": "memoryless_minmax", "dampening_frac": 0.01},
    ),
    Variant(
        "f-gptq4-mse", "GPTQ-4 per-channel, mse", F, "gptq_quant", {"bits": 4, "observer": "mse", "damp_percent": 0.01}
    ),
    Variant(
        "p-gptq4-mse",
        "GPTQ-4 per-channel, mse",
        P,
        "gptq",
        {"bits": 4, "observer": "memoryless_mse", "dampening_frac": 0.01},
    ),
    Variant("f-awq4", "AWQ-4 per-channel", F, "awq_quant", {"bits": 4}),
    Variant("f-mag50", "magnitude 50%", F, "magnitude_prune", {"sparsity": 0.5}),
    Variant("f-wanda50", "Wanda 50%", F, "wanda_prune", {"sparsity": 0.5}),
    Variant("p-wanda50", "Wanda 50%", P, "wanda", {"sparsity": 0.5, "mask_structure": "0:0"}),
    Variant("f-sgpt50", "SparseGPT 50%", F, "sparsegpt_prune", {"sparsity": 0.5, "percdamp": 0.01}),
    Variant(
        "p-sgpt50", "SparseGPT 50%", P, "sparsegpt", {"sparsity": 0.5, "mask_structure": "0:0", "dampening_frac": 0.01}
    ),
    Variant("f-mag24", "magnitude 2:4", F, "magnitude_prune", {"pattern": "2:4"}),
    Variant("f-wanda24", "Wanda 2:4", F, "wanda_prune", {"pattern": "2:4"}),
    Variant("p-wanda24", "Wanda 2:4", P, "wanda", {"sparsity": 0.5, "mask_structure": "2:4"}),
    Variant("f-sgpt24", "SparseGPT 2:4", F, "sparsegpt_prune", {"pattern": "2:4", "percdamp": 0.01}),
    Variant(
        "p-sgpt24", "SparseGPT 2:4", P, "sparsegpt", {"sparsity": 0.5, "mask_structure": "2:4", "dampening_frac": 0.01}
    ),
    Variant(
        "f-struct25",
        "structured 25% MLP channels",
        F,
        "structured_prune",
        {"unit": "mlp_channels", "fraction": 0.25},
        changed="mlp",
    ),
]
BY_KEY = {v.key: v for v in VARIANTS}


# --- child processes ------------------------------------------------------------------------------


THREADS = 1
"""torch intra-op threads in every child, both tools (set by --threads)."""


def child_env() -> dict:
    # Thread count through the environment, so that both tools' processes start with it.
    threads = {k: str(THREADS) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {
        **os.environ,
        **threads,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def error_lines(text: str, n: int = 6) -> str:
    """The informative lines of a failed child's output: its error lines, else its last lines."""
    lines = [ln.split("\r")[-1].rstrip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln.strip()]
    errors = [ln for ln in lines if re.search(r"^(ERROR|E?\w*Error\b|\w+Exception\b)|Error:", ln.strip())]
    return "\n".join(errors[:n] if errors else lines[-n:]) or "(no output)"


def run_child(cmd: list[str], log: Path, timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """Run one child; {"ok": payload} from its marked JSON line, or {"error": why}. Its output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=child_env(), cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s: {' '.join(cmd[:3])} ..."}
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    found = [ln[len(MARK) :] for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode == 0 and found:
        return json.loads(found[-1])
    return {"error": f"exit {proc.returncode}: " + error_lines(proc.stderr + "\n" + proc.stdout)}


def emit(payload: dict) -> None:
    print(MARK + json.dumps({"ok": payload}), flush=True)


def row_hashes(tokens) -> list[str]:
    return sorted(hashlib.sha256(r.numpy().tobytes()).hexdigest()[:16] for r in tokens)


def child_compress(key: str) -> None:
    """frugalm side: load, compress (timed), save the artifact; report times and what the model was fed."""
    import torch

    from frugalm.models import load_model, save_variant
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context

    v = BY_KEY[key]
    tokens = torch.load(WORK / "calibration.pt")  # (samples, 512) int64
    lm = load_model(STORIES, fast_kernels=False)
    technique = get_technique(v.technique)
    config = technique.config_cls(**v.options)
    seen: list = []  # every row the embedding sees while compressing (proves which tokens calibrated)
    hook = lm.model.get_input_embeddings().register_forward_pre_hook(
        lambda m, args: seen.extend(args[0].reshape(-1, args[0].shape[-1]).cpu())
    )
    ctx = Context(device=lm.device, calibration=tokens if technique.wants_calibration(config) else None)
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    lm.model = technique.apply(lm.model, config, ctx)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    hook.remove()
    save_variant(
        lm.model,
        lm.tokenizer,
        WORK / key,
        {
            "base_model": str(STORIES),
            "technique": v.technique,
            "config": asdict(config),
            "changes": ctx.changes,
            "produce_wall_s": wall,
        },
    )
    emit(
        {
            "wall_s": wall,
            "cpu_s": cpu,
            "load_1min": load,
            "threads": torch.get_num_threads(),
            "calibrated_rows": len(seen),
            "calibration_rows_match": bool(seen) and set(row_hashes(seen)) == set(row_hashes(tokens)),
        }
    )


def child_measure(folder: str, eval_tokens: int, repetitions: int) -> None:
    """Quality against the float32 model, weight statistics, and batch-1 decode speed of one saved model."""
    import torch

    from frugalm.measure.compute import generate_timed
    from frugalm.measure.quality import score_text
    from frugalm.models import load_model
    from frugalm.runtime.modules import kernel_summary
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    lm = load_model(folder)
    ref = load_model(STORIES).model
    encoded = encode_documents(lm.tokenizer, split_documents(read_text(TINYSTORIES)), eval_tokens)
    s = score_text(lm.model, encoded, SEQ_LEN, SEQ_LEN, reference=ref)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    tok_s = []
    for rep in range(1 + repetitions):  # the first is a warm-up
        ids = torch.randint(4, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(rep))
        _, steps = generate_timed(lm.model, ids, NEW_TOKENS, lm.device)
        if rep:
            tok_s.append(len(steps) / sum(steps))
    emit({
        "ppl": float(torch.tensor(s.nll_sum / s.n_predicted).exp()), "kl": s.kl_sum / s.n_predicted, "top1": s.n_agree / s.n_predicted,
        "predicted_tokens": s.n_predicted, "tokens": len(encoded.ids), "decode_tok_s": tok_s, "kernels": kernel_summary(lm.model),
        "threads": torch.get_num_threads(), **weight_stats(lm.model),
    })  # fmt: skip


def weight_stats(model) -> dict:
    """Over the decoder blocks' linears: fraction of zero weights, whether every 4-group has >= 2 zeros, max distinct values in a row."""
    import torch

    zeros = total = groups_ok = groups = levels = 0
    for name, m in model.named_modules():
        if not name.startswith("model.layers.") or not (
            hasattr(m, "dequantized_weight") or isinstance(m, torch.nn.Linear)
        ):
            continue
        w = m.dequantized_weight() if hasattr(m, "dequantized_weight") else m.weight.detach()  # (out, in)
        zeros, total = zeros + int((w == 0).sum()), total + w.numel()
        if w.shape[1] % 4 == 0:  # (out, in/4, 4): does every group of 4 inputs hold >= 2 zeros?
            g = (w == 0).reshape(w.shape[0], -1, 4).sum(-1) >= 2
            groups_ok, groups = groups_ok + int(g.sum()), groups + g.numel()
        levels = max(levels, max(len(torch.unique(r)) for r in w))
    return {
        "zero_frac": zeros / total,
        "frac_4groups_2zeros": groups_ok / groups if groups else None,
        "max_levels_per_row": levels,
    }


# --- llm-compressor (peer) --------------------------------------------------------------------------

PEER_SCRIPT = r'''
"""Run by bench_compression.py in the llm-compressor venv: one oneshot, timed; plain and compressed saves."""
import hashlib, json, os, sys, time
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

spec, model_dir, calib, out, out_compressed = json.loads(sys.argv[1]), *sys.argv[2:6]
o = spec["options"]
from llmcompressor import oneshot
if spec["technique"] == "gptq":
    from llmcompressor.modifiers.quantization import GPTQModifier
    weights = {"num_bits": o["bits"], "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False, "observer": o["observer"]}
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], dampening_frac=o["dampening_frac"], block_size=128, actorder="static",
                          config_groups={"group_0": {"targets": ["Linear"], "weights": weights}})
else:
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[spec["technique"]]
    recipe = cls(targets=["Linear"], ignore=["re:.*lm_head"], **o)

tokens = torch.load(calib)  # (samples, seq_len) int64, the same ids frugalm calibrates on
ds = Dataset.from_dict({"input_ids": tokens.tolist(), "attention_mask": torch.ones_like(tokens).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
keys = set(model.state_dict())
rh = lambda rows: {hashlib.sha256(r.numpy().tobytes()).hexdigest()[:16] for r in rows}
seen = []
hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.extend(a[0].reshape(-1, a[0].shape[-1]).cpu()))
load = os.getloadavg()[0]
t0, c0 = time.perf_counter(), time.process_time()
model = oneshot(model=model, tokenizer=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=len(tokens),
                max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, batch_size=8)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
hook.remove()

# A plain transformers folder (weights as computed, no quantization_config) that any loader reads.
plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
state = {k: v.detach().clone() for k, v in model.state_dict().items() if k in keys}
plain.load_state_dict(state, strict=True)
plain.save_pretrained(out)
tokenizer.save_pretrained(out)
try:  # llm-compressor's own storage format, for its bytes
    model.save_pretrained(out_compressed, save_compressed=True)
    compressed_error = None
except Exception as exc:
    compressed_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
import compressed_tensors, llmcompressor, transformers
fmt = json.load(open(os.path.join(out_compressed, "config.json"))).get("quantization_config", {}) if compressed_error is None else {}
print("@@RESULT@@ " + json.dumps({"ok": {
    "wall_s": wall, "cpu_s": cpu, "load_1min": load, "threads": torch.get_num_threads(), "calibrated_rows": len(seen),
    "calibration_rows_match": bool(seen) and rh(seen) == rh(tokens), "compressed_error": compressed_error,
    "compressed_format": fmt.get("format") or (fmt.get("sparsity_config") or {}).get("format"),
    "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
}}), flush=True)
'''


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def ensure_peer() -> tuple[bool, str]:
    """(usable, notes): reuse .cache/peer-venv when it imports llmcompressor, else create it and pip install."""
    check = [
        str(peer_python()),
        "-c",
        "import llmcompressor, torch, transformers; print(llmcompressor.__version__, torch.__version__, transformers.__version__)",
    ]
    if peer_python().exists():
        got = subprocess.run(check, capture_output=True, text=True, env=child_env())
        if got.returncode == 0:
            return (
                True,
                f"reused {PEER_VENV.relative_to(ROOT)} (llmcompressor, torch, transformers = {got.stdout.strip().splitlines()[-1]})",
            )
        shutil.rmtree(PEER_VENV)
    log = WORK / "peer-install.log"
    t0 = time.perf_counter()
    for cmd in (
        [sys.executable, "-m", "venv", str(PEER_VENV)],
        [str(PEER_VENV / "bin" / "pip"), "install", *PEER_PACKAGES],
    ):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return False, f"`{' '.join(cmd[-3:])}` timed out after 1800 s"
        with log.open("a") as f:
            f.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
        if proc.returncode:
            return (
                False,
                f"`{' '.join(cmd[-3:])}` failed (exit {proc.returncode}; full log {log}):\n{error_lines(proc.stderr + proc.stdout)}",
            )
    got = subprocess.run(check, capture_output=True, text=True, env=child_env())
    if got.returncode:
        return False, f"installed, but `import llmcompressor` fails:\n{error_lines(got.stderr)}"
    return (
        True,
        f"created {PEER_VENV.relative_to(ROOT)} and installed {' '.join(PEER_PACKAGES)} in {time.perf_counter() - t0:.0f} s ({got.stdout.strip().splitlines()[-1]})",
    )


def compress_peer(v: Variant, script: Path) -> dict:
    out, comp = WORK / v.key, WORK / f"{v.key}.compressed"
    for d in (out, comp):
        shutil.rmtree(d, ignore_errors=True)
    spec = json.dumps({"technique": v.technique, "options": v.options})
    return run_child(
        [str(peer_python()), str(script), spec, str(STORIES), str(WORK / "calibration.pt"), str(out), str(comp)],
        WORK / "logs" / f"{v.key}.log",
    )


# --- bytes as stored ----------------------------------------------------------------------------------


def stored_bytes(folder: Path, changed: str) -> int | None:
    """Bytes of the changed layers' tensors in a folder's safetensors files (None when there are none)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if CHANGED[changed].match(k):
                    t = st.get_slice(k)
                    total += _numel(t.get_shape()) * _DTYPE_BYTES[t.get_dtype()]
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


# --- the parent ---------------------------------------------------------------------------------------


def source_hashes() -> dict[str, str]:
    """sha256 (12 hex) of every frugalm source file: a run whose sources changed under it says so."""
    return {
        str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted((ROOT / "src" / "frugalm").rglob("*.py"))
    }


def prepare_calibration(samples: int, eval_tokens: int) -> dict:
    """Sample the calibration windows once (from the documents after the evaluated ones) and save them for every child."""
    import torch
    from transformers import AutoTokenizer

    from frugalm.techniques._calibrate import sample_calibration
    from frugalm.text.encode import encode_documents
    from frugalm.text.files import read_text, split_documents

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    docs = split_documents(read_text(TINYSTORIES))
    evaluated = len(encode_documents(tokenizer, docs, eval_tokens).docs)
    tokens = sample_calibration(tokenizer, docs[evaluated:], samples, SEQ_LEN, 0)
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, WORK / "calibration.pt")
    return {
        "documents": f"{evaluated}..{len(docs) - 1} of {len(docs)}",
        "shape": list(tokens.shape),
        "sha256": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16],
    }


def fmt_bytes(n: int | None, dense: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1024:.1f} ({n / dense:.3f}x)" if dense else f"{n / 1024:.1f}"


def table(rows: list[dict], dense: dict) -> str:
    head = [
        "variant",
        "tool",
        "ppl",
        "Δppl",
        "KL nats",
        "top-1",
        "stored KiB (x fp32)",
        "peer-format KiB",
        "zeros",
        "compress s wall/cpu",
        "decode tok/s",
        "kernel",
    ]
    lines = [head]
    for r in rows:
        m, c = r.get("measure", {}), r.get("compress", {})
        if "error" in r:
            lines.append([r["label"], r["tool"], "FAILED: " + r["error"].splitlines()[0][:90]] + [""] * (len(head) - 3))
            continue
        tok = m["decode_tok_s"]
        kernels = ", ".join(f"{n} {k}" for k, n in sorted(m["kernels"].items()))
        zeros = f"{100 * m['zero_frac']:.1f}%" + (" 2:4✓" if m["frac_4groups_2zeros"] == 1.0 else "")
        lines.append([
            r["label"], r["tool"], f"{m['ppl']:.4f}", f"{100 * (m['ppl'] / dense['ppl'] - 1):+.2f}%" if r["key"] != "dense" else "",
            f"{m['kl']:.4f}", f"{100 * m['top1']:.2f}%", fmt_bytes(r.get("bytes"), r.get("dense_bytes")), fmt_bytes(r.get("peer_format_bytes"), r.get("dense_bytes")) + (f" {c.get('compressed_format') or 'dense'}" if r.get("peer_format_bytes") else ""),
            zeros, f"{c['wall_s']:.1f} / {c['cpu_s']:.1f}" if c else "-", f"{statistics.median(tok):.0f} ± {statistics.stdev(tok):.0f}" if len(tok) > 1 else f"{tok[0]:.0f}", kernels,
        ])  # fmt: skip
    widths = [max(len(str(ln[i])) for ln in lines) for i in range(len(head))]
    out = [" | ".join(str(x).ljust(w) for x, w in zip(ln, widths)) for ln in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def checks(rows: dict[str, dict], dense_ppl: float) -> list[str]:
    ppl = {k: r["measure"]["ppl"] for k, r in rows.items() if "measure" in r}
    wall = {k: r["compress"]["wall_s"] for k, r in rows.items() if r.get("compress")}
    out = []
    for obs in ("minmax", "mse"):
        f, p = f"f-gptq4-{obs}", f"p-gptq4-{obs}"
        if f in ppl and p in ppl:
            rel = ppl[f] / ppl[p] - 1
            ok_q, ok_t = abs(rel) <= 0.01, wall[f] <= wall[p]
            out.append(
                f"(a) GPTQ-4 per-channel, {obs} observer: ppl frugalm {ppl[f]:.4f} vs llm-compressor {ppl[p]:.4f} ({100 * rel:+.2f}%, within 1%: {'PASS' if ok_q else 'FAIL'}); "
                f"wall {wall[f]:.1f} s vs {wall[p]:.1f} s (frugalm no longer: {'PASS' if ok_t else 'FAIL'})"
            )
        else:
            out.append(f"(a) GPTQ-4 {obs}: not checked (missing: {', '.join(k for k in (f, p) if k not in ppl)})")
    for tool, pre in (("frugalm", "f"), ("llm-compressor (for reference)", "p")):
        for pat in ("50", "24"):
            mag, wan, sg = (f"{pre}-{t}{pat}" for t in ("mag", "wanda", "sgpt"))
            if not all(k in ppl for k in (wan, sg) + ((mag,) if pre == "f" else ())):
                out.append(f"(b) {tool} at {'50%' if pat == '50' else '2:4'}: not checked (missing variants)")
                continue
            gap = abs(ppl[sg] - ppl[wan]) / dense_ppl
            order = (
                f"ppl(Wanda) {ppl[wan]:.4f} <= ppl(magnitude) {ppl[mag]:.4f}: {'PASS' if ppl[wan] <= ppl[mag] else 'FAIL'}; "
                if mag in ppl
                else ""
            )
            out.append(
                f"(b) {tool} at {'50%' if pat == '50' else '2:4'}: {order}|SparseGPT {ppl[sg]:.4f} - Wanda {ppl[wan]:.4f}| = {100 * gap:.2f}% of dense: {'PASS' if gap <= 0.05 else 'FAIL'}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-peer", action="store_true", help="run only the frugalm rows")
    parser.add_argument("--samples", type=int, default=128, help="calibration sequences of 512 tokens (default 128)")
    parser.add_argument(
        "--eval-tokens", type=int, default=65_536, help="tokens evaluated for perplexity (default 65,536)"
    )
    parser.add_argument(
        "--repetitions", type=int, default=5, help="timed decode repetitions after one warm-up (default 5)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in every compression and measurement process, both tools (default 1; see the module doc)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    if args.child:
        kind, target = args.child
        return (
            child_compress(target) if kind == "compress" else child_measure(target, args.eval_tokens, args.repetitions)
        )

    t_start, sources = time.perf_counter(), source_hashes()
    me = [sys.executable, str(Path(__file__).resolve())]
    calib = prepare_calibration(args.samples, args.eval_tokens)
    print(
        f"calibration: {calib['shape'][0]} x {calib['shape'][1]} tokens, seed 0, from documents {calib['documents']} (after the evaluated part); token ids sha256 {calib['sha256']}"
    )
    notes = []
    variants = [v for v in VARIANTS if v.tool == F or not args.skip_peer]
    if not args.skip_peer:
        usable, why = ensure_peer()
        print(
            f"llm-compressor: {why}"
            if usable
            else f"llm-compressor could not be installed, so its rows are missing:\n{why}"
        )
        notes.append(f"peer environment: {why}")
        if not usable:
            variants = [v for v in variants if v.tool == F]
    script = Path(tempfile.mkstemp(prefix="bench_compression_peer_", suffix=".py")[1])
    script.write_text(PEER_SCRIPT)

    rows = {"dense": {"key": "dense", "label": "dense float32", "tool": "-", "folder": STORIES}}
    for v in variants:
        print(f"compressing: {v.tool:<14} {v.label} ...", flush=True)
        result = (
            compress_peer(v, script)
            if v.tool == P
            else run_child([*me, "--child", "compress", v.key], WORK / "logs" / f"{v.key}.log")
        )
        row = {"key": v.key, "label": v.label, "tool": v.tool, "folder": WORK / v.key, "changed": v.changed}
        if "error" in result:
            row["error"] = f"compression: {result['error']}"
            print(f"  failed: {result['error']}")
        else:
            row["compress"] = result["ok"]
            print(
                f"  {result['ok']['wall_s']:.1f} s wall, {result['ok']['cpu_s']:.1f} s CPU (1-min load average before: {result['ok']['load_1min']:.1f})",
                flush=True,
            )
        rows[v.key] = row
    script.unlink()

    for key, row in rows.items():
        if "error" in row:
            continue
        print(f"measuring: {row['tool']:<14} {row['label']} ...", flush=True)
        result = run_child(
            [
                *me,
                "--child",
                "measure",
                str(row["folder"]),
                "--eval-tokens",
                str(args.eval_tokens),
                "--repetitions",
                str(args.repetitions),
            ],
            WORK / "logs" / f"{key}.measure.log",
        )
        if "error" in result:
            row["error"] = f"measurement: {result['error']}"
            print(f"  failed: {result['error']}")
            continue
        row["measure"] = result["ok"]
        changed = row.get("changed", "block")
        row["bytes"], row["dense_bytes"] = stored_bytes(Path(row["folder"]), changed), stored_bytes(STORIES, changed)
        if row["tool"] == P and (WORK / f"{key}.compressed").is_dir():
            row["peer_format_bytes"] = stored_bytes(WORK / f"{key}.compressed", changed)

    changed = sorted(k for k, h in source_hashes().items() if sources.get(k) != h)
    if changed:
        notes.append(f"WARNING: frugalm sources changed while this ran, so rows may mix versions: {', '.join(changed)}")
    print_results(rows, calib, notes, args, time.perf_counter() - t_start)


def print_results(rows: dict, calib: dict, notes: list[str], args, wall_s: float) -> None:
    dense = rows["dense"].get("measure")
    if not dense:
        print(f"the dense model could not be measured: {rows['dense'].get('error')}")
        return
    m = dense
    print(
        f"\n=== stories260K: frugalm vs llm-compressor ({m['tokens']:,} evaluation tokens, {m['predicted_tokens']:,} predicted; window 512, stride 512; "
        f"calibration {calib['shape'][0]} x {calib['shape'][1]}; decode: batch 1, {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new, median ± sd of {args.repetitions})"
    )
    if args.eval_tokens == 65_536:
        print(
            f"dense perplexity {m['ppl']:.4f} vs {REFERENCE_PPL} in ../shared/assets/README.md ({100 * (m['ppl'] / REFERENCE_PPL - 1):+.2f}%)"
        )
    print(table(list(rows.values()), dense))
    print("\nacceptance checks:")
    for line in checks(rows, dense["ppl"]):
        print("  " + line)
    compress = [r["compress"] for r in rows.values() if r.get("compress")]
    print("\nnotes:")
    print(
        "  - 'stored KiB' = bytes of the changed layers' tensors in the saved safetensors (frugalm: packed int4 codes + fp16 scales + uint8 zeros; "
        "pruned layers are stored dense; llm-compressor: its plain decompressed folder). 'peer-format KiB' = the same layers in llm-compressor's save_compressed=True folder."
    )
    print(
        "  - int4 layers (kernel 'dequantize') run by unpacking to float32 on every call: no speed kernel on CPU, so their decode speed is a cost, not a speed-up claim. "
        "Zeros from pruning are stored and multiplied densely: no sparse kernel either."
    )
    if compress:
        loads = [c["load_1min"] for c in compress]
        print(
            f"  - compression times were taken on a shared 2-core machine; 1-min load average at the start of each compression: {min(loads):.1f} to {max(loads):.1f}; torch threads per process {compress[0]['threads']} (--threads)."
        )
        bad = [
            r["label"] + " (" + r["tool"] + ")"
            for r in rows.values()
            if r.get("compress")
            and not r["compress"]["calibration_rows_match"]
            and BY_KEY[r["key"]].technique not in ("rtn_quant", "magnitude_prune")
        ]
        dense_rows = [
            statistics.median(r["measure"]["decode_tok_s"])
            for r in rows.values()
            if "measure" in r and set(r["measure"]["kernels"]) == {"dense"}
        ]
        print(
            f"  - decode speed is noisy here: rows that all run the same dense float32 kernel range {min(dense_rows):.0f} to {max(dense_rows):.0f} tok/s (medians), "
            "so differences of that size are load, not the variant. 'zeros' of quantized rows are weights rounded to 0."
        )
        print(
            f"  - calibration rows seen by the embedding during compression equal the sampled ids for every calibrated variant: {'yes' if not bad else 'NO for ' + ', '.join(bad)}"
        )
    for r in rows.values():
        c = r.get("compress") or {}
        if c.get("versions"):
            notes.append(f"peer versions: {c['versions']}")
            break
    for r in rows.values():
        c = r.get("compress") or {}
        if r["tool"] == P and c:
            fmt = c.get("compressed_format") or "none: written dense float32, no quantization or sparsity config"
            notes.append(
                f"{r['label']} (llm-compressor): save_compressed=True format: {fmt}"
                + (f"; save_compressed failed: {c['compressed_error']}" if c.get("compressed_error") else "")
            )
        if "error" in r:
            notes.append(f"{r['label']} ({r['tool']}) FAILED:\n      " + r["error"].replace("\n", "\n      "))
    for n in notes:
        print(f"  - {n}")
    (WORK / "results.json").write_text(
        json.dumps(
            {
                k: {kk: vv for kk, vv in r.items() if kk != "folder"} | {"folder": str(r["folder"])}
                for k, r in rows.items()
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nraw results: {WORK / 'results.json'}; child logs: {WORK / 'logs'}")
    print(f"script wall time: {wall_s:.0f} s")


if __name__ == "__main__":
    main()
