"""Computation: counted FLOPs per token, and timed generation (TTFT, TPOT, throughput).

Generation is a plain greedy loop over the model's forward with its KV cache, so each step can
be timed alone, with device synchronization around it. It never stops early at EOS: every
workload produces exactly its stated number of tokens.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count
from transformers import DynamicCache

from frugalm.measure.workloads import Workload
from frugalm.runtime import cpu_kernels, decoding, families, prompt_pruning

aten = torch.ops.aten


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of softmax(QK^T)V: two matmuls, counted in full (a causal mask is not discounted).

    Works for grouped-query attention, where key/value have fewer heads than the query.
    """
    *batch_heads, s_q, d_qk = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    bh = 1
    for n in batch_heads:
        bh *= n
    return 2 * bh * s_q * s_k * d_qk + 2 * bh * s_q * s_k * d_v


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of the CPU attention kernel's backward (recomputed scores and four gradient matmuls), torch's own formula."""

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _int8_linear_flops(x_shape, packed, *args, **kwargs) -> int:
    """fbgemm's dynamic int8 matmul: the same multiply-adds as the float one (as integer ops)."""
    out_f, in_f = packed.unpack()[0].shape
    return 2 * _rows(x_shape) * out_f * in_f


def _rows(x_shape) -> int:
    rows = 1
    for n in x_shape[:-1]:
        rows *= n
    return rows


def _int8pack_mm_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """ATen's weight-only int8 matmul (w8a16 decode): x (rows, in) by int8 codes (out, in)."""
    return 2 * _rows(x_shape) * x_shape[-1] * w_shape[0]


def _int4pack_mm_flops(x_shape, w_shape, group_size, scales_shape, *args, **kwargs) -> int:
    """ATen's weight-only int4 matmul (w4a16 decode): x (rows, in) by packed codes whose
    (in / group, out, 2) scales and offsets give the output width."""
    return 2 * _rows(x_shape) * x_shape[-1] * scales_shape[1]


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """grouped_mm, how transformers 5 runs a mixture-of-experts block's experts (on CPU too): each
    row of A (one token's choice of one expert) times its group's matrix, so the count is that of
    the experts actually routed. (rows, k) x (groups, k, n) -> 2 rows k n; (groups, m, k) x (k, n
    total) -> 2 m k n; (m, k total) x (k total, n) -> 2 m k n; (g, m, k) x (g, k, n) -> 2 g m k n."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 2:
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


# torch's counter knows the CUDA attention kernels but not the CPU one that sdpa dispatches to
# (forward, and backward for training), nor the quantized int8 matmul, nor the weight-only packed
# matmuls, nor grouped_mm: without these a packed variant's decode step would count its head alone.
_EXTRA_FLOP_FORMULAS = {
    aten._weight_int8pack_mm: _int8pack_mm_flops,
    aten._weight_int4pack_mm_for_cpu: _int4pack_mm_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
    torch.ops.quantized.linear_dynamic: _int8_linear_flops,
    aten._grouped_mm: _grouped_mm_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    formulas = dict(_EXTRA_FLOP_FORMULAS)
    if cpu_kernels.loaded():  # frugalm's int8 decode kernel: the int8pack matmul's contract, so its count
        formulas[torch.ops.frugalm.int8_rows] = _int8pack_mm_flops
    with FlopCounterMode(display=False, custom_mapping=formulas) as counter:
        fn()
    return counter.get_total_flops()


def forward_kwargs(model) -> dict:
    # Real serving computes logits for the last position only; ask for that where supported.
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.inference_mode()
def flops_per_token(model, workload: Workload, device) -> tuple[int, int]:
    """(prefill FLOPs per prompt token, FLOPs of one decode step) for one sequence of the workload."""
    ids = prompt_ids(model, 1, workload.prompt_tokens, device)
    kw = forward_kwargs(model)
    out = {}

    def prefill():  # a variant that prunes its prompts: the pruning counts, per token of the prompt given
        out["o"] = model(prompt_pruning.pruned(model, ids), use_cache=True, **kw)

    prefill_flops = count_flops(prefill)
    nxt = out["o"].logits[:, -1].argmax(-1, keepdim=True)
    decode_flops = count_flops(lambda: model(nxt, past_key_values=out["o"].past_key_values, use_cache=True, **kw))
    return prefill_flops // workload.prompt_tokens, decode_flops


def prompt_ids(model, batch: int, length: int, device, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids (avoiding the special ids at the bottom of most vocabularies)."""
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(4, vocab - 1), vocab, (batch, length), generator=g).to(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationTiming:
    """Raw samples of one workload: one prefill time per repetition, every decode step's time."""

    prefill_s: list[float] = field(default_factory=list)
    decode_step_s: list[list[float]] = field(default_factory=list)  # per repetition
    cache_bytes: list[int] = field(default_factory=list)
    """Bytes the KV cache held after each repetition's generation, as stored (see `cache_bytes`)."""

    @property
    def decode_s(self) -> list[float]:
        return [sum(steps) for steps in self.decode_step_s]


@torch.inference_mode()
def generate_timed(model, ids: torch.Tensor, n_new: int, device, *, cache=None) -> tuple[float, list[float]]:
    """Greedy-generate `n_new` tokens; return (time to first token, time of each later step), seconds.

    `cache` is the (empty) transformers Cache to run with, filled in place, e.g. a quantized one;
    None: the model makes its default cache.
    """
    kw = forward_kwargs(model)
    synchronize(device)
    t0 = time.perf_counter()
    ids = prompt_pruning.pruned(model, ids)  # a variant that prunes its prompts does it inside its time to first token
    out = model(ids, past_key_values=cache, use_cache=True, **kw)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
    synchronize(device)
    ttft = time.perf_counter() - t0
    steps = []
    past = out.past_key_values
    for _ in range(n_new - 1):
        t = time.perf_counter()
        out = model(nxt, past_key_values=past, use_cache=True, **kw)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        synchronize(device)
        steps.append(time.perf_counter() - t)
    return ttft, steps


def cache_bytes(cache) -> int:
    """Bytes a KV cache (or a recurrent model's state) holds as stored, per layer as runtime/families.layer_bytes counts them."""
    return sum(families.layer_bytes(layer) for layer in cache.layers)


@dataclass
class Strategy:
    """A variant's decoding strategy as the benchmark runs it (runtime/decoding), batch 1, on real text.

    Guesses depend on what is decoded, so its generations start from prompts of the evaluation
    text (`text_prompts`), one per repetition in turn; counts of every timed generation gather in
    `stats` and their tokens in `outputs`.
    """

    setting: dict
    proposer: object
    prompts: list[torch.Tensor]
    stats: decoding.DecodeStats = field(default_factory=decoding.DecodeStats)
    outputs: list[list[int]] = field(default_factory=list)

    def prompt(self, i: int) -> torch.Tensor:
        return self.prompts[i % len(self.prompts)]

    def generate(self, model, ids: torch.Tensor, n_new: int, *, cache=None, clock=None, stats=None) -> list[int]:
        stats = stats if stats is not None else self.stats
        if self.setting.get("method") == "confidence_exit":
            return decoding.exit_generate(model, ids, n_new, self.setting, cache=cache, stats=stats, clock=clock)
        return decoding.generate(model, ids, n_new, proposer=self.proposer, k=self.setting["k"], cache=cache,
                                 stats=stats, clock=clock)  # fmt: skip


def text_prompts(tokenizer, docs: list[str], length: int, device, count: int = 8) -> list[torch.Tensor]:
    """`count` prompts of `length` tokens from the evaluation documents: each document's first
    tokens where it is long enough, else windows of the documents' tokens run together, evenly spaced."""
    whole, stream = [], []
    for doc in docs:
        ids = tokenizer(doc).input_ids
        if len(ids) >= length:
            whole.append(ids[:length])
        stream += ids
        if len(whole) >= count or len(stream) >= 4 * count * length:
            break
    if len(whole) < count:
        if len(stream) < length:
            raise ValueError(f"the evaluation text has {len(stream)} tokens, fewer than one {length}-token prompt")
        starts = [round(i * (len(stream) - length) / max(1, count - 1)) for i in range(count)]
        whole += [stream[s : s + length] for s in starts][: count - len(whole)]
    return [torch.tensor([ids], device=device) for ids in whole]


def time_workload(
    model,
    workload: Workload,
    device,
    *,
    warmup: int,
    repetitions: int,
    on_rep: Callable[[int], None] | None = None,
    cache_factory: Callable[[int], object] | None = None,
    strategy: Strategy | None = None,
) -> GenerationTiming:
    """Warm up, then time `repetitions` full generations of the workload on fresh prompts.

    Each generation runs with a fresh cache from `cache_factory` (a quantized KV cache, say);
    None: a plain DynamicCache, as the model would make itself. With a `strategy` (batch 1) each
    generation decodes with it from the next text prompt, and a round's time is shared equally by
    the tokens it produced (one decode "step" per token).
    """

    timing = GenerationTiming()
    for rep in range(warmup + repetitions):
        tokens = workload.prompt_tokens + workload.output_tokens
        cache = cache_factory(tokens) if cache_factory else DynamicCache(config=model.config)
        if strategy is not None:
            clock: list[tuple[float, int]] = []
            counts = strategy.stats if rep >= warmup else decoding.DecodeStats()
            out = strategy.generate(
                model, strategy.prompt(rep), workload.output_tokens, cache=cache, clock=clock, stats=counts
            )
            if rep >= warmup:
                strategy.outputs.append(out)
            ttft, steps = clock[0][0], [s / n for s, n in clock[1:] for _ in range(n)]
        else:
            ids = prompt_ids(model, workload.batch_size, workload.prompt_tokens, device, seed=rep)
            ttft, steps = generate_timed(model, ids, workload.output_tokens, device, cache=cache)
        if rep >= warmup:
            timing.prefill_s.append(ttft)
            timing.decode_step_s.append(steps)
            timing.cache_bytes.append(cache_bytes(cache))
        if on_rep:
            on_rep(rep + 1)
    return timing
