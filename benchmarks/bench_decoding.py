"""Decoding strategies side by side with plain greedy decoding, and the drafts they need.

    .venv/bin/python benchmarks/bench_decoding.py [--steps 400] [--keep-layers 0.5] [--budget 20] [--out FILE]
        [--parts strategies drafts confidence] [--models stories260K built-in]

Everything in one process, one torch thread, batch 1, float32. Models: stories260K (its own
TinyStories text) and the built-in model (Python code). Prompts: the first 128 tokens of 8
held-out documents (the first 8 documents with at least 129 tokens, which no training here
reads); 64 new tokens each, greedy.

For each strategy it prints:
- identical: prompts whose output equals plain greedy decoding token for token (of 8);
- acceptance rate, guesses kept per round, target forwards per token (counted over the 8);
- speedup: whole generations (prefill included) decoded plainly over with the strategy, paired
  ABBA blocks cycling through the 8 prompts (measure/paired.py), with its 95% interval.

Drafts: `speculative`'s distilled draft (a layer-dropped copy keeping `--keep-layers` of the blocks, trained
`--steps` steps, batch 16 x 256 tokens, on the documents after the held-out ones, soft targets
alpha 0.9, T 2) against the same student trained with the next-token loss only (alpha 0): their
held-out perplexity (the 8 prompts' documents, 4,096 tokens, windows of 256) and acceptance; then
the distilled draft with each round's steps compiled into one graph (CompiledDraftProposer, k 3-5;
its compilation, tens of seconds per k, happens in the identity check, before any timing).

Confidence exit (lossy, `early_exit` mode confidence): every token may exit from block
`--exit-from` on (default half the depth) once its top probability reaches 0.5, 0.7 or 0.9; printed: blocks run per token, agreement of
its greedy output with plain greedy (position by position), held-out perplexity scored token by
token through the exit against the full model's, and the paired speedup.

Run alone: it times speed, and 2 shared cores swing with any other load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_foundation import STORIES, TINYSTORIES  # noqa: E402

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 128, 64


def _setup(model_ref, data):
    import torch

    from frugalm.models import load_model
    from frugalm.text.files import read_text, split_documents

    lm = load_model(model_ref, fast_kernels=False)
    docs = split_documents(read_text(data))
    held, prompts = [], []
    for i, doc in enumerate(docs):
        ids = lm.tokenizer(doc).input_ids
        if len(ids) > PROMPT_TOKENS:
            held.append(i)
            prompts.append(torch.tensor([ids[:PROMPT_TOKENS]]))
        if len(prompts) == PROMPTS:
            break
    train = [d for i, d in enumerate(docs) if i > held[-1]]
    return lm, prompts, [docs[i] for i in held], train


def _apply(name, model, ctx, **options):
    from frugalm.recipe import build_config
    from frugalm.registry import get_technique

    technique = get_technique(name)
    config, problems = build_config(technique.config_cls, options, name)
    assert not problems, problems
    return technique.apply(model, config, ctx)


def _ppl(model, tokenizer, docs) -> float:
    from frugalm.measure.quality import score_text
    from frugalm.text.encode import encode_documents

    s = score_text(model, encode_documents(tokenizer, docs, 4096), 256, 256)
    return math.exp(s.nll_sum / s.n_predicted)


def _strategy_row(label, model, proposer, k, prompts, budget) -> dict:
    from frugalm.measure.compute import Strategy
    from frugalm.measure.paired import PairedConfig
    from frugalm.measure.speedup import generation_call, paired_figure
    from frugalm.measure.workloads import Workload
    from frugalm.runtime import decoding

    strategy = Strategy({"k": k}, proposer, prompts)
    identical = 0
    for ids in prompts:
        plain = decoding.generate(model, ids, NEW_TOKENS)
        identical += strategy.generate(model, ids, NEW_TOKENS) == plain
    stats = strategy.stats
    w = Workload("bench", PROMPT_TOKENS, NEW_TOKENS, 1, "bench_decoding")
    config = PairedConfig(budget_s=budget, target_halfwidth=0.02)
    fig = paired_figure("speedup_strategy", w, generation_call(model, w, prompts, None, strategy),
                        generation_call(model, w, prompts, None, None), config, model.device, "bench")  # fmt: skip
    row = {
        "strategy": label, "k": k, "identical": identical, "prompts": len(prompts),
        "accept_rate": stats.accept_rate, "accept_len_mean": stats.accept_len_mean,
        "target_fwd_per_tok": stats.target_fwd_per_tok, "speedup": fig.value, "ci": fig.protocol["ci"],
        "blocks": fig.n,
    }  # fmt: skip
    print(
        f"  {label:<34} k={k}  identical {identical}/{len(prompts)}  accept {_f(stats.accept_rate)}  "
        f"kept/round {_f(stats.accept_len_mean)}  fwd/tok {_f(stats.target_fwd_per_tok)}  "
        f"speedup {fig.value:.3f}x [{fig.protocol['ci'][0]:.3f}, {fig.protocol['ci'][1]:.3f}] ({fig.n} blocks)",
        flush=True,
    )
    return row


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _drafts(lm, held, train, steps: int, keep: float) -> tuple[dict, object]:
    import copy

    from frugalm.runtime.decoding import draft_of
    from frugalm.techniques.base import Context

    out, drafts = {}, {}
    for alpha in (0.9, 0.0):
        ctx = Context(
            tokenizer=lm.tokenizer, training_documents=train, held_out_documents=held, training_source="bench"
        )
        t0 = time.perf_counter()
        target = _apply("speculative", copy.deepcopy(lm.model), ctx, steps=steps, batch_size=16, seq_len=256,
                        keep_layers=keep, alpha=alpha, k=3)  # fmt: skip
        draft = draft_of(target)
        drafts[alpha] = draft
        out[f"alpha={alpha}"] = {
            "held_out_ppl": _ppl(draft, lm.tokenizer, held),
            "layers": draft.config.num_hidden_layers,
            "train_s": time.perf_counter() - t0,
        }
    a, b = out["alpha=0.9"]["held_out_ppl"], out["alpha=0.0"]["held_out_ppl"]
    out["distilled_gain"] = 1 - a / b
    print(
        f"  draft ({out['alpha=0.9']['layers']} layers, {steps} steps): distilled ppl {a:.3f}, "
        f"no teacher {b:.3f}: {100 * out['distilled_gain']:.1f}% lower; target {_ppl(lm.model, lm.tokenizer, held):.3f}",
        flush=True,
    )
    return out, drafts


def _confidence_rows(lm, prompts, held, budget, first: int) -> list[dict]:
    """The lossy confidence exit at three thresholds: speed, agreement, blocks per token, perplexity through the exit."""
    from frugalm.measure.compute import Strategy
    from frugalm.measure.paired import PairedConfig
    from frugalm.measure.speedup import generation_call, paired_figure
    from frugalm.measure.workloads import Workload
    from frugalm.runtime import decoding
    from frugalm.runtime.modules import INFERENCE_ATTR

    model, rows = lm.model, []
    n = model.config.num_hidden_layers
    full_ppl = _ppl(model, lm.tokenizer, held)
    w = Workload("bench", PROMPT_TOKENS, NEW_TOKENS, 1, "bench_decoding")
    for threshold in (0.5, 0.7, 0.9):
        setting = {"method": "confidence_exit", "layers": first, "threshold": threshold, "blocks": "model.layers",
                   "norm": "model.norm", "rotary": "model.rotary_emb"}  # fmt: skip
        strategy = Strategy(setting, None, prompts)
        agree = total = 0
        for ids in prompts:
            plain = decoding.generate(model, ids, NEW_TOKENS)
            out = strategy.generate(model, ids, NEW_TOKENS)
            agree += sum(a == b for a, b in zip(out, plain))
            total += len(plain)
        setattr(model, INFERENCE_ATTR, {"decoding": setting})
        ppl = _ppl(model, lm.tokenizer, held)  # scored token by token through the exit
        setattr(model, INFERENCE_ATTR, {})
        fig = paired_figure("speedup_strategy", w, generation_call(model, w, prompts, None, strategy),
                            generation_call(model, w, prompts, None, None), PairedConfig(budget_s=budget, target_halfwidth=0.02),
                            model.device, "bench")  # fmt: skip
        row = {"threshold": threshold, "blocks_per_tok": strategy.stats.blocks_per_tok, "greedy_agree": agree / total,
               "ppl": ppl, "ppl_full": full_ppl, "speedup": fig.value, "ci": fig.protocol["ci"]}  # fmt: skip
        print(
            f"  confidence exit from block {first} of {n}, threshold {threshold}: blocks/token {row['blocks_per_tok']:.2f}  "
            f"greedy agreement {row['greedy_agree']:.3f}  ppl {ppl:.3f} (full {full_ppl:.3f}, {100 * (ppl / full_ppl - 1):+.1f}%)  "
            f"speedup {fig.value:.3f}x [{fig.protocol['ci'][0]:.3f}, {fig.protocol['ci'][1]:.3f}]",
            flush=True,
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="distillation steps of each draft")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of paired timing per figure")
    parser.add_argument(
        "--keep-layers", type=float, default=0.5, help="drafts: fraction of the model's blocks they keep"
    )
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--models", nargs="+", default=["stories260K", "built-in"], choices=["stories260K", "built-in"])
    parser.add_argument("--parts", nargs="+", default=["strategies", "drafts", "confidence"],
                        choices=["strategies", "drafts", "confidence"], help="what to measure")  # fmt: skip
    parser.add_argument(
        "--exit-from", type=int, help="confidence exit: first block a token may exit after (default: half the depth)"
    )
    args = parser.parse_args()

    import torch

    from frugalm.assets import DEFAULT_EVAL_PATH
    from frugalm.runtime.decoding import CompiledDraftProposer, DraftProposer, PromptLookupProposer, layer_view

    torch.set_num_threads(1)
    results = {}
    for name, ref, data in [("stories260K", STORIES, TINYSTORIES), ("built-in", None, DEFAULT_EVAL_PATH)]:
        if name not in args.models:
            continue
        print(f"{name}:", flush=True)
        lm, prompts, held, train = _setup(ref, data)
        model = lm.model
        rows, drafts = [], None
        if "strategies" in args.parts:
            for k in (2, 4):
                rows.append(
                    _strategy_row(
                        "prompt lookup (n-gram 3..1)", model, PromptLookupProposer(3, 1), k, prompts, args.budget
                    )
                )
            n_layers = model.config.num_hidden_layers
            for layers in sorted({1, n_layers // 2}):
                view = layer_view(model, "model.layers", layers)
                rows.append(
                    _strategy_row(
                        f"early exit, first {layers} of {n_layers} blocks",
                        model,
                        DraftProposer(view),
                        2,
                        prompts,
                        args.budget,
                    )
                )
            view = layer_view(model, "model.layers", n_layers // 2)
            for k in (2, 3):  # the half-depth view's rounds compiled (compiles once per k)
                label = f"early exit, first {n_layers // 2}, compiled rounds"
                rows.append(_strategy_row(label, model, CompiledDraftProposer(view, k), k, prompts, args.budget))
        if "drafts" in args.parts:
            drafts, models = _drafts(lm, held, train, args.steps, args.keep_layers)
            for alpha, draft in models.items():
                label = "distilled draft" if alpha else "draft trained without teacher"
                for k in (1, 2, 3):
                    rows.append(_strategy_row(label, model, DraftProposer(draft), k, prompts, args.budget))
            for k in (3, 4, 5):  # each round's draft steps in one compiled graph (compiles once per k)
                proposer = CompiledDraftProposer(models[0.9], k)
                rows.append(_strategy_row("distilled draft, compiled rounds", model, proposer, k, prompts, args.budget))
        confidence = None
        if "confidence" in args.parts:
            first = args.exit_from or max(1, model.config.num_hidden_layers // 2)
            confidence = _confidence_rows(lm, prompts, held, args.budget, first)
        results[name] = {"rows": rows, "drafts": drafts, "confidence": confidence}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
