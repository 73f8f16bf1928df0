"""Banks of experts as a saved variant runs them: found, run, stored packed, and cut down.

In transformers 5 a mixture-of-experts block (Mixtral, Qwen2-MoE, OLMoE) holds its experts as one
module with two 3-D parameters, `gate_up_proj` (experts, 2 x intermediate, hidden) and
`down_proj` (experts, hidden, intermediate), and a top-k router module returning (logits,
weights, indices). An expert computes down(act(gate(x)) * up(x)) on the tokens routed to it,
weighted by the router.

- `expert_forward` is that computation, written once over a `linear(name, expert, x)` accessor,
  so the float bank (calibration, with observers of each expert's inputs and outputs) and the
  packed banks run the same code. It is the eager loop over the experts hit, as transformers' "eager" experts
  implementation: the FLOP counter sees exactly the routed experts' matmuls.
- `QuantExperts` stores a bank as packed codes per expert, in the layout of `QuantLinear`
  (runtime/quant_linear): (experts, out, in x bits / 8) uint8 codes, (experts, out, groups)
  float16 scales and uint8 zero points. It computes by dequantizing the experts a forward
  routes to, one at a time (`kernel = "dequantize"`: it saves memory and storage, not time).
  `load_model` swaps in `FastExperts` on CPU where the kernels apply: each expert on ATen's
  packed int8/int4 kernels, as packed linear layers run (`to_fast_experts_`).
- `keep_experts_` removes experts from a block: the bank's rows and the router's, and the
  counts they carry. Every block keeps the same number, so the model's config states it and
  transformers reloads the pruned model as a plain one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from frugalm.errors import ModelError
from frugalm.runtime.quant_linear import (
    PackedWeightLinear,
    QuantLinear,
    dequantize_groups,
    pack,
    packed_eligible,
    unpack,
)

BANK_WEIGHTS = ("gate_up_proj", "down_proj")
"""The 3-D parameters of a bank of experts (transformers 5's Mixtral, Qwen2-MoE, OLMoE)."""
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")
"""Where a config states its experts per block (Mixtral; Qwen2-MoE and OLMoE)."""


def is_bank(module: nn.Module) -> bool:
    """A bank of experts: a QuantExperts or FastExperts, or a module whose own parameters are all 3-D with `num_experts` rows."""
    if isinstance(module, (QuantExperts, FastExperts)):
        return True
    n = getattr(module, "num_experts", None)
    own = list(module.parameters(recurse=False))
    return isinstance(n, int) and bool(own) and all(p.dim() == 3 and p.shape[0] == n for p in own)


def expert_banks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, top_k) of every bank of experts in `model`."""
    config = getattr(model, "config", None)
    top_k = getattr(config.get_text_config(), "num_experts_per_tok", None) if config is not None else None
    return [(name, m, top_k or m.num_experts) for name, m in model.named_modules() if is_bank(m)]


def routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every top-k router (transformers 5: returns (logits, weights, indices))."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "top_k", None), int) and isinstance(getattr(m, "num_experts", None), int)
        and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]  # fmt: skip


def bank_params(module: nn.Module) -> int:
    """Weights a bank holds (all experts), float or packed."""
    if isinstance(module, QuantExperts):
        return module.packed_params()
    if isinstance(module, FastExperts):
        return sum(m.packed_params() for m in module.modules() if isinstance(m, PackedWeightLinear))
    return sum(p.numel() for p in module.parameters(recurse=False))


def bank_problem(name: str, module: nn.Module) -> str | None:
    """Why a bank's weights are not the gate_up/down pair `expert_forward` runs, or None."""
    own = {k: tuple(p.shape) for k, p in module.named_parameters(recurse=False)}
    ok = set(own) == set(BANK_WEIGHTS) and (
        own["gate_up_proj"][1] == 2 * own["down_proj"][2] and own["gate_up_proj"][2] == own["down_proj"][1]
    )
    if ok and not getattr(module, "has_bias", False) and not getattr(module, "is_transposed", False):
        return None
    return (
        f"the experts at '{name}' hold {own}, not the (experts, 2 x intermediate, hidden) gate_up_proj and "
        "(experts, hidden, intermediate) down_proj handled here (Mixtral, Qwen2-MoE, OLMoE); leave them out of `targets`"
    )


Observer = Callable[[int, str, torch.Tensor], None]
"""observer(expert, weight name, inputs (tokens, in)): what each expert's matmuls are fed."""


def expert_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    linear: Callable[[str, int, torch.Tensor], torch.Tensor],
    act_fn: Callable,
    observe: Observer | None = None,
    out_of: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The routed experts' sum for hidden (tokens, hidden), top_k_index/weights (tokens, top_k).

    `linear(name, e, x)` is x times expert e's weight `name` transposed; `observe` sees each expert's
    inputs, `out_of(e, outputs, router weights)` its unweighted outputs (expert pruning's
    saliency)."""
    out = torch.zeros_like(hidden)
    for e in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == e)
        x = hidden[token]
        if observe:
            observe(e, "gate_up_proj", x)
        gate, up = linear("gate_up_proj", e, x).chunk(2, dim=-1)
        h = act_fn(gate) * up
        if observe:
            observe(e, "down_proj", h)
        y = linear("down_proj", e, h)
        routed = top_k_weights[token, slot, None]
        if out_of:
            out_of(e, y, routed)
        out.index_add_(0, token, (y * routed).to(out.dtype))
    return out


def bank_linear(bank: nn.Module) -> Callable[[str, int, torch.Tensor], torch.Tensor]:
    """`linear(name, expert, x)` of a float or packed bank, for expert_forward."""
    if isinstance(bank, (QuantExperts, FastExperts)):
        return bank.linear
    return lambda name, e, x: F.linear(x, getattr(bank, name)[e].to(x.dtype))


class QuantExperts(nn.Module):
    """A bank of experts stored as packed low-bit codes per expert (see module doc)."""

    kernel = "dequantize"

    def __init__(
        self, num_experts: int, shapes: dict[str, tuple[int, int]], bits: int, group_sizes: dict[str, int], act_fn
    ):
        super().__init__()
        self.num_experts, self.bits, self.act_fn = num_experts, bits, act_fn
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.group_sizes = {k: (shapes[k][1] if g <= 0 else g) for k, g in group_sizes.items()}
        for name, (out_f, in_f) in self.shapes.items():
            groups = in_f // self.group_sizes[name]
            self.register_buffer(
                f"{name}_qweight", torch.zeros(num_experts, out_f, in_f * bits // 8, dtype=torch.uint8)
            )
            self.register_buffer(f"{name}_scales", torch.zeros(num_experts, out_f, groups, dtype=torch.float16))
            self.register_buffer(f"{name}_zeros", torch.zeros(num_experts, out_f, groups, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, bank: nn.Module, codes: dict[str, list[tuple]], bits: int) -> QuantExperts:
        """From a float bank and, per weight name, every expert's (q (out, in), scale (out, G), zero (out, G))."""
        shapes = {name: tuple(getattr(bank, name).shape[1:]) for name in BANK_WEIGHTS}
        groups = {name: shapes[name][1] // codes[name][0][1].shape[1] for name in BANK_WEIGHTS}
        new = cls(bank.num_experts, shapes, bits, groups, bank.act_fn)
        for name in BANK_WEIGHTS:
            for e, (q, scale, zero) in enumerate(codes[name]):
                getattr(new, f"{name}_qweight")[e] = pack(q, bits)
                getattr(new, f"{name}_scales")[e] = scale
                getattr(new, f"{name}_zeros")[e] = zero
        return new.to(getattr(bank, BANK_WEIGHTS[0]).device)

    def spec(self) -> dict:
        """What rebuilding this module's empty slot needs (frugalm.json's packed_experts)."""
        return {"num_experts": self.num_experts, "bits": self.bits,
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "group_sizes": dict(self.group_sizes)}  # fmt: skip

    def packed_params(self) -> int:
        return self.num_experts * sum(o * i for o, i in self.shapes.values())

    def dequantized(self, name: str, e: int, dtype=torch.float32) -> torch.Tensor:
        """Expert e's weight `name` (out, in)."""
        q = unpack(getattr(self, f"{name}_qweight")[e], self.bits)
        return dequantize_groups(q, getattr(self, f"{name}_scales")[e], getattr(self, f"{name}_zeros")[e], dtype)

    def linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(name, e, x.dtype))

    def expert_linear(self, name: str, e: int) -> QuantLinear:
        """Expert e's weight `name` as a QuantLinear sharing nothing with the bank (for the CPU kernels)."""
        out_f, in_f = self.shapes[name]
        layer = QuantLinear(in_f, out_f, self.bits, self.group_sizes[name], bias=False)
        for key in ("qweight", "scales", "zeros"):
            getattr(layer, key).copy_(getattr(self, f"{name}_{key}")[e])
        return layer

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return expert_forward(hidden_states, top_k_index, top_k_weights, self.linear, self.act_fn)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, bits={self.bits}, group_sizes={self.group_sizes}, kernel={self.kernel}"


class FastExperts(nn.Module):
    """A packed bank on the CPU's weight-only kernels: each expert's two weights as a
    `PackedWeightLinear` (runtime/quant_linear: ATen's int8/int4 packed matmuls for decode rows,
    bfloat16 for prefill), made at load time from the stored codes, as packed linear layers are.
    Its parameter count and kernels are its expert layers'; it is never saved (save first)."""

    def __init__(self, source: QuantExperts):
        super().__init__()
        self.num_experts, self.bits, self.act_fn = source.num_experts, source.bits, source.act_fn
        self.experts = nn.ModuleDict({
            name: nn.ModuleList(PackedWeightLinear(source.expert_linear(name, e)) for e in range(self.num_experts))
            for name in BANK_WEIGHTS
        })  # fmt: skip

    def linear(self, name: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts[name][e](x)

    def forward(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        return expert_forward(hidden_states, top_k_index, top_k_weights, self.linear, self.act_fn)


def to_fast_experts_(model: nn.Module) -> list[str]:
    """Swap FastExperts in for every packed bank whose expert weights the CPU kernels all take
    (runtime/quant_linear.packed_eligible); returns the names swapped. Others stay dequantized."""
    swapped = []
    for name, bank in list(model.named_modules()):
        if not isinstance(bank, QuantExperts) or bank.get_buffer(f"{BANK_WEIGHTS[0]}_qweight").device.type != "cpu":
            continue
        if all(packed_eligible(bank.expert_linear(w, 0)) for w in BANK_WEIGHTS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, FastExperts(bank))
            swapped.append(name)
    return swapped


def restore_packed_experts_(model: nn.Module, specs: dict[str, dict]) -> None:
    """Put empty QuantExperts slots where frugalm.json's packed_experts says, before the weights load."""
    for name, spec in specs.items():
        skeleton = model.get_submodule(name)
        slot = QuantExperts(spec["num_experts"], spec["shapes"], spec["bits"], spec["group_sizes"], skeleton.act_fn)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, slot)


# --- removing experts -----------------------------------------------------------------------------


def block_router(model: nn.Module, bank_name: str) -> tuple[str, nn.Module]:
    """The router of the block holding the bank `bank_name` (its sibling module)."""
    parent = bank_name.rpartition(".")[0]
    found = [(n, m) for n, m in routers(model) if n.rpartition(".")[0] == parent]
    if len(found) != 1:
        raise ModelError(f"the experts at '{bank_name}' have {len(found)} routers beside them, expected one")
    return found[0]


@torch.no_grad()
def keep_experts_(model: nn.Module, keep: dict[str, list[int]]) -> None:
    """Keep only the listed experts (ascending indices) of each bank, in the bank and its router.

    Every bank must keep the same number: the config's expert count is set to it."""
    counts = {len(v) for v in keep.values()}
    if len(counts) != 1:
        raise ModelError(f"every block must keep the same number of experts, got {sorted(counts)}")
    (kept,) = counts
    for bank_name, experts in keep.items():
        bank = model.get_submodule(bank_name)
        index = torch.tensor(experts, dtype=torch.long)
        _, router = block_router(model, bank_name)
        router.weight = nn.Parameter(router.weight.data[index.to(router.weight.device)].clone())
        router.num_experts = kept
        if isinstance(bank, QuantExperts):
            for key, buf in list(bank.named_buffers(recurse=False)):
                setattr(bank, key, buf[index.to(buf.device)].clone())
        else:
            for key, p in list(bank.named_parameters(recurse=False)):
                setattr(bank, key, nn.Parameter(p.data[index.to(p.device)].clone(), requires_grad=p.requires_grad))
        bank.num_experts = kept
    config = model.config.get_text_config()
    for key in EXPERT_COUNT_KEYS:
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, kept)
