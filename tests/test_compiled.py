"""The compiled decode path: same tokens as eager, one compilation per shape on record, the stage and bench option."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from conftest import run
from frugalm.benchmark.api import BenchConfig, bench
from frugalm.cli import main
from frugalm.errors import TechniqueError
from frugalm.models import load_model, save_variant
from frugalm.runtime import compiled
from frugalm.runtime.kv_cache import cache_factory
from frugalm.runtime.modules import kernel_summary
from frugalm.runtime.quant_linear import CodesLinear
from frugalm.techniques.base import Context
from frugalm.techniques.compile_decode import TECHNIQUE, CompileDecodeConfig
from frugalm.techniques.kv_cache_quant import TECHNIQUE as KV
from frugalm.techniques.kv_cache_quant import KVCacheQuantConfig


@torch.inference_mode()
def _greedy(model, ids, n, cache):
    out = model(ids, past_key_values=cache, use_cache=True)
    tokens, logits = [], []
    for _ in range(n):
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        out = model(nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1), torch.stack(logits, 1)


@pytest.fixture(scope="module")
def compiled_variant(tiny_llama, tmp_path_factory):
    lm = load_model(tiny_llama)
    ctx = Context()
    model = TECHNIQUE.apply(lm.model, CompileDecodeConfig(), ctx)
    assert ctx.changes[-1]["params_changed"] == 0
    return save_variant(model, lm.tokenizer, tmp_path_factory.mktemp("c") / "compiled", {"changes": ctx.changes})


def test_compiled_steps_decode_what_eager_decodes(tiny_llama, compiled_variant):
    meta = json.loads((compiled_variant / "frugalm.json").read_text())
    assert meta["inference"] == {"compiled_decode": {"mode": "default"}}
    model = load_model(compiled_variant).model  # installs the compiled path
    eager = load_model(tiny_llama).model
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    cache = cache_factory(model)(20 + 12)
    assert isinstance(cache, compiled.StaticDecodeCache)
    tokens, logits = _greedy(model, ids, 12, cache)
    ref_tokens, ref_logits = _greedy(eager, ids, 12, DynamicCache(config=eager.config))
    # the graph ran with plain attention and a rotary table; both are switched back between calls
    assert model.config._attn_implementation == eager.config._attn_implementation
    assert type(model.model.rotary_emb) is type(eager.model.rotary_emb)
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    log = compiled.compile_log(model)  # 12 steps, one shape: compiled once
    assert [(r["batch"], r["cache_tokens"]) for r in log] == [(2, 32)] and log[0]["first_call_s"] > 0
    cache.crop(-3)  # the write position moves back; the next step overwrites the slot
    assert int(cache.get_seq_length()) == 20 + 12 - 3
    with torch.inference_mode():
        again = model(tokens[:, 9:10], past_key_values=cache, use_cache=True).logits[:, -1]
    assert torch.allclose(again, logits[:, 9], atol=1e-4)
    assert len(compiled.compile_log(model)) == 1


def test_an_int4_variants_compiled_steps_run_its_small_layers_as_fused_loops(tiny_llama, tmp_path):
    """Groups of 16, which the packed kernel refuses (quant_linear.CodesLinear): inside the graph each layer
    is one multiply-and-sum over its int8-held codes; the tokens are the eager path's (the same model on
    a DynamicCache runs eager), both float32 over the same codes."""
    lm = load_model(tiny_llama, fast_kernels=False)
    run("rtn_quant", lm.model, bits=4, group_size=16)
    model = TECHNIQUE.apply(lm.model, CompileDecodeConfig(), Context())
    model = load_model(save_variant(model, lm.tokenizer, tmp_path / "int4", {})).model
    assert kernel_summary(model) == {CodesLinear.kernel: 14, "dense": 1}
    ids = torch.randint(4, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    tokens, logits = _greedy(model, ids, 8, cache_factory(model)(20 + 8))
    ref_tokens, ref_logits = _greedy(model, ids, 8, DynamicCache(config=model.config))
    assert len(compiled.compile_log(model)) == 1  # the graph ran, not the eager forward
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-4)


def test_compiled_decode_and_a_quantized_cache_refuse_each_other(tiny_llama):
    for first, second in (
        ((KV, KVCacheQuantConfig(bits=8, group_size=16)), (TECHNIQUE, CompileDecodeConfig())),
        ((TECHNIQUE, CompileDecodeConfig()), (KV, KVCacheQuantConfig(bits=8, group_size=16))),
    ):
        model = load_model(tiny_llama).model
        first[0].apply(model, first[1], Context())
        with pytest.raises(TechniqueError, match="drop one of the two stages"):
            second[0].apply(model, second[1], Context())


def test_a_bad_mode_is_one_line(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "c.yaml"
    recipe.write_text("version: 1\nname: c\nstages:\n  - technique: compile_decode\n    mode: turbo\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mode" in err and "turbo" in err


def test_bench_reports_the_compile_time_and_the_decode_path(compiled_variant, tiny_llama, text_file, tmp_path):
    config = BenchConfig(
        data=str(text_file), workloads=("chat",), repetitions=1, warmup=0, metrics=("decode_tok_s", "compile_s")
    )
    figures = {m.metric: m for m in bench(compiled_variant, config, store=tmp_path / "s.db").measurements}
    compile_s = figures["compile_s"]
    assert compile_s.method == "measured" and compile_s.value > 0 and compile_s.n == 1
    assert compile_s.protocol["shapes"][0]["cache_tokens"] == 128 + 64  # the chat workload's prompt and new tokens
    assert figures["decode_tok_s"].protocol["decode_path"].startswith("compiled")
    plain = bench(tiny_llama, config, store=tmp_path / "s.db").measurements
    assert "compile_s" not in {m.metric for m in plain}
    assert next(m for m in plain if m.metric == "decode_tok_s").protocol["decode_path"] == "eager"


def test_bench_compile_refuses_a_quantized_cache_variant_in_one_line(tiny_llama, text_file, tmp_path):
    from frugalm.errors import FrugalmError

    lm = load_model(tiny_llama)
    KV.apply(lm.model, KVCacheQuantConfig(bits=8, group_size=16), Context())
    folder = save_variant(lm.model, lm.tokenizer, tmp_path / "kv", {"changes": []})
    config = BenchConfig(data=str(text_file), workloads=("chat",), repetitions=1, warmup=0, compile=True)
    with pytest.raises(FrugalmError, match="without --compile"):
        bench(folder, config, store=tmp_path / "s.db")


def test_each_model_runs_its_own_graph_and_only_the_calls_guards_are_checked(tiny_llama, monkeypatch):
    """Graphs keep the call's guards only (compiled.call_guards): on a real graph the filter drops the
    model's guards (dynamo's names for them are what it expects) and keeps every tensor's; a second
    model of the same class whose graph differs from the first's in a constant alone (its norms'
    epsilon, which no guard kept checks) still gets its own graph, also from a one-token prompt (its
    first step fills an empty cache); a model in training mode runs eager."""
    seen, shipped = [], compiled.call_guards

    def recorded(model_as):
        def keep(entries):
            kept = shipped(model_as)(entries)
            seen.extend(zip(entries, kept, strict=True))
            return kept

        return keep

    monkeypatch.setattr(compiled, "call_guards", recorded)
    first, second = load_model(tiny_llama).model, load_model(tiny_llama).model
    for module in second.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.5
    ids = torch.randint(4, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    refs = [_greedy(m, ids, 6, DynamicCache(config=m.config)) for m in (first, second)]
    assert not torch.allclose(refs[0][1], refs[1][1], atol=1e-2)
    for model, (ref_tokens, ref_logits) in zip((first, second), refs, strict=True):
        compiled.install(model, {"mode": "default"})
        tokens, logits = _greedy(model, ids, 6, compiled.static_cache(model, 12 + 6))
        assert torch.equal(tokens, ref_tokens)
        assert torch.allclose(logits, ref_logits, atol=1e-4)
    dropped = [e for e, kept in seen if not kept]
    assert all(kept for e, kept in seen if e.guard_type == "TENSOR_MATCH")
    assert len(dropped) > len(seen) / 2
    assert any(e.guard_type == "EMPTY_NN_MODULE_HOOKS_DICT" for e in dropped)
    assert any(kept and e.name.startswith("kwargs") for e, kept in seen)  # the cache's
    tokens, logits = _greedy(second, ids[:, :1], 4, compiled.static_cache(second, 1 + 4))
    ref_tokens, ref_logits = _greedy(second, ids[:, :1], 4, DynamicCache(config=second.config))  # eager
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    shapes = len(compiled.compile_log(second))
    second.train()
    _greedy(second, ids, 2, compiled.static_cache(second, 12 + 2))  # a new cache length, not compiled
    assert len(compiled.compile_log(second)) == shapes


def test_the_guard_filter_drops_the_models_objects_and_globals_and_keeps_the_calls():
    entry = lambda kind, name, is_global=False: SimpleNamespace(guard_type=kind, name=name, is_global=is_global)  # noqa: E731
    keep = compiled.call_guards("draft")
    cases = [
        (entry("TENSOR_MATCH", "draft._modules['lm_head']._parameters['weight']"), True),  # a cast model compiles again
        (entry("DUPLICATE_INPUT", "draft._modules['a']._parameters['weight']"), True),
        (entry("CONSTANT_MATCH", "draft._modules['norm'].variance_epsilon"), False),
        (entry("TYPE_MATCH", "dict(type(draft)).__dict__['forward']"), False),
        (entry("EMPTY_NN_MODULE_HOOKS_DICT", "draft._forward_hooks"), False),
        (entry("MODULE_MATCH", "G['__import_torch']", is_global=True), False),
        (entry("CONSTANT_MATCH", "cache.layers[0].is_initialized"), True),
        (entry("TYPE_MATCH", "dict(type(cache)).__dict__['crop']"), True),
        (entry("CONSTANT_MATCH", "kwargs['logits_to_keep']"), True),
        (entry("GRAD_MODE", ""), True),
        (entry("CONSTANT_MATCH", "drafts.k"), True),  # another variable, not the model's
    ]
    assert keep([e for e, _ in cases]) == [kept for _, kept in cases]
