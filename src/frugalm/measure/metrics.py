"""Every metric of the benchmark, declared once: name (with its unit), unit, direction, method.

Pareto fronts, report arrows and regression checks read `higher_is_better` from here; nobody
flips signs elsewhere. A metric's `method` is how its figures are normally obtained; a single
figure may carry another (energy is `measured` with a hardware counter, `estimated` without),
and the stored figure's own method is what counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from frugalm.errors import ConfigError, did_you_mean, suggest

BENCHMARK_VERSION = "frugalm-bench v4"
"""v2: paired speedups against a reference joined the scorecard. v3: the prefill speedup is
speedup_ttft (the prompt pass and first argmax), the decode speedup is timed one step per call,
and the energy and cost ratios derived from it (energy_ratio_decode, cost_ratio_decode) and the
decode step's fixed-cost share (decode_overhead_frac) joined. v4: task accuracies (acc_cloze, acc_choice,
acc_code; measure/tasks.py) joined, each item's score stored, paired against the reference; and for
other families: active_params_count and expert_load_cv (mixture-of-experts), state_mib in place of
kv_cache_mib (recurrent models), the attention implementation recorded."""
Method = Literal["measured", "estimated", "counted"]
OVERHEAD_BOUND = 0.5
"""decode_overhead_frac above this: the decode figures are called overhead-bound (the report says so)."""
RESOURCES = ("quality", "computation", "memory", "energy", "money", "network")


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool
    method: Method
    resource: str
    description: str
    per_workload: bool = False
    """True when the figure depends on the workload (prompt, output length, batch)."""


@dataclass
class Measurement:
    """One stored figure: a value with its unit, method, repetitions, spread and protocol.

    The unit is the metric's declared one (METRICS, below): leave it out and it is filled in;
    give one that differs and construction raises, so a mismatch cannot be written. A figure of
    an undeclared metric raises too. Figures read back from the store are rebuilt with
    `Measurement.stored` instead, unchecked, so a database written by another benchmark
    version still reads.
    """

    metric: str
    value: float
    unit: str | None = None
    """The metric's declared unit; None: filled in from METRICS."""
    method: Method | None = None
    """How this figure was obtained (required; may differ from the metric's usual method)."""
    workload: str | None = None
    n: int = 1
    """Number of repetitions the value summarises (1 for a count or a single pass)."""
    spread: float | None = None
    """Sample standard deviation of the per-repetition values, in the metric's unit."""
    protocol: dict = field(default_factory=dict)
    samples: list[float] | None = None
    """Raw samples, in the metric's unit, when the figure is a statistic of repeated timings."""

    def __post_init__(self) -> None:
        # Mistakes here are frugalm's bugs, not the user's: ValueError, with its traceback.
        declared = METRICS.get(self.metric)
        if declared is None:
            raise ValueError(
                f"no metric '{self.metric}' is declared in measure/metrics.py{suggest(self.metric, METRICS)}; declare it there (name, unit, direction, method) before storing figures of it"
            )
        if self.unit is None:
            self.unit = declared.unit
        elif self.unit != declared.unit:
            raise ValueError(
                f"figure of '{self.metric}' given in '{self.unit}', but the metric is declared in '{declared.unit}' (measure/metrics.py); leave the unit out, or convert the value"
            )
        if self.method is None:
            raise ValueError(
                f"figure of '{self.metric}' has no method; say how it was obtained: method='measured', 'estimated' or 'counted'"
            )

    @classmethod
    def stored(
        cls,
        metric: str,
        value: float,
        unit: str,
        method: str,
        workload: str | None = None,
        n: int = 1,
        spread: float | None = None,
        protocol: dict | None = None,
        samples: list[float] | None = None,
    ) -> Measurement:
        """A figure as the store holds it, not checked against today's METRICS: a database keeps
        the units and metrics of the benchmark version that wrote it, and must still read."""
        m = object.__new__(cls)
        m.__dict__.update(
            metric=metric,
            value=value,
            unit=unit,
            method=method,
            workload=workload,
            n=n,
            spread=spread,
            protocol=protocol if protocol is not None else {},
            samples=samples,
        )
        return m

    def to_dict(self) -> dict:
        return asdict(self)


def _m(name, unit, hib, method, resource, description, per_workload=False) -> Metric:
    return Metric(name, unit, hib, method, resource, description, per_workload)


_ALL = [
    # quality
    _m(
        "ppl_tok",
        "ppl",
        False,
        "measured",
        "quality",
        "Perplexity per token over rolling windows of the evaluation text.",
    ),
    _m(
        "ppl_word",
        "ppl",
        False,
        "measured",
        "quality",
        "Perplexity per whitespace-separated word: exp(total NLL / words); compares models with different tokenizers.",
    ),
    _m(
        "ppl_byte",
        "ppl",
        False,
        "measured",
        "quality",
        "Perplexity per UTF-8 byte: exp(total NLL / bytes); compares models with different tokenizers.",
    ),
    _m(
        "kl_ref_nats",
        "nats",
        False,
        "measured",
        "quality",
        "Mean next-token KL divergence KL(reference || model) over the evaluated positions.",
    ),
    _m(
        "top1_agree_frac",
        "fraction",
        True,
        "measured",
        "quality",
        "Fraction of evaluated positions where the model's argmax equals the reference's.",
    ),
    _m(
        "robust_ppl_ratio",
        "ratio",
        False,
        "measured",
        "quality",
        "Per-byte perplexity under seeded character-level noise divided by the clean figure on the same text.",
    ),
    # tasks (measure/tasks.py): per-item scores stored as the figure's samples; with a reference, the
    # paired difference and its bootstrap interval are in the figure's protocol ("paired")
    _m(
        "acc_cloze",
        "fraction",
        True,
        "measured",
        "quality",
        "Last-word cloze: fraction of items whose final word the model completes exactly, greedily, from the text before it.",
    ),
    _m(
        "acc_choice",
        "fraction",
        True,
        "measured",
        "quality",
        "Multiple-choice continuation: fraction of items where the true next sentence scores the highest log-likelihood per byte among it and sentences from other documents.",
    ),
    _m(
        "acc_code",
        "fraction",
        True,
        "measured",
        "quality",
        "Identifier completion: fraction of items where the model completes, greedily and exactly, a name already used earlier in the same document.",
    ),
    # lm-evaluation-harness tasks (benchmark/harness.py, `frugalm eval`): the workload is
    # "<task>:<lm-eval metric>", the spread lm-eval's stderr; with a reference, protocol["paired"]
    _m(
        "lm_eval_acc",
        "fraction",
        True,
        "measured",
        "quality",
        "An lm-evaluation-harness task's accuracy-like metric in [0, 1] (acc, acc_norm, exact_match, f1, ...), as lm-eval computes it, on the model as it runs.",
        True,
    ),
    _m(
        "lm_eval_ppl",
        "ppl",
        False,
        "measured",
        "quality",
        "An lm-evaluation-harness loglikelihood task's perplexity: exp of minus the mean log-likelihood per item (lm-eval's `perplexity`).",
        True,
    ),
    _m(
        "lm_eval_word_ppl",
        "ppl",
        False,
        "measured",
        "quality",
        "An lm-evaluation-harness rolling-loglikelihood task's perplexity per word (lm-eval's `word_perplexity`; words split at whitespace runs).",
        True,
    ),
    _m(
        "lm_eval_byte_ppl",
        "ppl",
        False,
        "measured",
        "quality",
        "An lm-evaluation-harness rolling-loglikelihood task's perplexity per UTF-8 byte (lm-eval's `byte_perplexity`).",
        True,
    ),
    _m(
        "lm_eval_bits_per_byte",
        "bits/byte",
        False,
        "measured",
        "quality",
        "An lm-evaluation-harness rolling-loglikelihood task's bits per UTF-8 byte (lm-eval's `bits_per_byte`).",
        True,
    ),
    # computation
    _m(
        "flops_per_tok_prefill",
        "FLOP/tok",
        False,
        "counted",
        "computation",
        "Forward FLOPs per prompt token of the workload's prefill, counted with torch's FLOP counter.",
        True,
    ),
    _m(
        "flops_per_tok_decode",
        "FLOP/tok",
        False,
        "counted",
        "computation",
        "Forward FLOPs of one decode step after the workload's prompt, with the KV cache, counted with torch's FLOP counter.",
        True,
    ),
    _m(
        "cascade_cost_ratio",
        "ratio",
        False,
        "counted",
        "computation",
        "A cascade's FLOPs over its task's items (the small model on every item, the large one on those escalated) over the large model's alone, counted with torch's FLOP counter.",
    ),
    _m(
        "cascade_time_ratio",
        "ratio",
        False,
        "measured",
        "computation",
        "A cascade's wall time over its task's items (as cascade_cost_ratio counts FLOPs) over the large model's alone, both timed in the measuring child, alternating.",
    ),
    _m(
        "cascade_escalated_frac",
        "fraction",
        False,
        "measured",
        "computation",
        "Fraction of a cascade's task items its small model was unsure of (confidence below the threshold) and the large model answered.",
    ),
    _m(
        "ttft_p50_ms",
        "ms",
        False,
        "measured",
        "computation",
        "Time to first token (prefill + first token), median over repetitions.",
        True,
    ),
    _m(
        "ttft_p90_ms",
        "ms",
        False,
        "measured",
        "computation",
        "Time to first token, 90th percentile over repetitions.",
        True,
    ),
    _m(
        "ttft_p99_ms",
        "ms",
        False,
        "measured",
        "computation",
        "Time to first token, 99th percentile over repetitions.",
        True,
    ),
    _m(
        "tpot_p50_ms",
        "ms",
        False,
        "measured",
        "computation",
        "Time per output token after the first (one decode step), median over all steps of all repetitions.",
        True,
    ),
    _m("tpot_p90_ms", "ms", False, "measured", "computation", "Time per output token, 90th percentile.", True),
    _m("tpot_p99_ms", "ms", False, "measured", "computation", "Time per output token, 99th percentile.", True),
    _m(
        "decode_tok_s",
        "tok/s",
        True,
        "measured",
        "computation",
        "Decode throughput: tokens generated after the first, over the batch, per second of decode time.",
        True,
    ),
    _m(
        "speedup_ttft",
        "x",
        True,
        "measured",
        "computation",
        "Time to first token (the prompt pass and the first argmax: the prefill speedup) of the reference over this model's, timed side by side in one process (ABBA blocks); above 1 is faster. Its 95% interval is in the protocol.",
        True,
    ),
    _m(
        "speedup_decode",
        "x",
        True,
        "measured",
        "computation",
        "Decode-step time of the reference over this model's from the same prompt cache (for a variant with a decoding strategy, whole batch-1 generations from evaluation-text prompts, the reference decoding plainly), timed side by side in one process (ABBA blocks); above 1 is faster. Its 95% interval is in the protocol.",
        True,
    ),
    _m(
        "decode_overhead_frac",
        "fraction",
        False,
        "estimated",
        "computation",
        "Share of a decode step that is fixed per-step cost (Python, dispatch, cache bookkeeping): a width-shrunk twin's step time over this model's. Above 0.5 the decode figures are overhead-bound: no change to the weights can speed them much.",
        True,
    ),
    _m(
        "produce_wall_s",
        "s",
        False,
        "measured",
        "computation",
        "Wall time to produce the variant from its base model (compression or training stages), on the stated device.",
    ),
    _m(
        "speedup_strategy",
        "x",
        True,
        "measured",
        "computation",
        "Time of whole batch-1 greedy generations from evaluation-text prompts decoded plainly over the same with the variant's decoding strategy (speculative, prompt lookup, early exit), same weights, side by side in one process (ABBA blocks); above 1 the strategy is faster. Its 95% interval is in the protocol.",
        True,
    ),
    _m(
        "accept_rate",
        "fraction",
        True,
        "counted",
        "computation",
        "Share of the decoding strategy's guesses that the model kept, over the timed generations.",
        True,
    ),
    _m(
        "accept_len_mean",
        "tok",
        True,
        "counted",
        "computation",
        "Guesses kept per verification round (the model's own token after them not counted), over the timed generations.",
        True,
    ),
    _m(
        "target_fwd_per_tok",
        "ratio",
        False,
        "counted",
        "computation",
        "Forwards of the model per generated token with the decoding strategy (the prompt's included; plain greedy decoding: 1).",
        True,
    ),
    _m(
        "greedy_agree_frac",
        "fraction",
        True,
        "measured",
        "quality",
        "Share of generated tokens equal, position by position, to the same model's plain greedy output from the same prompts (a lossless strategy: 1 up to the rounding of batched forwards).",
        True,
    ),
    _m(
        "offload_read_mib_per_tok",
        "MiB/tok",
        False,
        "counted",
        "memory",
        "Bytes an offloaded variant reads from its weight files per decode step (its offloaded blocks, once each), counted at accelerate's weight loader.",
        True,
    ),
    _m(
        "tpot_cold_ms",
        "ms",
        False,
        "measured",
        "computation",
        "Decode-step time of an offloaded variant with its weight files evicted from the OS page cache before every step (posix_fadvise DONTNEED): reads from the disk. tpot_* are the warm figures (page cache).",
        True,
    ),
    _m(
        "compile_s",
        "s",
        False,
        "measured",
        "computation",
        "Wall time torch.compile took to build the compiled decode step (first call per batch and cache length, compilation plus one step): paid once per serving process and shape, only by variants that decode compiled.",
    ),
    _m(
        "produce_flops",
        "FLOP",
        False,
        "counted",
        "computation",
        "FLOPs of the training stages that produced the variant: one step's forward and backward counted with torch's FLOP counter, times the steps, plus the counted scoring forwards of importance sampling.",
    ),
    _m(
        "produce_train_tokens",
        "tok",
        False,
        "counted",
        "computation",
        "Tokens the training stages that produced the variant processed (steps x global batch x window).",
    ),
    _m(
        "prefill_tok_s",
        "tok/s",
        True,
        "measured",
        "computation",
        "Prefill throughput: prompt tokens over the batch per second of prefill time.",
        True,
    ),
    _m(
        "active_params_count",
        "params",
        False,
        "counted",
        "computation",
        "Mixture-of-experts models: parameters a token runs through, all of them less the unrouted share ((experts - top_k) / experts) of every expert bank (tied weights counted once).",
    ),
    _m(
        "expert_load_cv",
        "ratio",
        False,
        "measured",
        "computation",
        "Mixture-of-experts models: how unevenly the router loads the experts over the evaluation text: per layer the coefficient of variation (std / mean) of the tokens routed to each expert, averaged over layers; 0 is perfectly even, sqrt(experts / top_k - 1) all on top_k experts.",
    ),
    # memory
    _m("params_count", "params", False, "counted", "memory", "Number of parameters (tied weights counted once)."),
    _m(
        "weights_mib", "MiB", False, "counted", "memory", "Bytes of parameters and buffers as stored in memory, in MiB."
    ),
    _m("artifact_mib", "MiB", False, "counted", "memory", "Size of the model folder on disk, in MiB."),
    _m(
        "peak_mem_mib",
        "MiB",
        False,
        "measured",
        "memory",
        "Peak memory while running the workload: CUDA allocator peak on GPU; on CPU peak RSS of the fresh child process minus its interpreter baseline.",
        True,
    ),
    _m(
        "kv_cache_mib",
        "MiB",
        False,
        "counted",
        "memory",
        "Bytes the KV cache holds after the workload's generation (its prompt and generated tokens, whole batch), as stored: float tensors, or packed codes + scales + zero points + the full-precision residual of a quantized cache.",
        True,
    ),
    _m(
        "state_mib",
        "MiB",
        False,
        "counted",
        "memory",
        "Recurrent models (RWKV, Mamba), in place of kv_cache_mib: bytes of the recurrent state per sequence after the workload's generation (convolution windows and SSM or WKV states, as stored); its size does not grow with the context.",
        True,
    ),
    # energy
    _m(
        "energy_j_per_tok",
        "J/tok",
        False,
        "measured",
        "energy",
        "Energy of the workload per generated token: NVML or RAPL counters when readable (measured), else a documented power model (estimated).",
        True,
    ),
    _m(
        "energy_ratio_decode",
        "x",
        False,
        "estimated",
        "energy",
        "Energy per decoded token of this model over the reference's: 1 / speedup_decode, assuming both draw the same power on the same cores; below 1 saves. Its 95% interval (speedup_decode's, inverted) is in the protocol.",
        True,
    ),
    _m(
        "produce_energy_j",
        "J",
        False,
        "estimated",
        "energy",
        "Energy of the training stages that produced the variant: NVML or RAPL counters when readable (measured), else the documented power model (estimated).",
    ),
    _m(
        "carbon_g_per_mtok",
        "gCO2e/Mtok",
        False,
        "estimated",
        "energy",
        "Carbon per million generated tokens: energy times the profile's grid intensity.",
        True,
    ),
    # money
    _m(
        "cost_usd_per_mtok",
        "USD/Mtok",
        False,
        "estimated",
        "money",
        "USD per million generated tokens: the profile's hourly price times measured time, plus energy times its electricity price.",
        True,
    ),
    _m(
        "cost_ratio_decode",
        "x",
        False,
        "estimated",
        "money",
        "Cost per decoded token of this model over the reference's: 1 / speedup_decode (hourly price and energy both scale with time at equal power); below 1 saves. Its 95% interval is in the protocol.",
        True,
    ),
    _m(
        "produce_cost_usd",
        "USD",
        False,
        "estimated",
        "money",
        "USD to produce the variant: the profile's hourly price times the production wall time, plus the training energy times its electricity price.",
    ),
    _m(
        "cost_usd_per_mtok_per_bparam",
        "USD/Mtok/Bparam",
        False,
        "estimated",
        "money",
        "Cost per million generated tokens per billion parameters: what each parameter costs to serve.",
        True,
    ),
    # network
    _m(
        "ship_mib",
        "MiB",
        False,
        "counted",
        "network",
        "Bytes to ship the model artifact (every file of the folder), in MiB.",
    ),
    _m(
        "ship_compressed_mib",
        "MiB",
        False,
        "counted",
        "network",
        "Bytes to ship the artifact compressed (zlib level 6 over every file), in MiB.",
    ),
    _m(
        "produce_comm_bytes",
        "B",
        False,
        "counted",
        "network",
        "Bytes each process handed to collective communication while training the variant data-parallel (gradient all-reduce, compressed or not), summed over its steps.",
    ),
]

METRICS: dict[str, Metric] = {m.name: m for m in _ALL}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(f"unknown metric '{name}'{suggest(name, METRICS)}") from None


def check_metric_names(names) -> list[str]:
    """Validate a user's metric selection, reporting all unknown names at once."""
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise ConfigError(
            "; ".join(f"unknown metric '{n}'{did_you_mean(n, METRICS)}" for n in bad)
            + f". Valid choices: {', '.join(METRICS)} (see `frugalm ls metrics`)"
        )
    return list(names)
