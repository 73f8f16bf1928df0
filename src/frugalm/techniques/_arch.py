"""One table of the architectures the techniques know: where the decoder blocks are, which
linear layers they hold, and the parts structured pruning cuts.

`DEFAULT_TARGETS`, the default `targets` of every technique that changes linear layers, is
derived from this table (the block-relative patterns of every architecture, each once), so one
list cannot drift from another. Configs are pure data and cannot depend on the model, so the
default is the union: a pattern that matches nothing in a given model costs nothing.

`decoder_blocks` is how every technique finds the blocks: the table's path for a known model
type, else the ModuleList holding the most linear layers (Llama-like models not listed here,
e.g. Mistral, keep block-by-block calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from frugalm.runtime.modules import is_linear


@dataclass(frozen=True)
class Arch:
    """Where an architecture keeps its blocks and projections (names relative to one block)."""

    blocks: str  # the ModuleList of decoder blocks
    linears: tuple[str, ...]  # fnmatch patterns of the attention and MLP linears in a block
    mlp_in: tuple[str, ...]  # linears whose output features are the MLP channels
    mlp_out: str  # the linear whose input features are the MLP channels
    mlp_size: str  # the config field holding the number of channels
    attn_out: str  # the attention output projection
    attn: str | None = None  # the GQA attention module (q/k/v/o_proj) when structured `heads` is supported


_LLAMA = Arch(
    "model.layers",
    ("mlp.*", "self_attn.*"),
    ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj",
    "intermediate_size",
    "self_attn.o_proj",
    attn="self_attn",
)
ARCHS = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "gpt2": Arch("transformer.h", ("attn.*", "mlp.*"), ("mlp.c_fc",), "mlp.c_proj", "n_inner", "attn.c_proj"),
    "gpt_neox": Arch(
        "gpt_neox.layers",
        ("attention.*", "mlp.*"),
        ("mlp.dense_h_to_4h",),
        "mlp.dense_4h_to_h",
        "intermediate_size",
        "attention.dense",
    ),
    "opt": Arch(
        "model.decoder.layers", ("self_attn.*", "fc1", "fc2"), ("fc1",), "fc2", "ffn_dim", "self_attn.out_proj"
    ),
}
"""model_type (config.model_type) -> Arch."""

DEFAULT_TARGETS: tuple[str, ...] = tuple(dict.fromkeys(f"*.{p}" for a in ARCHS.values() for p in a.linears))
"""("*.mlp.*", "*.self_attn.*", "*.attn.*", "*.attention.*", "*.fc1", "*.fc2"): attention and MLP
linears of Llama/Qwen2 (self_attn, mlp), GPT-2 (attn, mlp), GPT-NeoX (attention, mlp) and OPT
(self_attn, fc1, fc2); never the output head."""


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the decoder blocks, or None when the model has none."""
    arch = ARCHS.get(model_type(model))
    if arch is not None:
        try:
            return arch.blocks, model.get_submodule(arch.blocks)
        except AttributeError:  # a wrapped model: the table's path has a prefix; search instead
            pass
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name:
            count = sum(is_linear(m) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    return best


def remove_layers_(model: nn.Module, arch: Arch, blocks: list[nn.Module], removed: list[int]) -> None:
    """Drop the decoder blocks at indices `removed`, renumber the rest, update the config (structured_prune, distill)."""
    cfg = model.config
    kept = [b for i, b in enumerate(blocks) if i not in removed]
    for new_idx, block in enumerate(kept):
        for m in block.modules():  # the KV cache is indexed by layer_idx: it must be the new position
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new_idx
    parent, _, attr = arch.blocks.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.ModuleList(kept))
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in removed]
        inner = model.get_submodule(parent)
        if hasattr(inner, "has_sliding_layers"):
            inner.has_sliding_layers = "sliding_attention" in cfg.layer_types
    cfg.num_hidden_layers = len(kept)
