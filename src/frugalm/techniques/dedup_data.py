"""A data stage: near-duplicate removal of the training text (MinHash LSH, see frugalm.text.dedup).

Changes no weight. It reads the training text as a training stage picks it (this stage's own `data`
file, without the evaluated documents, or the run's default training text: see
training_stage.training_documents) and replaces the text that later training stages of the recipe
read by default with its deduplicated documents. It records what it removed: how many documents and
bytes, and each removed document with the kept one it near-duplicates. Training stages that
name their own `data:` file read that file, not this stage's output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from torch import nn

from frugalm.errors import DataError
from frugalm.techniques.base import Context, Technique
from frugalm.techniques.training_stage import drop_evaluated, training_documents
from frugalm.text.dedup import DedupConfig, minhash_dedup

REPORTED_REMOVALS = 100
"""Removals listed one by one in the change record (all are counted)."""


@dataclass(frozen=True, kw_only=True)
class DedupDataConfig(DedupConfig):
    data: str | None = None
    """Training text to deduplicate (UTF-8, documents split at <|endoftext|> lines); default: the run's training text."""


def apply(model: nn.Module, config: DedupDataConfig, ctx: Context) -> nn.Module:

    docs, source = training_documents(config.data, ctx, TECHNIQUE.name)
    if (
        config.data is not None
    ):  # the run's default text is what follows the evaluated part; training stages drop any evaluated document again
        docs, _ = drop_evaluated(docs, ctx)
    if not docs:
        raise DataError(
            f"dedup_data: training text {source} holds no document (after removing the evaluated ones); pass another `data:` file"
        )
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
