"""Contract tests over the whole registry: every technique, its defaults, its artifact, a quality floor.

Run on the built-in default model (a real, trained 2.4M-parameter Llama), with calibration
text drawn from the part of its held-out text that the perplexity check does not use.
"""

import math

import pytest
import torch

from frugalm.assets import DEFAULT_EVAL_PATH
from frugalm.measure.quality import score_text
from frugalm.models import load_model, save_variant
from frugalm.recipe import Recipe, Stage, build_config, recipe_to_dict
from frugalm.registry import TECHNIQUES, get_technique
from frugalm.runtime import cascade
from frugalm.runtime.decoding import draft_of
from frugalm.runtime.modules import inference_settings
from frugalm.techniques._calibrate import sample_calibration
from frugalm.techniques.base import Context
from frugalm.text.encode import encode_documents
from frugalm.text.files import read_text, split_documents

# Largest perplexity ratio to the dense model each technique may reach with its default
# options on the default model (measured values are well inside; see the closing notes).
QUALITY_FLOOR = {
    "rtn_quant": 1.05,  # int8 per-channel
    "gptq_quant": 1.05,
    "awq_quant": 1.05,
    "magnitude_prune": 3.0,  # 50% unstructured, no recovery
    "wanda_prune": 2.0,
    "sparsegpt_prune": 2.0,
    "structured_prune": 20.0,  # 25% of MLP channels physically removed, no recovery
    "kv_cache_quant": 1.02,  # int8 KV cache, scored by chunked prefill through it
    "mixed_precision_quant": 1.05,  # 5.0 average bits, int4/int8 GPTQ per layer
    "compile_decode": 1.0,  # no weight changes; prefill (what perplexity scores) stays eager
    # Training stages run a short budget here (TRAINING_BUDGET) on the held-out text after the
    # evaluated part; fine-tuning must not hurt, the half-layer student is allowed its loss.
    "full_finetune": 1.05,
    "masked_finetune": 1.05,
    "lora_finetune": 1.05,
    "distill": 3.0,
    "dedup_data": 1.0,  # a data stage: the weights are untouched
    # Decoding stages: the weights are untouched; how the variant generates is not scored by perplexity.
    "speculative": 1.0,
    "prompt_lookup": 1.0,
    "early_exit": 1.0,
    "offload": 1.0,  # weights read from disk, unchanged
    "cascade": 1.0,  # the large model is the incoming one; the small one answers task items only
    "prompt_pruning": 1.0,  # prompts are pruned before prefill; the text perplexity scores is not a prompt
    # Run on the default model upcycled to 4 identical experts (upcycled_moe): any 3 of them give the dense output.
    "expert_prune": 1.001,
}
MOE_ONLY = {"expert_prune"}
"""Techniques for mixture-of-experts models: the contract runs them on the default model upcycled (upcycled_moe)."""
EVAL_TOKENS = 4096
TRAINING_BUDGET = {"steps": 10, "batch_size": 4, "seq_len": 128, "warmup_steps": 2, "log_every": 5}
"""Options given to training stages (kind "training") instead of their defaults, to keep the matrix fast."""
FAST_OPTIONS = {
    "mixed_precision_quant": {"probe_tokens": 512},
    "speculative": TRAINING_BUDGET,
    "cascade": {"items": 100},
}
"""Other techniques' options that keep the matrix fast (fewer sensitivity probe tokens, a short draft distillation)."""


def upcycled_moe(dense):
    """The default Llama as a Mixtral whose 4 experts (top 2) are each a copy of its MLP (sparse upcycling,
    Komatsuzaki et al. 2022) and whose router is random: it computes what the dense model computes."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    c = dense.config
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")  # fmt: skip
    config = MixtralConfig(**{k: getattr(c, k) for k in keep}, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    moe = AutoModelForCausalLM.from_config(config)
    dense_state, state = dense.state_dict(), moe.state_dict()
    for key, tensor in state.items():
        if key in dense_state:
            tensor.copy_(dense_state[key])
    for i in range(c.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp."
        gate_up = torch.cat([dense_state[mlp + "gate_proj.weight"], dense_state[mlp + "up_proj.weight"]])
        state[mlp + "experts.gate_up_proj"].copy_(gate_up.expand(4, *gate_up.shape))
        down = dense_state[mlp + "down_proj.weight"]
        state[mlp + "experts.down_proj"].copy_(down.expand(4, *down.shape))
    moe.tie_weights()
    return moe.eval()


@pytest.fixture(scope="module")
def setup():
    docs = split_documents(read_text(DEFAULT_EVAL_PATH))
    lm = load_model(fast_kernels=False)
    evaluated = encode_documents(lm.tokenizer, docs, EVAL_TOKENS)
    calibration = sample_calibration(lm.tokenizer, docs[len(evaluated.docs) :], 16, 256, seed=0)
    dense = _ppl(lm.model, evaluated)
    return docs, evaluated, calibration, dense, lm.tokenizer


def _ppl(model, encoded) -> float:
    s = score_text(model, encoded, 512, 512)
    return math.exp(s.nll_sum / s.n_predicted)


def test_every_technique_has_a_quality_floor():
    assert set(TECHNIQUES) <= set(QUALITY_FLOOR), f"add a floor for {set(TECHNIQUES) - set(QUALITY_FLOOR)}"


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_defaults_are_valid_and_round_trip(name):
    technique = get_technique(name)
    config, problems = build_config(technique.config_cls, {}, name)
    assert problems == []
    stage_dict = recipe_to_dict(Recipe(name="r", stages=(Stage(name, config),)))["stages"][0]
    again, problems = build_config(
        technique.config_cls, {k: v for k, v in stage_dict.items() if k != "technique"}, name
    )
    assert problems == [] and again == config


@pytest.mark.parametrize("name", sorted(TECHNIQUES))
def test_apply_save_reload(name, setup, tmp_path):
    docs, evaluated, calibration, dense, tokenizer = setup
    technique = get_technique(name)
    lm = load_model(fast_kernels=False)
    n = len(evaluated.docs)
    ctx = Context(
        calibration=calibration, tokenizer=tokenizer, training_documents=docs[n:], held_out_documents=docs[:n]
    )
    model = technique.apply(
        upcycled_moe(lm.model) if name in MOE_ONLY else lm.model,
        technique.config_cls(**(TRAINING_BUDGET if technique.kind == "training" else FAST_OPTIONS.get(name, {}))),
        ctx,
    )
    change = ctx.changes[-1]
    decoding_stage = name in ("speculative", "prompt_lookup", "cascade", "prompt_pruning")  # how it runs, no layer
    assert change["technique"] == name and (
        change["data"]["docs_in"] > 0 if technique.kind == "data" else change["layers"] or decoding_stage
    )
    ids = evaluated.ids[None, :256]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    ppl = _ppl(model, evaluated)
    assert ppl <= QUALITY_FLOOR[name] * dense, f"{name}: perplexity {ppl:.3f} vs dense {dense:.3f}"
    folder = save_variant(model, lm.tokenizer, tmp_path / "variant", {"changes": ctx.changes})
    again = load_model(folder, fast_kernels=False)
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, logits)
    assert again.inference.get("decoding") == inference_settings(model).get("decoding")
    if name == "speculative":  # the draft travels in the artifact
        with torch.no_grad():
            assert torch.equal(draft_of(again.model)(ids).logits, draft_of(model)(ids).logits)
    if name == "cascade":  # and so does the cascade's small model
        assert again.inference["cascade"] == inference_settings(model)["cascade"]
        with torch.no_grad():
            assert torch.equal(cascade.small_of(again.model)(ids).logits, cascade.small_of(model)(ids).logits)
