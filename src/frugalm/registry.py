"""THE list of techniques: name -> "module:attribute", imported only when used.

Adding a technique is one module in `frugalm/techniques/` and one line here. Docs, CLI listings
and the contract-test matrix are generated from this dict.
"""

from __future__ import annotations

import importlib

from frugalm.errors import ConfigError, suggest
from frugalm.techniques.base import Technique

TECHNIQUES: dict[str, str] = {
    "magnitude_prune": "frugalm.techniques.prune_magnitude:TECHNIQUE",
    "wanda_prune": "frugalm.techniques.prune_wanda:TECHNIQUE",
    "sparsegpt_prune": "frugalm.techniques.prune_sparsegpt:TECHNIQUE",
    "structured_prune": "frugalm.techniques.prune_structured:TECHNIQUE",
    "expert_prune": "frugalm.techniques.prune_experts:TECHNIQUE",
    "rtn_quant": "frugalm.techniques.quant_rtn:TECHNIQUE",
    "gptq_quant": "frugalm.techniques.quant_gptq:TECHNIQUE",
    "awq_quant": "frugalm.techniques.quant_awq:TECHNIQUE",
    "mixed_precision_quant": "frugalm.techniques.quant_mixed:TECHNIQUE",
    "kv_cache_quant": "frugalm.techniques.kv_cache_quant:TECHNIQUE",
    "compile_decode": "frugalm.techniques.compile_decode:TECHNIQUE",
    "speculative": "frugalm.techniques.speculative:TECHNIQUE",
    "prompt_lookup": "frugalm.techniques.prompt_lookup:TECHNIQUE",
    "early_exit": "frugalm.techniques.early_exit:TECHNIQUE",
    "offload": "frugalm.techniques.offload:TECHNIQUE",
    "distill": "frugalm.techniques.distill:TECHNIQUE",
    "lora_finetune": "frugalm.techniques.lora_finetune:TECHNIQUE",
    "masked_finetune": "frugalm.techniques.masked_finetune:TECHNIQUE",
    "full_finetune": "frugalm.techniques.full_finetune:TECHNIQUE",
    "dedup_data": "frugalm.techniques.dedup_data:TECHNIQUE",
    "cascade": "frugalm.techniques.cascade:TECHNIQUE",
    "prompt_pruning": "frugalm.techniques.prompt_pruning:TECHNIQUE",
}


def get_technique(name: str) -> Technique:
    if name not in TECHNIQUES:
        raise ConfigError(f"unknown technique '{name}'{suggest(name, TECHNIQUES)}")
    module, attr = TECHNIQUES[name].split(":")
    return getattr(importlib.import_module(module), attr)
