"""Tasks on stories260K: what they separate, a cascade's accuracy against its cost, prompt pruning's price.

    .venv/bin/python benchmarks/bench_tasks.py [--parts separation cascade pruning] [--items 400]

All on ../shared/assets (stories260K, the first 65,536 tokens of TinyStories' validation stories
as the evaluated text; variants are made from the documents after it by the shipped recipes),
one process, tasks as `frugalm bench` scores them (measure/tasks.py: 400 items per task, 128
context tokens, 4 choices, seed 0). Printed:

- separation: for each variant, each task's accuracy (measured), its difference to the baseline
  on the same items with the paired 95% bootstrap interval, the unpaired interval on the same
  items, the ratio of their half-widths, and the least ratio any pairing of items with those two
  accuracies can have (derived: least_ratio);
- cascade: the `cascade` stage's default (the float model as the large one, itself int4 RTN in
  groups of 32 as the small one, threshold chosen on 400 multiple-choice items of the training
  part of the text), evaluated on the evaluated items: accuracy, escalated fraction, FLOPs
  (counted) and time (measured, alternating passes) against the large model alone; then, on the
  evaluated items, every threshold's front and the cheapest cost within 1 point of the large
  model, per confidence measure. With --distilled, the same with a 2-of-5-block student distilled
  from the model (400 steps) as the small model;
- pruning: prompt pruning of 30% of prompt tokens (scorer: 0 or 1 of the model's blocks, the
  last 32 tokens kept): each task's accuracy difference to the unpruned model with its paired
  interval, and prefill FLOPs per prompt token (counted, scorer included) at 128 and 256 tokens.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT.parent / "shared" / "assets"
STORIES = ASSETS / "models" / "stories260K"
TEXT = ASSETS / "data" / "tinystories_valid_0000-0499.txt"
CACHE = ROOT / ".cache" / "bench_tasks"


def variant(name: str, stages: list[dict]) -> Path:
    """A variant of stories260K made by `stages` (cached under .cache/)."""
    from frugalm.benchmark.api import BenchConfig
    from frugalm.recipe import parse_recipe
    from frugalm.run import RunConfig, run_recipe

    out = CACHE / name
    if not (out / "frugalm.json").is_file():
        recipe, problems = parse_recipe({"version": 1, "name": name, "stages": stages})
        assert not problems, problems
        run_recipe(recipe, STORIES, RunConfig(out_dir=str(out), bench=BenchConfig(data=str(TEXT)), measure=False))
    return out


def shipped(name: str) -> Path:
    import yaml

    return variant(name, yaml.safe_load((ROOT / "src/frugalm/recipes" / f"{name}.yaml").read_text())["stages"])


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def separation(base, docs, protocol) -> None:
    from frugalm.measure.tasks import measure_tasks
    from frugalm.models import load_model

    print("\n## separation: difference to the baseline in points, paired 95% interval; unpaired; half-width ratio")
    for name in ("wanda-2of4", "int4-rtn", "int8", "int8-w8a16"):
        v = load_model(shipped(name))
        for m in measure_tasks(v.model, v.tokenizer, docs, protocol, data_desc={}, reference=base.model):
            p = m.protocol["paired"]
            (lo, hi), (ulo, uhi) = p["ci"], p["ci_unpaired"]
            verdict = "tie" if lo <= 0 <= hi else ("worse" if hi < 0 else "better")
            print(f"{name:11s} {m.metric:10s} {m.value:.3f} (base {p['reference_value']:.3f})  Δ {pts(p['delta'])} "
                  f"[{pts(lo)}, {pts(hi)}] {verdict:6s} unpaired [{pts(ulo)}, {pts(uhi)}]  "
                  f"ratio {(hi - lo) / (uhi - ulo):.2f} (least possible {least_ratio(m.value, p['reference_value']):.2f})  "
                  f"discordant {p['discordant']}/{p['items']}")  # fmt: skip


def least_ratio(a: float, b: float) -> float:
    """The least paired/unpaired standard-deviation ratio any pairing of 0/1 item scores with
    accuracies a and b can have: a paired difference's variance is (p10 + p01) - d^2 with
    p10 - p01 = d = a - b, so at least |d|(1 - |d|) (no item the worse model gets right that the
    better one misses), against a(1 - a) + b(1 - b) unpaired. A large loss cannot have a narrow
    paired interval: 2:4 Wanda's cloze drop makes pairing gain little, whatever the items."""
    d = abs(a - b)
    unpaired = a * (1 - a) + b * (1 - b)
    return (d * (1 - d) / unpaired) ** 0.5 if unpaired else 1.0


def cascade(base, docs, protocol, distilled: bool) -> None:
    from dataclasses import replace

    from frugalm.measure.tasks import measure_tasks
    from frugalm.models import load_model

    smalls = {"int4 RTN g32 (default)": [{"technique": "cascade"}]}
    if distilled:
        student = variant("distilled-2of5", [{"technique": "distill", "keep_layers": 0.4, "steps": 400}])
        smalls["distilled 2 of 5 blocks"] = [{"technique": "cascade", "small": str(student)}]
    for label, stages in smalls.items():
        v = load_model(variant("cascade-" + label.split()[0], stages))
        figures = {m.metric: m for m in measure_tasks(v.model, v.tokenizer, docs, replace(protocol, tasks=("choice",)),
                                                      data_desc={}, reference=base.model)}  # fmt: skip
        acc = figures["acc_choice"]
        c, p = acc.protocol["cascade"], acc.protocol["paired"]
        print(f"\n## cascade, small = {label}: tau {c['tau']:.4f} on {c['confidence']} (chosen on training items)")
        print(f"small alone {c['small_accuracy']:.4f}, large alone {c['large_accuracy']:.4f}, cascade {acc.value:.4f}"
              f" (Δ to large {pts(p['delta'])} pts [{pts(p['ci'][0])}, {pts(p['ci'][1])}] paired); escalated "
              f"{c['escalated_frac']:.3f}; FLOPs {c['cost_ratio']:.3f}x, time {c['time_ratio']:.3f}x the large model alone")  # fmt: skip
        for cost, analysis in c["sweep_on_these_items"].items():
            print(f"  {cost}: small alone costs {analysis['small_cost_ratio']:.3f}x; within 1 point of the large model, "
                  "cheapest threshold on these items (in-sample):")  # fmt: skip
            for measure, found in analysis["measures"].items():
                ch = found["chosen"]
                print(f"    {measure:8s} tau {ch['tau']:.4f}: accuracy {ch['accuracy']:.4f}, escalated {ch['escalated']:.3f}, "
                      f"cost {ch['cost_ratio']:.3f}x ({len(found['front'])} points on the front)")  # fmt: skip


def pruning(base, docs, protocol) -> None:
    from frugalm.measure import compute
    from frugalm.measure.tasks import measure_tasks
    from frugalm.measure.workloads import Workload
    from frugalm.models import load_model

    print("\n## prompt pruning, 30% of prompt tokens, last 32 kept")
    for layers in (0, 1):
        v = load_model(variant(f"pruning30-l{layers}", [{"technique": "prompt_pruning", "scorer_layers": layers}]))
        for m in measure_tasks(v.model, v.tokenizer, docs, protocol, data_desc={}, reference=base.model):
            p = m.protocol["paired"]
            print(f"scorer {layers} blocks  {m.metric:10s} {m.value:.3f} (unpruned {p['reference_value']:.3f})  "
                  f"Δ {pts(p['delta'])} pts [{pts(p['ci'][0])}, {pts(p['ci'][1])}] paired")  # fmt: skip
        for n in (128, 256):
            w = Workload("p", prompt_tokens=n, output_tokens=2, batch_size=1, description="")
            dense, _ = compute.flops_per_token(base.model, w, "cpu")
            pruned, _ = compute.flops_per_token(v.model, w, "cpu")
            print(f"scorer {layers} blocks  prefill of {n} tokens: {pruned:,} FLOP/tok against {dense:,} "
                  f"({pruned / dense:.3f}x, counted, scorer included)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["separation", "cascade", "pruning"])
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--distilled", action="store_true", help="also a cascade with a distilled 2-block small model")
    args = ap.parse_args()
    from frugalm.measure.tasks import TaskProtocol
    from frugalm.models import load_model
    from frugalm.text.encode import evaluated_documents

    base = load_model(STORIES)
    docs = evaluated_documents(TEXT, base.tokenizer, 65_536)
    protocol = TaskProtocol(tasks=("cloze", "choice"), items=args.items)
    print(f"stories260K; {len(docs)} evaluated documents of {TEXT.name}; {args.items} items per task")
    if "separation" in args.parts:
        separation(base, docs, protocol)
    if "cascade" in args.parts:
        cascade(base, docs, protocol, args.distilled)
    if "pruning" in args.parts:
        pruning(base, docs, protocol)


if __name__ == "__main__":
    main()
