"""frugalm export ARTIFACT -o OUT: a variant in a standard format other tools load.

compressed-tensors (the default): a folder transformers and vLLM load. gguf: one file llama.cpp
runs (Llama models; quantized layers only where their codes map exactly onto GGUF blocks).
"""

from __future__ import annotations

FORMATS = ("compressed-tensors", "gguf")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a variant as a compressed-tensors checkpoint (transformers, vLLM) or a GGUF file (llama.cpp)",
    )
    p.add_argument(
        "artifact", help="a variant folder written by `frugalm run` or `frugalm optimize` (gguf: or a model folder)"
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="folder (compressed-tensors) or file (gguf) to write; an existing one is replaced atomically, only if frugalm wrote it",
    )
    p.add_argument("--force", action="store_true", help="replace --out even if frugalm did not write it")
    p.add_argument(
        "--format",
        default="compressed-tensors",
        choices=FORMATS,
        help="compressed-tensors (default: weight-quantized variants) or gguf (Llama: float, Q8_0, Q4_0, Q4_1)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16"),
        default=None,
        help="gguf only (default float32): the type of float matrices (quantized layers keep their exact blocks; norms stay float32)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    if args.format == "gguf":
        return _gguf(args)
    if args.dtype is not None:
        from frugalm.errors import ConfigError

        raise ConfigError("--dtype applies to --format gguf only; compressed-tensors keeps the variant's own dtypes")
    from frugalm.export import export_compressed_tensors

    out = export_compressed_tensors(args.artifact, args.out, force=args.force)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"{out}: {args.format} checkpoint, {size / 2**20:.1f} MiB of weights; load it with transformers.AutoModelForCausalLM.from_pretrained('{out}') or vLLM"
    )
    return 0


def _gguf(args) -> int:
    from frugalm.export_gguf import export_gguf

    result = export_gguf(args.artifact, args.out, dtype=args.dtype or "float32", force=args.force)
    types = ", ".join(f"{n} {t}" for t, n in result.tensor_types.items())
    size = result.path.stat().st_size
    print(
        f"{result.path}: GGUF {result.file_type}, {size / 2**20:.1f} MiB ({types} tensors); run it with llama.cpp (llama-cli -m '{result.path}')"
    )
    return 0
