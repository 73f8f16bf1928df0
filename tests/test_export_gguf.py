"""Export to GGUF: float tensors equal llama.cpp's own conversion; quantized blocks dequantize to frugalm's weights."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize

from conftest import STORIES, error_message, needs_assets, run
from frugalm.cli import main
from frugalm.errors import ConfigError
from frugalm.export_gguf import LAYER_NAMES, OWNER_KEY, export_gguf
from frugalm.models import load_model, save_variant
from frugalm.runtime.quant_linear import QuantLinear

REFERENCE = STORIES.parents[1] / "sources" / "stories260K.gguf"  # llama.cpp's conversion of stories260K
CASES = {  # rtn_quant options -> the GGUF type every quantized layer must get
    "int8-channel": (dict(bits=8, group_size=-1, symmetric=True), "Q8_0"),
    "int8-group32": (dict(bits=8, group_size=32, symmetric=True), "Q8_0"),
    "int4-group32": (dict(bits=4, group_size=32, symmetric=True), "Q4_0"),
    "int4-group64": (dict(bits=4, group_size=64, symmetric=True), "Q4_0"),
    "int4-channel": (dict(bits=4, group_size=-1, symmetric=True), "Q4_0"),
}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def hf_name(gguf_name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj (the module)."""
    _, i, kind, _ = gguf_name.split(".")
    return f"model.layers.{i}.{ {v: k for k, v in LAYER_NAMES.items()}[kind] }"


def rope_rows(n_heads: int, head_dim: int) -> torch.Tensor:
    """llama.cpp's converter's q/k permutation, written out independently: rows (h, 2, d/2) -> (h, d/2, 2)."""
    return torch.arange(n_heads * head_dim).reshape(n_heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def frugalm_weight(model, name: str) -> torch.Tensor:
    """frugalm's own float32 weight of a projection, in llama.cpp's row order."""
    module = model.get_submodule(name)
    w = module.dequantized_weight(torch.float32) if isinstance(module, QuantLinear) else module.weight.detach().float()
    c = model.config
    heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}.get(name.rsplit(".", 1)[-1])
    return w[rope_rows(heads, c.head_dim)] if heads else w


def variant(tiny_llama, tmp_path, technique="rtn_quant", **options):
    lm = load_model(tiny_llama, fast_kernels=False)
    run(technique, lm.model, **options)
    return save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_blocks_dequantize_to_frugalms_weights_exactly(tiny_llama, tmp_path, case):
    options, qtype = CASES[case]
    artifact = variant(tiny_llama, tmp_path, **options)
    result = export_gguf(artifact, tmp_path / "m.gguf")
    assert result.file_type == f"MOSTLY_{qtype}"
    model = load_model(artifact, fast_kernels=False).model
    blocks = {n: t for n, t in tensors(result.path).items() if n.startswith("blk.") and "norm" not in n}
    assert len(blocks) == 7 * model.config.num_hidden_layers
    for name, t in blocks.items():
        assert t.tensor_type.name == qtype, name
        ours = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(ours, frugalm_weight(model, hf_name(name))), name  # bit for bit, float32


def test_int4_with_float16_exact_offsets_exports_as_q4_1_exactly(tiny_llama, tmp_path):
    """Q4_1 stores m = -scale * zero in float16: with zero points 0, 4 and 8 it is exact, so the blocks map."""
    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=4, group_size=32, symmetric=False)
    generator = torch.Generator().manual_seed(0)
    for m in lm.model.modules():
        if isinstance(m, QuantLinear):
            m.zeros.copy_(
                torch.tensor([0, 4, 8], dtype=torch.uint8)[torch.randint(0, 3, m.zeros.shape, generator=generator)]
            )
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    result = export_gguf(artifact, tmp_path / "m.gguf")
    assert result.tensor_types["Q4_1"] == 14
    model = load_model(artifact, fast_kernels=False).model
    for name, t in tensors(result.path).items():
        if t.tensor_type.name == "Q4_1":
            ours = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(ours, frugalm_weight(model, hf_name(name))), name


def test_refuses_int4_whose_offsets_float16_cannot_hold(tiny_llama, tmp_path):
    """Round-to-nearest zero points (3, 5, 7...) times a float16 scale need more than float16's 11 bits."""
    artifact = variant(tiny_llama, tmp_path, bits=4, group_size=32, symmetric=False)
    with pytest.raises(ConfigError) as exc:
        export_gguf(artifact, tmp_path / "m.gguf")
    assert "not exact in float16" in error_message(exc) and "symmetric: true" in error_message(exc)
    assert list(tmp_path.glob("*.gguf*")) == list(tmp_path.glob(".*partial*")) == []


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        (dict(bits=8, activations="dynamic-int8"), "activations: none"),
        (dict(bits=4, group_size=16), "a multiple of 32 (32, 64, 128) or -1 (per channel)"),
    ],
    ids=["w8a8-dynamic", "group16"],
)
def test_refuses_what_gguf_cannot_hold_and_leaves_no_file(tiny_llama, tmp_path, options, fix):
    artifact = variant(tiny_llama, tmp_path, **options)
    with pytest.raises(ConfigError) as exc:
        export_gguf(artifact, tmp_path / "m.gguf")
    assert fix in error_message(exc)
    assert [p.name for p in tmp_path.iterdir()] == ["variant"]


def test_refuses_other_architectures(tiny_models, tmp_path):
    with pytest.raises(ConfigError) as exc:
        export_gguf(tiny_models["gpt2"], tmp_path / "m.gguf")
    assert "Llama architecture only" in error_message(exc)


def test_a_pruned_model_exports_dense_with_its_zeros(tiny_llama, tmp_path):
    artifact = variant(tiny_llama, tmp_path, technique="magnitude_prune", sparsity=0.5)
    result = export_gguf(artifact, tmp_path / "m.gguf")
    assert result.tensor_types == {"F32": 2 + 9 * 2}  # embedding, final norm, 9 per block; tied: no output.weight
    model = load_model(artifact, fast_kernels=False).model
    t = tensors(result.path)["blk.1.ffn_up.weight"]
    assert np.array_equal(t.data, frugalm_weight(model, "model.layers.1.mlp.up_proj").numpy())
    assert (t.data == 0).mean() == pytest.approx(0.5, abs=0.01)


def test_float16_keeps_norms_float32_and_rounds_matrices_once(tiny_llama, tmp_path):
    result = export_gguf(tiny_llama, tmp_path / "m.gguf", dtype="float16")
    assert result.file_type == "MOSTLY_F16"
    found = tensors(result.path)
    assert {n for n, t in found.items() if t.tensor_type.name == "F32"} == {
        "output_norm.weight",
        *(f"blk.{i}.{k}_norm.weight" for i in range(2) for k in ("attn", "ffn")),
    }
    model = load_model(tiny_llama).model
    w = frugalm_weight(model, "model.layers.0.self_attn.k_proj")
    assert np.array_equal(found["blk.0.attn_k.weight"].data, w.half().numpy())


def test_a_byte_level_tokenizer_exports_as_gpt2_with_its_merges(tiny_llama, tmp_path):
    path = export_gguf(tiny_llama, tmp_path / "m.gguf").path
    fields = gguf.GGUFReader(path).fields
    tokenizer = load_model(tiny_llama).tokenizer
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert tokens == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert len(fields["tokenizer.ggml.merges"].contents()) > 0
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.token_type"].contents()[tokenizer.eos_token_id] == gguf.TokenType.CONTROL


def test_never_replaces_a_file_frugalm_did_not_write(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("someone's notes")
    with pytest.raises(ConfigError) as exc:
        export_gguf(tiny_llama, out)
    assert "--force" in error_message(exc) and out.read_text() == "someone's notes"
    export_gguf(tiny_llama, out, force=True)
    assert OWNER_KEY in gguf.GGUFReader(out).fields
    export_gguf(tiny_llama, out, dtype="float16")  # its own file: replaced without --force
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_exports_gguf_and_refuses_in_one_line(tiny_llama, tmp_path, capsys):
    artifact = variant(tiny_llama, tmp_path, bits=8, group_size=-1)
    out = tmp_path / "m.gguf"
    assert main(["export", str(artifact), "--format", "gguf", "-o", str(out)]) == 0
    assert "MOSTLY_Q8_0" in capsys.readouterr().out and out.is_file()
    assert main(["export", str(artifact), "-o", str(tmp_path / "ct"), "--dtype", "float16"]) == 2  # gguf only
    assert "--format gguf only" in capsys.readouterr().err
    bad = variant(tiny_llama, tmp_path / "b", bits=4, group_size=16)
    assert main(["export", str(bad), "--format", "gguf", "-o", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group size 16" in err and "Traceback" not in err
    assert not (tmp_path / "bad.gguf").exists()


@pytest.mark.integration
@needs_assets()
def test_stories260K_float32_equals_llama_cpps_own_conversion(tmp_path):
    """Same tensors, bit for bit, as llama.cpp's stories260K.gguf; the metadata differs only where listed."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference GGUF not found at {REFERENCE}")
    ours_path = export_gguf(STORIES, tmp_path / "s.gguf").path
    ours, theirs = tensors(ours_path), tensors(REFERENCE)
    # The reference (converted from llama2.c) stores the tied output head; an HF-tied model has none.
    assert set(theirs) - set(ours) == {"output.weight"} and set(ours) <= set(theirs)
    assert np.array_equal(theirs["output.weight"].data, ours["token_embd.weight"].data)
    for name, t in ours.items():
        ref = theirs[name]
        assert (t.tensor_type, list(t.shape)) == (ref.tensor_type, list(ref.shape)), name
        assert np.abs(t.data - ref.data).max() <= 1e-6, name  # measured: 0.0 everywhere

    def values(path):
        return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}

    a, b = values(ours_path), values(REFERENCE)
    assert a["tokenizer.ggml.tokens"] == b["tokenizer.ggml.tokens"]
    assert a["tokenizer.ggml.scores"] == b["tokenizer.ggml.scores"]
    assert a["tokenizer.ggml.token_type"] == b["tokenizer.ggml.token_type"]
    differ = {k for k in a.keys() & b.keys() if a[k] != b[k]}
    # general.name: the folder's name; context 512 is the model's (2048 in the reference is a placeholder).
    assert differ == {"general.name", "llama.context_length"}
    assert set(a) - set(b) == {
        OWNER_KEY,
        "general.file_type",
        "llama.rope.freq_base",
        "llama.vocab_size",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.add_sep_token",
    }
    assert set(b) - set(a) == {
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.seperator_token_id",
    }  # both unset (-1)


@pytest.mark.integration
@needs_assets()
@pytest.mark.parametrize(("bits", "qtype"), [(8, "Q8_0"), (4, "Q4_0")])
def test_stories260K_quantized_round_trips_and_its_172_column_layers_are_named(tmp_path, bits, qtype):
    """ffn_down has 172 columns, which no GGUF block divides: refused, with the fix; without it the rest maps exactly."""
    lm = load_model(STORIES, fast_kernels=False)
    run("rtn_quant", lm.model, bits=bits, group_size=-1)
    whole = save_variant(lm.model, lm.tokenizer, tmp_path / "whole", {})
    with pytest.raises(ConfigError) as exc:
        export_gguf(whole, tmp_path / "whole.gguf")
    assert "mlp.down_proj" in error_message(exc) and "`targets`" in error_message(exc)

    lm = load_model(STORIES, fast_kernels=False)
    targets = ("*.self_attn.*", "*.mlp.gate_proj", "*.mlp.up_proj")
    run("rtn_quant", lm.model, bits=bits, group_size=32 if bits == 4 else -1, targets=targets)
    artifact = save_variant(lm.model, lm.tokenizer, tmp_path / "variant", {})
    result = export_gguf(artifact, tmp_path / "s.gguf")
    assert result.tensor_types == {"F32": 2 + 5 * 3, qtype: 5 * 6}  # down_proj and the norms stay float
    model = load_model(artifact, fast_kernels=False).model
    for name, t in tensors(result.path).items():
        if name.startswith("blk.") and "norm" not in name:
            ours = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(ours, frugalm_weight(model, hf_name(name))), name


def test_a_head_pruned_model_exports_at_its_new_sizes(tiny_llama, tmp_path):
    """Half the key/value groups removed: 2 query heads of 16 no longer span the width, so the head size is written."""
    artifact = variant(
        tiny_llama, tmp_path, technique="structured_prune", unit="heads", fraction=0.5, importance="magnitude"
    )
    result = export_gguf(artifact, tmp_path / "m.gguf")
    fields = gguf.GGUFReader(result.path).fields
    assert (
        fields["llama.attention.head_count"].contents() == 2 and fields["llama.attention.key_length"].contents() == 16
    )
    model = load_model(artifact).model
    t = tensors(result.path)["blk.0.attn_q.weight"]
    assert np.array_equal(t.data, frugalm_weight(model, "model.layers.0.self_attn.q_proj").numpy())
