"""Mixture-of-experts and recurrent models (issue 17), and the attention implementation as a bench setting.

Each family's tiny config, built in code, goes through `frugalm bench` (the API, one child per
family, the chat workload); its counted FLOPs are checked against an analytic count written here
from the config alone (matrix products only, as the counter counts: 2 x multiply-adds).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import calibration, error_message, tiny_tokenizer
from frugalm.benchmark.api import BenchConfig, bench, prepare
from frugalm.errors import ConfigError, TechniqueError
from frugalm.measure import compute, moe
from frugalm.measure.metrics import METRICS
from frugalm.measure.quality import PerplexityProtocol
from frugalm.models import load_model
from frugalm.registry import get_technique
from frugalm.runtime import families
from frugalm.techniques.base import Context

_ATTN = dict(
    num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048
)
FAMILIES = {
    "mixtral": dict(**_ATTN, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        **_ATTN,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
    ),  # fmt: skip
    "olmoe": dict(**_ATTN, intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "rwkv": dict(hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128),
    "mamba": dict(hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, conv_kernel=4),
    "mamba2": dict(
        hidden_size=64,
        num_hidden_layers=2,
        state_size=16,
        expand=2,
        conv_kernel=4,
        num_heads=8,
        head_dim=16,
        n_groups=1,
        chunk_size=32,
    ),  # fmt: skip
}
MOE = ("mixtral", "qwen2_moe", "olmoe")
RECURRENT = ("rwkv", "mamba", "mamba2")
VOCAB = len(tiny_tokenizer())


def build(arch: str, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **FAMILIES[arch])  # fmt: skip
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def family_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {arch: build(arch, root / arch) for arch in FAMILIES}


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    story = "Once upon a time there was a little model. It wanted to run on a small computer.\n"
    path.write_text((story * 6 + "<|endoftext|>\n") * 4)
    return path


_BENCHED: dict[str, dict] = {}


def benched(arch: str, family_models, eval_text, tmp_path_factory) -> dict:
    """{(metric, workload): Measurement} of one `frugalm bench` run of the family (run once per module)."""
    if arch not in _BENCHED:
        config = BenchConfig(data=str(eval_text), workloads=("chat",), repetitions=1, warmup=0, threads=1,
                             protocol=PerplexityProtocol(max_tokens=256, robust_tokens=128))  # fmt: skip
        store = tmp_path_factory.mktemp("store") / "s.db"
        result = bench(family_models[arch], config, store=store)
        _BENCHED[arch] = {(m.metric, m.workload): m for m in result.measurements}
    return _BENCHED[arch]


@pytest.mark.parametrize("arch", FAMILIES)
def test_each_family_benches_with_units_methods_and_its_own_memory_figure(arch, family_models, eval_text,
                                                                          tmp_path_factory):  # fmt: skip
    figures = benched(arch, family_models, eval_text, tmp_path_factory)
    for (metric, _), m in figures.items():
        assert m.unit == METRICS[metric].unit and m.method in ("measured", "estimated", "counted"), metric
        assert math.isfinite(m.value), metric
    for metric in ("ppl_tok", "flops_per_tok_prefill", "flops_per_tok_decode", "decode_tok_s", "peak_mem_mib"):
        assert any(k[0] == metric for k in figures), metric
    decode = figures[("decode_tok_s", "chat")]
    assert decode.protocol["attn_implementation"] == ("none (no attention layers)" if arch in RECURRENT else "sdpa")
    if arch in RECURRENT:  # state per sequence instead of a KV cache
        assert ("kv_cache_mib", "chat") not in figures and figures[("state_mib", "chat")].value > 0
        assert "active_params_count" not in {k[0] for k in figures}
    else:
        assert ("state_mib", "chat") not in figures and figures[("kv_cache_mib", "chat")].value > 0
    if arch in MOE:
        active, total = figures[("active_params_count", None)].value, figures[("params_count", None)].value
        assert 0 < active < total


# --- FLOPs against the analytic count -------------------------------------------------------------


def _attention_flops(c, context: int) -> int:
    """Projections (2 x weights) and softmax(QK^T)V over `context` keys (counted in full) for one query token."""
    d = c.hidden_size // c.num_attention_heads
    weights = 2 * c.hidden_size * c.num_attention_heads * d + 2 * c.hidden_size * c.num_key_value_heads * d
    return 2 * weights + 4 * context * c.num_attention_heads * d


def _block_flops(arch: str, c, context: int, prefill: bool) -> int:
    """One token through one block, from the config: matrix products (2 x multiply-adds), MoE with its top_k experts."""
    h = c.hidden_size
    if arch in MOE:
        experts = c.num_local_experts if arch == "mixtral" else c.num_experts
        width = c.moe_intermediate_size if arch == "qwen2_moe" else c.intermediate_size
        mlp = experts * h + c.num_experts_per_tok * 3 * h * width  # router + the experts routed
        if arch == "qwen2_moe":
            mlp += 3 * h * c.shared_expert_intermediate_size + h  # the shared expert and its gate
        return _attention_flops(c, context) + 2 * mlp
    if arch == "rwkv":
        return 2 * (4 * h * c.attention_hidden_size + 2 * h * c.intermediate_size + h * h)
    inner, n, k = c.expand * h, c.state_size, c.conv_kernel
    if arch == "mamba":
        rank = math.ceil(h / 16)
        linears = h * 2 * inner + inner * (rank + 2 * n) + rank * inner + inner * h
        return 2 * linears + 2 * inner * k + 2 * inner * n  # + causal conv + the state's readout
    heads, p, conv = c.num_heads, c.head_dim, inner + 2 * c.n_groups * n
    linears = h * (2 * inner + 2 * c.n_groups * n + heads) + inner * h
    # decode: the state's readout; prefill: the chunked scan (C B^T and its product with X within a
    # chunk, the chunk's state B^T X, its readout C state), per token
    scan = 2 * heads * p * n if not prefill else 2 * heads * c.chunk_size * (n + p) + 4 * heads * n * p
    return 2 * linears + 2 * conv * k + scan


def analytic_flops(arch: str, c, prompt: int) -> tuple[float, float]:
    """(prefill per prompt token, one decode step) as flops_per_token counts them: logits for the last position only."""
    head = 2 * c.hidden_size * c.vocab_size
    layers = c.num_hidden_layers
    prefill = layers * _block_flops(arch, c, prompt, True) + head / prompt
    decode = layers * _block_flops(arch, c, prompt + 1, False) + head
    return prefill, decode


@pytest.mark.parametrize("arch", FAMILIES)
def test_flops_per_token_are_within_5_percent_of_the_analytic_count(arch, family_models, eval_text, tmp_path_factory):
    figures = benched(arch, family_models, eval_text, tmp_path_factory)
    config = load_model(family_models[arch]).model.config
    prefill, decode = analytic_flops(arch, config, 128)  # the chat workload's prompt
    assert figures[("flops_per_tok_prefill", "chat")].value == pytest.approx(prefill, rel=0.05)
    assert figures[("flops_per_tok_decode", "chat")].value == pytest.approx(decode, rel=0.05)


def test_grouped_mm_is_counted_as_the_matmuls_of_each_group():
    a, b = torch.randn(10, 8), torch.randn(3, 8, 4)  # the CPU kernel wants rows of 16-byte multiples
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)  # groups of 4, 0 and 6 rows
    grouped = compute.count_flops(lambda: torch.nn.functional.grouped_mm(a, b, offs=offs))
    looped = compute.count_flops(lambda: [a[s:e] @ b[g] for g, (s, e) in enumerate([(0, 4), (4, 4), (4, 10)])])
    assert grouped == looped == 2 * 10 * 8 * 4


def test_moe_flops_count_the_routed_experts_on_grouped_mm_and_on_the_eager_loop(family_models):
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(4, VOCAB, (1, 32), generator=torch.Generator().manual_seed(0))
    models, counts = {}, {}
    for impl in ("grouped_mm", "eager"):
        models[impl] = load_model(family_models["mixtral"]).model
        models[impl].set_experts_implementation(impl)
        counts[impl] = compute.count_flops(lambda m=models[impl]: m(ids))
    assert counts["grouped_mm"] == counts["eager"]
    experts = 2 * 2 * 32 * 2 * 3 * 64 * 128  # layers x top_k x tokens x 2 x (gate, up, down) x hidden x width
    with torch.no_grad(), FlopCounterMode(display=False) as plain:  # torch's own formulas: none for grouped_mm
        models["grouped_mm"](ids)
    assert plain.get_total_flops() <= counts["grouped_mm"] - experts


# --- MoE figures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE)
def test_active_params_are_the_total_less_the_unrouted_experts(arch, family_models):
    model = load_model(family_models[arch]).model
    c = model.config
    experts = c.num_local_experts if arch == "mixtral" else c.num_experts
    width = c.moe_intermediate_size if arch == "qwen2_moe" else c.intermediate_size
    bank = experts * 3 * c.hidden_size * width
    total = sum(p.numel() for p in model.parameters())
    active, protocol = moe.active_params(model)
    assert active == total - c.num_hidden_layers * bank * (experts - c.num_experts_per_tok) // experts
    assert protocol["experts"] == experts and protocol["top_k"] == 2


def test_the_load_balance_statistic():
    assert moe.cv([5, 5, 5, 5]) == 0
    assert moe.cv([8, 8, 0, 0]) == pytest.approx(math.sqrt(4 / 2 - 1))  # all tokens on top_k = 2 of 4 experts
    assert moe.cv([0, 0]) == 0


@pytest.mark.parametrize("arch", MOE)
def test_expert_load_is_in_range_and_counts_every_routed_token(arch, family_models, eval_text, tmp_path_factory):
    figure = benched(arch, family_models, eval_text, tmp_path_factory)[("expert_load_cv", None)]
    low, high = figure.protocol["range"]
    assert low <= figure.value <= high == pytest.approx(1.0)
    for counts in figure.protocol["counts_per_layer"].values():
        assert sum(counts) == figure.protocol["tokens"] * 2  # each token's top_k choices, once per layer


# --- recurrent models -----------------------------------------------------------------------------


def _cache_after(model, tokens: int) -> int:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.randint(4, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        model(out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True)
    return compute.cache_bytes(cache)


@pytest.mark.parametrize("arch", RECURRENT)
def test_recurrent_state_does_not_grow_with_the_context(arch, family_models, tiny_llama):
    model = load_model(family_models[arch]).model
    assert _cache_after(model, 16) == _cache_after(model, 160) > 0
    llama = load_model(tiny_llama).model  # a Transformer's KV cache grows with every token
    assert _cache_after(llama, 160) > _cache_after(llama, 16)


@pytest.mark.parametrize("arch", RECURRENT)
def test_recurrent_decoding_through_the_cache_interface_matches_the_full_forward(arch, family_models):
    """At batch 2, one token at a time through the state equals the whole sequence at once
    (transformers' RWKV alone broadcasts a one-token step over the batch: runtime/families fixes it)."""
    from transformers import DynamicCache

    model = load_model(family_models[arch]).model
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        out = model(ids[:, :8], past_key_values=cache, use_cache=True)
        steps = [model(ids[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
                 for i in range(8, 12)]  # fmt: skip
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 8:12], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ("rwkv", "mamba"))
def test_the_paired_decode_call_steps_a_recurrent_state_on_instead_of_cropping_it(arch, family_models):
    from frugalm.measure.speedup import decode_call

    model = load_model(family_models[arch]).model
    run = decode_call(model, compute.prompt_ids(model, 1, 16, torch.device("cpu")), None)
    for _ in range(3):  # a KV cache is cropped back after each call; a recurrent state cannot be
        run()


def test_a_copy_of_a_recurrent_model_runs_on_its_own_weights(family_models):
    import copy

    model = load_model(family_models["mamba"]).model
    twin = copy.deepcopy(model)  # as a cascade's small model or a distillation's student is made
    twin.get_output_embeddings().weight.data.zero_()
    ids = torch.randint(4, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not twin(ids, use_cache=True).logits.any() and model(ids, use_cache=True).logits.any()
        assert twin(ids, use_cache=True).past_key_values is not None


# --- refusals -------------------------------------------------------------------------------------


REFUSALS = {  # one technique per family: (technique, options, words the one-line refusal names)
    "mixtral": ("awq_quant", {}, ("mixtral (mixture-of-experts)", "experts", "supported")),
    "qwen2_moe": ("wanda_prune", {}, ("qwen2_moe (mixture-of-experts)", "supported")),
    "olmoe": ("offload", {}, ("olmoe (mixture-of-experts)", "supported")),
    "rwkv": ("kv_cache_quant", {}, ("rwkv (recurrent)", "supported")),
    "mamba": ("gptq_quant", {}, ("mamba (recurrent)", "supported")),
    "mamba2": ("prompt_lookup", {}, ("mamba2 (recurrent)", "rewound", "supported")),
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_a_technique_that_cannot_handle_a_family_refuses_it_in_one_line(arch, family_models):
    technique, options, words = REFUSALS[arch]
    t = get_technique(technique)
    with pytest.raises(TechniqueError) as exc:
        t.apply(load_model(family_models[arch]).model, t.config_cls(**options), Context(calibration=calibration()))
    message = error_message(exc)
    assert message.startswith(technique) and all(w in message for w in words), message


def test_moe_attention_alone_can_still_be_quantized(family_models):
    model = load_model(family_models["mixtral"]).model
    t = get_technique("rtn_quant")
    ctx = Context()
    t.apply(model, t.config_cls(targets=("*.self_attn.*",)), ctx)
    assert len(ctx.changes[-1]["layers"]) == 8  # q, k, v, o in 2 blocks


# --- the attention implementation -----------------------------------------------------------------


def test_the_attention_implementation_is_loaded_recorded_and_counted_alike(tiny_llama, eval_text, tmp_path):
    figures = {}
    for impl in ("eager", "sdpa"):
        config = BenchConfig(data=str(eval_text), workloads=("chat",), repetitions=1, warmup=0, threads=1,
                             attn_implementation=impl, metrics=("flops_per_tok_decode", "decode_tok_s"))  # fmt: skip
        result = bench(tiny_llama, config, store=tmp_path / "s.db")
        assert result.run.config["attn_implementation"] == impl
        figures[impl] = {m.metric: m for m in result.measurements}
        assert figures[impl]["decode_tok_s"].protocol["attn_implementation"] == impl
    # eager's matmul-softmax-matmul and sdpa's kernel do (and are counted as) the same products
    assert figures["eager"]["flops_per_tok_decode"].value == figures["sdpa"]["flops_per_tok_decode"].value
    assert load_model(tiny_llama, attn_implementation="eager").model.config._attn_implementation == "eager"


@pytest.mark.parametrize(
    "name, arch, words",
    [
        ("flash", "llama", ("unknown attention implementation 'flash'", "sdpa")),
        ("flash_attention_2", "llama", ("CUDA", "flash-attn", "use sdpa")),
        ("sdpa", "mamba", ("mamba (recurrent)", "no attention")),
    ],
)
def test_a_bad_attention_implementation_fails_in_one_line_before_any_child(name, arch, words, family_models,
                                                                           tiny_llama, eval_text):  # fmt: skip
    if name == "flash_attention_2" and torch.cuda.is_available():
        pytest.skip("a CUDA machine may have flash-attn; the refusal is for machines without it")
    model = tiny_llama if arch == "llama" else family_models[arch]
    with pytest.raises(ConfigError) as exc:
        prepare(model, BenchConfig(data=str(eval_text), attn_implementation=name))
    assert all(w in error_message(exc) for w in words), error_message(exc)


def test_the_command_line_sets_the_attention_implementation():
    from frugalm.cli import bench as bench_cli
    from frugalm.cli import build_parser

    args = build_parser().parse_args(["bench", "--attn-implementation", "eager"])
    assert bench_cli.config(args) == BenchConfig(attn_implementation="eager")


def test_families_are_told_apart(family_models, tiny_llama):
    kinds = {arch: families.family(load_model(path).model) for arch, path in family_models.items()}
    assert kinds == {**dict.fromkeys(MOE, "moe"), **dict.fromkeys(RECURRENT, "recurrent")}
    assert families.family(load_model(tiny_llama).model) == "dense"
