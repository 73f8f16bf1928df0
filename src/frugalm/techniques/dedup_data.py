"""A data stage: near-duplicate removal of the training text (MinHash LSH, see frugalm.text.dedup).

Changes no weight. It replaces the training text that later training stages of the recipe read
by default (the run's evaluation text minus its evaluated part, or this stage's own `data`
file) with its deduplicated documents, and records what it removed: how many documents and
bytes, and each removed document with the kept one it near-duplicates. Training stages that
name their own `data:` file read that file, not this stage's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from torch import nn

from frugalm.errors import DataError
from frugalm.techniques.base import Context, Technique
from frugalm.text.dedup import DedupConfig, minhash_dedup
from frugalm.text.files import read_text, split_documents

REPORTED_REMOVALS = 100
"""Removals listed one by one in the change record (all are counted)."""


@dataclass(frozen=True, kw_only=True)
class DedupDataConfig(DedupConfig):
    data: str | None = None
    """Training text to deduplicate (UTF-8, documents split at <|endoftext|> lines); default: the run's training text."""


def apply(model: nn.Module, config: DedupDataConfig, ctx: Context) -> nn.Module:

    if config.data is not None:
        docs, source = split_documents(read_text(Path(config.data).expanduser())), config.data
        held_out = set(ctx.held_out_documents or ())
        docs = [d for d in docs if d not in held_out]
    elif ctx.training_documents is not None:
        docs, source = list(ctx.training_documents), ctx.training_source or "the evaluation text minus its evaluated part"
    else:
        raise DataError("dedup_data: no training text to deduplicate; set the stage option `data: FILE` (UTF-8 text)")
    if not docs:
        raise DataError(f"dedup_data: training text {source} holds no document (after removing the evaluated ones); pass another `data:` file")
    result = minhash_dedup(docs, DedupConfig(**{f.name: getattr(config, f.name) for f in fields(DedupConfig)}))
    ctx.training_documents, ctx.training_source = result.kept, f"{source}, near-duplicates removed (dedup_data)"
    report = result.to_dict()
    ctx.changes.append({
        "technique": TECHNIQUE.name, "layers": [], "params_changed": 0, "fraction_of_params": 0.0,
        "data": {**{k: v for k, v in report.items() if k != "removed"}, "source": source,
                 "removed": report["removed"][:REPORTED_REMOVALS], "config": asdict(config)},
    })  # fmt: skip
    ctx.report(TECHNIQUE.name, 1, 1)
    return model


TECHNIQUE = Technique(name="dedup_data", config_cls=DedupDataConfig, apply=apply, kind="data", needs_calibration=False)
