import pytest
import torch

from frugalm.measure.compute import (
    count_flops,
    flops_per_token,
    generate_timed,
    time_workload,
)
from frugalm.measure.workloads import Workload
from frugalm.models import load_model

CPU = torch.device("cpu")


def _shapes(model):
    cfg = model.config
    layer_linear = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n
    )
    head = model.lm_head.weight.numel()  # the output matmul counts even when tied to the embedding
    d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return layer_linear, head, cfg.num_hidden_layers, d_attn


def test_counted_flops_match_the_analytic_count(tiny_llama):
    # Kaplan et al. (2020): forward FLOPs per token = 2 N (matmul parameters) + attention, where
    # attention is QK^T and AV: 2 matmuls x 2 FLOPs x n_layer x context x d_attn.
    model = load_model(tiny_llama).model
    layer_linear, head, n_layer, d_attn = _shapes(model)
    prompt = 96
    prefill, decode = flops_per_token(model, Workload("t", prompt, 2, 1, ""), CPU)
    expected_decode = 2 * (layer_linear + head) + 4 * n_layer * (prompt + 1) * d_attn
    assert decode == pytest.approx(expected_decode, rel=0.05)
    # Prefill computes the output head for the last position only (as serving does) and counts
    # the full prompt x prompt attention (no discount for the causal mask).
    expected_prefill = (2 * layer_linear * prompt + 2 * head + 4 * n_layer * prompt * prompt * d_attn) / prompt
    assert prefill == pytest.approx(expected_prefill, rel=0.05)


def test_flop_counter_sees_cpu_attention():
    q = torch.randn(1, 4, 8, 16)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert flops == 2 * 2 * 4 * 8 * 8 * 16


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "qwen2"])
def test_flops_counted_for_every_architecture(tiny_models, arch):
    model = load_model(tiny_models[arch]).model
    params = sum(p.numel() for p in model.parameters())
    prefill, decode = flops_per_token(model, Workload("t", 32, 2, 1, ""), CPU)
    assert 0 < prefill < 4 * params and 0 < decode < 4 * params


def test_timed_generation_keeps_raw_samples(tiny_llama):
    model = load_model(tiny_llama).model
    ids = torch.randint(4, 300, (2, 16))
    ttft, steps = generate_timed(model, ids, 5, CPU)
    assert ttft > 0 and len(steps) == 4 and all(s > 0 for s in steps)
    timing = time_workload(model, Workload("t", 16, 4, 2, ""), CPU, warmup=1, repetitions=3)
    assert len(timing.prefill_s) == 3 and [len(r) for r in timing.decode_step_s] == [3, 3, 3]
