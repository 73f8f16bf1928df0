"""What every technique shares: the Technique record, the Context a stage runs in, and layer selection.

A technique is a frozen config dataclass plus one `apply(model, config, ctx) -> model`. Configs
are pure data; an optional `problems(self) -> list[str]` method lists the rules that need no
model (ranges, choices), so `frugalm validate` can report them without loading anything. Rules
that need the model ("group_size must divide in_features") are checked in `apply`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.measure.cost import get_profile
from frugalm.measure.memory import params_count
from frugalm.runtime.experts import QuantExperts, bank_problem, expert_banks
from frugalm.runtime.families import DENSE_TYPES, describe, family
from frugalm.runtime.modules import is_linear


@dataclass(frozen=True)
class Technique:
    name: str
    config_cls: type
    apply: Callable[[nn.Module, Any, Context], nn.Module]
    kind: str
    """Lifecycle family: quantization, pruning, distillation, fine-tuning, data, acceleration."""
    needs_calibration: bool | Callable[[Any], bool] = False
    """True, or a function of the config, when `apply` reads ctx.calibration."""
    version: int = 1
    """Bumped when the technique's output changes for the same config (stored with artifacts)."""
    needs_training_text: bool | Callable[[Any], bool] | None = None
    """True, or a function of the config, when `apply` trains on ctx.training_documents; None: the training and data kinds do."""

    def wants_calibration(self, config) -> bool:
        return self.needs_calibration(config) if callable(self.needs_calibration) else self.needs_calibration

    def wants_training_text(self, config) -> bool:
        if self.needs_training_text is None:
            return self.kind in ("training", "data")
        return self.needs_training_text(config) if callable(self.needs_training_text) else self.needs_training_text


@dataclass
class Context:
    """What a stage needs that is not config: device, calibration tokens, progress, a change log."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    calibration: torch.Tensor | None = None
    """(n_samples, seq_len) int64 token ids, when the recipe provides calibration text."""
    progress: Callable[[str, int, int], None] | None = None
    changes: list[dict] = field(default_factory=list)
    """One record per stage: which layers changed and how many parameters."""
    tokenizer: Any = None
    """The model's tokenizer, for stages that read text themselves (training stages)."""
    training_documents: list[str] | None = None
    """Default training text, as documents: the evaluation text minus its evaluated part."""
    training_source: str | None = None
    """Where training_documents come from, for the record."""
    held_out_documents: list[str] | None = None
    """The evaluated documents: training stages drop them from any training text they read."""
    checkpoint_dir: str | None = None
    """Folder for this stage's resumable training checkpoints (set per stage by the pipeline)."""
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    """Wraps a model for training, e.g. in DistributedDataParallel (all-reduce in backward)."""
    profile: str | None = None
    """Hardware profile whose watts estimate training energy where no counter is readable (None: the device's default)."""
    profiles_file: str | None = None
    """Extra hardware profiles file (YAML), as `--profiles` gives it."""

    def calibration_tokens(self, technique: str) -> torch.Tensor:
        if self.calibration is None:
            raise TechniqueError(
                f"technique '{technique}' needs calibration text; add a `calibration:` block with `data:` to the recipe"
            )
        return self.calibration

    def hardware_profile(self, device_type: str):
        """The HardwareProfile named by `profile` (from `profiles_file` or the built-in ones) for a device type."""

        return get_profile(self.profile, device_type, self.profiles_file)

    def report(self, step: str, done: int, total: int) -> None:
        if self.progress:
            self.progress(step, done, total)


def check_config(technique: str, config) -> None:
    """Raise the config's model-free problems in one line (a config built in code skips `frugalm validate`)."""
    problems = config.problems() if hasattr(config, "problems") else []
    if problems:
        raise TechniqueError(f"{technique}: " + "; ".join(problems))


def select_linears(
    model: nn.Module,
    targets: tuple[str, ...],
    exclude: tuple[str, ...] = ("lm_head",),
    *,
    technique: str = "",
    experts: bool = False,
) -> list[tuple[str, nn.Module]]:
    """Linear-like modules whose qualified name matches any fnmatch pattern in `targets`.

    The output head is excluded unless named explicitly (it is tied to the embedding in many
    small models, where changing it changes the embedding too). No match is an error, and so is a
    model family whose weights the technique would miss (check_family). A technique that handles
    banks of experts itself (`experts`, see select_banks) may match banks only.
    """
    check_family(model, targets, technique or "stage", experts=experts)
    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if is_linear(m)
        and any(fnmatch.fnmatchcase(name, p) for p in targets)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude if p not in targets)
    ]
    if not chosen and not (experts and select_banks(model, targets, technique)):
        examples = [n for n, m in model.named_modules() if is_linear(m)][:4]
        raise TechniqueError(
            f"{technique or 'stage'}: targets {list(targets)} match no linear layer of this model; its linear layers are named like {examples}"
        )
    return chosen


def select_banks(model: nn.Module, targets: tuple[str, ...], technique: str) -> list[tuple[str, nn.Module]]:
    """The float banks of experts (runtime/experts) whose names match `targets`; already packed ones are left out,
    as packed linear layers are. A bank of another layout is refused in one line."""
    chosen = []
    for name, bank, _ in expert_banks(model):
        if isinstance(bank, QuantExperts) or not any(fnmatch.fnmatchcase(name, p) for p in targets):
            continue
        problem = bank_problem(name, bank)
        if problem:
            raise TechniqueError(f"{technique}: {describe(model)}: {problem}")
        chosen.append((name, bank))
    return chosen


def check_family(model: nn.Module, targets: tuple[str, ...], technique: str, *, experts: bool = False) -> None:
    """Refuse, in one line naming the family, a model whose targeted weights a technique that changes
    linear layers cannot reach: a recurrent model (RWKV, Mamba: blocks these techniques were never
    checked on; RWKV rescales its output weights in place, which packed layers do not have), or a
    mixture-of-experts model whose experts (3-D parameters, not linear layers) the targets cover,
    unless the technique handles them (`experts`): they would be left unchanged while the record
    claimed the stage done."""
    kind = family(model)
    supported = (
        f"supported: dense Transformers ({', '.join(DENSE_TYPES)}) and the attention of mixture-of-experts models"
    )
    if kind == "recurrent":
        raise TechniqueError(f"{technique}: {describe(model)} models are not supported; {supported}")
    if kind == "moe" and not experts:
        covered = [n for n, _, _ in expert_banks(model) if any(fnmatch.fnmatchcase(n, p) for p in targets)]
        if covered:
            raise TechniqueError(
                f"{technique}: {describe(model)}: targets {list(targets)} cover its experts ({covered[0]}: 3-D parameters, "
                f"not linear layers), which it would leave unchanged; {supported}: target the attention alone, e.g. targets ['*.self_attn.*'], "
                "or quantize the experts with rtn_quant or gptq_quant"
            )


def embedding_params(model: nn.Module) -> tuple[int, int]:
    """(input embedding, output head) parameters; the head counts 0 when tied to the embedding."""
    if not hasattr(model, "get_input_embeddings"):  # a bare module, not a language model
        return 0, 0
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n_emb = emb.weight.numel() if emb is not None else 0
    head_weight = getattr(head, "weight", None)
    tied = head_weight is not None and emb is not None and head_weight.data_ptr() == emb.weight.data_ptr()
    n_head = (
        0
        if tied or head is None
        else (head_weight.numel() if head_weight is not None else getattr(head, "packed_params", lambda: 0)())
    )
    return n_emb, n_head


def record_change(
    ctx: Context, technique: str, layers: list[str], params_changed: int, model: nn.Module, **details
) -> None:
    """Log what a stage changed: the layers, and the parameters changed as a fraction of all of
    them and of the non-embedding ones (embeddings and the output head are counted apart: in
    small models they are a large share)."""

    total = params_count(model)
    n_emb, n_head = embedding_params(model)
    ctx.changes.append({
        "technique": technique, "layers": layers, "params_changed": params_changed,
        "params_total": total, "params_input_embedding": n_emb, "params_output_head_untied": n_head,
        "fraction_of_params": params_changed / total,
        "fraction_of_params_without_input_embedding": params_changed / max(1, total - n_emb),
        **details,
    })  # fmt: skip
