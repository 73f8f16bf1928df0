"""`frugalm run`: apply a recipe's stages to a model, save the variant, measure it, store it.

recipe ──▶ model + tokenizer ──▶ stage after stage (timed) ──▶ artifact folder (complete or
absent) ──▶ `bench` in a fresh child, with the original model as the fidelity reference ──▶ the
store, with the resolved recipe, what each stage changed and the time it took to produce.

Calibration text, when a stage needs it, is the recipe's `calibration.data`; without one it is
drawn from the part of the evaluation text that the benchmark does not evaluate (the documents
after its first `--eval-tokens` tokens), so calibration never sees the evaluated text.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from frugalm.bench import BenchConfig, BenchResult, bench, evaluation_text
from frugalm.data import read_text, split_documents
from frugalm.errors import DataError
from frugalm.measure.metrics import Measurement
from frugalm.measure.runner import Progress
from frugalm.recipe import Recipe, recipe_to_dict
from frugalm.registry import get_technique
from frugalm.store import Store


@dataclass(frozen=True)
class RunConfig:
    out_dir: str | None = None
    """Where the variant artifact is saved (default: ./frugalm-out/<recipe name>)."""
    bench: BenchConfig = BenchConfig()
    measure: bool = True


@dataclass
class RunResult:
    artifact: Path
    metadata: dict
    bench: BenchResult | None


def run_recipe(recipe: Recipe, model: str | os.PathLike | None = None, config: RunConfig = RunConfig(), *, store: Store | str | os.PathLike | None = None, progress: Progress | None = None, key: str | None = None) -> RunResult:
    from frugalm.models import load_model, resolve_model, save_variant

    source = resolve_model(model or recipe.model)
    out_dir = Path(config.out_dir or Path("frugalm-out") / recipe.name)
    lm = load_model(source.path, device=config.bench.device, dtype=config.bench.dtype, fast_kernels=False)
    calibration, calibration_desc = _calibration(recipe, lm, config.bench)
    from frugalm.techniques.base import Context

    ctx = Context(device=lm.device, calibration=calibration, progress=progress)
    timings = []
    t_total = time.perf_counter()
    for i, stage in enumerate(recipe.stages):
        technique = get_technique(stage.technique)
        t0 = time.perf_counter()
        lm.model = technique.apply(lm.model, stage.config, ctx)
        timings.append({"stage": i, "technique": stage.technique, "version": technique.version, "wall_s": time.perf_counter() - t0})
    produce_s = time.perf_counter() - t_total
    metadata = {
        "base_model": source.ref,
        "base_model_path": str(source.path),
        "recipe": recipe_to_dict(recipe),
        "stages": timings,
        "changes": ctx.changes,
        "produce_wall_s": produce_s,
        "calibration": calibration_desc,
    }
    artifact = save_variant(lm.model, lm.tokenizer, out_dir, metadata)
    if not config.measure:
        return RunResult(artifact, metadata, None)
    bench_config = replace(config.bench, reference=str(source.path))
    produce = Measurement("produce_wall_s", produce_s, "s", "measured", protocol={"stages": timings, "device": str(lm.device)})
    result = bench(artifact, bench_config, store=store, progress=progress, kind="variant", record={"variant": metadata}, extra=[produce], key=key)
    return RunResult(artifact, metadata, result)


def _calibration(recipe: Recipe, lm, bench_config: BenchConfig):
    """Calibration tokens when a stage needs them, and a description for the artifact."""
    from frugalm.measure.quality import encode_documents
    from frugalm.models import context_length
    from frugalm.techniques.calibrate import sample_calibration

    tokenizer = lm.tokenizer
    if not any(get_technique(s.technique).wants_calibration(s.config) for s in recipe.stages):
        return None, None
    cal = recipe.calibration
    if cal.data:
        docs, source = split_documents(read_text(cal.data)), cal.data
    else:
        text, path = evaluation_text(bench_config.data)
        all_docs = split_documents(text)
        evaluated = len(encode_documents(tokenizer, all_docs, bench_config.protocol.max_tokens).docs)
        docs, source = all_docs[evaluated:], f"{path or '(built-in evaluation text)'}: documents {evaluated}.. (after the evaluated part)"
        if not docs:
            raise DataError("the stages need calibration text and the evaluation text has none left over after the evaluated part; add `calibration: {data: FILE}` to the recipe")
    seq_len = min(cal.seq_len, context_length(lm.model.config) or cal.seq_len)
    tokens = sample_calibration(tokenizer, docs, cal.samples, seq_len, cal.seed)
    return tokens, {"source": source, "samples": cal.samples, "seq_len": seq_len, "seed": cal.seed}
