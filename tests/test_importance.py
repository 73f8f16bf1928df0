import pytest
import torch

from conftest import TINY_CONFIGS
from frugalm.errors import ConfigError, DataError
from frugalm.training.importance import (
    ImportanceConfig,
    candidate_windows,
    importance_sample,
    sampling_probs,
    weighted_lm_loss,
)
from frugalm.training.loop import TrainConfig, causal_lm_loss, train_causal_lm

SEQ = 16


@pytest.fixture(scope="module")
def model_and_windows():
    """A tiny model trained on a repeated pattern: pattern windows are easy, random ones hard."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, **TINY_CONFIGS["llama"]))
    pattern = torch.arange(50, 66).repeat(40)  # (640,)
    train_causal_lm(
        model, pattern, TrainConfig(steps=40, batch_size=8, seq_len=SEQ, warmup_steps=5, lr=1e-2, log_every=40)
    )
    random_tokens = torch.randint(0, 290, (640,), generator=torch.Generator().manual_seed(0))
    windows = torch.cat([candidate_windows(pattern, SEQ), candidate_windows(random_tokens, SEQ)])
    return model, windows  # first half pattern, second half random


def test_hard_windows_are_drawn_more_and_weights_unbias_the_mean(model_and_windows):
    model, windows = model_and_windows
    n = windows.shape[0]
    sample = importance_sample(model, windows, ImportanceConfig(num_samples=20_000, power=1.0, uniform_mix=0.1))
    assert sample.losses[n // 2 :].mean() > 2 * sample.losses[: n // 2].mean()
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
    assert torch.allclose(
        sampling_probs(torch.zeros(3, dtype=torch.float64), 1.0, 0.0), torch.full((3,), 1 / 3, dtype=torch.float64)
    )


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
    [
        (dict(num_samples=0), "num_samples=0"),
        (dict(power=-1), "power=-1"),
        (dict(uniform_mix=1.5), "uniform_mix=1.5"),
        (dict(batch_size=0), "batch_size=0"),
    ],
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


# --- the training-time sampler: rescored pools, exact resume, counted cost ---------------------------

from frugalm.training.importance import ImportanceWindows  # noqa: E402
from frugalm.training.loop import train  # noqa: E402


def _stream():
    pattern = torch.arange(50, 66).repeat(40)  # (640,) easy for the trained fixture model
    random_tokens = torch.randint(0, 290, (640,), generator=torch.Generator().manual_seed(1))
    return torch.cat([pattern, random_tokens])


def test_sampler_draws_hard_windows_and_counts_its_scoring(model_and_windows):
    model, _ = model_and_windows
    sampler = ImportanceWindows(
        model, _stream(), batch_size=8, seq_len=SEQ, pool=128, power=2.0, uniform_mix=0.0, rescore_every=5
    )
    generator = torch.Generator().manual_seed(0)
    batches = [sampler(i, generator) for i in range(10)]
    assert all(b.shape == (8, SEQ + 1) for b in batches)
    summary = sampler.summary()
    assert summary["rescores"] == 2 and summary["scored_windows"] == 256 and summary["scored_tokens"] == 256 * SEQ
    assert summary["drawn_mean_loss_nats"] > 1.2 * sum(summary["pool_mean_loss_nats"]) / 2  # tilted toward hard windows
    per_window = (
        2 * sum(p.numel() for p in model.parameters()) * SEQ
    )  # tied head: the embedding counts once, as the head matmul
    assert 0.8 < summary["scoring_flops"] / (256 * per_window) < 1.5  # counted ~ 2 * params * tokens


def test_data_parallel_ranks_draw_their_slices_of_one_global_batch(model_and_windows):
    model, _ = model_and_windows
    kw = dict(seq_len=SEQ, pool=64, power=1.0, uniform_mix=0.1, rescore_every=2)
    one = ImportanceWindows(model, _stream(), batch_size=8, **kw)
    ranks = [ImportanceWindows(model, _stream(), batch_size=4, rank=r, world_size=2, **kw) for r in (0, 1)]
    gens = [torch.Generator().manual_seed(5) for _ in range(3)]
    for i in range(4):
        whole = one(i, gens[0])
        assert torch.equal(torch.cat([ranks[0](i, gens[1]), ranks[1](i, gens[2])]), whole)


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, **TINY_CONFIGS["llama"]))


def test_interrupted_importance_run_resumes_exactly(tmp_path):
    def run(stop_at=None):
        model = _tiny_model()
        config = TrainConfig(
            steps=8,
            batch_size=4,
            seq_len=SEQ,
            lr=1e-2,
            warmup_steps=1,
            log_every=1,
            checkpoint_every=4,
            checkpoint_dir=str(tmp_path / "ck"),
        )
        sampler = ImportanceWindows(
            model, _stream(), batch_size=4, seq_len=SEQ, pool=32, power=1.0, uniform_mix=0.1, rescore_every=2
        )

        def on_step(done, total):
            if done == stop_at:
                raise KeyboardInterrupt  # killed between the checkpoints at 4 and 8

        result = train(model, sampler, config, on_step=on_step, count_flops=False)
        return model, result

    reference, ref_result = run()
    with pytest.raises(KeyboardInterrupt):
        run(stop_at=6)
    resumed, result = run()
    assert result.resumed_from_step == 4 and result.losses == ref_result.losses
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters(), strict=True))
    model = _tiny_model()  # a resume between rescorings would score another model than the uninterrupted run did
    sampler = ImportanceWindows(
        model, _stream(), batch_size=4, seq_len=SEQ, pool=32, power=1.0, uniform_mix=0.1, rescore_every=4
    )
    with pytest.raises(ConfigError, match="multiple of rescore_every"):
        sampler(2, torch.Generator())


def test_stage_options_are_checked_together():
    from frugalm.recipe import build_config
    from frugalm.registry import get_technique

    cls = get_technique("full_finetune").config_cls
    _, problems = build_config(
        cls,
        {"sampling": "importance", "checkpoint_every": 30, "rescore_every": 20, "sampling_mix": 2.0},
        "stages[0] (full_finetune)",
    )
    assert (
        len(problems) == 2
        and any("multiple of rescore_every=20" in p for p in problems)
        and any("sampling_mix" in p for p in problems)
    )
    _, problems = build_config(cls, {"sampling": "hardest"}, "stages[0] (full_finetune)")
    assert len(problems) == 1 and "uniform" in problems[0] and "importance" in problems[0]
