"""frugalm export ARTIFACT -o DIR: a quantized variant in a standard format other tools load."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a quantized variant as a compressed-tensors checkpoint (loads in transformers and vLLM)"
    )
    p.add_argument("artifact", help="a variant folder written by `frugalm run` or `frugalm optimize`")
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="folder to write (an existing one is replaced atomically, only if frugalm wrote it)",
    )
    p.add_argument("--force", action="store_true", help="replace --out even if frugalm did not write it")
    p.add_argument(
        "--format",
        default="compressed-tensors",
        choices=["compressed-tensors"],
        help="the only standard format so far (default)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from frugalm.export import export_compressed_tensors

    out = export_compressed_tensors(args.artifact, args.out, force=args.force)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(
        f"{out}: {args.format} checkpoint, {size / 2**20:.1f} MiB of weights; load it with transformers.AutoModelForCausalLM.from_pretrained('{out}') or vLLM"
    )
    return 0
