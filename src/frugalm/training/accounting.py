"""What a training run cost, kept across the segments of a resumed run.

The loop (frugalm.training.loop) trains; this module keeps its account and writes the record:
wall time, FLOPs (counted with torch's FLOP counter over one whole step, forward and backward of
every micro-batch, a teacher's forward included, times the steps; the analytic 6 * params *
tokens is kept beside it), tokens seen, energy (hardware counter or the stated power model of
frugalm.measure.energy, with the hardware profile the caller gives) and the loss curve.

Checkpoints carry the account so far (losses, wall time, energy), so a resumed run's figures
cover every segment; one resumed from a checkpoint written before energy was stored says which
steps its energy covers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from frugalm.measure.compute import _EXTRA_FLOP_FORMULAS
from frugalm.measure.energy import EnergyMeter
from frugalm.training import checkpoint as ckpt


@dataclass(frozen=True)
class TrainResult:
    losses: list[tuple[int, float]]
    """(step, mean training loss over the steps since the previous record), step is 1-based."""
    final_loss: float
    """The last recorded mean training loss."""
    tokens_seen: int
    """Target tokens processed, over all processes: steps * batch_size * grad_accum * world_size * seq_len."""
    wall_time_s: float
    """Training wall time over every segment of the run (time lost after the last checkpoint of a killed segment is not counted)."""
    flops: int | None = None
    """Counted FLOPs of the whole run (one step counted with torch's FLOP counter, times the steps); None when not counted."""
    flops_analytic: int = 0
    """6 * parameters * tokens_seen: the usual estimate for full training (forward 2N, backward 4N per token)."""
    energy_j: float = 0.0
    energy_method: str = "estimated"
    energy_protocol: dict = field(default_factory=dict)
    resumed_from_step: int = 0
    """The step of the checkpoint this run resumed from (0: started fresh)."""
    params: int = 0
    trainable_params: int = 0
    settings: dict = field(default_factory=dict)

    def _flops_method(self) -> str | None:
        if self.flops is None:
            return None
        scoring = " + importance scoring: one window's forward x windows scored" if "sampling" in self.settings else ""
        return "counted: torch FlopCounterMode over one step x steps" + scoring

    def cost(self) -> dict:
        """The cost record stored with a variant: JSON-ready, units in the names."""
        return {
            "wall_s": self.wall_time_s, "flops": self.flops, "flops_method": self._flops_method(),
            "flops_analytic_6nt": self.flops_analytic, "tokens_seen": self.tokens_seen, "energy_j": self.energy_j,
            "energy_method": self.energy_method, "energy_protocol": self.energy_protocol, "params": self.params,
            "trainable_params": self.trainable_params, "resumed_from_step": self.resumed_from_step,
            "loss_curve": self.losses, "final_loss": self.final_loss, "settings": self.settings,
        }  # fmt: skip


def count_step_flops(
    model: nn.Module, loss_fn, probe: torch.Tensor, autocast: contextlib.AbstractContextManager
) -> int:
    """FLOPs of one micro-batch's forward and backward, counted on `probe` (batch, seq_len + 1).

    Counted on a probe micro-batch (token id 0 everywhere: FLOPs do not depend on the values)
    before training, not inside a real step: torch's counter dispatches some ops differently,
    which would change the trained bits. The probe's gradients are dropped and torch's RNG state
    restored, so training is unaffected. The optimizer's elementwise update is not counted.
    """

    rng = torch.get_rng_state()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS) as counter:
        with autocast:
            loss = loss_fn(model, probe)
        loss.backward()
    for p in model.parameters():
        p.grad = None
    torch.set_rng_state(rng)
    return counter.get_total_flops()


@dataclass
class RunAccount:
    """The running account of one training run: loss records, and wall time and energy of the earlier segments."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    pending: tuple[float, int] = (0.0, 0)
    """(sum, count) of the step losses since the last record."""
    start_step: int = 0
    """The step this segment started at (a resume's checkpoint step, else 0)."""
    wall_before: float = 0.0
    """Wall seconds of the earlier segments."""
    energy_before: float = 0.0
    """Joules of the earlier segments (stored in the checkpoint resumed from)."""
    energy_method_before: str | None = None
    energy_from_step: int = 0
    """The first step the energy covers (0 unless resumed from a checkpoint that stored none)."""

    @classmethod
    def resumed(cls, state: ckpt.TrainState) -> RunAccount:
        """The account a checkpoint carries."""
        stored = state.energy_j is not None  # checkpoints written before energy was stored have none
        return cls(
            losses=list(state.losses), pending=tuple(state.pending), start_step=state.step, wall_before=state.wall_s,
            energy_before=state.energy_j if stored else 0.0, energy_method_before=state.energy_method if stored else None,
            energy_from_step=state.energy_from_step if stored else state.step,
        )  # fmt: skip

    def for_checkpoint(self, meter: EnergyMeter) -> dict:
        """The account so far, as TrainState fields (reads the meter now)."""
        joules = meter.so_far()  # also brings meter.wall_s up to now
        return {
            "losses": list(self.losses), "pending": self.pending, "wall_s": self.wall_before + meter.wall_s,
            "energy_j": self.energy_before + joules, "energy_method": self.energy_method(meter), "energy_from_step": self.energy_from_step,
        }  # fmt: skip

    def energy_method(self, meter: EnergyMeter) -> str:
        """'measured' only when this segment and every earlier one read a hardware counter."""
        return (
            "measured"
            if meter.method == "measured" and self.energy_method_before in (None, "measured")
            else "estimated"
        )

    def add_loss(self, step: int, loss: float, log_every: int, steps: int) -> bool:
        """Count one step's loss; True when it closed a record (every log_every steps and at the last)."""
        total, n = self.pending[0] + loss, self.pending[1] + 1
        self.pending = (total, n)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            self.losses.append((step + 1, total / n))
            self.pending = (0.0, 0)
            return True
        return False

    def result(
        self, model: nn.Module, steps: int, tokens: int, flops: int | None, meter: EnergyMeter, settings: dict
    ) -> TrainResult:
        """The run's cost record: `tokens` seen and counted `flops` over the whole run (None: not counted)."""
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return TrainResult(
            losses=self.losses, final_loss=self.losses[-1][1], tokens_seen=tokens, wall_time_s=self.wall_before + meter.wall_s,
            flops=flops, flops_analytic=6 * params * tokens, energy_j=self.energy_before + meter.joules,
            energy_method=self.energy_method(meter), energy_protocol=self.energy_protocol(meter, steps),
            resumed_from_step=self.start_step, params=params, trainable_params=trainable, settings=settings,
        )  # fmt: skip

    def energy_protocol(self, meter: EnergyMeter, steps: int) -> dict:
        """The meter's protocol of the last segment, plus which steps the run's energy figure covers."""
        protocol = {
            **meter.protocol(),
            "covers": f"steps {self.energy_from_step}..{steps} of {steps}",
            "uncovered_steps": self.energy_from_step,
        }
        if not self.start_step:
            return protocol
        at, since = self.start_step, self.energy_from_step
        notes = [f"wall_s and joules above are the segment after the resume at step {at}"]
        if since < at:
            protocol["energy_before_resume_j"], protocol["energy_before_resume_method"] = (
                self.energy_before,
                self.energy_method_before,
            )
            notes.append(
                f"the figure adds the {self.energy_before:.6g} J the checkpoint stored for steps {since}..{at}"
            )
        if since:
            notes.append(f"steps 0..{since} are not counted: a checkpoint this run resumed from predates stored energy")
        notes.append(
            "the energy of work a killed segment did after its last checkpoint is not counted (that work is redone and counted then)"
        )
        return {**protocol, "resumed_at_step": at, "note": "; ".join(notes)}
