"""Offloading to disk: the variant keeps only part of its weights in memory (a system technique).

No weight changes. `apply` records `"inference": {"offload": {"max_memory_frac": f, ...}}`; the
variant is saved whole, and `load_model` loads it with accelerate's hooks so that the parts every
token reads whole (embeddings, head, norms) and the first decoder blocks stay in memory within
`max_memory_frac` of the weights' bytes, and the other blocks are read from the artifact's
safetensors file each time they run (runtime/offload). Outputs are the in-memory model's; each
decode step reads every offloaded byte once, which the benchmark counts
(`offload_read_mib_per_tok`) and times warm (page cache) and cold (`tpot_cold_ms`, the file
evicted from the page cache before every step).

For a model that does not fit in memory otherwise; it makes decoding slower. Float weights
only here (packed quantized layers load through their own path), CPU only.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.measure.memory import weights_bytes
from frugalm.runtime import compiled, offload
from frugalm.runtime.families import describe, family, model_type
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.runtime.quant_linear import QuantLinear
from frugalm.techniques._arch import decoder_blocks
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    max_memory_frac: float = 0.4
    """Share of the weights' bytes kept in memory (the rest stay on disk); must hold at least the embeddings, head and norms."""

    def problems(self) -> list[str]:
        if not 0 < self.max_memory_frac < 1:
            return [
                f"max_memory_frac must be in (0, 1) (the share of the weights kept in memory, e.g. 0.4), got {self.max_memory_frac}"
            ]
        return []


def apply(model: nn.Module, config: OffloadConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise TechniqueError(f"{name}: packed quantized layers are not offloaded here; offload a float variant")
    if family(model) == "moe" or model_type(model) == "rwkv":
        why = ("its experts are stored in a layout transformers converts while loading, which weights left on disk cannot be"
               if family(model) == "moe" else "it rescales its output weights in place when it first runs, which weights left on disk cannot be")  # fmt: skip
        raise TechniqueError(
            f"{name}: {describe(model)} models are not supported: {why}; supported: dense Transformers, Mamba and Mamba2"
        )
    if inference_settings(model).get(compiled.SETTING):
        raise TechniqueError(
            f"{name}: a compiled decode graph cannot read weights from disk; drop one of compile_decode and offload"
        )
    found = decoder_blocks(model)
    if found is None:
        raise TechniqueError(f"{name}: found no decoder blocks in {type(model).__name__} to offload")
    path, _ = found
    total = weights_bytes(model)
    try:
        _, plan = offload.device_map(model, path, int(config.max_memory_frac * total))
    except ValueError as exc:
        raise TechniqueError(f"{name}: {exc}") from None
    setting = {"max_memory_frac": config.max_memory_frac, "blocks": path}
    setattr(model, INFERENCE_ATTR, {**inference_settings(model), offload.SETTING: setting})
    record_change(ctx, name, [f"{path}.{i}" for i in range(plan["blocks_in_memory"], plan["blocks_in_memory"] + plan["blocks_on_disk"])],
                  0, model, inference={offload.SETTING: setting}, plan=plan)  # fmt: skip
    return model


TECHNIQUE = Technique(name="offload", config_cls=OffloadConfig, apply=apply, kind="acceleration")
