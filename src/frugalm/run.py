"""`frugalm run`: apply a recipe's stages to a model, save the variant, measure it, store it.

recipe ──▶ model + tokenizer ──▶ stage after stage (timed) ──▶ artifact folder (complete or
absent) ──▶ `bench` in a fresh child, with the original model as the fidelity reference ──▶ the
store, with the resolved recipe, what each stage changed and the time it took to produce.

Calibration text, when a stage needs it, is the recipe's `calibration.data`; without one it is
drawn from the part of the evaluation text that the benchmark does not evaluate (the documents
after its first `--eval-tokens` tokens), so calibration never sees the evaluated text. Training
stages read the same remainder unless given their own `data:` file, and drop any evaluated
document from it; each stage checkpoints into a hidden folder beside the artifact, so rerunning
a killed recipe resumes its training. What training cost (FLOPs, tokens, energy, USD) is stored
as figures beside the inference ones.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from frugalm.assets import DEFAULT_EVAL_PATH
from frugalm.atomic import check_output_folder
from frugalm.benchmark.api import BenchConfig, BenchResult, bench
from frugalm.benchmark.runner import Progress
from frugalm.errors import ConfigError, DataError, MeasurementError
from frugalm.measure.cost import get_profile, usd
from frugalm.measure.metrics import Measurement
from frugalm.models import context_length, load_model, resolve_model, save_variant
from frugalm.recipe import Recipe, name_problems, recipe_to_dict
from frugalm.registry import get_technique
from frugalm.store import Store
from frugalm.techniques._calibrate import sample_calibration
from frugalm.techniques.base import Context
from frugalm.text.encode import evaluated_documents
from frugalm.text.files import iter_documents


@dataclass(frozen=True)
class RunConfig:
    out_dir: str | None = None
    """Where the variant artifact is saved (default: ./frugalm-out/<recipe name>)."""
    bench: BenchConfig = BenchConfig()
    measure: bool = True
    force: bool = False
    """Replace an existing output folder that frugalm did not write (by default refused)."""


@dataclass
class RunResult:
    artifact: Path
    metadata: dict
    bench: BenchResult | None
    screened_out: str | None = None
    """Why `screen` stopped the run before its measurement, if it did."""


def run_recipe(
    recipe: Recipe,
    model: str | os.PathLike | None = None,
    config: RunConfig = RunConfig(),
    *,
    store: Store | str | os.PathLike | None = None,
    progress: Progress | None = None,
    key: str | None = None,
    screen: Callable[[Path], str | None] | None = None,
) -> RunResult:
    """`screen(artifact)`, when given, runs between saving and measuring: a cheap check (the
    search's perplexity screen) whose reason, if it returns one, ends the run unmeasured."""

    unmerged = [i for i, s in enumerate(recipe.stages) if s.technique == "lora_finetune" and not s.config.merge]
    if unmerged:
        raise ConfigError(
            f"stages[{unmerged[0]}] (lora_finetune): merge: false keeps separate adapters, which a frugalm artifact cannot store yet; set merge: true (the merged model computes the same function)"
        )
    if name_problems(recipe.name):
        raise ConfigError(f"recipe: {name_problems(recipe.name)[0]}")
    source = resolve_model(model or recipe.model)
    out_dir = check_output_folder(config.out_dir or Path("frugalm-out") / recipe.name, force=config.force)
    lm = load_model(source.path, device=config.bench.device, dtype=config.bench.dtype, fast_kernels=False)
    split = functools.cache(
        lambda: evaluation_split(lm.tokenizer, config.bench)
    )  # read once, for calibration and training alike
    calibration, calibration_desc = _calibration(recipe, lm, split)

    ctx = Context(
        device=lm.device,
        calibration=calibration,
        progress=progress,
        tokenizer=lm.tokenizer,
        profile=config.bench.profile,
        profiles_file=config.bench.profiles_file,
    )
    # the default training text, for the stages that train
    if any(get_technique(s.technique).wants_training_text(s.config) for s in recipe.stages):
        ctx.held_out_documents, ctx.training_documents, ctx.training_source = split()
    checkpoints = out_dir.parent / f".{out_dir.name}.checkpoints"
    timings = []
    t_total = time.perf_counter()
    for i, stage in enumerate(recipe.stages):
        technique = get_technique(stage.technique)
        ctx.checkpoint_dir = str(checkpoints / f"stage-{i}-{stage.technique}")  # a rerun of the recipe resumes there
        t0 = time.perf_counter()
        lm.model = technique.apply(lm.model, stage.config, ctx)
        _check_finite(lm.model, f"stages[{i}] ({stage.technique})")
        timings.append(
            {"stage": i, "technique": stage.technique, "version": technique.version, "wall_s": time.perf_counter() - t0}
        )
    produce_s = time.perf_counter() - t_total
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):  # each completed stage removed its own
        checkpoints.rmdir()
    metadata = {
        "base_model": source.ref,
        "base_model_path": str(source.path),
        "recipe": recipe_to_dict(recipe),
        "stages": timings,
        "changes": ctx.changes,
        "produce_wall_s": produce_s,
        "calibration": calibration_desc,
    }
    artifact = save_variant(lm.model, lm.tokenizer, out_dir, metadata, force=config.force)
    if not config.measure:
        return RunResult(artifact, metadata, None)
    reason = screen(artifact) if screen else None
    if reason:
        return RunResult(artifact, metadata, None, screened_out=reason)
    bench_config = replace(config.bench, reference=str(source.path))
    produce = Measurement(
        "produce_wall_s", produce_s, method="measured", protocol={"stages": timings, "device": str(lm.device)}
    )
    extra = [produce, *training_cost_measurements(ctx.changes, produce_s, lm.device, config.bench)]
    result = bench(
        artifact,
        bench_config,
        store=store,
        progress=progress,
        kind="variant",
        record={"variant": metadata},
        extra=extra,
        key=key,
    )
    return RunResult(artifact, metadata, result)


def _check_finite(model, stage: str) -> None:
    """Refuse a model a stage left with NaN or infinite weights, naming the first such tensor."""

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            what = "NaN" if torch.isnan(tensor).any() else "infinite values"
            raise MeasurementError(
                f"{stage} produced {what} in {name}; the variant is not usable: change the stage's options (e.g. more calibration samples, a larger dampening or group size)"
            )


def training_cost_measurements(
    changes: list[dict], produce_s: float, device, bench_config: BenchConfig
) -> list[Measurement]:
    """The training stages' cost as figures stored beside the inference ones: FLOPs, tokens, energy, USD.

    Empty when no stage trained. Energy covers the training loops only, every segment of a resumed
    one; its protocol's `covers` names the steps left out where a stage resumed from a checkpoint
    written before checkpoints stored energy. USD prices the whole production wall time (every
    stage) plus that energy at the hardware profile's rates.
    """

    costs = [{"stage": c["technique"], **c["training"]} for c in changes if "training" in c]
    if not costs:
        return []
    profile = get_profile(bench_config.profile, device.type, bench_config.profiles_file)
    per_stage = [
        {
            k: c[k]
            for k in (
                "stage",
                "wall_s",
                "flops",
                "flops_method",
                "flops_analytic_6nt",
                "tokens_seen",
                "energy_j",
                "energy_method",
            )
        }
        for c in costs
    ]
    joules = sum(c["energy_j"] for c in costs)
    energy_method = "measured" if all(c["energy_method"] == "measured" for c in costs) else "estimated"
    partial = [
        f"training stage {i} ({c['stage']}): {c['energy_protocol']['covers']}"
        for i, c in enumerate(costs)
        if c["energy_protocol"].get("uncovered_steps")
    ]
    covers = "; ".join(partial) or "every step of every training stage"
    out = [
        Measurement(
            "produce_train_tokens",
            sum(c["tokens_seen"] for c in costs),
            method="counted",
            protocol={"stages": per_stage},
        ),
        Measurement(
            "produce_energy_j",
            joules,
            method=energy_method,
            protocol={"covers": covers, "stages": per_stage, "energy": [c["energy_protocol"] for c in costs]},
        ),
        Measurement(
            "produce_cost_usd",
            usd(profile, produce_s, joules),
            method="estimated",
            protocol={"profile": profile.to_dict(), "wall_s": produce_s, "energy_j": joules},
        ),
    ]
    if all(c["flops"] is not None for c in costs):
        out.append(
            Measurement(
                "produce_flops",
                sum(c["flops"] for c in costs),
                method="counted",
                protocol={
                    "counter": "torch FlopCounterMode over one training step x steps, plus importance-scoring forwards where a stage samples by importance (optimizer update not counted; each stage's flops_method)",
                    "stages": per_stage,
                },
            )
        )
    return out


TRAINING_TEXT_MAX_CHARS = 64 * 2**20
"""Most characters of the evaluation text read for calibration and training (the documents after
the evaluated part): far more than they use, and bounded, so a huge --data file is never read whole."""


def evaluation_split(tokenizer, bench_config: BenchConfig) -> tuple[list[str], list[str], str]:
    """(evaluated documents, the documents after them, where they come from) of the run's evaluation text.

    The benchmark evaluates the first `max_tokens` tokens; calibration and training use only the
    rest, read as a stream up to TRAINING_TEXT_MAX_CHARS characters (the description says when
    the text went on beyond that).
    """

    path = bench_config.data or DEFAULT_EVAL_PATH
    n_evaluated = len(evaluated_documents(path, tokenizer, bench_config.protocol.max_tokens))
    documents = iter_documents(path, max_doc_chars=TRAINING_TEXT_MAX_CHARS)
    held_out = [doc for doc, _ in itertools.islice(documents, n_evaluated)]
    rest, cut = _take_chars(documents, TRAINING_TEXT_MAX_CHARS)
    where = f"{bench_config.data or '(built-in evaluation text)'}: documents {n_evaluated}.. (after the evaluated part)"
    return held_out, rest, where + cut


def _take_chars(documents, max_chars: int) -> tuple[list[str], str]:
    """Documents from `documents` ((text, complete) pairs) until `max_chars`; and "" or what was left out."""
    taken, chars = [], 0
    for doc, _ in documents:
        if chars + len(doc) > max_chars:
            return (
                taken,
                f", the first {chars:,} characters of them (the text goes on; frugalm reads at most {max_chars:,})",
            )
        taken.append(doc)
        chars += len(doc)
    return taken, ""


def _calibration(recipe: Recipe, lm, split):
    """Calibration tokens when a stage needs them, and a description for the artifact; `split()`
    gives the run's evaluation_split, read when the recipe names no calibration text."""

    tokenizer = lm.tokenizer
    if not any(get_technique(s.technique).wants_calibration(s.config) for s in recipe.stages):
        return None, None
    cal = recipe.calibration
    if cal.data:
        docs, cut = _take_chars(
            iter_documents(cal.data, max_doc_chars=TRAINING_TEXT_MAX_CHARS), TRAINING_TEXT_MAX_CHARS
        )
        source = cal.data + cut
    else:
        _, docs, source = split()
        if not docs:
            raise DataError(
                "the stages need calibration text and the evaluation text has none left over after the evaluated part; add `calibration: {data: FILE}` to the recipe"
            )
    seq_len = min(cal.seq_len, context_length(lm.model.config) or cal.seq_len)
    tokens = sample_calibration(tokenizer, docs, cal.samples, seq_len, cal.seed)
    return tokens, {"source": source, "samples": cal.samples, "seq_len": seq_len, "seed": cal.seed}
