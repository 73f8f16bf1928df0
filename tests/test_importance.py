import pytest
import torch

from frugalm.errors import ConfigError, DataError
from frugalm.importance import (
    ImportanceConfig,
    candidate_windows,
    importance_sample,
    sampling_probs,
    weighted_lm_loss,
)
from conftest import TINY_CONFIGS
from frugalm.train import TrainConfig, causal_lm_loss, train_causal_lm

SEQ = 16


@pytest.fixture(scope="module")
def model_and_windows():
    """A tiny model trained on a repeated pattern: pattern windows are easy, random ones hard."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, **TINY_CONFIGS["llama"]))
    pattern = torch.arange(50, 66).repeat(40)  # (640,)
    train_causal_lm(model, pattern, TrainConfig(steps=40, batch_size=8, seq_len=SEQ, warmup_steps=5, lr=1e-2, log_every=40))
    random_tokens = torch.randint(0, 290, (640,), generator=torch.Generator().manual_seed(0))
    windows = torch.cat([candidate_windows(pattern, SEQ), candidate_windows(random_tokens, SEQ)])
    return model, windows  # first half pattern, second half random


def test_hard_windows_are_drawn_more_and_weights_unbias_the_mean(model_and_windows):
    model, windows = model_and_windows
    n = windows.shape[0]
    sample = importance_sample(model, windows, ImportanceConfig(num_samples=20_000, power=1.0, uniform_mix=0.1))
    assert sample.losses[n // 2:].mean() > 2 * sample.losses[: n // 2].mean()
    hard_share = (sample.indices >= n // 2).double().mean()
    assert hard_share > 0.6
    assert torch.allclose(sample.probs.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(sample.weights * n * sample.probs[sample.indices], torch.ones(20_000, dtype=torch.float64))
    assert sample.weights.max() <= 1 / 0.1 + 1e-9
    estimate = (sample.weights * sample.losses[sample.indices]).mean()
    assert estimate == pytest.approx(sample.losses.mean().item(), rel=0.02)


def test_seeded_draws(model_and_windows):
    model, windows = model_and_windows
    a = importance_sample(model, windows, ImportanceConfig(num_samples=32, seed=3))
    b = importance_sample(model, windows, ImportanceConfig(num_samples=32, seed=3))
    c = importance_sample(model, windows, ImportanceConfig(num_samples=32, seed=4))
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    assert model.training is False  # scoring restores the mode it found (eval after training)


def test_tempering():
    losses = torch.tensor([1.0, 2.0, 4.0, 0.0], dtype=torch.float64)
    assert torch.allclose(sampling_probs(losses, 0.0, 0.0), torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.allclose(sampling_probs(losses, 1.0, 0.0), losses / 7)
    assert torch.allclose(sampling_probs(losses, 2.0, 0.0), losses**2 / 21)
    mixed = sampling_probs(losses, 1.0, 0.2)
    assert torch.allclose(mixed, 0.8 * losses / 7 + 0.05) and mixed.min() == pytest.approx(0.05)
    assert torch.allclose(sampling_probs(torch.zeros(3, dtype=torch.float64), 1.0, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64))


def test_weighted_loss_with_unit_weights_is_the_plain_loss(model_and_windows):
    model, windows = model_and_windows
    batch = windows[[0, 1, 2, -1, -2, -3]]  # easy and hard windows
    plain = causal_lm_loss(model, batch)
    weighted = weighted_lm_loss(model, batch, torch.ones(6))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-4)
    weighted.backward()
    assert any(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "options, match",
    [(dict(num_samples=0), "num_samples=0"), (dict(power=-1), "power=-1"),
     (dict(uniform_mix=1.5), "uniform_mix=1.5"), (dict(batch_size=0), "batch_size=0")],
)
def test_bad_options(model_and_windows, options, match):
    model, windows = model_and_windows
    with pytest.raises(ConfigError, match=match) as info:
        importance_sample(model, windows, ImportanceConfig(**options))
    assert "\n" not in str(info.value)


def test_bad_windows(model_and_windows):
    model, _ = model_and_windows
    with pytest.raises(DataError, match="at least seq_len"):
        candidate_windows(torch.arange(10), 16)
    with pytest.raises(DataError, match="candidate windows"):
        importance_sample(model, torch.zeros(0, 17, dtype=torch.long), ImportanceConfig())
    with pytest.raises(DataError, match="do not match"):
        weighted_lm_loss(model, torch.zeros(2, 17, dtype=torch.long), torch.ones(3))
