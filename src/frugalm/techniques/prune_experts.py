"""Expert pruning: drop the experts of a mixture-of-experts model that matter least.

Every block keeps the same number of experts, `fraction` of them removed (rounded to whole
experts), so the pruned model is a plain model of its family with a smaller expert count in its
config: it saves and reloads through transformers, and it keeps its top-k routing (the router
picks among the experts left; its softmax runs over them alone).

Which experts go is decided per block from one pass of the calibration text through the model:

- `reap` (Lasby et al. 2025, "REAP: Router-weighted Expert Activation Pruning",
  arXiv:2510.13999): an expert's saliency is the mean, over the tokens routed to it, of its
  router weight times the L2 norm of its output, g_j(x) ||f_j(x)||: how much it adds to the
  block's output when chosen. Experts never chosen score 0.
- `frequency`: the number of calibration tokens routed to the expert (each token's top-k
  choices), the criterion of the earlier expert-pruning work; cheaper to explain, blind to how
  much an expert's output weighs.

Saves memory and storage in proportion to the experts removed (a token's compute is unchanged:
it still runs top_k experts); the quality cost is measured, not assumed. Packed banks
(quantized first) are pruned the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.experts import bank_params, block_router, expert_banks, keep_experts_
from frugalm.runtime.families import describe
from frugalm.techniques._calibrate import CALIBRATION_BATCH, observed_banks
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class ExpertPruneConfig:
    fraction: float = 0.25
    """Share of each block's experts removed, rounded to whole experts (at least one)."""
    criterion: Literal["reap", "frequency"] = "reap"
    """reap: mean router weight x output norm over the tokens routed to the expert; frequency: tokens routed to it."""

    def problems(self) -> list[str]:
        out = []
        if not 0 < self.fraction < 1:
            out.append(
                f"fraction must be in (0, 1) (the share of each block's experts removed, e.g. 0.25), got {self.fraction}"
            )
        if self.criterion not in ("reap", "frequency"):
            out.append(f"criterion must be reap or frequency, got {self.criterion!r}")
        return out


class Saliency:
    """Per expert of one bank: tokens routed, and the sum of router weight x output norm over them."""

    def __init__(self, experts: int):
        self.tokens = torch.zeros(experts, dtype=torch.long)
        self.weighted_norm = torch.zeros(experts, dtype=torch.float64)

    def add(self, expert: int, outputs: torch.Tensor, routed: torch.Tensor) -> None:
        self.tokens[expert] += outputs.shape[0]
        self.weighted_norm[expert] += (routed[:, 0].double() * outputs.double().norm(dim=-1)).sum().cpu()

    def scores(self, criterion: str) -> torch.Tensor:
        if criterion == "frequency":
            return self.tokens.double()
        return self.weighted_norm / self.tokens.clamp(min=1)


@torch.inference_mode()
def saliencies(model: nn.Module, banks: list[tuple[str, nn.Module]], tokens: torch.Tensor) -> dict[str, Saliency]:
    """Each bank's Saliency over one pass of the calibration tokens (n, seq_len)."""
    found = {name: Saliency(bank.num_experts) for name, bank in banks}
    device = next(model.parameters()).device
    with observed_banks(banks, out_of={n: s.add for n, s in found.items()}):
        for i in range(0, len(tokens), CALIBRATION_BATCH):
            model(tokens[i : i + CALIBRATION_BATCH].to(device), use_cache=False)
    return found


def kept_count(technique: str, model: nn.Module, experts: int, top_k: int, fraction: float) -> int:
    removed = round(fraction * experts)
    if removed < 1:
        raise TechniqueError(
            f"{technique}: fraction {fraction} of {experts} experts per block removes none; raise it to at least {1 / experts:.3g}"
        )
    if experts - removed < top_k:
        raise TechniqueError(
            f"{technique}: {describe(model)} routes each token to {top_k} experts, so a block must keep at least {top_k} of its "
            f"{experts}; fraction {fraction} keeps {experts - removed}: lower it to at most {(experts - top_k) / experts:.3g}"
        )
    return experts - removed


@torch.no_grad()
def apply(model: nn.Module, config: ExpertPruneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    found = expert_banks(model)
    if not found:
        raise TechniqueError(
            f"{name}: {describe(model)} has no experts to prune; it applies to mixture-of-experts models (Mixtral, Qwen2-MoE, OLMoE)"
        )
    banks = [(n, m) for n, m, _ in found]
    experts, top_k = found[0][1].num_experts, found[0][2]
    keep_n = kept_count(name, model, experts, top_k, config.fraction)
    tokens = ctx.calibration_tokens(name)
    scores = saliencies(model, banks, tokens)
    keep, per_bank, removed_params = {}, {}, 0
    for bank_name, bank in banks:
        score = scores[bank_name].scores(config.criterion)
        order = sorted(range(experts), key=lambda e: (-float(score[e]), e))  # ties: the lower index stays
        keep[bank_name] = sorted(order[:keep_n])
        removed_params += bank_params(bank) * (experts - keep_n) // experts
        removed_params += block_router(model, bank_name)[1].weight.shape[1] * (experts - keep_n)
        per_bank[bank_name] = {
            "removed": sorted(order[keep_n:]),
            "saliency": [round(float(s), 6) for s in score],
            "calibration_tokens": scores[bank_name].tokens.tolist(),
        }
        ctx.report(name, len(keep), len(banks))
    keep_experts_(model, keep)
    record_change(ctx, name, [n for n, _ in banks], removed_params, model, criterion=config.criterion,
                  fraction=config.fraction, experts_before=experts, experts_after=keep_n, top_k=top_k,
                  params_removed=removed_params, calibration_samples=len(tokens), banks=per_bank)  # fmt: skip
    return model


TECHNIQUE = Technique(
    name="expert_prune", config_cls=ExpertPruneConfig, apply=apply, kind="pruning", needs_calibration=True
)
