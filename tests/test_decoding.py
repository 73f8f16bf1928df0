"""Decoding strategies (runtime/decoding and the speculative, prompt_lookup, early_exit stages).

Lossless greedy speculation on tiny random models of every architecture, the counts it reports,
the artifact's draft, the benchmark's figures, and bad input as one line.
"""

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, build_tiny_model
from frugalm.cli import main
from frugalm.errors import ModelError, TechniqueError
from frugalm.models import load_model, save_variant
from frugalm.recipe import build_config
from frugalm.registry import get_technique
from frugalm.runtime import decoding
from frugalm.runtime.decoding import DecodeStats, DraftProposer, PromptLookupProposer, generate, layer_view
from frugalm.runtime.kv_cache import cache_factory
from frugalm.runtime.modules import inference_settings
from frugalm.techniques._arch import decoder_blocks
from frugalm.techniques.base import Context


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _prompt(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 290, (1, n), generator=g)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_plain_loop_is_transformers_greedy(arch, tiny_models):
    model = _model(tiny_models[arch])
    ids = _prompt()
    expected = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    stats = DecodeStats()
    assert generate(model, ids, 20, stats=stats) == expected
    assert stats.target_forwards == 20 and stats.target_fwd_per_tok == 1.0 and stats.drafted == 0


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_strategies_are_lossless(arch, tiny_models, tmp_path):
    model = _model(tiny_models[arch])
    other = _model(build_tiny_model(arch, tmp_path / "other", seed=1))  # a draft that often disagrees
    path, _ = decoder_blocks(model)
    proposers = {
        "self": DraftProposer(model),
        "other": DraftProposer(other),
        "adaptive": DraftProposer(other, threshold=0.5),
        "lookup": PromptLookupProposer(3, 1),
        "early": DraftProposer(layer_view(model, path, 1)),
    }
    for seed in range(3):
        ids = _prompt(seed=seed)
        plain = generate(model, ids, 30)
        for name, proposer in proposers.items():
            for k in (1, 3, 5):
                stats = DecodeStats()
                assert generate(model, ids, 30, proposer=proposer, k=k, stats=stats) == plain, (name, k, seed)
                assert stats.generated == 30 and stats.accepted <= stats.drafted
                if name == "self":  # a draft equal to the target: every guess kept
                    assert stats.accept_rate == 1.0 and stats.target_forwards < 30 / k + 2


@pytest.mark.parametrize("bits", [8, 4])
def test_strategies_run_on_the_packed_kv_cache(bits, tiny_models):
    """Rounds crop frugalm's quantized cache; the output is plain greedy's on the same cache."""
    model = _model(tiny_models["llama"])
    make = cache_factory(model, {"kv_cache": {"bits": bits, "group_size": 64, "residual_length": 8}})
    for seed in range(2):
        ids = _prompt(40, seed)
        plain = generate(model, ids, 40, cache=make(80))
        for proposer in (PromptLookupProposer(), DraftProposer(layer_view(model, "model.layers", 1))):
            assert generate(model, ids, 40, cache=make(80), proposer=proposer, k=3) == plain


def _talking(folder, out, noise=0.0):
    model = _model(folder)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.mul_(8).add_(noise * p.std() * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    shutil.copytree(folder, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    return out


def test_compiled_draft_rounds_guess_what_the_eager_draft_guesses(tiny_models, tmp_path):
    """`compiled: true` travels with the artifact; each round is one compiled graph making the same
    guesses, kept and counted, as the draft stepped eagerly, and compiles once per cache length."""
    # A random tiny model with tied embeddings repeats its last token; blocks scaled up make it talk,
    # and a draft that is the target plus noise agrees with it often, not always.
    lm = load_model(_talking(tiny_models["llama"], tmp_path / "target"), fast_kernels=False)
    draft_folder = _talking(tiny_models["llama"], tmp_path / "draft-src", noise=0.3)
    model = _apply(
        "speculative", lm.model, Context(tokenizer=lm.tokenizer), draft=str(draft_folder), k=3, compiled=True
    )
    again = load_model(save_variant(model, lm.tokenizer, tmp_path / "v", {}))
    setting = again.inference["decoding"]
    assert setting == {"method": "speculative", "k": 3, "threshold": 0.0, "compile": True}
    rounds, draft = decoding.proposer_for(again.model, setting), decoding.draft_of(again.model)
    assert isinstance(rounds, decoding.CompiledDraftProposer)
    counts = []
    for seed, (n, threshold) in enumerate([(24, 0.0), (40, 0.0), (31, 0.3)]):
        ids = _prompt(n, seed)
        rounds.threshold = threshold
        want, got = DecodeStats(), DecodeStats()
        expected = generate(again.model, ids, 30, proposer=DraftProposer(draft, threshold), k=3, stats=want)
        assert (
            generate(again.model, ids, 30, proposer=rounds, k=3, stats=got)
            == expected
            == generate(again.model, ids, 30)
        )
        assert (got.rounds, got.drafted, got.accepted) == (want.rounds, want.drafted, want.accepted), seed
        counts.append((got.accepted, got.drafted))
    assert any(a < d for a, d in counts) and sum(a for a, _ in counts) > 0  # rounds cut short and rounds kept
    log = decoding.compiled.compile_log(again.model)
    assert [(r["what"], r["k"], r["cache_tokens"]) for r in log] == [("draft round", 3, 128)]  # one graph, reused
    assert draft.config._attn_implementation == again.model.config._attn_implementation  # restored after each round
    draft._can_compile_fullgraph = False
    with pytest.raises(TechniqueError, match="static KV cache in one compiled graph"):
        decoding.CompiledDraftProposer(draft, 3)


def test_compiled_early_exit_rounds_guess_what_the_eager_view_guesses(tiny_models, tmp_path):
    """The early-exit view compiles like a draft: the same guesses, one graph reused, the model's own config restored."""
    lm = load_model(_talking(tiny_models["llama"], tmp_path / "target"), fast_kernels=False)
    model = _apply("early_exit", lm.model, Context(tokenizer=lm.tokenizer), layers=1, k=2, compiled=True)
    setting = inference_settings(model)["decoding"]
    rounds = decoding.proposer_for(model, setting)
    assert (
        isinstance(rounds, decoding.CompiledDraftProposer)
        and decoding.proposer_for(model, setting).draft is rounds.draft
    )
    for seed in range(2):
        ids = _prompt(24 + 9 * seed, seed)
        want, got = DecodeStats(), DecodeStats()
        expected = generate(
            model, ids, 30, proposer=DraftProposer(layer_view(model, "model.layers", 1)), k=2, stats=want
        )
        assert generate(model, ids, 30, proposer=rounds, k=2, stats=got) == expected == generate(model, ids, 30)
        assert (got.rounds, got.drafted, got.accepted) == (want.rounds, want.drafted, want.accepted), seed
    assert [r["what"] for r in decoding.compiled.compile_log(model)] == ["draft round"]
    assert model.config._attn_implementation != "eager"  # the blocks' config, switched only during a round


def test_layer_view_shares_weights_and_leaves_the_model_whole(tiny_models):
    model = _model(tiny_models["llama"])
    view = layer_view(model, "model.layers", 1)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert len(view.model.layers) == 1 and view.config.num_hidden_layers == 1
    assert view.model.layers[0] is model.model.layers[0] and view.lm_head is model.lm_head
    truncated = copy.deepcopy(model)
    truncated.model.layers = truncated.model.layers[:1]
    truncated.config.num_hidden_layers = 1
    ids = _prompt()
    with torch.no_grad():
        torch.testing.assert_close(view(ids).logits, truncated(ids).logits)


def test_prompt_lookup_copies_the_latest_match():
    proposer = PromptLookupProposer(3, 1)
    seq = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7]
    assert proposer.propose(seq, 3, DecodeStats()) == [1, 2, 5]  # the later "5 6 7" is followed by 1 2
    assert proposer.propose([1, 2, 3], 3, DecodeStats()) == []


def test_batch_above_one_is_refused(tiny_models):
    model = _model(tiny_models["llama"])
    with pytest.raises(ValueError, match="batch 1"):
        generate(model, torch.randint(3, 290, (2, 8)), 4, proposer=PromptLookupProposer())


def _apply(name, model, ctx, **options):
    technique = get_technique(name)
    config, problems = build_config(technique.config_cls, options, name)
    assert problems == [], problems
    return technique.apply(model, config, ctx)


def test_speculative_artifact_carries_its_draft(tiny_models, tmp_path):
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    draft_folder = build_tiny_model("llama", tmp_path / "draft-src", seed=3)
    model = _apply("speculative", lm.model, Context(tokenizer=lm.tokenizer), draft=str(draft_folder), k=2)
    folder = save_variant(model, lm.tokenizer, tmp_path / "v", {})
    meta = json.loads((folder / "frugalm.json").read_text())
    assert meta["inference"]["decoding"] == {"method": "speculative", "k": 2, "threshold": 0.0}
    again = load_model(folder)
    draft = decoding.draft_of(again.model)
    assert draft is not None and draft is not again.model
    ids = _prompt()
    plain = generate(again.model, ids, 16)
    assert (
        generate(again.model, ids, 16, proposer=decoding.proposer_for(again.model, again.inference["decoding"]), k=2)
        == plain
    )
    meta_path = folder / "draft" / "frugalm.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "inference": {"decoding": meta["inference"] | {"method": "speculative"}}}))
    with pytest.raises(
        ModelError, match="carries a decoding strategy or cascade of its own"
    ):  # never a draft of a draft
        load_model(folder)
    shutil.rmtree(folder / "draft")
    with pytest.raises(ModelError, match="draft/ folder is missing"):
        load_model(folder)


def test_bad_options_are_refused(tiny_models, tmp_path):
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    ctx = Context(tokenizer=lm.tokenizer)
    for name, options, message in [
        ("speculative", {"k": 0}, "k must be at least 1"),
        ("prompt_lookup", {"k": -1}, "k must be at least 1"),
        ("early_exit", {"layers": 2}, "fewer than the model's 2 decoder blocks"),
        ("early_exit", {"threshold": 1.5}, "threshold must be in [0, 1)"),
        ("early_exit", {"mode": "confidence", "compiled": True}, "compiled applies to mode self_speculative"),
    ]:
        technique = get_technique(name)
        config, problems = build_config(technique.config_cls, options, name)
        if problems:
            assert message in problems[0]
            continue
        with pytest.raises(TechniqueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            technique.apply(lm.model, config, ctx)
    gpt2 = tiny_models["gpt2"]
    with pytest.raises(TechniqueError, match="another tokenizer"):
        other_vocab = tmp_path / "other-vocab"
        shutil.copytree(gpt2, other_vocab)
        vocab = json.loads((other_vocab / "tokenizer.json").read_text())
        vocab["model"]["vocab"] = {f"x{k}": v for k, v in vocab["model"]["vocab"].items()}
        vocab["model"]["merges"] = []
        (other_vocab / "tokenizer.json").write_text(json.dumps(vocab))
        _apply("speculative", lm.model, ctx, draft=str(other_vocab))
    model = _apply("prompt_lookup", lm.model, ctx)
    with pytest.raises(TechniqueError, match="one decoding strategy"):
        _apply("early_exit", model, ctx, layers=1)
    with pytest.raises(TechniqueError, match="drop one of the two stages"):
        _apply("compile_decode", model, ctx)


def test_bad_recipe_values_are_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    for stage, expected in [
        ("technique: speculative\n    k: 0", "k must be at least 1"),
        ("technique: early_exit\n    layers: 9", "fewer than the model's 4 decoder blocks"),
        ("technique: speculative\n    draft: /no/such/draft", "does not exist"),
    ]:
        recipe.write_text(f"version: 1\nname: bad\nstages:\n  - {stage}\n")
        assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--no-measure", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()  # the resolved recipe, then the error
        errors = [line for line in err if "error:" in line]
        assert errors == [err[-1]] and err[-1].startswith("frugalm run: error:") and expected in err[-1], err
        assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_prompt_lookup_is_measured_on_text_prompts(tmp_path, capsys):
    """The built-in model decoding code with prompt lookup: identical output, counts, a paired speedup."""
    db = tmp_path / "s.db"
    args = ["run", "src/frugalm/recipes/prompt-lookup.yaml", "--out", str(tmp_path / "pl"), "--store", str(db),
            "--workload", "chat", "--workload", "batch8", "--repetitions", "2", "--speedup-budget", "3", "--json", "--quiet",
            "--metric", "greedy_agree_frac", "--metric", "accept_rate", "--metric", "accept_len_mean",
            "--metric", "target_fwd_per_tok", "--metric", "speedup_strategy", "--metric", "tpot_p50_ms"]  # fmt: skip
    assert main(args) == 0
    figures = {(m["metric"], m["workload"]): m for m in json.loads(capsys.readouterr().out)["metrics"]}
    assert figures[("greedy_agree_frac", "chat")]["value"] == 1.0
    assert 0 < figures[("accept_rate", "chat")]["value"] <= 1
    assert figures[("target_fwd_per_tok", "chat")]["value"] < 1  # code repeats itself: guesses are kept
    speedup = figures[("speedup_strategy", "chat")]
    assert speedup["method"] == "measured" and len(speedup["protocol"]["ci"]) == 2
    assert ("accept_rate", "batch8") not in figures  # batch 8 decodes plainly, and says so
    assert "batch 1 only" in figures[("tpot_p50_ms", "batch8")]["protocol"]["decoding"]


def test_confidence_exit(tiny_models, tmp_path):
    """Lossy early exit: never confident enough, it is the full model; always confident, every token runs `layers` blocks."""
    lm = load_model(tiny_models["llama"], fast_kernels=False)
    ctx = Context(tokenizer=lm.tokenizer)
    model = _apply("early_exit", lm.model, ctx, mode="confidence", layers=1, threshold=0.999999)
    setting = model.frugalm_inference["decoding"]
    assert setting["method"] == "confidence_exit"
    ids = _prompt()
    plain = generate(model, ids, 16)
    stats = DecodeStats()
    assert decoding.exit_generate(model, ids, 16, setting, stats=stats) == plain
    assert stats.blocks_per_tok == 2
    with torch.no_grad():
        torch.testing.assert_close(
            decoding.exit_logits(model, ids, setting)[0], model(ids).logits[0], rtol=1e-4, atol=1e-4
        )
    eager = {**setting, "threshold": 1e-9}
    stats = DecodeStats()
    out = decoding.exit_generate(model, ids, 16, eager, stats=stats)
    assert len(out) == 16 and stats.blocks_per_tok == 1
    logits = decoding.exit_logits(model, ids, eager)
    assert logits.shape == (1, 24, lm.model.config.vocab_size) and torch.isfinite(logits).all()
    folder = save_variant(model, lm.tokenizer, tmp_path / "ce", {})
    assert load_model(folder).inference["decoding"] == setting
    gpt2 = load_model(tiny_models["gpt2"], fast_kernels=False)
    with pytest.raises(TechniqueError, match="Llama-family"):
        _apply("early_exit", gpt2.model, ctx, mode="confidence", layers=1)


def test_the_report_says_how_a_variant_decoded():
    from frugalm.measure.metrics import Measurement
    from frugalm.report.build import decoding_note

    p = {"decoding": {"method": "prompt_lookup", "k": 4}}
    figures = [
        Measurement("target_fwd_per_tok", 0.5, method="counted", workload="chat", protocol=p),
        Measurement("accept_rate", 0.69, method="counted", workload="chat", protocol=p),
        Measurement("greedy_agree_frac", 1.0, method="measured", workload="chat", protocol=p),
        Measurement("speedup_strategy", 1.6, method="measured", workload="chat", protocol={"ci": [1.56, 1.65]}),
    ]
    note = decoding_note(figures)
    assert note == ("prompt_lookup on chat: 0.690 of guesses kept, 0.500 forwards per token, 1.000 of tokens as plain "
                    "greedy decoding, 1.600x [1.560, 1.650] over its own plain decoding")  # fmt: skip
    assert decoding_note(figures[2:]) is None
