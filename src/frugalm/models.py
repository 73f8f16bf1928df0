"""Load causal LMs and their tokenizers from a local Hugging Face folder or a hub id.

Every model reference is first resolved to a local folder (`resolve_model`): the benchmark
measures the artifact on disk as well as the model in memory, so a hub id is fetched (or found
in the local cache) before anything else happens. Loading itself is the transformers Auto
classes; nothing here is architecture-specific.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_flash_attn_2_available

from frugalm.assets import DEFAULT_MODEL_DIR
from frugalm.atomic import atomic_folder
from frugalm.errors import ConfigError, ModelError, suggest
from frugalm.runtime import cascade, compiled, decoding, families, offload
from frugalm.runtime.experts import FastExperts, QuantExperts, restore_packed_experts_, to_fast_experts_
from frugalm.runtime.modules import INFERENCE_ATTR, inference_settings
from frugalm.runtime.quant_linear import (
    CodesLinear,
    Int8Linear,
    PackedWeightLinear,
    QuantLinear,
    set_linear_formats_,
    to_fast_kernels_,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL_NAME = "frugalm-default"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Files a loadable model folder needs; the weights come in one of these formats.
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the reference the user gave and the local folder it resolved to."""

    ref: str
    path: Path


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    inference: dict = field(default_factory=dict)
    """How the model runs beyond its weights, from frugalm.json (e.g. {"kv_cache": {...}}); see inference_settings."""


def resolve_model(ref: str | os.PathLike | None) -> ModelSource:
    """Resolve a model reference to a local folder, without loading weights.

    None means the built-in default model. An existing path must be a model folder. Anything
    that looks like a hub id ("org/name") is looked up in the local hub cache, then downloaded.
    """
    if ref is None or str(ref) == DEFAULT_MODEL_NAME:
        return ModelSource(DEFAULT_MODEL_NAME, check_model_folder(DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME))
    text = str(ref)
    path = Path(text).expanduser()
    if path.exists():
        return ModelSource(text, check_model_folder(path.resolve(), text))
    if not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise ModelError(
            f"model path '{text}' does not exist; pass a folder saved with save_pretrained or a hub id like 'HuggingFaceTB/SmolLM2-135M'"
        )
    return ModelSource(text, _download(text))


def check_model_folder(path: Path, ref: str) -> Path:
    if not path.is_dir():
        raise ModelError(
            f"'{ref}' is a file, not a model folder; pass the folder that holds config.json and the weights"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"'{ref}' is not a model folder: it has no config.json; pass a folder saved with save_pretrained"
        )
    if not any(any(path.glob(g)) for g in _WEIGHT_GLOBS):
        raise ModelError(
            f"'{ref}' has a config.json but no weights (*.safetensors or pytorch_model*.bin); save the model with save_pretrained"
        )
    return path


# --- safetensors sanity, checked before any loading ---------------------------------------------

_SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses longer headers too
_SAFETENSORS_INDEX = "model.safetensors.index.json"
# Bytes per element of the dtypes whose sizes are whole bytes; others are not size-checked.
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def folder_identity(path: Path) -> list:
    """The files of a model folder as (name, size, mtime_ns), sorted: equal while none changes."""
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())


def check_weights(source: ModelSource) -> None:
    """Refuse a model folder whose safetensors weights are damaged, before anything loads them.

    Checks every *.safetensors file in the folder and every shard that a
    model.safetensors.index.json names (which must exist). Reads only the headers, so it is
    cheap; load_model and the benchmark's parent call it (resolve_model does not: callers may
    look at the files' sizes first).
    """
    folder, ref = source.path, source.ref
    files = set(folder.glob("*.safetensors"))
    index = folder / _SAFETENSORS_INDEX
    if index.is_file():
        shards = _index_shards(index, ref)
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelError(
                f"'{ref}': {index.name} names shard '{missing[0]}' which is missing ({len(missing)} missing in all); {_REDOWNLOAD}"
            )
        files |= {folder / s for s in shards}
    for f in sorted(files):
        problem = safetensors_problem(f)
        if problem:
            raise ModelError(f"'{ref}': weights file {f.name} is damaged ({problem}); {_REDOWNLOAD}")


_REDOWNLOAD = "re-download or re-save the model (save_pretrained), then try again"


def _index_shards(index: Path, ref: str) -> set[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {str(s) for s in weight_map.values()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"'{ref}': {index.name} cannot be read ({type(exc).__name__}); {_REDOWNLOAD}") from None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's layout, or None.

    The format: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor to
    {dtype, shape, data_offsets: [begin, end]} (relative to the data after the header), then the
    data, which the tensors must cover exactly. A truncated file fails the last rule.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size < 8:
                return f"{size} bytes, shorter than the 8-byte header length"
            n = int.from_bytes(f.read(8), "little")
            if n > min(_SAFETENSORS_MAX_HEADER, size - 8):
                return f"header length {n} does not fit in the file's {size} bytes"
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    except (UnicodeDecodeError, ValueError):
        return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    return _tensor_layout_problem(header, size - 8 - n)


def _tensor_layout_problem(header: dict, data_bytes: int) -> str | None:
    covered = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(d) for d in info["shape"]], str(info["dtype"])
        except (TypeError, ValueError, KeyError):
            return f"tensor '{name}' has no valid dtype, shape and data_offsets"
        if not 0 <= begin <= end or end > data_bytes:
            return f"tensor '{name}' ends at byte {end} of the data, which has only {data_bytes} bytes (truncated?)"
        if dtype in _DTYPE_BYTES and math.prod(shape) * _DTYPE_BYTES[dtype] != end - begin:
            return f"tensor '{name}' of shape {shape} and dtype {dtype} does not fill its {end - begin} bytes"
        covered = max(covered, end)
    if covered != data_bytes:
        return f"the tensors cover {covered} of its {data_bytes} data bytes"
    return None


def _download(repo_id: str) -> Path:
    """Fetch a hub repo's model files (or find them in the cache) and return the local folder."""

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelError(
            f"model '{repo_id}' is not a local folder and is not in the Hugging Face cache, and the hub "
            f"cannot be reached (offline?); download it where there is network "
            f"(`hf download {repo_id} --local-dir DIR`) and pass DIR"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", "?")
        raise ModelError(
            f"model '{repo_id}' could not be fetched from the Hugging Face hub (HTTP {status}); check the id, or pass a local folder"
        ) from None


def torch_dtype(name: str) -> torch.dtype:

    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'{suggest(name, DTYPES)}")
    return getattr(torch, name)


def torch_device(name: str) -> torch.device:

    kind = name.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device '{name}'{suggest(name, ('cpu', 'cuda'))}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu, or install a CUDA build of torch (see README)"
        )
    return torch.device(name)


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
"""Attention kernels a bench can ask for: transformers' matmul-softmax-matmul in Python (eager),
torch's scaled_dot_product_attention (sdpa), the flash-attn package's kernel (CUDA only)."""


def check_attn_implementation(name: str, config, device: torch.device) -> None:
    """Refuse, before any model loads, an attention implementation that is unknown, that the
    model's class does not support, or that this machine lacks (ConfigError, one line)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"unknown attention implementation '{name}'{suggest(name, ATTN_IMPLEMENTATIONS)}")
    if families.family(config) == "recurrent":
        raise ConfigError(
            f"attn_implementation {name}: {families.describe(config)} has no attention layers; leave the setting out"
        )
    try:
        cls = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(
            f"attn_implementation {name}: transformers has no causal LM class for {type(config).__name__}"
        ) from None
    flag = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}.get(name)
    if flag and not getattr(cls, flag, False):
        raise ConfigError(f"attn_implementation {name}: {cls.__name__} does not support it; use eager")
    if name == "flash_attention_2":
        if device.type != "cuda" or not is_flash_attn_2_available():
            raise ConfigError(
                "attn_implementation flash_attention_2 needs a CUDA device and the flash-attn package (pip install flash-attn); use sdpa or eager"
            )


def load_model(
    ref: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    fast_kernels: bool = True,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode on `device`, in `dtype`.

    `attn_implementation` (eager, sdpa, flash_attention_2; see check_attn_implementation) sets the
    attention kernel of the model and of any model it carries; None: transformers' default. A
    recurrent model (RWKV, Mamba) gets the Transformer's cache interface (runtime/families).

    Packed quantized layers are rebuilt from the artifact's frugalm.json, each in its recorded
    format (inference.linear_formats). With `fast_kernels` a layer runs on the device's real
    kernel for its format where one exists (on CPU: fbgemm for w8a8-dynamic, ATen's packed
    weight-only kernels for w8a16/w4a16, see runtime/quant_linear), never through a kernel that
    quantizes activations the format does not. A variant recorded to decode compiled
    (inference.compiled_decode) gets its compiled path installed (runtime/compiled); a
    speculative one (inference.decoding) gets its draft, from the artifact's draft/ folder; an
    offloaded one (inference.offload) keeps part of its blocks on disk (runtime/offload).
    """

    source = resolve_model(ref)
    dev, dt = torch_device(device), torch_dtype(dtype)
    check_weights(source)
    tokenizer = load_tokenizer(source)
    meta = read_metadata(source.path)
    inference = (meta or {}).get("inference") or {}
    offloaded = inference.get(offload.SETTING)
    if offloaded and dev.type != "cpu":
        raise ModelError(
            f"'{source.ref}' is offloaded to disk (its offload stage), which runs on the CPU here; load it with --device cpu"
        )
    try:
        if meta and (meta.get("packed_layers") or meta.get("packed_experts")):
            model = _load_packed(source, meta, dt)
        elif offloaded:
            model, _ = offload.load(source.path, offloaded, dt)  # part of the weights stay on disk
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dt)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"'{source.ref}' could not be loaded as a causal LM by transformers: {first_line}") from None
    if not offloaded:
        model.to(dev)
    model.eval()
    if attn_implementation:
        model.set_attn_implementation(attn_implementation)
    families.install(model)
    if meta and (meta.get("packed_layers") or meta.get("packed_experts")):
        set_linear_formats_(model, inference.get("linear_formats"))  # None: saved before formats were recorded
        if fast_kernels and dev.type == "cpu":
            to_fast_kernels_(model)
            to_fast_experts_(model)
    if inference:
        setattr(model, INFERENCE_ATTR, inference)
    if inference.get(compiled.SETTING):
        compiled.install(model, inference[compiled.SETTING])
    if inference.get(decoding.SETTING, {}).get("method") == "speculative":
        draft = _companion(
            source, decoding.DRAFT_DIR, "decodes speculatively", device, dtype, fast_kernels, attn_implementation
        )
        decoding.attach_draft(model, draft)
    if inference.get(cascade.SETTING):
        small = _companion(source, cascade.DIR, "is a cascade", device, dtype, fast_kernels, attn_implementation)
        cascade.attach(model, small)
    return LoadedModel(model, tokenizer, source, dev, dt, inference)


def _companion(source: ModelSource, sub: str, what: str, device, dtype, fast_kernels: bool, attn=None) -> nn.Module:
    """The model a variant carries in its folder `sub` (a speculative draft, a cascade's small model):
    a plain variant, never one that carries a strategy or a companion of its own (no recursion)."""
    folder = source.path / sub
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"'{source.ref}' {what} but its {sub}/ folder is missing; the artifact is damaged: re-create it"
        )
    inner = (read_metadata(folder) or {}).get("inference") or {}
    if inner.get(decoding.SETTING) or inner.get(cascade.SETTING):
        raise ModelError(
            f"'{source.ref}': its {sub}/ model carries a decoding strategy or cascade of its own; frugalm never writes that: re-create the artifact"
        )
    return load_model(folder, device=device, dtype=dtype, fast_kernels=fast_kernels, attn_implementation=attn).model


def load_tokenizer(source: ModelSource):

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(
            f"'{source.ref}' has no usable tokenizer ({type(exc).__name__}); save one beside the model with tokenizer.save_pretrained"
        ) from None
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # no pad token: pad with EOS, as generation does
    return tokenizer


def context_length(config) -> int | None:
    """The longest sequence the model's position scheme supports, from its config."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def read_config(source: ModelSource):
    """The model's transformers config, read without loading weights."""

    try:
        return AutoConfig.from_pretrained(source.path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"'{source.ref}': config.json could not be read by transformers ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix or regenerate it"
        ) from None


# --- variant artifacts -----------------------------------------------------------------------

METADATA_FILE = "frugalm.json"
ARTIFACT_FORMAT = "frugalm-artifact v1"


def packed_layers(model: nn.Module) -> dict[str, dict]:
    """Shapes of every packed quantized layer, enough to rebuild its empty module before loading."""

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, PackedWeightLinear, CodesLinear)):
            raise AssertionError("save a variant before swapping in fast kernels (to_fast_kernels_)")
        if isinstance(m, QuantLinear):
            layers[name] = {
                "in_features": m.in_features,
                "out_features": m.out_features,
                "bits": m.bits,
                "group_size": m.group_size,
                "bias": m.bias is not None,
            }
    return layers


def save_variant(
    model: nn.Module, tokenizer, out_dir: str | os.PathLike, metadata: dict, *, force: bool = False
) -> Path:
    """Save in Hugging Face layout plus frugalm.json, atomically: the folder is complete or absent.

    An existing `out_dir` is replaced only if frugalm wrote it (or `force`).
    """

    with atomic_folder(out_dir, force=force) as tmp:
        _write_variant(model, tokenizer, tmp, metadata)
        companions = ((decoding.DRAFT_DIR, decoding.draft_of(model), "draft"), (cascade.DIR, cascade.small_of(model), "cascade's small model"))  # fmt: skip
        for sub, companion, role in companions:  # a variant folder of its own inside the artifact
            if companion is not None:
                (tmp / sub).mkdir()
                _write_variant(companion, tokenizer, tmp / sub, {"role": f"{role} of the parent folder's variant"})
    return Path(out_dir).expanduser().resolve()


def _write_variant(model: nn.Module, tokenizer, folder: Path, metadata: dict) -> None:
    layers, experts = packed_layers(model), packed_experts(model)
    if layers or experts:  # frugalm's own layout, loaded by _load_packed
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
        _write_module_weights(model, folder)
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    meta = {
        "format": ARTIFACT_FORMAT,
        **metadata,
        "packed_layers": layers,
        **({"packed_experts": experts} if experts else {}),
        "inference": inference_settings(model),
    }
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))


def packed_experts(model: nn.Module) -> dict[str, dict]:
    """Shapes of every packed bank of experts (runtime/experts.QuantExperts)."""
    if any(isinstance(m, FastExperts) for m in model.modules()):
        raise AssertionError("save a variant before swapping in fast kernels (to_fast_experts_)")
    return {name: m.spec() for name, m in model.named_modules() if isinstance(m, QuantExperts)}


def _write_module_weights(model: nn.Module, folder: Path) -> None:
    """A packed variant's weights under its module names, in one file, in place of save_pretrained's.

    save_pretrained renames some families' keys back to their original checkpoint layout
    (Mixtral's experts become `block_sparse_moe.experts.N.w1`), which packed buffers do not
    have; _load_packed loads this file as is. A tensor shared by two names (a tied head) is
    written once, under its first name."""
    state, seen = {}, set()
    for key, t in model.state_dict().items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident not in seen:
            seen.add(ident)
            state[key] = t.detach().contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def read_metadata(path: Path) -> dict | None:
    meta = path / METADATA_FILE
    return json.loads(meta.read_text()) if meta.is_file() else None


def _load_packed(source: ModelSource, meta: dict, dtype) -> nn.Module:
    """Rebuild a model whose quantized layers are packed: empty skeleton, QuantLinear slots, weights."""

    config = read_config(source)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    restore_packed_experts_(model, meta.get("packed_experts") or {})
    for name, spec in (meta.get("packed_layers") or {}).items():
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            child,
            QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["bias"]),
        )
    state = {}
    for f in sorted(source.path.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ModelError(
            f"'{source.ref}': weights do not match its frugalm.json (missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}); the artifact is damaged: re-create it"
        )
    model.tie_weights()
    return model
