"""Shared fixtures: tiny models of each supported architecture, built in code, offline and seeded."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# The suite runs on two pytest-xdist workers (README): the children they start (bench, optimize,
# the CLI) run torch on one thread each too, so that the workers do not fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ASSETS = Path(os.environ.get("FRUGALM_ASSETS") or Path(__file__).resolve().parents[2] / "shared" / "assets")
STORIES = ASSETS / "models" / "stories260K"
TINYSTORIES = ASSETS / "data" / "tinystories_valid_0000-0499.txt"

# Tiny configurations of every architecture frugalm supports (shapes scaled down from
# ../shared/assets/configs/). Vocabulary 300 = 256 bytes + a few merges/specials.
TINY_CONFIGS = {
    "llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rotary_pct=0.25,
    ),
    "opt": dict(
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    ),
    "qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
}
VOCAB = 300


def tiny_tokenizer():
    """A byte-level BPE tokenizer built in code: 256 byte tokens, <s>, </s>, and a few merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = ["Once upon a time there was a little model that wanted to be cheaper to run."] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def build_tiny_model(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised tiny model of `arch` with the tiny tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_CONFIGS[arch],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in TINY_CONFIGS}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "eval.txt"
    story = "Once upon a time there was a little model. It wanted to run on a small computer.\n"
    path.write_text((story * 6 + "<|endoftext|>\n") * 4)
    return path


def needs_assets():
    return pytest.mark.skipif(not STORIES.is_dir(), reason=f"shared assets not found at {ASSETS}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With FRUGALM_REQUIRE_ASSETS=1 (.ci/run sets it when ../shared/assets is there), a skipped
    integration test fails: the tests that carry the main claims must run, not quietly skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("FRUGALM_REQUIRE_ASSETS") == "1" and item.get_closest_marker("integration"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = (
            "failed",
            f"integration test skipped although FRUGALM_REQUIRE_ASSETS=1: {reason}",
        )


# --- helpers shared by the technique tests ------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run torch on one thread: the machines are shared, and tiny models gain nothing from more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def calibration(n=8, seq_len=32, seed=0):
    """Seeded random token ids (n, seq_len) over the tiny vocabulary."""
    import torch

    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def run(technique: str, model, calib=None, **options) -> dict:
    """Apply a registered technique with `options` to `model` in place; its change record."""
    from frugalm.registry import get_technique
    from frugalm.techniques.base import Context

    t = get_technique(technique)
    ctx = Context(calibration=calibration() if calib is None else calib)
    t.apply(model, t.config_cls(**options), ctx)
    return ctx.changes[-1]


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


def error_message(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message  # one line, as the CLI prints it
    return message


def complete_keys(db: Path):
    """How often each key is stored as a complete run (the store checked whole first): optimize's resume tests."""
    from collections import Counter

    from frugalm.store import Store

    with Store(db) as store:
        assert store.integrity_check() == "ok"
        return Counter(r.key for r in store.runs() if r.status == "complete" and r.key)
