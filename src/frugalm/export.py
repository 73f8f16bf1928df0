"""Export a weight-quantized variant to compressed-tensors, the format transformers and vLLM load.

frugalm's own artifacts (see models.save_variant) keep packed codes in frugalm's layout, which
only frugalm reads. compressed-tensors (the format llm-compressor writes) is read by
`transformers.AutoModelForCausalLM.from_pretrained` (with the `compressed-tensors` package
installed) and by vLLM, so a variant exported here can be served without frugalm.

The export is exact: every frugalm code maps to the same compressed-tensors code. frugalm stores
unsigned codes q in [0, 2^b) with a zero point z and float16 scales s (w = (q - z) s);
compressed-tensors stores signed codes q - 2^(b-1) with zero point z - 2^(b-1) (dropped when
symmetric). The packing itself is done by compressed-tensors' own compressors (int8:
"int-quantized", one int8 per weight; int4: "pack-quantized", codes packed into int32), so the
bytes on disk are exactly what its loaders expect. The dense weights the compressors start from
are frugalm's dequantized weights, which lie exactly on the grid (small integers times float16
scales are exact in float32), so quantizing them again returns the original codes.

Only weight-only formats export (w8a16, w4a16: compressed-tensors' weight-only schemes, which
transformers runs as frugalm measured them). A w8a8-dynamic variant is refused: its figures
come from fbgemm's activation quantization, one asymmetric 7-bit range per input tensor, which
no compressed-tensors scheme describes; its nearest, dynamic per-token int8 input activations,
loads in transformers 5.23 with compressed-tensors 0.19 but computes other numbers (stories260K
int8 RTN, perplexity on the first 8192 TinyStories tokens: 3.664 on fbgemm, 3.531 as per-token
W8A8 in transformers, 3.528 as w8a16), so exporting it would ship a model whose measured quality
is not its own.

Refused as well, with the reason: layers other than nn.Linear (GPT-2's Conv1D), which the format does
not describe; and int4 with zero points (asymmetric), which compressed-tensors packs eight to an
int32 along the output dimension but which transformers 5.23 with compressed-tensors 0.19 then
fails to load (its meta-device initialisation expects them unpacked; llm-compressor's own
asymmetric W4A16 checkpoints hit the same wall). Asymmetric int8 stores zero points unpacked
and loads.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, QuantizationStatus
from torch import nn
from transformers import AutoModelForCausalLM

from frugalm.atomic import atomic_folder, check_output_folder
from frugalm.errors import ModelError
from frugalm.models import load_model, read_config
from frugalm.runtime.experts import QuantExperts
from frugalm.runtime.quant_linear import QuantLinear

FORMAT = "compressed-tensors"


class _Compressed(nn.Module):
    """Holds one layer's compressed tensors under the names compressed-tensors' loaders expect."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, tensor in tensors.items():
            if tensor.is_floating_point():
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            else:
                self.register_buffer(name, tensor)


def export_compressed_tensors(artifact: str | os.PathLike, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `artifact` (a frugalm variant with quantized layers) as a compressed-tensors checkpoint.

    The folder is written atomically (complete or absent) and holds config.json with its
    `quantization_config`, the safetensors weights and the tokenizer.
    """

    check_output_folder(out_dir, force=force)  # before any work: never replace a folder frugalm did not write
    lm = load_model(artifact, fast_kernels=False)
    model = lm.model
    banks = [name for name, m in model.named_modules() if isinstance(m, QuantExperts)]
    if banks:
        raise ModelError(
            f"'{artifact}' holds packed experts ('{banks[0]}'), which this {FORMAT} export does not write (it maps Linear layers; "
            "an expert bank is one 3-D tensor per weight); keep frugalm's own artifact (load_model runs it)"
        )
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise ModelError(
            f"'{artifact}' has no quantized layers; the {FORMAT} export is for weight-quantized variants (run an int8/int4 recipe first)"
        )
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(read_config(lm.source))
    not_linear = [n for n in quantized if not isinstance(skeleton.get_submodule(n), nn.Linear)]
    if not_linear:
        kind = type(skeleton.get_submodule(not_linear[0])).__name__
        raise ModelError(
            f"layer '{not_linear[0]}' is a {kind}, not nn.Linear, and {FORMAT} describes only Linear layers; keep frugalm's own artifact for this model"
        )

    dynamic = [n for n, m in quantized.items() if m.activations == "dynamic-int8"]
    if dynamic:
        raise ModelError(
            f"'{artifact}' is w8a8-dynamic ({len(dynamic)} layers, e.g. '{dynamic[0]}'): its figures come from fbgemm's per-tensor 7-bit activation quantization, which {FORMAT} cannot describe; quantize with `activations: none` (format w8a16, the exportable one) to export, or keep frugalm's own artifact"
        )
    groups: dict[tuple[int, int, bool], list[str]] = {}
    for name, m in quantized.items():
        symmetric = bool((m.zeros == 2 ** (m.bits - 1)).all())
        if m.bits == 4 and not symmetric:
            raise ModelError(
                f"layer '{name}' is int4 with zero points (asymmetric), which transformers {_version('transformers')} cannot load from {FORMAT} {_version('compressed-tensors')}; quantize with `symmetric: true` to export, or keep frugalm's own artifact"
            )
        group = -1 if m.group_size == m.in_features else m.group_size
        groups.setdefault((m.bits, group, symmetric), []).append(name)
    fmt = "int-quantized" if all(bits == 8 for bits, _, _ in groups) else "pack-quantized"
    compressor = BaseCompressor.load_from_registry(fmt)
    schemes = {}
    for i, ((bits, group, symmetric), names) in enumerate(sorted(groups.items())):
        args = QuantizationArgs(
            num_bits=bits,
            type="int",
            symmetric=symmetric,
            strategy="channel" if group == -1 else "group",
            group_size=None if group == -1 else group,
            scale_dtype=torch.float16,
        )
        scheme = QuantizationScheme(targets=[f"re:^{re.escape(n)}$" for n in names], weights=args, format=fmt)
        schemes[f"group_{i}"] = scheme
        for name in names:
            _replace(model, name, _compress(quantized[name], compressor, scheme))
    config = QuantizationConfig(
        config_groups=schemes, format=fmt, quantization_status=QuantizationStatus.COMPRESSED, ignore=[]
    )
    model.config.quantization_config = config.to_dict()
    with atomic_folder(out_dir, force=force) as tmp:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    return Path(out_dir).expanduser().resolve()


def _compress(m, compressor, scheme) -> _Compressed:
    offset = 2 ** (m.bits - 1)
    state = {
        "weight": m.dequantized_weight(torch.float32),
        "weight_scale": m.scales.clone(),
        "weight_zero_point": (m.zeros.to(torch.int16) - offset).to(torch.int8),
    }
    tensors = dict(compressor.compress(state, scheme))
    if m.bias is not None:
        tensors["bias"] = m.bias.detach().clone()
    return _Compressed(tensors)


def _version(package: str) -> str:

    return version(package)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
