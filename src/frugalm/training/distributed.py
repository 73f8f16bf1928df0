"""Data-parallel training with measured gradient communication and optional compression.

Each process (launched by torchrun: gloo on CPU, nccl on GPU) holds a full model copy wrapped in
DistributedDataParallel; backward averages the gradients across processes through a DDP
communication hook. Every hook here is one of torch's own, handed a byte-counting stand-in for
the process group, so what is counted is exactly what the real hook passes to the collectives:

- `none`: torch's allreduce_hook, fp32 buckets (what DDP does without a hook);
- `fp16` / `bf16`: torch's fp16/bf16_compress_hook, the bucket cast to 16 bits, then all-reduced;
- `powersgd`: torch's powerSGD_hook (Vogels et al. 2019, arXiv:1905.13727) at `powersgd_rank`:
  per bucket, the P and Q low-rank factors of every matrix worth compressing plus one flat
  tensor of the others (norms, small matrices) uncompressed. Its first `powersgd_start_step`
  steps are plain fp32 allreduce (torch requires >= 2: DDP rebuilds its buckets after step 1);
  each step's record says whether it was compressed.

What a "byte" is: the bytes of the tensors this process hands to the collectives (its payload),
per step. A ring all-reduce moves about 2 (W - 1) / W times the payload over each process's
link, W the number of processes; the payload is the figure comparable across backends.
Parameter broadcasts at DDP construction and the logging of losses are not gradient traffic and
not counted; buffers are synced once at construction, not every step (forward_sync_buffers=False:
the models trained here have no running statistics, only constant buffers such as rotary
frequencies).

Interface for a training loop:

    info = setup_distributed()                      # reads torchrun's environment
    wrap, counter = make_wrapper(CommConfig(compression="powersgd", powersgd_rank=4), info)
    result = loop.train(model.to(info.device), tokens, config, wrap_model=wrap,
                        on_step=lambda done, total: counter.end_step())
    counter.summary(expected_bytes_per_step=gradient_bytes(model))   # JSON-ready figures
    teardown_distributed()

or by hand: `ddp, counter = wrap_ddp(model, comm, info)`, then `counter.end_step()` after
each optimizer step. frugalm.training.ddp_train is a runnable example and the benchmark's entry.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from frugalm.errors import ConfigError, FrugalmError, problems_message, suggest

COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")


class DistributedError(FrugalmError):
    """The process group cannot be set up as asked (not under torchrun, too few GPUs...)."""


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    compression: str = "none"
    """Gradient communication: none (fp32 allreduce), fp16, bf16, or powersgd."""
    powersgd_rank: int = 4
    """Rank of PowerSGD's low-rank approximation (1-4 is typical; lower sends less)."""
    powersgd_start_step: int = 2
    """Steps of plain fp32 allreduce before PowerSGD starts; >= 2 (DDP rebuilds buckets after step 1)."""
    min_compression_rate: float = 2.0
    """PowerSGD compresses a matrix only when that shrinks it more than this factor."""
    bucket_cap_mb: float = 25.0
    """DDP bucket size: gradients are communicated in buckets of about this many MiB."""
    seed: int = 0
    """Seeds PowerSGD's random initial Q matrices (equal on every process)."""

    def problems(self) -> list[str]:
        out = []
        if self.compression not in COMPRESSIONS:
            out.append(f"unknown compression '{self.compression}'{suggest(self.compression, COMPRESSIONS)}")
        if self.powersgd_rank < 1:
            out.append(f"powersgd_rank={self.powersgd_rank!r} must be >= 1")
        if self.powersgd_start_step < 2:
            out.append(
                f"powersgd_start_step={self.powersgd_start_step!r} must be >= 2 (DDP rebuilds its buckets after step 1)"
            )
        if not self.min_compression_rate > 0:
            out.append(f"min_compression_rate={self.min_compression_rate!r} must be > 0")
        if not self.bucket_cap_mb > 0:
            out.append(f"bucket_cap_mb={self.bucket_cap_mb!r} must be > 0")
        return out


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def setup_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl with CUDA)."""

    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"not launched by torchrun ({', '.join(missing)} unset); run `torchrun --nproc-per-node 2 -m frugalm.training.ddp_train ...`"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise DistributedError(f"unknown backend '{backend}'{suggest(backend, ('gloo', 'nccl'))}")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cpu")
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"backend nccl needs one GPU per process: local rank {local_rank} but {torch.cuda.device_count()} GPU(s); lower --nproc-per-node or use gloo"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)


def teardown_distributed() -> None:

    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class StepComm:
    step: int
    """1-based optimizer step."""
    bytes: int = 0
    """Bytes this process handed to collectives during the step."""
    calls: int = 0
    """Collective calls."""
    bucket_bytes: int = 0
    """Bytes of the gradient buckets the hook was given (the uncompressed gradients)."""
    buckets: int = 0
    compressed_buckets: int = 0
    """Buckets that PowerSGD compressed (0 for other hooks, and in PowerSGD's warm-up)."""


@dataclass
class ByteCounter:
    """Per-step totals of the bytes handed to collectives by the comm hook; thread-safe (hooks
    chain callbacks that run on the backend's threads)."""

    compression: str = "none"
    steps: list[StepComm] = field(default_factory=list)
    current: StepComm = field(default_factory=lambda: StepComm(step=1))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_collective(self, tensors: list[torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        with self._lock:
            self.current.bytes += nbytes
            self.current.calls += 1

    def add_bucket(self, nbytes: int, compressed: bool) -> None:
        with self._lock:
            self.current.bucket_bytes += nbytes
            self.current.buckets += 1
            self.current.compressed_buckets += int(compressed)

    def end_step(self) -> StepComm:
        """Close the current step's record (call after each optimizer step) and start the next."""
        with self._lock:
            done, self.current = self.current, StepComm(step=self.current.step + 1)
            self.steps.append(done)
        return done

    def summary(self, expected_bytes_per_step: int) -> dict:
        """JSON-ready figures: bytes per step, totals, and the reduction against fp32 gradients."""
        total = sum(s.bytes for s in self.steps)
        compressed = [s for s in self.steps if s.compressed_buckets]
        return {
            "compression": self.compression,
            "steps": len(self.steps),
            "bytes_per_step": [s.bytes for s in self.steps],
            "calls_per_step": [s.calls for s in self.steps],
            "compressed_steps": [s.step for s in compressed],
            "bucket_bytes_per_step": [s.bucket_bytes for s in self.steps],
            "total_bytes": total,
            "expected_grad_bytes_per_step": expected_bytes_per_step,
            "expected_total_bytes": expected_bytes_per_step * len(self.steps),
            "total_vs_expected": total / (expected_bytes_per_step * len(self.steps)) if self.steps else None,
            "reduction_x": expected_bytes_per_step * len(self.steps) / total if total else None,
            "reduction_compressed_steps_x": (
                expected_bytes_per_step * len(compressed) / sum(s.bytes for s in compressed)
            )
            if compressed
            else None,
            "method": "counted: bytes of the tensors the DDP comm hook passed to collectives, per process",
        }


class _CountingGroup:
    """Stands in for a ProcessGroup inside a comm hook's state: counts the bytes of every tensor
    this process hands to a collective, then calls the real group. Other attributes pass through."""

    def __init__(self, group, counter: ByteCounter):
        self._group, self._counter = group, counter

    def allreduce(self, tensors, *args, **kwargs):
        self._counter.add_collective(tensors)
        return self._group.allreduce(tensors, *args, **kwargs)

    def allreduce_coalesced(self, tensors, *args, **kwargs):
        self._counter.add_collective(tensors)
        return self._group.allreduce_coalesced(tensors, *args, **kwargs)

    def allgather(self, output_tensors, input_tensors, *args, **kwargs):
        self._counter.add_collective(input_tensors)
        return self._group.allgather(output_tensors, input_tensors, *args, **kwargs)

    def _allgather_base(self, output, input, *args, **kwargs):
        self._counter.add_collective([input])
        return self._group._allgather_base(output, input, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._group, name)


def _hook_and_state(comm: CommConfig, group: _CountingGroup, counter: ByteCounter, backend: str):
    """(hook, state) of torch's own hook for `comm`, wrapped to record each bucket it is given."""

    if comm.compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=group,
            matrix_approximation_rank=comm.powersgd_rank,
            start_powerSGD_iter=comm.powersgd_start_step,
            min_compression_rate=comm.min_compression_rate,
            use_error_feedback=True,
            warm_start=True,
            random_seed=comm.seed,
        )
        hook = powerSGD_hook.powerSGD_hook
    else:
        state = group
        hook = {
            "none": default_hooks.allreduce_hook,
            "fp16": default_hooks.fp16_compress_hook,
            "bf16": default_hooks.bf16_compress_hook,
        }[comm.compression]

    # PowerSGD issues its P and Q all-reduces from future callbacks, which gloo runs on its
    # worker threads: two buckets' collectives could then interleave in different orders on
    # different processes (a collective mismatch that aborts). On gloo each bucket's chain is
    # therefore finished before the next bucket's hook starts; it costs only overlap.
    serialize = comm.compression == "powersgd" and backend == "gloo"

    def counted_hook(state, bucket):
        buffer = bucket.buffer()  # (numel,) flat gradients of the bucket
        compressed = comm.compression == "powersgd" and state.iter >= state.start_powerSGD_iter
        counter.add_bucket(buffer.numel() * buffer.element_size(), compressed)
        future = hook(state, bucket)
        if serialize:
            future.wait()
        return future

    return counted_hook, state


def wrap_ddp(
    model: nn.Module, comm: CommConfig, info: DistInfo, counter: ByteCounter | None = None
) -> tuple[nn.Module, ByteCounter]:
    """Wrap `model` (already on info.device) in DDP with the counted comm hook of `comm`."""

    if problems := comm.problems():
        raise ConfigError(problems_message("CommConfig", problems))
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            "data-parallel training: no parameter of the model is trainable; select some parameters to train"
        )
    counter = counter or ByteCounter(compression=comm.compression)
    ddp = DistributedDataParallel(
        model,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        forward_sync_buffers=False,
        bucket_cap_mb=comm.bucket_cap_mb,
        gradient_as_bucket_view=True,
    )
    hook, state = _hook_and_state(comm, _CountingGroup(dist.group.WORLD, counter), counter, info.backend)
    ddp.register_comm_hook(state, hook)
    return ddp, counter


def make_wrapper(comm: CommConfig, info: DistInfo):
    """(wrap_model, counter) for frugalm.training.loop.train: the counter exists before the loop wraps the model."""
    if problems := comm.problems():
        raise ConfigError(problems_message("CommConfig", problems))
    counter = ByteCounter(compression=comm.compression)
    return (lambda model: wrap_ddp(model, comm, info, counter)[0]), counter


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters' gradients (4 x params in fp32): one uncompressed all-reduce payload."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
