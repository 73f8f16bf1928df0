"""LoRA fine-tuning (Hu et al. 2021, arXiv:2106.09685) through Hugging Face peft.

Each targeted linear layer W (out, in) gets a trainable low-rank update (alpha / rank) * B A,
A (rank, in), B (out, rank), B initialised to zero so training starts from the base model;
everything else is frozen. Trains ~1% of the parameters, so optimizer memory is small, and
is the usual way to recover quality lost to pruning or quantization. `merge: true` (the
default) folds B A into W for deployment: the variant has the base architecture and costs
nothing extra to run.

On a quantized base (frugalm's packed `QuantLinear`, from rtn_quant / gptq_quant / awq_quant)
the adapters train on top of the frozen packed weights (QLoRA-style). peft does not know
QuantLinear; rather than a parallel LoRA implementation, `QuantLoraLinear` plugs into peft's
custom-module mapping (`LoraConfig._register_custom_module`) and reuses peft's own LoRA Linear
for everything but the merge, so adapters, dropout, scaling and merge_and_unload behave as for
dense layers. Merging into packed weights re-quantizes: W + B A is rounded back onto the base
layer's own grid (its scales and zero points are kept), so a weight moves only where the update
crosses a rounding boundary; the part of the update lost that way is measured per layer and
stored with the stage's change record (`merge_update_lost_fraction`). Keep `merge: false` to
keep the adapters exact.

Does not do DoRA, other adapter types, or adapters on embeddings.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.modules import is_linear
from frugalm.runtime.quant_linear import QuantLinear, pack, unpack
from frugalm.techniques.base import Context, Technique, check_family, record_change
from frugalm.techniques.training_stage import TrainingOptions, run_training


@dataclass(frozen=True, kw_only=True)
class LoraFinetuneConfig(TrainingOptions):
    rank: int = 8
    """Rank r of each low-rank update."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / rank) * B A."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    targets: tuple[str, ...] = ("*.self_attn.*", "*.mlp.*", "*.attn.*", "*.attention.*")
    """fnmatch patterns over module names of the linear layers to adapt; the output head only if named."""
    merge: bool = True
    """Fold the adapters into the weights (re-quantizing a packed base, with the loss recorded); false keeps them separate (in-process use: artifacts store merged weights)."""
    lr: float = 2e-3

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            problems.append("targets must hold at least one module-name pattern, e.g. ['*.self_attn.*']")
        return problems


def _adaptable(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, QuantLinear)


def lora_targets(model: nn.Module, patterns: tuple[str, ...], technique: str) -> list[str]:
    """Names of the linear (or packed quantized) layers matching any pattern; none is an error listing
    names, and so is a family whose targeted weights LoRA would miss (base.check_family)."""
    check_family(model, patterns, technique)
    names = [n for n, m in model.named_modules() if _adaptable(m)]
    chosen = [
        n
        for n in names
        if any(fnmatch.fnmatchcase(n, p) for p in patterns) and (n != "lm_head" or "lm_head" in patterns)
    ]
    if not chosen:
        fast = [n for n, m in model.named_modules() if getattr(m, "kernel", None) == "fbgemm"]
        hint = "; its int8 layers run on fbgemm kernels: load it with fast_kernels=False" if fast else ""
        raise TechniqueError(
            f"{technique}: targets {list(patterns)} match no linear layer; its linear layers are named like {names[:6]}{hint}"
        )
    return chosen


def _quant_lora_linear_cls():
    """QuantLoraLinear, defined on first use so that importing this module does not import peft."""

    class QuantLoraLinear(LoraLinear):
        """peft's LoRA Linear around a frozen QuantLinear; merging re-quantizes onto the layer's grid."""

        @torch.no_grad()
        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> dict:
            base = self.get_base_layer()
            stats = {}
            for name in check_adapters_to_merge(self, adapter_names):
                w = base.dequantized_weight(torch.float32)  # (out, in)
                delta = self.get_delta_weight(name).float()
                target = w + delta
                g = base.group_size
                scale = base.scales.float().repeat_interleave(g, dim=1)  # (out, in): the base grid, kept
                zero = base.zeros.float().repeat_interleave(g, dim=1)
                q = torch.round(target / scale + zero).clamp(0, 2**base.bits - 1).to(torch.uint8)
                changed = int((q != unpack(base.qweight, base.bits)).sum())
                base.qweight.copy_(pack(q, base.bits))
                lost = (base.dequantized_weight(torch.float32) - target).norm() / delta.norm().clamp(min=1e-12)
                stats[name] = {
                    "update_norm": float(delta.norm()),
                    "lost_fraction": float(lost),
                    "codes_changed": changed,
                }
                self.merged_adapters.append(name)
            return stats

        def unmerge(self) -> None:
            raise TechniqueError(
                "lora_finetune: an adapter merged into packed weights cannot be unmerged (the rounding is lossy); rerun the stage with merge: false"
            )

    return QuantLoraLinear


def apply(model: nn.Module, config: LoraFinetuneConfig, ctx: Context) -> nn.Module:

    name = TECHNIQUE.name
    targets = lora_targets(model, config.targets, name)
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)  # GPT-2 stores weights (in, out)
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=conv1d,
    )
    quant_cls = (
        _quant_lora_linear_cls() if any(isinstance(model.get_submodule(t), QuantLinear) for t in targets) else None
    )
    if quant_cls is not None:
        lora_config._register_custom_module({QuantLinear: quant_cls})
    torch.manual_seed(config.seed)  # adapter initialisation (A: Kaiming-uniform, B: zeros)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.filterwarnings(
            "ignore", "Unsupported layer type", UserWarning
        )  # QuantLinear: handled by QuantLoraLinear
        peft_model = get_peft_model(model, lora_config)
    adapter_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    result, text = run_training(peft_model, config, ctx, name, run_id={"targets": targets})
    details = {"rank": config.rank, "alpha": config.alpha, "adapter_params": adapter_params, "merged": config.merge}
    if config.merge:
        model, details["merge_update_lost_fraction"] = merge_adapters(peft_model, quant_cls)
    else:
        model = peft_model
    record_change(ctx, name, targets, adapter_params, model, **details, training=result.cost(), training_text=text)
    return model


def merge_adapters(peft_model, quant_cls) -> tuple[nn.Module, dict]:
    """Fold every adapter into its base layer; return the plain model and, per packed layer, the update lost to re-quantization."""
    lost = {}
    if quant_cls is not None:
        for module_name, module in peft_model.named_modules():
            if isinstance(module, quant_cls):
                lost[module_name.removeprefix("base_model.model.")] = module.merge()["default"]["lost_fraction"]
    with warnings.catch_warnings():  # peft warns that the packed layers are already merged: they are, above
        warnings.simplefilter("ignore")
        return peft_model.merge_and_unload(), lost


TECHNIQUE = Technique(name="lora_finetune", config_cls=LoraFinetuneConfig, apply=apply, kind="training")
