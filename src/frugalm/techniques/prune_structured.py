"""Structured pruning: physically remove MLP channels, attention heads or whole decoder layers.

Unlike unstructured or N:M pruning, the weights really get smaller, so dense kernels run
faster and the saved model is smaller, on any hardware. The model's config is updated, so
`save_pretrained` + `AutoModelForCausalLM.from_pretrained` reload it at its new size.

- `mlp_channels`: removes `fraction` of the MLP's intermediate channels in every layer (the rows
  of gate/up, fc1, c_fc or dense_h_to_4h and the matching columns of the output projection),
  and sets the config's intermediate size (LLM-Pruner-style width pruning, Ma et al. 2023,
  arXiv:2305.11627, without its gradient scores or its LoRA recovery).
- `heads`: removes `fraction` of the key/value groups in every layer, each with the query heads
  that share it (GQA), and sets num_attention_heads, num_key_value_heads and head_dim.
- `layers`: drops `fraction` of the decoder layers, renumbers the attention modules' layer_idx
  (the KV cache is indexed by it) and sets num_hidden_layers (and layer_types where present).

Importance, per unit (lowest removed):
- `activation` (needs calibration tokens; one pass over them on the dense model): channels and
  heads score the output-projection columns they feed, ||X_c||_2 * ||W_out[:, c]||_2 summed
  (squared) over the unit's columns (Wanda's score, grouped; cf. Sun et al. 2023); layers score
  their Block Influence 1 - mean cos(h_in, h_out) over tokens (ShortGPT, Men et al. 2024,
  arXiv:2403.03853).
- `magnitude` (data-free): channels the product of the L2 norms of the weights attached to them,
  heads the L2 norm of all their q/k/v rows and o columns, layers the Frobenius norm of the two
  projections that write into the residual stream (a weak proxy: prefer `activation`).

Channels and heads are removed in equal numbers from every layer (a transformers config has one
size for all layers); which ones is chosen per layer. Supported: Llama and Qwen2 for every unit;
GPT-2, OPT and GPT-NeoX for `mlp_channels` and `layers`. Quality drops more than with
unstructured pruning at the same fraction; it is usually recovered by distillation or
fine-tuning afterwards, which this technique does not do. It does not round the new sizes to
kernel-friendly multiples (choose `fraction` for that).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime.modules import weight_out_in
from frugalm.techniques._arch import ARCHS, Arch, model_type, remove_layers_
from frugalm.techniques._calibrate import block_output, capture_block_inputs, collect_input_stats
from frugalm.techniques.base import Context, Technique, record_change

UNITS = ("mlp_channels", "heads", "layers")
IMPORTANCES = ("magnitude", "activation")


@dataclass(frozen=True, kw_only=True)
class StructuredPruneConfig:
    unit: Literal["mlp_channels", "heads", "layers"] = "mlp_channels"
    """What is removed: MLP intermediate channels, key/value head groups (with their query heads), or decoder layers."""
    fraction: float = 0.25
    """Fraction of the units removed (per layer for channels and heads), in (0, 1)."""
    importance: Literal["magnitude", "activation"] = "activation"
    """How units are ranked: weight norms (data-free) or calibration activations."""
    batch_size: int = 8
    """Calibration sequences per forward pass (importance 'activation')."""

    def problems(self) -> list[str]:
        problems = []
        if self.unit not in UNITS:
            problems.append(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.importance not in IMPORTANCES:
            problems.append(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if not 0 < self.fraction < 1:
            problems.append(f"fraction must be in (0, 1) (the fraction of units removed), got {self.fraction}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        return problems


def arch_of(model: nn.Module, unit: str) -> Arch:
    kind = model_type(model)
    supported = [t for t, a in ARCHS.items() if unit != "heads" or a.attn]
    if kind not in supported:
        raise TechniqueError(
            f"structured_prune: unit '{unit}' supports model types {supported}, not '{kind}'; use another unit or an unstructured technique (wanda_prune)"
        )
    return ARCHS[kind]


def units_to_remove(n_units: int, fraction: float, what: str) -> int:
    k = round(fraction * n_units)
    if not 0 < k < n_units:
        raise TechniqueError(
            f"structured_prune: fraction {fraction} of {n_units} {what} removes {k}; choose a fraction that removes between 1 and {n_units - 1}"
        )
    return k


def lowest(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k lowest scores (those removed), sorted."""
    return sorted(scores.topk(k, largest=False).indices.tolist())


# --- cutting Linear / Conv1D modules in place -------------------------------------------------------


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous().clone(), requires_grad=like.requires_grad)


def keep_outputs_(m: nn.Module, keep: torch.Tensor) -> None:
    """Keep only output features `keep` (1-D long) of a Linear or Conv1D."""
    if type(m).__name__ == "Conv1D":  # weight (in, out)
        m.weight, m.nf = _param(m.weight[:, keep], m.weight), len(keep)
    else:  # weight (out, in)
        m.weight, m.out_features = _param(m.weight[keep], m.weight), len(keep)
    if m.bias is not None:
        m.bias = _param(m.bias[keep], m.bias)


def keep_inputs_(m: nn.Module, keep: torch.Tensor) -> None:
    """Keep only input features `keep` (1-D long) of a Linear or Conv1D; the bias is per output, unchanged."""
    if type(m).__name__ == "Conv1D":
        m.weight, m.nx = _param(m.weight[keep], m.weight), len(keep)
    else:
        m.weight, m.in_features = _param(m.weight[:, keep], m.weight), len(keep)


def complement(n: int, removed: list[int], device) -> torch.Tensor:
    drop = set(removed)
    return torch.tensor([i for i in range(n) if i not in drop], dtype=torch.long, device=device)


# --- importance --------------------------------------------------------------------------------------


def _col_norms(m: nn.Module) -> torch.Tensor:
    return weight_out_in(m).float().norm(dim=0)  # (in,) ||W[:, c]||


def _activation_norms(model, modules: list[nn.Module], ctx: Context, batch_size: int) -> list[torch.Tensor]:
    """||X_c||_2 per input feature of each module, over the calibration tokens (one pass, dense model)."""
    tokens = ctx.calibration_tokens(TECHNIQUE.name)  # (n, seq_len) int64
    named = [(str(i), m) for i, m in enumerate(modules)]
    stats = collect_input_stats(model, named, tokens, batch_size=batch_size)
    return [stats[str(i)].feature_norm.float() for i in range(len(modules))]


def column_scores(model, blocks, out_name: str, config: StructuredPruneConfig, ctx: Context) -> list[torch.Tensor]:
    """Per block, (in,) score of each input column of `out_name`: ||X_c|| * ||W[:, c]|| (or ||W[:, c]|| alone)."""
    outs = [b.get_submodule(out_name) for b in blocks]
    col = [_col_norms(m) for m in outs]
    if config.importance == "magnitude":
        return col
    return [c * x.to(c.device) for c, x in zip(col, _activation_norms(model, outs, ctx, config.batch_size))]


@torch.no_grad()
def block_influence(model, blocks, ctx: Context, batch_size: int) -> torch.Tensor:
    """(n_blocks,) 1 - mean cosine similarity between each block's input and output hidden states, on the dense model."""
    batches = capture_block_inputs(model, blocks[0], ctx.calibration_tokens(TECHNIQUE.name), batch_size)
    scores = []
    for block in blocks:
        outputs = [replace(b, hidden=block_output(block, b)) for b in batches]  # the next block's inputs
        cos = torch.cat(
            [
                F.cosine_similarity(b.hidden.float(), o.hidden.float(), dim=-1).flatten()
                for b, o in zip(batches, outputs)
            ]
        )  # (tokens,)
        scores.append(1 - cos.double().mean())
        batches = outputs
    return torch.stack(scores).cpu()


# --- the three units ----------------------------------------------------------------------------------


def prune_mlp_channels_(model, arch: Arch, blocks, config: StructuredPruneConfig, ctx: Context) -> dict:
    n = weight_out_in(blocks[0].get_submodule(arch.mlp_out)).shape[1]
    k = units_to_remove(n, config.fraction, "MLP channels per layer")
    scores = column_scores(model, blocks, arch.mlp_out, config, ctx)  # per block (n,)
    if config.importance == "magnitude":  # times the norms of the rows that produce each channel
        scores = [
            s * torch.stack([weight_out_in(b.get_submodule(name)).float().norm(dim=1) for name in arch.mlp_in]).prod(0)
            for s, b in zip(scores, blocks)
        ]
    for block, s in zip(blocks, scores):
        keep = complement(n, lowest(s, k), block.get_submodule(arch.mlp_out).weight.device)
        for name in arch.mlp_in:
            keep_outputs_(block.get_submodule(name), keep)
        keep_inputs_(block.get_submodule(arch.mlp_out), keep)
        mlp = block.get_submodule(arch.mlp_out.rpartition(".")[0]) if "." in arch.mlp_out else block
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = n - k
    setattr(model.config, arch.mlp_size, n - k)
    return {"units_removed_per_layer": k, "new_sizes": {arch.mlp_size: n - k}}


def prune_heads_(model, arch: Arch, blocks, config: StructuredPruneConfig, ctx: Context) -> dict:
    cfg = model.config
    n_kv, n_q = cfg.num_key_value_heads, cfg.num_attention_heads
    rep, head_dim = n_q // n_kv, blocks[0].get_submodule(arch.attn).head_dim
    k = units_to_remove(n_kv, config.fraction, "key/value head groups per layer")
    o_name = f"{arch.attn}.o_proj"
    cols = column_scores(model, blocks, o_name, config, ctx)  # per block (n_q * head_dim,)
    for block, c in zip(blocks, cols):
        attn = block.get_submodule(arch.attn)
        score = c.pow(2).reshape(n_kv, rep * head_dim).sum(1)  # (n_kv,) the o_proj columns of each group
        if config.importance == "magnitude":  # plus the q, k, v rows of each group
            score = score + sum(
                weight_out_in(getattr(attn, p)).float().pow(2).sum(1).reshape(n_kv, -1).sum(1)
                for p in ("q_proj", "k_proj", "v_proj")
            )
        removed = lowest(score, k)
        dev = attn.o_proj.weight.device
        kv_keep = complement(n_kv * head_dim, [g * head_dim + d for g in removed for d in range(head_dim)], dev)
        q_keep = complement(
            n_q * head_dim,
            [(g * rep + r) * head_dim + d for g in removed for r in range(rep) for d in range(head_dim)],
            dev,
        )
        keep_outputs_(attn.q_proj, q_keep)
        keep_outputs_(attn.k_proj, kv_keep)
        keep_outputs_(attn.v_proj, kv_keep)
        keep_inputs_(attn.o_proj, q_keep)
    # num_key_value_groups (= rep) is unchanged; head_dim is written so it is not re-derived from hidden_size.
    cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim = n_kv - k, n_q - k * rep, head_dim
    return {
        "units_removed_per_layer": k,
        "new_sizes": {"num_attention_heads": n_q - k * rep, "num_key_value_heads": n_kv - k, "head_dim": head_dim},
    }


def prune_layers_(model, arch: Arch, blocks, config: StructuredPruneConfig, ctx: Context) -> dict:
    cfg = model.config
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise TechniqueError(
            "structured_prune: this GPT-2 scales attention by 1/layer_idx, so renumbered layers would compute differently; use unit 'mlp_channels'"
        )
    k = units_to_remove(len(blocks), config.fraction, "decoder layers")
    if config.importance == "activation":
        score = block_influence(model, blocks, ctx, config.batch_size)
    else:
        score = torch.stack(
            [
                weight_out_in(b.get_submodule(arch.attn_out)).float().norm()
                + weight_out_in(b.get_submodule(arch.mlp_out)).float().norm()
                for b in blocks
            ]
        )
    removed = lowest(score, k)
    remove_layers_(model, arch, blocks, removed)
    return {"units_removed": removed, "new_sizes": {"num_hidden_layers": len(blocks) - len(removed)}}


PRUNERS = {"mlp_channels": prune_mlp_channels_, "heads": prune_heads_, "layers": prune_layers_}


@torch.no_grad()
def apply(model: nn.Module, config: StructuredPruneConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    arch = arch_of(model, config.unit)
    blocks = list(model.get_submodule(arch.blocks))
    before = sum(p.numel() for p in model.parameters())
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    ctx.report(name, 0, 1)
    details = PRUNERS[config.unit](model, arch, blocks, config, ctx)
    removed = before - sum(p.numel() for p in model.parameters())
    ctx.report(name, 1, 1)
    record_change(
        ctx, name, [arch.blocks], removed, model,
        unit=config.unit, fraction=config.fraction, importance=config.importance, params_before=before,
        params_removed=removed, fraction_of_block_params_removed=removed / block_params, **details,
    )  # fmt: skip
    return model


TECHNIQUE = Technique(
    name="structured_prune",
    config_cls=StructuredPruneConfig,
    apply=apply,
    kind="pruning",
    needs_calibration=lambda config: config.importance == "activation",  # 'magnitude' reads no data
)
