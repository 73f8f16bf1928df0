"""Compiled decode: the variant decodes through `torch.compile` against a static KV cache (runtime/compiled).

A system technique: no weight changes. `apply` records the inference setting on the model, which
`save_variant` writes into frugalm.json as `"inference": {"compiled_decode": {"mode": ...}}` and
`load_model` restores by installing the compiled path; the benchmark then runs every decode step
of the variant compiled (prefill stays eager) and reports the compilation's wall time as
`compile_s`, a cost paid once per process and shape. It composes with weight techniques (the
packed int8/int4 layers are compiled into the graph) but not with kv_cache_quant, whose packed
cache grows by concatenation and cannot be static.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from frugalm.errors import TechniqueError
from frugalm.runtime import compiled, decoding
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.techniques._arch import decoder_blocks
from frugalm.techniques.base import Context, Technique, check_config, record_change


@dataclass(frozen=True, kw_only=True)
class CompileDecodeConfig:
    mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    """torch.compile mode: default, max-autotune-no-cudagraphs (longer compile, tuned kernels) or reduce-overhead (CUDA graphs; CUDA only)."""

    def problems(self) -> list[str]:
        if self.mode not in compiled.MODES:
            return [f"mode must be one of {', '.join(compiled.MODES)}, got {self.mode!r}"]
        return []


def apply(model: nn.Module, config: CompileDecodeConfig, ctx: Context) -> nn.Module:
    name = TECHNIQUE.name
    check_config(name, config)
    settings = inference_settings(model)
    if settings.get("kv_cache"):
        raise TechniqueError(
            f"{name}: this variant quantizes its KV cache (kv_cache_quant), whose packed cache cannot be static; drop one of the two stages"
        )
    if settings.get(decoding.SETTING):
        raise TechniqueError(
            f"{name}: this variant decodes with {settings[decoding.SETTING]['method']}, whose rounds run eager; drop one of the two stages"
        )
    compiled.check_fits(model, name)
    setting = {"mode": config.mode}
    setattr(model, INFERENCE_ATTR, {**settings, compiled.SETTING: setting})
    found = decoder_blocks(model)  # what runs inside the compiled graph, for the record
    layers = [f"{found[0]}.{i}" for i in range(len(found[1]))] if found else [type(model).__name__]
    record_change(ctx, name, layers, 0, model, inference={compiled.SETTING: setting})
    return model


TECHNIQUE = Technique(name="compile_decode", config_cls=CompileDecodeConfig, apply=apply, kind="acceleration")
