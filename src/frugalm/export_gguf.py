"""Export a Llama model or variant to GGUF, the single-file format llama.cpp (and ollama, LM Studio) runs.

Float layers are written as float32 (or float16 when asked; 1-D norms stay float32, as
llama.cpp's converter keeps them). Quantized layers are written only where frugalm's codes map
exactly onto a GGUF block type, block size 32, one float16 scale per block, each block taking
its group's scale (so the group size must be a multiple of 32; per-channel counts as one group):

- int8, w = (q - z) s:   Q8_0, w = d q8,        q8 = q - z, which must lie in -128..127
                         (always so for symmetric codes, z = 128).
- int4, z = 8 everywhere: Q4_0, w = d (q - 8),   the same codes.
- int4 otherwise:        Q4_1, w = d q + m,     m = -s z, which must be exact in float16.

Dequantized in float32 (d*q, then + m), every weight is then bit for bit frugalm's (q - z) s:
small integers times a float16 scale are exact in float32, and so is their sum when m is exact.
llama.cpp's CPU matmul for Q8_0/Q4_0/Q4_1 weights quantizes activations to 8 bits per block of
32 on the fly, so its logits differ slightly from frugalm's weight-only (w8a16/w4a16) figures;
the weights themselves are frugalm's.

Refused, each with one line naming the fix: w8a8-dynamic layers (their figures come from
fbgemm's per-tensor activation quantization, which llama.cpp does not do), group sizes that
are not a multiple of 32, codes that no block type holds exactly, architectures other than
Llama, and parts the llama.cpp Llama graph lacks (biases, scaled RoPE). Pruned models export as
dense float (zeros included); structurally pruned ones export at their new sizes.

Layout follows llama.cpp's convert_hf_to_gguf.py: llama.cpp names (token_embd.weight,
blk.N.attn_q.weight, ..., output_norm.weight; no output.weight when embeddings are tied), q/k
rows permuted from transformers' rotate-half RoPE layout to llama.cpp's interleaved pairs, and
the tokenizer as "llama" (sentencepiece-style BPE with byte fallback: scores rebuilt as minus
the piece's rank, which is what sentencepiece's BPE trainer assigns) or "gpt2" (byte-level BPE
with its merges).

The file is written beside the target and renamed over it, so it is complete or absent. An
existing file is replaced only if frugalm wrote it (it carries the `frugalm.version` key),
unless `force`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from frugalm import __version__
from frugalm.atomic import glob_escape, process_alive
from frugalm.errors import ConfigError
from frugalm.models import load_model
from frugalm.runtime.quant_linear import QuantLinear, unpack

FORMAT = "gguf"
DTYPES = ("float32", "float16")
OWNER_KEY = "frugalm.version"
"""The key frugalm writes into every GGUF file: the proof that it may replace the file."""
BLOCK = 32  # GGUF's block size for Q8_0, Q4_0 and Q4_1
Q = gguf.GGMLQuantizationType
FILE_TYPES = {
    Q.F32: gguf.LlamaFileType.ALL_F32,
    Q.F16: gguf.LlamaFileType.MOSTLY_F16,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
}
LAYER_NAMES = {  # transformers' Llama decoder layer -> llama.cpp's block tensor
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)-.*")


@dataclass(frozen=True)
class GgufExport:
    path: Path
    tensor_types: dict[str, int]
    """How many tensors of each GGUF type ("F32", "Q8_0", ...) the file holds."""
    file_type: str


def export_gguf(
    artifact: str | os.PathLike, out_file: str | os.PathLike, *, dtype: str = "float32", force: bool = False
) -> GgufExport:
    """Write `artifact` (a model folder or frugalm variant, Llama architecture) as one GGUF file.

    `dtype` is the type of float matrices (norms stay float32); quantized layers keep their
    exact block type whatever it is. Raises ConfigError for anything that cannot map exactly.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"unknown GGUF float type '{dtype}'; choose one of {', '.join(DTYPES)}")
    out = check_output_file(out_file, force=force)  # before any work
    lm = load_model(artifact, fast_kernels=False)
    model, config = lm.model, lm.model.config
    hp = _hyperparameters(config, str(artifact))
    tensors = _tensors(model, hp, np.float16 if dtype == "float16" else np.float32)
    types = Counter(t.name for _, _, t in tensors)
    main = max((t for _, _, t in tensors if t != Q.F32), key=lambda t: types[t.name], default=Q.F32)
    with _partial_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(Path(lm.source.path).name)
        writer.add_string(OWNER_KEY, __version__)
        _add_hyperparameters(writer, hp)
        writer.add_file_type(FILE_TYPES[main])
        _add_tokenizer(writer, Path(lm.source.path), hp["vocab_size"], str(artifact))
        for name, data, qtype in tensors:
            writer.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return GgufExport(out, dict(sorted(types.items())), FILE_TYPES[main].name)


# --- the model's shape ---------------------------------------------------------------------------


def _hyperparameters(config, where: str) -> dict:
    """What llama.cpp's Llama graph needs, refusing what it would compute differently."""
    if config.model_type != "llama":
        raise ConfigError(
            f"'{where}' is a {config.model_type} model; GGUF export supports the Llama architecture only: keep frugalm's own artifact or the compressed-tensors export"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    problems = [
        f"{key} is true" for key in ("attention_bias", "mlp_bias") if getattr(config, key, False)
    ]  # llama.cpp's Llama graph reads no biases for these
    if rope_type != "default":
        problems.append(f"RoPE type is '{rope_type}'")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"activation is '{config.hidden_act}'")
    if problems:
        raise ConfigError(
            f"'{where}': {'; '.join(problems)}, which frugalm's GGUF export does not map (plain Llama: no biases, default RoPE, SiLU); keep frugalm's own artifact"
        )
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": n_head,
        "head_count_kv": getattr(config, "num_key_value_heads", None) or n_head,
        "head_dim": head_dim,
        "rope_freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _add_hyperparameters(writer: gguf.GGUFWriter, hp: dict) -> None:
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    if hp["head_dim"] * hp["head_count"] != hp["embedding_length"]:  # llama.cpp assumes n_embd / n_head otherwise
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_freq_base"])
    writer.add_layer_norm_rms_eps(hp["rms_eps"])
    writer.add_vocab_size(hp["vocab_size"])


# --- tensors -------------------------------------------------------------------------------------


def _tensors(model: nn.Module, hp: dict, float_type) -> list[tuple[str, np.ndarray, gguf.GGMLQuantizationType]]:
    """(llama.cpp name, data, GGUF type) for every weight; refuses any weight left unmapped."""
    core = model.model
    hd = hp["head_dim"]
    expected = {  # (out, in) of each projection: llama.cpp has one size per kind for all blocks
        "self_attn.q_proj": (hp["head_count"] * hd, hp["embedding_length"]),
        "self_attn.k_proj": (hp["head_count_kv"] * hd, hp["embedding_length"]),
        "self_attn.v_proj": (hp["head_count_kv"] * hd, hp["embedding_length"]),
        "self_attn.o_proj": (hp["embedding_length"], hp["head_count"] * hd),
        "mlp.gate_proj": (hp["feed_forward_length"], hp["embedding_length"]),
        "mlp.up_proj": (hp["feed_forward_length"], hp["embedding_length"]),
        "mlp.down_proj": (hp["embedding_length"], hp["feed_forward_length"]),
    }
    entries = [("token_embd.weight", "model.embed_tokens", core.embed_tokens, None)]
    for i, layer in enumerate(core.layers):
        for hf, cpp in LAYER_NAMES.items():
            heads = {"self_attn.q_proj": hp["head_count"], "self_attn.k_proj": hp["head_count_kv"]}.get(hf)
            entries.append((f"blk.{i}.{cpp}.weight", f"model.layers.{i}.{hf}", layer.get_submodule(hf), heads))
    entries.append(("output_norm.weight", "model.norm", core.norm, None))
    if not hp["tied"]:
        entries.append(("output.weight", "lm_head", model.lm_head, None))

    out, covered = [], set()
    for gguf_name, hf_name, module, heads in entries:
        shape = expected.get(hf_name.split(".", 3)[-1])
        _check_module(hf_name, module, shape)
        perm = _rope_permutation(heads, hd) if heads else None
        out.append((gguf_name, *_tensor_data(hf_name, module, perm, float_type)))
        covered.update(f"{hf_name}.{n}" for n, _ in module.named_parameters())
        covered.update(f"{hf_name}.{n}" for n, _ in module.named_buffers())
    left = [n for n, _ in (*model.named_parameters(), *model.named_buffers()) if n not in covered]
    left = [n for n in left if ".rotary_emb." not in n and not (hp["tied"] and n == "lm_head.weight")]
    if left:
        raise ConfigError(
            f"weights {left[:3]} have no place in llama.cpp's Llama graph; GGUF export takes plain Llama models: keep frugalm's own artifact"
        )
    return out


def _check_module(name: str, module: nn.Module, shape: tuple[int, int] | None) -> None:
    if isinstance(module, QuantLinear):
        actual = (module.out_features, module.in_features)
    elif isinstance(getattr(module, "weight", None), torch.Tensor):  # Linear, Embedding, RMSNorm
        actual = tuple(module.weight.shape)
    else:
        raise ConfigError(f"layer '{name}' is a {type(module).__name__}, which GGUF export does not map")
    if getattr(module, "bias", None) is not None:
        raise ConfigError(
            f"layer '{name}' has a bias, which llama.cpp's Llama graph does not read; keep frugalm's own artifact"
        )
    if shape is not None and actual != shape:
        raise ConfigError(
            f"layer '{name}' is {actual[0]}x{actual[1]} but the config implies {shape[0]}x{shape[1]}; GGUF stores one size per kind of layer for all blocks"
        )


def _rope_permutation(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row order taking q/k from rotate-half (transformers) to interleaved pairs (llama.cpp).

    Per head, row j of the first half and row j of the second half become rows 2j and 2j + 1:
    llama.cpp's converter's reshape(n_head, 2, head_dim // 2, in).swapaxes(1, 2).
    """
    rows = torch.arange(n_heads * head_dim).reshape(n_heads, 2, head_dim // 2)
    return rows.transpose(1, 2).reshape(-1)


def _tensor_data(name: str, module: nn.Module, perm, float_type) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if isinstance(module, QuantLinear):
        return _quantized(name, module, perm)
    w = module.weight.detach().float()
    if perm is not None:
        w = w[perm]
    if w.dim() == 1 or float_type == np.float32:  # llama.cpp keeps norms in float32
        return w.numpy().astype(np.float32), Q.F32
    return w.numpy().astype(np.float16), Q.F16


# --- quantized blocks ----------------------------------------------------------------------------


def _quantized(name: str, m: QuantLinear, perm) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Bytes (out, in / 32 * block bytes) of one layer's GGUF blocks, built from its codes, never re-quantized."""
    if m.activations != "none":
        raise ConfigError(
            f"layer '{name}' is {m.format}: its figures come from fbgemm's per-tensor activation quantization, which llama.cpp does not do; quantize with `activations: none` (format w8a16) to export to GGUF, or keep frugalm's own artifact"
        )
    if m.group_size % BLOCK:
        fix = (
            f"its rows have {m.in_features} columns, which no multiple of {BLOCK} divides: leave it out of the recipe's `targets` to export"
            if m.in_features % BLOCK
            else f"quantize with a group_size that is a multiple of {BLOCK} (32, 64, 128) or -1 (per channel) to export"
        )
        raise ConfigError(
            f"layer '{name}' has group size {m.group_size}, not a multiple of GGUF's block of {BLOCK} weights; {fix}"
        )
    q, scales, zeros = unpack(m.qweight, m.bits), m.scales, m.zeros  # (out, in) uint8, (out, G) f16, (out, G) u8
    if perm is not None:
        q, scales, zeros = q[perm], scales[perm], zeros[perm]
    per_block = m.group_size // BLOCK
    d = scales.repeat_interleave(per_block, dim=1)  # (out, in / 32): each block takes its group's scale
    z = zeros.repeat_interleave(per_block, dim=1).to(torch.int16)
    blocks_q = q.to(torch.int16).reshape(m.out_features, -1, BLOCK)  # (out, in / 32, 32)
    if m.bits == 8:
        signed = blocks_q - z[..., None]
        if signed.min() < -128 or signed.max() > 127:
            raise ConfigError(
                f"layer '{name}' is int8 with zero points whose codes q - z span {int(signed.min())}..{int(signed.max())}, outside Q8_0's -128..127; quantize with `symmetric: true` to export to GGUF"
            )
        return _pack(d, None, signed.to(torch.int8).view(torch.uint8)), Q.Q8_0
    if m.bits != 4:
        raise ConfigError(f"layer '{name}' is int{m.bits}; GGUF export maps int8 and int4 layers only")
    nibbles = blocks_q.to(torch.uint8)
    nibbles = nibbles[..., : BLOCK // 2] | (nibbles[..., BLOCK // 2 :] << 4)  # low nibble: first half of the block
    if bool((zeros == 8).all()):
        return _pack(d, None, nibbles), Q.Q4_0
    m_exact = -(d.float() * z.float())  # exact in float32 (11-bit mantissa times a 4-bit integer)
    m16 = m_exact.half()
    if not torch.equal(m16.float(), m_exact):
        bad = (m16.float() != m_exact).nonzero()[0].tolist()
        raise ConfigError(
            f"layer '{name}' is int4 with zero points, and -scale*zero of row {bad[0]}, block {bad[1]} ({float(m_exact[tuple(bad)]):.6g}) is not exact in float16, which Q4_1 stores; quantize with `symmetric: true` (Q4_0) to export to GGUF"
        )
    return _pack(d, m16, nibbles), Q.Q4_1


def _pack(d: torch.Tensor, m: torch.Tensor | None, codes: torch.Tensor) -> np.ndarray:
    """Concatenate per block: d (float16), [m (float16)], codes (uint8) -> (out, in / 32 * block bytes)."""
    parts = [d.contiguous().view(torch.uint8).reshape(*d.shape, 2)]  # (out, in / 32, 2)
    if m is not None:
        parts.append(m.contiguous().view(torch.uint8).reshape(*m.shape, 2))
    parts.append(codes)
    blocks = torch.cat(parts, dim=-1)  # (out, in / 32, block bytes)
    return blocks.reshape(blocks.shape[0], -1).numpy()


# --- tokenizer -----------------------------------------------------------------------------------


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int, where: str) -> None:
    """Vocabulary, scores, types and special ids, read from tokenizer.json as llama.cpp's converter would."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(
            f"'{where}' has no tokenizer.json; GGUF embeds the tokenizer: save a fast tokenizer beside the model"
        )
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    vocab = model.get("vocab", {})
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    n = max([*vocab.values(), *added, vocab_size - 1]) + 1
    if n != vocab_size:
        raise ConfigError(
            f"'{where}': the tokenizer has ids up to {n - 1} but the model {vocab_size} embeddings; GGUF needs one token per embedding row: resize the embeddings to the tokenizer"
        )
    tokens = [f"[PAD{i}]" for i in range(n)]  # ids the tokenizer leaves unused, named as llama.cpp's converter does
    types = [gguf.TokenType.UNUSED] * n
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        scores = _sentencepiece_scores_(tokens, types, model.get("unk_token"))
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
    elif model.get("type") == "BPE" and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel":
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # the ByteLevel pre-tokenizer's regex is GPT-2's
    else:
        raise ConfigError(
            f"'{where}': tokenizer.json holds a {model.get('type')} tokenizer that frugalm's GGUF export does not map (sentencepiece-style BPE with byte fallback, or byte-level BPE); convert with llama.cpp's convert_hf_to_gguf.py instead"
        )
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    byte_level = not model.get("byte_fallback")  # gpt2 tokenizers need their merges; llama ones use the scores
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # its notes on unusual templates are not the user's concern
    try:
        gguf.SpecialVocab(folder, load_merges=byte_level, n_vocab=n).add_to_gguf(writer, quiet=True)
    finally:
        vocab_log.setLevel(level)


def _sentencepiece_scores_(tokens: list[str], types: list, unk: str | None) -> list[float]:
    """Scores and types as sentencepiece's BPE model has them: bytes <0xNN>, unk, control 0; pieces -rank."""
    scores, rank = [], 0
    for i, text in enumerate(tokens):
        if text == unk:
            types[i] = gguf.TokenType.UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = gguf.TokenType.BYTE
        if types[i] == gguf.TokenType.NORMAL:
            scores.append(-float(rank))  # the merge priority llama.cpp's SPM tokenizer reads
            rank += 1
        else:
            scores.append(0.0)
    return scores


# --- the output file -----------------------------------------------------------------------------


def check_output_file(out_file: str | os.PathLike, *, force: bool = False) -> Path:
    """The absolute output path, after refusing a symlink, a folder, or a file frugalm did not write (unless `force`)."""
    given = Path(out_file).expanduser()
    if given.is_symlink():
        raise ConfigError(
            f"output file '{given}' is a symlink; frugalm does not write through links: pass the real path"
        )
    out = given.resolve()
    if out.is_dir():
        raise ConfigError(
            f"output path '{out}' is a folder; GGUF is one file: pass a file path such as {out / 'model.gguf'}"
        )
    if out.exists() and not force and not _written_by_frugalm(out):
        raise ConfigError(
            f"output file '{out}' exists and was not written by frugalm; choose a new path, or pass --force to replace it"
        )
    return out


def _written_by_frugalm(path: Path) -> bool:
    try:
        return OWNER_KEY in gguf.GGUFReader(path).fields
    except (ValueError, OSError, IndexError, KeyError):  # not a GGUF file at all
        return False


@contextlib.contextmanager
def _partial_file(out: Path):
    """A temporary path beside `out`, renamed over it once the block succeeds; removed on any error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in out.parent.glob(f".{glob_escape(out.name)}.partial-*"):  # what killed exports left behind
        match = _LEFTOVER.fullmatch(path.name)
        if match and match["name"] == out.name and path.is_file() and not process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
