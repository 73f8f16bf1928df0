"""Knowledge distillation into a smaller student (Hinton et al. 2015, arXiv:1503.02531).

The incoming model is the teacher. The student is a copy of it with decoder layers dropped
(`keep_layers`, evenly spaced with the first and last kept, or explicit `layers`), initialised
from the teacher's kept layers as in DistilBERT (Sanh et al. 2019, arXiv:1910.01108), or any
smaller model given by `student` that uses the teacher's tokenizer. The student trains on

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, next token)
           + hidden_weight * mean over mapped layers of MSE(h_s, h_t)

where z are logits per position, T the temperature (T^2 keeps the soft term's gradients at the
CE term's scale) and h the hidden states after a student layer and after its mapped teacher
layer (for a layer-dropped copy, the teacher layer it came from). The teacher is frozen and runs
in inference mode. The stage returns the student; the teacher is discarded.

Helps when a smaller model must keep most of a larger one's quality: on the same budget the
soft targets carry more signal per token than the one-hot next token. Costs a teacher forward
per step. Does not do sequence-level or on-policy distillation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.models import load_model
from frugalm.techniques._arch import ARCHS, remove_layers_
from frugalm.techniques.base import Context, Technique, record_change
from frugalm.techniques.training_stage import TrainingOptions, run_training


@dataclass(frozen=True, kw_only=True)
class DistillConfig(TrainingOptions):
    student: str | None = None
    """Folder (or hub id) of a smaller model with the teacher's tokenizer; None: a copy of the teacher with layers dropped."""
    keep_layers: float = 0.5
    """Fraction of the teacher's decoder layers the student copy keeps, evenly spaced, first and last kept."""
    layers: tuple[int, ...] = ()
    """Explicit teacher layer indices the student copy keeps (overrides keep_layers)."""
    temperature: float = 2.0
    """Softmax temperature T of the soft targets."""
    alpha: float = 0.5
    """Weight of the KL term; 1 - alpha weighs the next-token cross-entropy."""
    hidden_weight: float = 0.0
    """Weight of the hidden-state MSE term; 0 turns it off (it needs equal hidden sizes)."""
    hidden_layers: tuple[int, ...] = ()
    """Teacher layer matched by each student layer, for hidden-state matching; empty: the kept layers (copy) or evenly spaced (given student)."""
    lr: float = 2e-3
    weight_decay: float = 0.1  # the student relearns whole layers: decay as in pre-training (the loop's default)

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0 < self.keep_layers < 1:
            problems.append(f"keep_layers must be in (0, 1) (the fraction of layers kept), got {self.keep_layers}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            problems.append(f"alpha must be in [0, 1], got {self.alpha}")
        if self.hidden_weight < 0:
            problems.append(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.student is not None and self.layers:
            problems.append("give either `student` or `layers` (the layers a teacher copy keeps), not both")
        return problems


def evenly_spaced(n: int, keep: int) -> list[int]:
    """`keep` of range(n), evenly spaced, first and last included (keep >= 2)."""
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)}) if keep > 1 else [n - 1]


def layer_dropped_copy(teacher: nn.Module, config: DistillConfig) -> tuple[nn.Module, list[int]]:
    """A deep copy of the teacher keeping `layers` (or keep_layers of them), and the kept indices."""

    model_type = getattr(teacher.config, "model_type", type(teacher).__name__)
    if model_type not in ARCHS:
        raise TechniqueError(
            f"distill: dropping layers supports model types {list(ARCHS)}, not '{model_type}'; give a smaller `student:` model instead"
        )
    arch = ARCHS[model_type]
    n = len(teacher.get_submodule(arch.blocks))
    kept = sorted(set(config.layers)) if config.layers else evenly_spaced(n, max(1, round(config.keep_layers * n)))
    if not kept or kept[0] < 0 or kept[-1] >= n or len(kept) >= n:
        raise TechniqueError(
            f"distill: the student must keep between 1 and {n - 1} of the teacher's {n} layers (indices 0..{n - 1}), got {kept}; fix `layers` or `keep_layers`"
        )
    student = copy.deepcopy(teacher)
    blocks = list(student.get_submodule(arch.blocks))
    remove_layers_(student, arch, blocks, [i for i in range(n) if i not in kept])
    return student, kept


def load_student(path: str, teacher_tokenizer, device) -> nn.Module:
    """The given student model; refuses one whose tokenizer differs from the teacher's."""

    lm = load_model(path, device=str(device), fast_kernels=False)
    if lm.tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise TechniqueError(
            f"distill: student '{path}' has a different tokenizer ({len(lm.tokenizer)} tokens) from the teacher's "
            f"({len(teacher_tokenizer)}); logits cannot be compared token by token: pick a student trained with the teacher's tokenizer, or use the layer-dropped copy (remove `student`)"
        )
    return lm.model


def distill_loss(teacher: nn.Module, config: DistillConfig, layer_map: list[int]):
    """The stage's loss function: (student, window (batch, seq_len + 1)) -> scalar."""
    t2 = config.temperature**2
    hidden = config.hidden_weight > 0

    def loss(student: nn.Module, window: torch.Tensor) -> torch.Tensor:
        inputs, targets = window[:, :-1], window[:, 1:]  # (batch, seq_len)
        s_out = student(input_ids=inputs, output_hidden_states=hidden)
        s_logits = s_out.logits.float()  # (batch, seq_len, vocab)
        ce = F.cross_entropy(s_logits.flatten(0, 1), targets.flatten())
        if config.alpha == 0 and not hidden:  # no teacher signal asked for: skip its forward (and its cost)
            return ce
        with torch.no_grad():
            t_out = teacher(input_ids=inputs, output_hidden_states=hidden)
        t_logits = t_out.logits.float()
        kl = F.kl_div(
            F.log_softmax(s_logits / config.temperature, -1).flatten(0, 1),
            F.log_softmax(t_logits / config.temperature, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        total = config.alpha * t2 * kl + (1 - config.alpha) * ce
        if hidden:  # hidden_states[0] is the embedding output; [i + 1] follows layer i
            mse = [
                F.mse_loss(s_out.hidden_states[i + 1].float(), t_out.hidden_states[j + 1].float())
                for i, j in enumerate(layer_map)
            ]
            total = total + config.hidden_weight * torch.stack(mse).mean()
        return total

    return loss


def _layer_map(config: DistillConfig, kept: list[int] | None, n_student: int, n_teacher: int) -> list[int]:
    mapping = (
        list(config.hidden_layers) or kept or [round((i + 1) * n_teacher / n_student) - 1 for i in range(n_student)]
    )
    if len(mapping) != n_student or not all(0 <= j < n_teacher for j in mapping):
        raise TechniqueError(
            f"distill: hidden_layers must name one teacher layer (0..{n_teacher - 1}) per student layer ({n_student}), got {mapping}"
        )
    return mapping


def apply(model: nn.Module, config: DistillConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    teacher = model.eval()
    if config.student is not None:
        student, kept = load_student(config.student, ctx.tokenizer, ctx.device), None
    else:
        student, kept = layer_dropped_copy(teacher, config)
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    layer_map = _layer_map(config, kept, n_s, n_t)
    if config.hidden_weight > 0 and student.config.hidden_size != teacher.config.hidden_size:
        raise TechniqueError(
            f"distill: hidden-state matching needs equal hidden sizes (student {student.config.hidden_size}, teacher {teacher.config.hidden_size}); set hidden_weight: 0"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(True)
    result, text = run_training(
        student,
        config,
        ctx,
        name,
        loss_fn=distill_loss(teacher, config, layer_map),
        run_id={"student": config.student, "kept": kept},
    )
    params_s, params_t = sum(p.numel() for p in student.parameters()), sum(p.numel() for p in teacher.parameters())
    layers = [f"layer {i}" for i in range(n_t) if kept is not None and i not in kept]
    record_change(ctx, name, layers or [f"student {config.student}"], params_s, student, student_params=params_s, teacher_params=params_t,
                  teacher_layers_kept=kept, layer_map=layer_map, training=result.cost(), training_text=text)  # fmt: skip
    return student


TECHNIQUE = Technique(name="distill", config_cls=DistillConfig, apply=apply, kind="training")
