"""A seeded data-parallel training run with measured gradient communication, runnable by torchrun.

    torchrun --nproc-per-node 2 -m frugalm.cli.ddp_train --model tiny --steps 10 \\
        --compression none,fp16,powersgd --out ddp.json

For each compression in the list, every process builds the same model from the same seed,
wraps it with frugalm.training.distributed (counted DDP comm hook) and trains it with the one
training loop (frugalm.training.loop.train) for --steps steps on windows of the text. Rank 0
writes one JSON document atomically: per run, the per-step loss curve (mean over processes),
bytes handed to collectives per step, the expected fp32 gradient bytes per step
(4 x trainable parameters), step times and wall time. `frugalm.cli.ddp_train` is the
entry point torchrun starts; its `launch()` runs it from Python and returns that document.

--model is `tiny` (a 2-layer Llama built in code, byte-level: token ids are UTF-8 bytes), a
config .json (random weights of those shapes; --layers may cut the depth), or a model folder /
reference that frugalm.models.load_model accepts (its weights and tokenizer). --tokenizer
overrides the tokenizer; without one the text is encoded as UTF-8 bytes (vocabulary >= 256).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from frugalm.assets import DEFAULT_EVAL_PATH
from frugalm.errors import ConfigError, DataError, problems_message
from frugalm.measure.metrics import BENCHMARK_VERSION, Measurement
from frugalm.models import load_model
from frugalm.store import Run, Store
from frugalm.text.files import read_text
from frugalm.training.distributed import (
    CommConfig,
    DistInfo,
    gradient_bytes,
    make_wrapper,
    setup_distributed,
    teardown_distributed,
)
from frugalm.training.loop import TrainConfig, causal_lm_loss, train

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


def build_model(spec: str, seed: int, layers: int | None = None) -> tuple[nn.Module, object | None, str]:
    """(model, tokenizer or None, description) for a --model spec; same weights on every process."""

    torch.manual_seed(seed)
    if spec == "tiny" or spec.endswith(".json"):
        if spec == "tiny":
            config, desc = LlamaConfig(**TINY), "tiny llama (built in code)"
        else:
            try:
                cfg = json.loads(Path(spec).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(
                    f"--model {spec}: cannot read it as a JSON model config ({exc}); pass a config .json, a model folder or 'tiny'"
                ) from None
            config, desc = AutoConfig.for_model(cfg.pop("model_type"), **cfg), f"random weights of {spec}"
        if layers:
            config.num_hidden_layers, desc = layers, desc + f", cut to {layers} layers"
        return AutoModelForCausalLM.from_config(config), None, desc

    loaded = load_model(spec)
    model = loaded.model.train()
    if layers:
        raise ConfigError("--layers applies only to a config .json or 'tiny'; drop it for a pretrained model")
    return model, loaded.tokenizer, f"pretrained {loaded.source.ref}"


def encode(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """1-D int64 token stream: the tokenizer's ids, or UTF-8 bytes without one."""
    if tokenizer is None:
        if vocab_size < 256:
            raise ConfigError(
                f"byte-level encoding needs a vocabulary of >= 256, the model has {vocab_size}; pass --tokenizer"
            )
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # a stream, windowed later


def train_ddp(
    model: nn.Module,
    tokens: torch.Tensor,
    config: TrainConfig,
    comm: CommConfig,
    info: DistInfo,
    count_flops: bool = True,
) -> dict:
    """Train `model` in place under DDP with `comm`; return the run's JSON-ready figures (on every rank)."""

    model.to(info.device)
    wrap, counter = make_wrapper(comm, info)
    step_start: list[float] = [0.0]
    step_times: list[float] = []

    def timed_loss(trained: nn.Module, window: torch.Tensor) -> torch.Tensor:
        step_start[0] = time.perf_counter()  # the last call before a step ends is that step's forward
        return causal_lm_loss(trained, window)

    def on_step(done: int, total: int) -> None:
        step_times.append(time.perf_counter() - step_start[0])
        counter.end_step()

    result = train(
        model,
        tokens,
        replace(config, log_every=1),
        loss_fn=timed_loss,
        wrap_model=wrap,
        on_step=on_step,
        count_flops=count_flops,
    )
    local = torch.tensor([loss for _, loss in result.losses], dtype=torch.float64, device=info.device)
    dist.all_reduce(local)  # mean loss over processes (logging only: not gradient traffic, not counted)
    expected = gradient_bytes(model)
    return {
        **counter.summary(expected_bytes_per_step=expected),
        "comm": asdict(comm),
        "loss_per_step": (local / info.world_size).tolist(),
        "step_time_s": step_times,
        "wall_time_s": result.wall_time_s,
        "params": result.params,
        "trainable_params": result.trainable_params,
        "cost": {k: v for k, v in result.cost().items() if k not in ("loss_curve", "settings")},
    }


def run(args: argparse.Namespace) -> dict:
    """This process's share of the runs the parsed options ask for; rank 0's document of all of them."""
    comms = [CommConfig(compression=c.strip(), powersgd_rank=args.powersgd_rank, powersgd_start_step=args.powersgd_start_step,
                        bucket_cap_mb=args.bucket_cap_mb, seed=args.seed) for c in args.compression.split(",")]  # fmt: skip
    problems = [p for c in comms for p in c.problems()]
    if problems:
        raise ConfigError(problems_message("ddp_train", problems))
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
    )
    info = setup_distributed()
    try:
        if args.data:
            text = read_text(args.data)
        else:
            text = read_text(DEFAULT_EVAL_PATH)
        runs, desc = [], ""
        for comm in comms:
            model, tokenizer, desc = build_model(args.model, args.seed, args.layers)
            if args.tokenizer:
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            tokens = encode(text, tokenizer, model.config.vocab_size)
            if tokens.numel() < config.seq_len + 1:
                raise DataError(
                    f"--data: the text is {tokens.numel()} tokens, too short for --seq-len {config.seq_len}; give more text or lower --seq-len"
                )
            runs.append(train_ddp(model, tokens, config, comm, info, count_flops=not args.no_count_flops))
            del model
        return {
            "world_size": info.world_size, "backend": info.backend, "device": str(info.device), "model": desc,
            "data": args.data or "frugalm built-in evaluation text", "tokens": int(tokens.numel()), "train": asdict(config),
            "threads_per_process": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "runs": runs,
        }  # fmt: skip
    finally:
        teardown_distributed()


def store_runs(doc: dict, store_path: str | os.PathLike) -> list[str]:
    """One stored run per compression: bytes communicated (network), wall time, tokens, FLOPs; the curves in its config."""

    setting = {
        k: doc[k]
        for k in ("world_size", "backend", "device", "model", "data", "tokens", "train", "threads_per_process")
    }
    environment = {k: doc[k] for k in ("torch", "python", "machine")}
    ids = []
    with Store(store_path) as db:
        for r in doc["runs"]:
            protocol = {
                "method": r["method"],
                "steps": r["steps"],
                "compression": r["comm"],
                "expected_grad_bytes_per_step": r["expected_grad_bytes_per_step"],
            }
            figures = [
                Measurement("produce_comm_bytes", float(r["total_bytes"]), "B", "counted", protocol=protocol),
                Measurement(
                    "produce_wall_s",
                    r["wall_time_s"],
                    "s",
                    "measured",
                    protocol={"world_size": doc["world_size"], "device": doc["device"]},
                ),
                Measurement("produce_train_tokens", float(r["cost"]["tokens_seen"]), "tok", "counted"),
            ]
            if r["cost"].get("flops"):
                figures.append(Measurement("produce_flops", float(r["cost"]["flops"]), "FLOP", "counted"))
            curves = {
                k: r[k]
                for k in (
                    "loss_per_step",
                    "bytes_per_step",
                    "compressed_steps",
                    "step_time_s",
                    "total_vs_expected",
                    "reduction_x",
                )
            }
            run = Run(
                kind="training-ddp",
                model_ref=doc["model"],
                benchmark_version=BENCHMARK_VERSION,
                environment=environment,
                config={**setting, "compression": r["comm"], **curves},
                wall_s=r["wall_time_s"],
            )
            ids.append(db.add_run(run, figures))
    return ids
