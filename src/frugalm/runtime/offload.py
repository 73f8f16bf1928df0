"""Offloading: part of a variant's weights stay on disk and are read at every forward that needs them.

A variant recorded with `"inference": {"offload": {"max_memory_frac": f, "blocks": path}}` loads
through accelerate's big-model hooks (`from_pretrained(device_map=...)`): the parts every
token needs and that are read whole anyway (embeddings, the output head, the final norm), then
the decoder blocks in order, stay in memory while they fit in `f` of the weights' bytes; the
remaining blocks are mapped to "disk". Their weights are read from the artifact's own
safetensors file when their block runs and dropped after it (accelerate's
OffloadedWeightsLoader reads safetensors in place: nothing is copied to an offload folder), so
memory holds the resident part plus one block. Every decode step reads every offloaded byte
once: a memory-for-time trade that pays where the model would not fit otherwise.

The device map is built here rather than by accelerate's `infer_auto_device_map`, which on CPU
alone mapped the whole model to disk at a 40% budget (it reserves room for the largest layer
and has no notion of which modules every token reads in full).

Counting and cache state: `bytes_read(model)` is the running count of bytes the hooks read
from the file (counted at the loader); `evict(folder)` drops the artifact's weight files from
the OS page cache (posix_fadvise DONTNEED) so that the next reads come from the disk: the cold
figure; otherwise the reads hit the page cache: the warm one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils.offload import OffloadedWeightsLoader
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

SETTING = "offload"


def _unique(module: nn.Module) -> list[torch.Tensor]:
    return list({id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _unique(module))


def device_map(model: nn.Module, blocks_path: str, budget_bytes: int) -> tuple[dict[str, str], dict]:
    """(accelerate device map, what it keeps): everything outside the decoder blocks in memory, then
    blocks in order while the total fits `budget_bytes`, the rest on disk. Raises ValueError when
    the parts outside the blocks alone exceed the budget."""
    blocks = model.get_submodule(blocks_path)
    block_bytes = [_bytes(b) for b in blocks]
    dmap: dict[str, str] = {}
    ancestors = blocks_path.split(".")

    def walk(module: nn.Module, prefix: str, depth: int) -> None:
        for name, _ in module.named_parameters(recurse=False):
            dmap[f"{prefix}{name}"] = "cpu"
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if depth < len(ancestors) and name == ancestors[depth]:
                if depth < len(ancestors) - 1:
                    walk(child, path + ".", depth + 1)
            else:
                dmap[path] = "cpu"

    walk(model, "", 0)
    in_blocks = {id(t) for b in blocks for t in [*b.parameters(), *b.buffers()]}
    fixed = sum(t.numel() * t.element_size() for t in _unique(model) if id(t) not in in_blocks)  # tied weights once
    if fixed > budget_bytes:
        raise ValueError(
            f"the parts every token reads whole (embeddings, head, norms) take {fixed / 2**20:.1f} MiB, more than the "
            f"{budget_bytes / 2**20:.1f} MiB budget; raise max_memory_frac"
        )
    resident, kept = fixed, 0
    for i, size in enumerate(block_bytes):
        fits = resident + size <= budget_bytes and kept == i
        dmap[f"{blocks_path}.{i}"] = "cpu" if fits else "disk"
        if fits:
            resident, kept = resident + size, kept + 1
    plan = {"resident_bytes": resident, "offloaded_bytes": sum(block_bytes[kept:]), "blocks_in_memory": kept,
            "blocks_on_disk": len(block_bytes) - kept, "budget_bytes": budget_bytes}  # fmt: skip
    return dmap, plan


def load(path: Path, setting: dict, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    """The model at `path` with its blocks offloaded as `setting` asks, and the plan it followed."""
    config = AutoConfig.from_pretrained(path)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()
    total = _bytes(skeleton)
    dmap, plan = device_map(skeleton, setting["blocks"], int(setting["max_memory_frac"] * total))
    plan["weights_bytes"] = total
    model = AutoModelForCausalLM.from_pretrained(path, device_map=dmap, dtype=dtype)
    for loader in _loaders(model):
        if not isinstance(loader, _CountingLoader):
            loader.__class__ = _CountingLoader
            loader.frugalm_bytes_read = 0
    model.__dict__["frugalm_offload_plan"] = plan
    return model, plan


class _CountingLoader(OffloadedWeightsLoader):
    """accelerate's loader, counting the bytes it reads from the weight files."""

    def __getitem__(self, key: str):
        tensor = super().__getitem__(key)
        if key not in self.state_dict:
            self.frugalm_bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def _loaders(model: nn.Module) -> list[OffloadedWeightsLoader]:
    """accelerate's weight loaders behind the model's offload hooks, each once."""
    found = {}
    for module in model.modules():
        loader = getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
        if isinstance(loader, OffloadedWeightsLoader):
            found[id(loader)] = loader
    return list(found.values())


def bytes_read(model: nn.Module) -> int:
    """Bytes the offload hooks have read from the weight files so far (0 for a model not offloaded)."""
    return sum(getattr(loader, "frugalm_bytes_read", 0) for loader in _loaders(model))


def plan_of(model: nn.Module) -> dict | None:
    return model.__dict__.get("frugalm_offload_plan")


def evict(folder: Path) -> int:
    """Drop the folder's weight files from the OS page cache; returns their bytes."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total
