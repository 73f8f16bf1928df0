"""Training-side acceptance figures on stories260K: distillation and LoRA recovery after pruning.

    .venv/bin/python benchmarks/bench_training.py [--steps N] [--threads N]

Protocol (printed with the figures):
- Text: ../shared/assets/data/tinystories_valid_0000-0499.txt. Held out: its first HELD_OUT_TOKENS
  tokens as `frugalm bench --data FILE --eval-tokens HELD_OUT_TOKENS` evaluates them (documents
  encoded as [BOS] + tokens, concatenated, cut there); training and calibration read only the
  documents after the last evaluated one (frugalm.run.evaluation_split).
- Perplexity: frugalm.measure.quality.score_text over those held-out tokens, windows of 512
  tokens every 256 (the benchmark's default protocol), per token.
- (a) Distillation: teacher stories260K (5 layers); student = the teacher with layers dropped to
  keep_layers 0.5 (2 of 5, layers 0 and 4, initialised from them). Distilled (alpha 0.5, T 2) vs
  the same student trained on next-token loss alone (alpha 0): same steps, seed, windows, init.
- (b) Wanda 50% unstructured (128 calibration windows of 256 tokens from the training part),
  then LoRA (rank 8 on every attention and MLP projection) for a fixed budget. Fraction of the
  perplexity increase removed = (ppl_pruned - ppl_lora) / (ppl_pruned - ppl_dense). The adapter
  model (merge: false) and the merged model are both scored; the merged model is dense again
  (B A fills the pruned zeros): the sparsity is traded for the recovery, and the table says so.
- (c) The same LoRA recovery with importance-sampled windows (IMPORTANCE: a pool of 256 random
  windows rescored every 50 steps, batches drawn with p proportional to the loss, 10% uniform),
  merged, against the uniform run's merged model: same steps, seed and init; its cost includes
  the scoring forward passes.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
MODEL = ASSETS / "models" / "stories260K"
DATA = ASSETS / "data" / "tinystories_valid_0000-0499.txt"
HELD_OUT_TOKENS = 40_000
IMPORTANCE = {
    "sampling": "importance",
    "sampling_pool": 256,
    "rescore_every": 50,
    "sampling_power": 1.0,
    "sampling_mix": 0.1,
}
WINDOW, STRIDE = 512, 256


def held_out_split(tokenizer):
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.quality import PerplexityProtocol
    from frugalm.run import evaluation_split
    from frugalm.text.encode import encode_documents

    held_out, rest, source = evaluation_split(
        tokenizer, BenchConfig(data=str(DATA), protocol=PerplexityProtocol(max_tokens=HELD_OUT_TOKENS))
    )
    return encode_documents(tokenizer, held_out, HELD_OUT_TOKENS), held_out, rest, source


def perplexity(model, encoded) -> float:
    from frugalm.measure.quality import score_text

    s = score_text(model, encoded, WINDOW, STRIDE)
    return math.exp(s.nll_sum / s.n_predicted)


def stage(name: str, model, ctx, **options):
    from frugalm.recipe import build_config
    from frugalm.registry import get_technique

    technique = get_technique(name)
    config, problems = build_config(technique.config_cls, options, name)
    if problems:
        raise SystemExit("; ".join(problems))
    t0 = time.perf_counter()
    out = technique.apply(model, config, ctx)
    return out, time.perf_counter() - t0, ctx.changes[-1]


def context(lm, held_out, rest, source, calibration=None):
    from frugalm.techniques.base import Context

    return Context(
        tokenizer=lm.tokenizer,
        training_documents=rest,
        held_out_documents=held_out,
        training_source=source,
        calibration=calibration,
    )


def cost(change: dict) -> str:
    t = change["training"]
    return f"{t['wall_s']:.1f} s, {t['flops'] / 1e12:.2f} TFLOP counted ({t['flops_analytic_6nt'] / 1e12:.2f} by 6NT), {t['tokens_seen']:,} tokens, {t['energy_j']:.0f} J ({t['energy_method']})"


def distillation(budget: dict, encoded, split) -> list[tuple[str, str]]:
    from frugalm.models import load_model

    rows = []
    teacher = load_model(MODEL, fast_kernels=False)
    rows.append(("teacher stories260K (5 layers)", f"ppl {perplexity(teacher.model, encoded):.3f}"))
    results = {}
    for label, alpha in (("distilled", 0.5), ("no teacher", 0.0)):
        lm = load_model(MODEL, fast_kernels=False)
        student, _, change = stage(
            "distill", lm.model, context(lm, *split), **budget, keep_layers=0.5, alpha=alpha, temperature=2.0
        )
        results[label] = perplexity(student, encoded)
        rows.append(
            (
                f"student {change['teacher_layers_kept']} {label} (alpha {alpha})",
                f"ppl {results[label]:.3f}; loss {change['training']['final_loss']:.3f}; {cost(change)}",
            )
        )
    verdict = "PASS" if results["distilled"] < results["no teacher"] else "FAIL"
    rows.append(("(a) distilled < no teacher", f"{results['distilled']:.3f} vs {results['no teacher']:.3f}: {verdict}"))
    return rows


def lora_recovery(budget: dict, encoded, split) -> list[tuple[str, str]]:
    from frugalm.models import load_model
    from frugalm.techniques._calibrate import sample_calibration
    from frugalm.techniques.lora_finetune import merge_adapters

    lm = load_model(MODEL, fast_kernels=False)
    dense = perplexity(lm.model, encoded)
    calibration = sample_calibration(lm.tokenizer, split[1], 128, 256, seed=0)
    ctx = context(lm, *split, calibration=calibration)
    pruned, prune_s, change = stage("wanda_prune", lm.model, ctx, sparsity=0.5)
    ppl_pruned = perplexity(pruned, encoded)
    selected, _, selected_change = stage("lora_finetune", copy.deepcopy(pruned), ctx, **budget, rank=8, **IMPORTANCE)
    ppl_selected = perplexity(selected, encoded)
    adapted, _, lora_change = stage("lora_finetune", pruned, ctx, **budget, rank=8, merge=False)
    ppl_adapter = perplexity(adapted, encoded)
    merged, _ = merge_adapters(adapted, None)
    ppl_merged = perplexity(merged, encoded)
    removed = (ppl_pruned - ppl_adapter) / (ppl_pruned - dense)
    merge_diff = abs(ppl_merged / ppl_adapter - 1)
    zeros = sum(int((m.weight == 0).sum()) for n, m in merged.named_modules() if n in change["layers"])
    total = sum(m.weight.numel() for n, m in merged.named_modules() if n in change["layers"])
    return [
        ("dense stories260K", f"ppl {dense:.3f}"),
        ("wanda 50% (no recovery)", f"ppl {ppl_pruned:.3f} (+{ppl_pruned - dense:.3f}); pruning {prune_s:.1f} s"),
        (
            f"+ LoRA r8, adapters ({lora_change['adapter_params']:,} params)",
            f"ppl {ppl_adapter:.3f}; {cost(lora_change)}",
        ),
        (
            "+ LoRA r8, merged",
            f"ppl {ppl_merged:.3f}; sparsity of pruned layers after merge {zeros / total:.1%} (B A fills the zeros)",
        ),
        ("(b) increase removed (target >= 30%)", f"{removed:.1%}: {'PASS' if removed >= 0.30 else 'FAIL'}"),
        ("(b) merged vs adapter ppl (target <= 0.1%)", f"{merge_diff:.5%}: {'PASS' if merge_diff <= 1e-3 else 'FAIL'}"),
        (
            f"(c) + LoRA r8, importance-sampled windows {IMPORTANCE}",
            f"ppl {ppl_selected:.3f} vs uniform {ppl_merged:.3f} ({ppl_selected / ppl_merged - 1:+.2%}); {cost(selected_change)}",
        ),
        ("(c) selection", selection(selected_change)),
    ]


def selection(change: dict) -> str:
    s = change["training"]["settings"]["sampling"]
    pool = sum(s["pool_mean_loss_nats"]) / len(s["pool_mean_loss_nats"])
    return (
        f"{s['rescores']} rescorings of {s['pool_windows']} windows, scoring {s['scoring_flops'] / 1e12:.2f} TFLOP counted (included above); "
        f"drawn windows' mean loss {s['drawn_mean_loss_nats']:.3f} nats vs pools' {pool:.3f}"
    )


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of each run (the fixed budget)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (results are bitwise reproducible per thread count)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no weight-loading bars or sequence-length notes between the figures
    hf_logging.disable_progress_bar()
    from frugalm.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(MODEL))
    encoded, held_out, rest, source = held_out_split(tokenizer)
    split = (held_out, rest, source)
    budget = {"steps": args.steps, "batch_size": 16, "seq_len": 256, "warmup_steps": 20, "log_every": 50, "seed": 0}
    print(
        f"held out: {encoded.ids.numel():,} tokens ({len(held_out)} documents) of {DATA.name}; training text: {source} ({len(rest)} documents)"
    )
    print(
        f"perplexity: per token, windows of {WINDOW} every {STRIDE}; budget per training run: {budget}; torch threads {args.threads}"
    )
    t0 = time.perf_counter()
    rows = distillation(budget, encoded, split) + lora_recovery(budget, encoded, split)
    width = max(len(r[0]) for r in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
