"""A seeded data-parallel training run with measured gradient communication, runnable by torchrun.

    torchrun --nproc-per-node 2 -m frugalm.training.ddp_train --model tiny --steps 10 \\
        --compression none,fp16,powersgd --out ddp.json

For each compression in the list, every process builds the same model from the same seed,
wraps it with frugalm.training.distributed (counted DDP comm hook) and trains it with the one
training loop (frugalm.training.loop.train) for --steps steps on windows of the text. Rank 0
writes one JSON document atomically: per run, the per-step loss curve (mean over processes),
bytes handed to collectives per step, the expected fp32 gradient bytes per step
(4 x trainable parameters), step times and wall time. `launch()` runs this module under
torchrun from Python and returns that document.

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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from frugalm.errors import ConfigError, DataError, FrugalmError
from frugalm.training.distributed import COMPRESSIONS, CommConfig, DistInfo, gradient_bytes, make_wrapper, setup_distributed, teardown_distributed
from frugalm.training.loop import TrainConfig, causal_lm_loss, train

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip


def build_model(spec: str, seed: int, layers: int | None = None) -> tuple[nn.Module, object | None, str]:
    """(model, tokenizer or None, description) for a --model spec; same weights on every process."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if spec == "tiny" or spec.endswith(".json"):
        if spec == "tiny":
            config, desc = LlamaConfig(**TINY), "tiny llama (built in code)"
        else:
            try:
                cfg = json.loads(Path(spec).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ConfigError(f"--model {spec}: cannot read it as a JSON model config ({exc}); pass a config .json, a model folder or 'tiny'") from None
            config, desc = AutoConfig.for_model(cfg.pop("model_type"), **cfg), f"random weights of {spec}"
        if layers:
            config.num_hidden_layers, desc = layers, desc + f", cut to {layers} layers"
        return AutoModelForCausalLM.from_config(config), None, desc
    from frugalm.models import load_model

    loaded = load_model(spec)
    model = loaded.model.train()
    if layers:
        raise ConfigError("--layers applies only to a config .json or 'tiny'; drop it for a pretrained model")
    return model, loaded.tokenizer, f"pretrained {loaded.source.ref}"


def encode(text: str, tokenizer, vocab_size: int) -> torch.Tensor:
    """1-D int64 token stream: the tokenizer's ids, or UTF-8 bytes without one."""
    if tokenizer is None:
        if vocab_size < 256:
            raise ConfigError(f"byte-level encoding needs a vocabulary of >= 256, the model has {vocab_size}; pass --tokenizer")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # a stream, windowed later


def train_ddp(model: nn.Module, tokens: torch.Tensor, config: TrainConfig, comm: CommConfig, info: DistInfo, count_flops: bool = True) -> dict:
    """Train `model` in place under DDP with `comm`; return the run's JSON-ready figures (on every rank)."""
    import torch.distributed as dist

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

    result = train(model, tokens, replace(config, log_every=1), loss_fn=timed_loss, wrap_model=wrap, on_step=on_step, count_flops=count_flops)
    local = torch.tensor([loss for _, loss in result.losses], dtype=torch.float64, device=info.device)
    dist.all_reduce(local)  # mean loss over processes (logging only: not gradient traffic, not counted)
    expected = gradient_bytes(model)
    return {
        **counter.summary(expected_bytes_per_step=expected), "comm": asdict(comm),
        "loss_per_step": (local / info.world_size).tolist(), "step_time_s": step_times,
        "wall_time_s": result.wall_time_s, "params": result.params, "trainable_params": result.trainable_params,
        "cost": {k: v for k, v in result.cost().items() if k not in ("loss_curve", "settings")},
    }


def write_json_atomic(path: str | os.PathLike, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m frugalm.training.ddp_train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny', a config .json (random weights) or a model folder / reference")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's, else UTF-8 bytes)")
    p.add_argument("--layers", type=int, help="cut a config's depth to this many layers")
    p.add_argument("--data", help="training text (default: frugalm's built-in evaluation text)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4, help="windows per process per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", default="none", help=f"comma-separated list, one run each: {', '.join(COMPRESSIONS)}")
    p.add_argument("--powersgd-rank", type=int, default=4)
    p.add_argument("--powersgd-start-step", type=int, default=2)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--no-count-flops", action="store_true", help="skip counting one step's FLOPs before training")
    p.add_argument("--out", required=True, help="JSON result file (written by rank 0, atomically)")
    p.add_argument("--store", help="also store each run, with its communicated bytes and loss curve, in this frugalm results store")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from frugalm.data import read_text

    comms = [CommConfig(compression=c.strip(), powersgd_rank=args.powersgd_rank, powersgd_start_step=args.powersgd_start_step,
                        bucket_cap_mb=args.bucket_cap_mb, seed=args.seed) for c in args.compression.split(",")]  # fmt: skip
    problems = [p for c in comms for p in c.problems()]
    if problems:
        raise ConfigError(f"ddp_train: {'; '.join(dict.fromkeys(problems))}. Fix these options.")
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps, seed=args.seed)
    info = setup_distributed()
    try:
        if args.data:
            text = read_text(args.data)
        else:
            from frugalm.default_model import default_eval_path

            text = read_text(default_eval_path())
        runs, desc = [], ""
        for comm in comms:
            model, tokenizer, desc = build_model(args.model, args.seed, args.layers)
            if args.tokenizer:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            tokens = encode(text, tokenizer, model.config.vocab_size)
            if tokens.numel() < config.seq_len + 1:
                raise DataError(f"--data: the text is {tokens.numel()} tokens, too short for --seq-len {config.seq_len}; give more text or lower --seq-len")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        doc = run(args)
    except FrugalmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        write_json_atomic(args.out, doc)
        if args.store:
            store_runs(doc, args.store)
    return 0


def store_runs(doc: dict, store_path: str | os.PathLike) -> list[str]:
    """One stored run per compression: bytes communicated (network), wall time, tokens, FLOPs; the curves in its config."""
    from frugalm.measure.metrics import BENCHMARK_VERSION, Measurement
    from frugalm.store import Run, Store

    setting = {k: doc[k] for k in ("world_size", "backend", "device", "model", "data", "tokens", "train", "threads_per_process")}
    environment = {k: doc[k] for k in ("torch", "python", "machine")}
    ids = []
    with Store(store_path) as db:
        for r in doc["runs"]:
            protocol = {"method": r["method"], "steps": r["steps"], "compression": r["comm"], "expected_grad_bytes_per_step": r["expected_grad_bytes_per_step"]}
            figures = [
                Measurement("produce_comm_bytes", float(r["total_bytes"]), "B", "counted", protocol=protocol),
                Measurement("produce_wall_s", r["wall_time_s"], "s", "measured", protocol={"world_size": doc["world_size"], "device": doc["device"]}),
                Measurement("produce_train_tokens", float(r["cost"]["tokens_seen"]), "tok", "counted"),
            ]
            if r["cost"].get("flops"):
                figures.append(Measurement("produce_flops", float(r["cost"]["flops"]), "FLOP", "counted"))
            curves = {k: r[k] for k in ("loss_per_step", "bytes_per_step", "compressed_steps", "step_time_s", "total_vs_expected", "reduction_x")}
            run = Run(kind="training-ddp", model_ref=doc["model"], benchmark_version=BENCHMARK_VERSION, environment=environment,
                      config={**setting, "compression": r["comm"], **curves}, wall_s=r["wall_time_s"])
            ids.append(db.add_run(run, figures))
    return ids


def launch(args: list[str], nproc: int = 2, timeout_s: float = 600) -> dict:
    """Run this module under torchrun with `args` (no --out) and return rank 0's JSON document."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "frugalm.training.ddp_train", *args, "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out.exists():
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            tail = errors[0] if errors else " | ".join(proc.stderr.strip().splitlines()[-5:])
            raise FrugalmError(f"data-parallel run failed (exit {proc.returncode}): {tail}")
        return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
