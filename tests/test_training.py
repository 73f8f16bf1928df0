"""The training loop and the training stages: exact resume after SIGKILL, distillation, LoRA, masking, bad input."""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from frugalm.assets import DEFAULT_EVAL_PATH
from frugalm.errors import ConfigError, DataError, FrugalmError, TechniqueError
from frugalm.measure.quality import score_text
from frugalm.models import load_model
from frugalm.recipe import build_config
from frugalm.registry import get_technique
from frugalm.store import Store
from frugalm.techniques.base import Context
from frugalm.text.encode import encode_documents
from frugalm.text.files import read_text, split_documents
from frugalm.training import checkpoint as ckpt
from frugalm.training.loop import TrainConfig, train

# --- the loop: exact resume ------------------------------------------------------------------------

# A child trains a tiny seeded Llama for 16 steps with a checkpoint every 4, one thread, and saves
# its final weights; after step 9 it slows down so the parent can SIGKILL it between checkpoints.
CHILD = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from frugalm.training.loop import TrainConfig, train
torch.set_num_threads(1)
ckpt_dir, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
tokens = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(1))
config = TrainConfig(steps=16, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=3, log_every=2, checkpoint_every=4, checkpoint_dir=ckpt_dir, grad_accum=2)
def on_step(done, total):
    if slow and done >= 9:
        time.sleep(60)
result = train(model, tokens, config, on_step=on_step)
torch.save(model.state_dict(), out + ".pt")
json.dump({"resumed_from_step": result.resumed_from_step, "losses": result.losses}, open(out + ".json", "w"))
"""


def _child(tmp_path: Path, ckpt_dir: str, out: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, ckpt_dir, str(tmp_path / out), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_run_resumes_to_bitwise_identical_weights(tmp_path):
    killed = _child(tmp_path, str(tmp_path / "ck-a"), "a", "slow")
    reference = _child(tmp_path, str(tmp_path / "ck-b"), "b", "fast")
    deadline = time.time() + 120
    while not (tmp_path / "ck-a" / "step-00000008").is_dir():
        assert killed.poll() is None and time.time() < deadline, killed.communicate()[1][-2000:]
        time.sleep(0.1)
    time.sleep(0.5)  # now inside step 9's pause: past the checkpoint at 8, before the one at 12
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert ckpt.list_checkpoints(tmp_path / "ck-a")[-1].name == "step-00000008"
    resumed = _child(tmp_path, str(tmp_path / "ck-a"), "a", "fast")
    for proc in (resumed, reference):
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text())
    assert ra["resumed_from_step"] == 8 and rb["resumed_from_step"] == 0
    assert ra["losses"] == rb["losses"]  # the loss curve survives the kill too
    assert not (tmp_path / "ck-a").exists()  # a completed run removes its checkpoints


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )


TOKENS = torch.randint(0, 64, (4000,), generator=torch.Generator().manual_seed(1))


def test_partial_and_foreign_checkpoints_are_never_loaded(tmp_path):
    (tmp_path / ".partial-x").mkdir()
    (tmp_path / ".partial-x" / "state.pt").write_bytes(b"torn")
    (tmp_path / "step-00000004").mkdir()  # no state.pt: not a complete checkpoint
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.load_latest(tmp_path, "f") is None
    config = TrainConfig(
        steps=4, batch_size=2, seq_len=16, warmup_steps=1, checkpoint_every=2, checkpoint_dir=str(tmp_path / "ck")
    )
    state = ckpt.TrainState(
        step=2,
        model={},
        optimizer={},
        generator=torch.Generator().get_state(),
        cpu_rng=torch.get_rng_state(),
        cuda_rng=[],
        losses=[],
        pending=(0.0, 0),
        wall_s=0.0,
        fingerprint="other",
    )
    ckpt.save_checkpoint(tmp_path / "ck", state)
    with pytest.raises(ConfigError, match="other settings.*delete the folder"):
        train(_tiny(), TOKENS, config)


def test_accumulation_checkpointing_and_bf16_run_and_count_cost(monkeypatch, tmp_path):
    base = TrainConfig(steps=4, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, log_every=1)
    plain, recomputed = _tiny(), _tiny()
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path / "absent"))  # no energy counter: estimated
    result = train(plain, TOKENS, base)
    zone = tmp_path / "powercap" / "intel-rapl:0"  # a fabricated RAPL counter: measured
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text("5000000")
    (zone / "max_energy_range_uj").write_text(str(10**9))
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path / "powercap"))
    counted = train(recomputed, TOKENS, TrainConfig(**{**base.__dict__, "gradient_checkpointing": True}))
    for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # recomputation changes memory, not the result
    assert result.flops > 0 and 0.5 < result.flops / result.flops_analytic < 2
    assert result.tokens_seen == 4 * 2 * 16 and result.energy_j > 0 and result.energy_method == "estimated"
    assert (
        counted.energy_method == "measured"
        and counted.energy_j == 0.0
        and counted.energy_protocol["zones"] == ["intel-rapl:0"]
    )  # the counter stood still
    accumulated = train(_tiny(), TOKENS, TrainConfig(**{**base.__dict__, "grad_accum": 2, "precision": "bf16"}))
    assert accumulated.tokens_seen == 2 * result.tokens_seen and accumulated.flops > result.flops
    assert all(math.isfinite(loss) for _, loss in accumulated.losses)


# --- the stages on the built-in default model ---------------------------------------------------------

EVAL_TOKENS = 4096


@pytest.fixture(scope="module")
def default_setup():
    docs = split_documents(read_text(DEFAULT_EVAL_PATH))
    lm = load_model(fast_kernels=False)
    evaluated = encode_documents(lm.tokenizer, docs, EVAL_TOKENS)
    n = len(evaluated.docs)
    return lm.tokenizer, evaluated, docs[:n], docs[n:]


def _ppl(model, encoded) -> float:
    s = score_text(model, encoded, 256, 256)
    return math.exp(s.nll_sum / s.n_predicted)


def _ctx(setup, **kw) -> Context:
    tokenizer, _, held_out, rest = setup
    return Context(
        tokenizer=tokenizer,
        training_documents=rest,
        held_out_documents=held_out,
        training_source="default eval text after 4096 tokens",
        **kw,
    )


def _apply(name: str, model, ctx: Context, **options):
    technique = get_technique(name)
    config, problems = build_config(technique.config_cls, options, name)
    assert problems == []
    return technique.apply(model, config, ctx)


BUDGET = dict(steps=30, batch_size=4, seq_len=128, warmup_steps=3, log_every=10)


def test_distillation_beats_the_same_student_without_teacher(default_setup):
    encoded = default_setup[1]
    with_teacher = _apply("distill", load_model(fast_kernels=False).model, _ctx(default_setup), **BUDGET, alpha=0.9)
    without = _apply(
        "distill", load_model(fast_kernels=False).model, _ctx(default_setup), **BUDGET, alpha=0.0
    )  # CE only: no teacher signal
    assert with_teacher.config.num_hidden_layers == 2 == without.config.num_hidden_layers
    assert _ppl(with_teacher, encoded) < _ppl(without, encoded)


def test_lora_merge_reproduces_the_adapter_model(default_setup):
    lm = load_model(fast_kernels=False)
    ctx = _ctx(default_setup)
    adapted = _apply("lora_finetune", lm.model, ctx, **{**BUDGET, "steps": 10}, merge=False)
    assert ctx.changes[-1]["adapter_params"] < 0.1 * ctx.changes[-1]["params_total"]
    ids = default_setup[1].ids[None, :256]
    with torch.no_grad():
        adapter_logits = adapted(ids).logits
    adapter_ppl = _ppl(adapted, default_setup[1])
    from frugalm.techniques.lora_finetune import merge_adapters

    merged, lost = merge_adapters(adapted, None)
    assert type(merged).__name__ == "LlamaForCausalLM" and lost == {}
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_logits, rtol=1e-4, atol=1e-4)
    assert abs(_ppl(merged, default_setup[1]) / adapter_ppl - 1) < 1e-3


def test_lora_on_a_quantized_base_keeps_packed_weights(default_setup):
    from frugalm.runtime.quant_linear import QuantLinear

    lm = load_model(fast_kernels=False)
    ctx = _ctx(default_setup)
    model = _apply("rtn_quant", lm.model, ctx, bits=4, group_size=64)
    codes = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    model = _apply("lora_finetune", model, ctx, **{**BUDGET, "steps": 8}, targets=["*.mlp.down_proj"], lr=1e-2)
    change = ctx.changes[-1]
    lost = change["merge_update_lost_fraction"]
    assert sorted(lost) == sorted(n for n in codes if n.endswith("mlp.down_proj")) and all(
        0 <= v <= 1.5 for v in lost.values()
    )
    after = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert after.keys() == codes.keys()  # still packed: the merge re-quantized onto each layer's grid
    assert any(not torch.equal(after[n].qweight, codes[n]) for n in lost)  # and the update moved some codes
    assert all(torch.equal(after[n].qweight, codes[n]) for n in codes if n not in lost)


def test_importance_sampling_stage_records_its_selection_and_counts_the_scoring(default_setup):
    uniform_ctx, ctx = _ctx(default_setup), _ctx(default_setup)
    budget = {**BUDGET, "steps": 6}
    _apply("full_finetune", load_model(fast_kernels=False).model, uniform_ctx, **budget)
    _apply(
        "full_finetune",
        load_model(fast_kernels=False).model,
        ctx,
        **budget,
        sampling="importance",
        sampling_pool=16,
        rescore_every=3,
    )
    uniform, training = uniform_ctx.changes[-1]["training"], ctx.changes[-1]["training"]
    selection = training["settings"]["sampling"]
    assert (
        selection["rescores"] == 2 and selection["scored_windows"] == 32 and len(selection["pool_mean_loss_nats"]) == 2
    )
    assert training["flops"] == uniform["flops"] + selection["scoring_flops"] and selection["scoring_flops"] > 0
    assert "importance scoring" in training["flops_method"] and "sampling" not in uniform["settings"]
    assert training["tokens_seen"] == uniform["tokens_seen"] and training["loss_curve"] != uniform["loss_curve"]


def test_masked_finetune_changes_only_the_chosen_parameters(tiny_models, tmp_path):
    lm = load_model(tiny_models["gpt2"], fast_kernels=False)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    text = tmp_path / "train.txt"
    text.write_text(
        "\n<|endoftext|>\n".join(f"Story {i}: a little model ran {i} miles on a small computer." for i in range(200))
    )
    ctx = Context(tokenizer=lm.tokenizer)
    model = _apply(
        "masked_finetune",
        lm.model,
        ctx,
        steps=3,
        batch_size=2,
        seq_len=32,
        warmup_steps=1,
        data=str(text),
        train=["biases"],
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    biases = {n for n in before if n.endswith(".bias")}
    assert changed and changed <= biases and set(ctx.changes[-1]["layers"]) == biases
    assert all(p.requires_grad for p in model.parameters())  # flags restored after training


def test_training_never_sees_the_evaluated_documents(default_setup, tmp_path):
    tokenizer, _, held_out, _ = default_setup
    only_held_out = tmp_path / "eval-copy.txt"
    only_held_out.write_text("\n<|endoftext|>\n".join(held_out))
    with pytest.raises(DataError, match="no document left once the evaluated"):
        _apply(
            "full_finetune",
            load_model(fast_kernels=False).model,
            _ctx(default_setup),
            **BUDGET,
            data=str(only_held_out),
        )


# --- bad input: one line each, naming the fix ----------------------------------------------------------


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and isinstance(exc_info.value, FrugalmError)
    return message


def test_bad_inputs_are_one_line_errors_with_the_fix(default_setup, tiny_llama, tmp_path):
    with pytest.raises(TechniqueError) as e:  # the default model's tokenizer is not the tiny models'
        _apply("distill", load_model(fast_kernels=False).model, _ctx(default_setup), **BUDGET, student=str(tiny_llama))
    assert "different tokenizer" in _one_line(e) and "pick a student trained with the teacher's tokenizer" in str(
        e.value
    )
    with pytest.raises(TechniqueError) as e:
        _apply(
            "lora_finetune",
            load_model(fast_kernels=False).model,
            _ctx(default_setup),
            **BUDGET,
            targets=["*.q_projection"],
        )
    assert "match no linear layer" in _one_line(e) and "model.layers.0.self_attn.q_proj" in str(e.value)
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("  \n")
    short.write_text("Once upon a time.")
    for path, expected in ((empty, "is empty"), (short, "too short")):
        with pytest.raises(DataError) as e:
            _apply("full_finetune", load_model(fast_kernels=False).model, _ctx(default_setup), **BUDGET, data=str(path))
        assert expected in _one_line(e)
    _, problems = build_config(get_technique("masked_finetune").config_cls, {"steps": 0}, "stages[0] (masked_finetune)")
    assert len(problems) == 1 and "zero steps" in problems[0] and "steps >= 1" in problems[0]
    with pytest.raises(ConfigError) as e:
        train(_tiny(), TOKENS, TrainConfig(steps=0))
    assert "zero steps" in _one_line(e)


# --- through a recipe: training text, checkpoints, the stored cost --------------------------------------


def test_recipe_stage_trains_on_text_after_the_evaluated_part_and_records_its_cost(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "FRUGALM_RAPL_ROOT", str(tmp_path / "absent")
    )  # no energy counter: the training energy is estimated
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.quality import PerplexityProtocol
    from frugalm.recipe import parse_recipe
    from frugalm.run import RunConfig, run_recipe, training_cost_measurements

    text = tmp_path / "eval.txt"
    text.write_text(
        "\n<|endoftext|>\n".join(
            f"Story {i}: a little model ran {i} miles on a small computer, then rested." for i in range(120)
        )
    )
    produce = ("produce_wall_s", "produce_flops", "produce_train_tokens", "produce_energy_j", "produce_cost_usd")
    bench_config = BenchConfig(
        data=str(text),
        protocol=PerplexityProtocol(max_tokens=512),
        workloads=("chat",),
        warmup=0,
        repetitions=1,
        metrics=("ppl_tok", *produce),
    )
    stage = {
        "technique": "lora_finetune",
        "steps": 4,
        "batch_size": 2,
        "seq_len": 32,
        "warmup_steps": 1,
        "checkpoint_every": 2,
    }
    recipe, problems = parse_recipe({"name": "lora", "stages": [stage]})
    assert problems == []
    result = run_recipe(
        recipe, tiny_llama, RunConfig(out_dir=str(tmp_path / "out"), bench=bench_config), store=tmp_path / "s.db"
    )
    [change] = result.metadata["changes"]
    assert change["training_text"]["documents"] < 120 and change["training_text"]["held_out_documents_dropped"] == 0
    assert "documents" in change["training_text"]["source"] and change["training"]["tokens_seen"] == 4 * 2 * 32
    with Store(tmp_path / "s.db") as store:  # stored beside the inference figures of the variant
        figures = {m.metric: m for m in store.measurements(result.bench.run.id)}
    assert set(produce) | {"ppl_tok"} <= set(figures)
    assert (
        figures["produce_flops"].value == change["training"]["flops"] > 0
        and figures["produce_flops"].method == "counted"
    )
    assert (
        figures["produce_flops"].protocol["stages"][0]["flops_method"] == change["training"]["flops_method"]
    )  # what each stage counted
    assert figures["produce_train_tokens"].value == 4 * 2 * 32 and figures["produce_energy_j"].method == "estimated"
    assert (
        training_cost_measurements([{"technique": "rtn_quant"}], 1.0, torch.device("cpu"), bench_config) == []
    )  # no training, no figures
    assert not any(p.name.endswith(".checkpoints") for p in tmp_path.iterdir())  # removed once complete
    unmerged, _ = parse_recipe({"name": "lora", "stages": [{**stage, "merge": False}]})
    with pytest.raises(ConfigError, match="set merge: true"):
        run_recipe(unmerged, tiny_llama, RunConfig(out_dir=str(tmp_path / "out2"), bench=bench_config, measure=False))


# --- a planted checkpoint: refused before anything in it runs -----------------------------------------


class _RunsCode:
    """Unpickling this calls open(marker, "w"): what a pickle planted as state.pt could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _interrupted(folder: Path, stop_at: int, steps: int = 8, every: int = 4, **kw):
    """Train _tiny() with checkpoints into `folder` and stop (as if killed) after step `stop_at`."""
    config = TrainConfig(
        steps=steps,
        batch_size=2,
        seq_len=16,
        lr=1e-2,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=every,
        checkpoint_dir=str(folder),
    )

    def on_step(done, total):
        if done == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny(), TOKENS, config, on_step=on_step, count_flops=False, **kw)
    return config


def test_a_planted_checkpoint_runs_no_code_and_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted" / "step-00000002"
    planted.mkdir(parents=True)
    torch.save({"step": 2, "model": _RunsCode(marker), "fingerprint": "f"}, planted / "state.pt")
    with pytest.raises(ConfigError) as e:
        ckpt.load_latest(tmp_path / "planted", "f")
    assert not marker.exists()
    assert "state.pt" in _one_line(e) and "delete the checkpoint folder" in str(e.value)
    # A genuine checkpoint of this very run (its fingerprint right) whose state.pt is swapped for the pickle:
    config = _interrupted(tmp_path / "ck", stop_at=3, steps=4, every=2)
    [genuine] = ckpt.list_checkpoints(tmp_path / "ck")
    torch.save({"step": 2, "model": _RunsCode(marker), "fingerprint": "f"}, genuine / "state.pt")
    with pytest.raises(ConfigError) as e:
        train(_tiny(), TOKENS, config, count_flops=False)
    assert not marker.exists()
    assert str(genuine / "state.pt") in _one_line(e) and "delete the checkpoint folder" in str(e.value)


def test_fingerprint_is_checked_before_state_is_read(tmp_path):
    config = _interrupted(tmp_path / "ck", stop_at=3, steps=4, every=2)
    [genuine] = ckpt.list_checkpoints(tmp_path / "ck")
    (genuine / "state.pt").write_bytes(b"not even a pickle")  # never read: the settings differ
    other = TrainConfig(**{**config.__dict__, "lr": 2e-2})
    with pytest.raises(ConfigError, match="other settings.*delete the folder"):
        train(_tiny(), TOKENS, other, count_flops=False)


# --- training energy: the user's hardware profile, every segment of a resumed run ---------------------


def _profiles(tmp_path: Path, watts: float = 1000.0) -> Path:
    """A profiles file with one profile that draws `watts` whatever the load (idle = max)."""
    path = tmp_path / "profiles.yaml"
    path.write_text(
        f"hot-box:\n  description: test box\n  usd_per_hour: 1.0\n  usd_per_kwh: 0.5\n  gco2e_per_kwh: 100\n  watts_idle: {watts}\n  watts_max: {watts}\n"
    )
    return path


@pytest.fixture
def no_rapl(monkeypatch, tmp_path):
    """No readable energy counter: the estimate (the profile's watts) is used, whatever the host has."""
    monkeypatch.setenv("FRUGALM_RAPL_ROOT", str(tmp_path / "no-powercap"))


def test_training_energy_uses_the_given_profile(no_rapl, tmp_path):
    from frugalm.measure.cost import get_profile

    profile = get_profile("hot-box", "cpu", _profiles(tmp_path))
    result = train(
        _tiny(),
        TOKENS,
        TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1),
        profile=profile,
        count_flops=False,
    )
    assert result.energy_method == "estimated" and result.energy_protocol["profile"] == "hot-box"
    assert result.energy_j == pytest.approx(1000.0 * result.energy_protocol["wall_s"])
    assert result.energy_protocol["covers"] == "steps 0..3 of 3"


def test_a_stage_and_a_recipe_estimate_training_energy_with_the_users_profile(no_rapl, tiny_llama, tmp_path):
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.quality import PerplexityProtocol
    from frugalm.recipe import parse_recipe
    from frugalm.run import RunConfig, run_recipe, training_cost_measurements

    profiles = _profiles(tmp_path)
    text = tmp_path / "eval.txt"
    text.write_text(
        "\n<|endoftext|>\n".join(
            f"Story {i}: a little model ran {i} miles on a small computer, then rested." for i in range(120)
        )
    )
    lm = load_model(tiny_llama, fast_kernels=False)
    ctx = Context(tokenizer=lm.tokenizer, profile="hot-box", profiles_file=str(profiles))
    _apply("full_finetune", lm.model, ctx, steps=2, batch_size=2, seq_len=32, warmup_steps=1, data=str(text))
    energy = ctx.changes[-1]["training"]["energy_protocol"]
    assert energy["profile"] == "hot-box" and energy["watts_max"] == 1000.0
    bench_config = BenchConfig(
        data=str(text), protocol=PerplexityProtocol(max_tokens=512), profile="hot-box", profiles_file=str(profiles)
    )
    recipe, _ = parse_recipe(
        {
            "name": "ft",
            "stages": [{"technique": "full_finetune", "steps": 2, "batch_size": 2, "seq_len": 32, "warmup_steps": 1}],
        }
    )
    result = run_recipe(recipe, tiny_llama, RunConfig(out_dir=str(tmp_path / "out"), bench=bench_config, measure=False))
    [change] = result.metadata["changes"]
    assert change["training"]["energy_protocol"]["profile"] == "hot-box"
    figures = {
        m.metric: m
        for m in training_cost_measurements(result.metadata["changes"], 1.0, torch.device("cpu"), bench_config)
    }
    assert figures["produce_energy_j"].value == pytest.approx(1000.0 * change["training"]["energy_protocol"]["wall_s"])
    assert figures["produce_energy_j"].protocol["covers"] == "every step of every training stage"


def test_a_resumed_run_counts_the_energy_of_every_segment(no_rapl, tmp_path):
    from frugalm.benchmark.api import BenchConfig
    from frugalm.measure.cost import get_profile
    from frugalm.run import training_cost_measurements

    profile = get_profile("hot-box", "cpu", _profiles(tmp_path))
    config = _interrupted(tmp_path / "ck", stop_at=6, profile=profile)  # checkpoint at 4, killed after 6
    result = train(_tiny(), TOKENS, config, profile=profile, count_flops=False)
    assert result.resumed_from_step == 4 and result.energy_protocol["covers"] == "steps 0..8 of 8"
    assert result.energy_j > result.energy_protocol["joules"] > 0  # more than the segment after the resume
    assert result.energy_j == pytest.approx(
        1000.0 * result.wall_time_s, rel=1e-3
    )  # both segments, at the profile's watts
    # A checkpoint written before energy was stored in it: the figure says which steps it covers.
    config = _interrupted(tmp_path / "old", stop_at=6, profile=profile)
    [old] = ckpt.list_checkpoints(tmp_path / "old")
    state = torch.load(old / "state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("energy")}, old / "state.pt")
    (old / "fingerprint.json").unlink(missing_ok=True)
    partial = train(_tiny(), TOKENS, config, profile=profile, count_flops=False)
    assert partial.resumed_from_step == 4 and partial.energy_protocol["covers"] == "steps 4..8 of 8"
    assert partial.energy_j == pytest.approx(partial.energy_protocol["joules"])
    change = {"technique": "full_finetune", "training": partial.cost()}
    [energy] = [
        m
        for m in training_cost_measurements(
            [change],
            1.0,
            torch.device("cpu"),
            BenchConfig(profile="hot-box", profiles_file=str(tmp_path / "profiles.yaml")),
        )
        if m.metric == "produce_energy_j"
    ]
    assert energy.protocol["covers"] == "training stage 0 (full_finetune): steps 4..8 of 8"
