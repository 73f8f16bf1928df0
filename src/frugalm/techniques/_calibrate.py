"""The one block-by-block calibration engine, and the statistics of Linear inputs it gathers.

Wanda needs, per targeted layer, the L2 norm of each input feature over the calibration
tokens; GPTQ, SparseGPT and AWQ need the (in, in) second-moment matrix X^T X (AWQ also per-channel
means of |x|). `InputStats` accumulates them from forward hooks, in float64 where sums get long.

`calibrate_blocks` (GPTQ, AWQ, Wanda, SparseGPT) walks the decoder blocks (`_arch.decoder_blocks`):
1. the model runs once per calibration batch up to block 0, where a pre-hook captures the block's
   inputs (hidden states and the keyword arguments it needs: attention mask, position
   embeddings ...) and stops the forward pass;
2. per block with targeted layers, the block runs on those inputs with hooks on its targeted
   layers; the step is yielded and the technique changes the block (prunes, quantizes, scales);
3. the block runs again to give the next block its inputs: `sequential` (the papers' code,
   llm-compressor), the outputs of the changed block; otherwise the outputs of the unchanged
   block, taken during step 2 (every layer then sees the dense model's activations, as one pass
   of the whole model would give).
Targeted layers outside the blocks (an explicitly named head) come last, calibrated in one pass
of the whole model (before any change when not `sequential`). The captured inputs of every batch
are held at once: (samples, seq_len, hidden) floats, the price of not rerunning earlier blocks.

A bank of experts (runtime/experts) among the layers gets an `ExpertStats`: per expert, the
statistics of the tokens its router sent it and of its down projection's inputs (GPTQ per expert).

`collect_input_stats` is the one-pass variant over the whole model (structured pruning's scores).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from frugalm.errors import DataError, TechniqueError
from frugalm.runtime.experts import bank_linear, expert_forward, is_bank
from frugalm.techniques._arch import decoder_blocks
from frugalm.text.encode import encode_documents


@dataclass
class InputStats:
    """Accumulated statistics of one layer's inputs x (tokens, in_features)."""

    tokens: int = 0
    sq_sum: torch.Tensor | None = None  # (in,) sum of x^2 per input feature, float64
    abs_sum: torch.Tensor | None = None  # (in,) sum of |x| per input feature, float64
    gram: torch.Tensor | None = None  # (in, in) X^T X, float64 (only when asked for)
    want_gram: bool = field(default=False, repr=False)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.tokens += x.shape[0]
        sq, ab = (x * x).sum(0), x.abs().sum(0)
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        self.abs_sum = ab if self.abs_sum is None else self.abs_sum + ab
        if self.want_gram:
            g = x.t() @ x
            self.gram = g if self.gram is None else self.gram + g

    @property
    def feature_norm(self) -> torch.Tensor:
        """||X_j||_2 per input feature j (Wanda's activation term)."""
        return self.sq_sum.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| per input feature (AWQ's activation salience)."""
        return self.abs_sum / max(1, self.tokens)


@dataclass
class ExpertStats:
    """Per expert of a bank, InputStats of what each of its weights is fed: the tokens the router
    sent it (gate_up_proj), and their act(gate) x up (down_proj)."""

    want_gram: bool = False
    experts: dict[tuple[int, str], InputStats] = field(default_factory=dict)

    def observe(self, expert: int, weight: str, x: torch.Tensor) -> None:
        self.experts.setdefault((expert, weight), InputStats(want_gram=self.want_gram)).add(x)

    def of(self, expert: int, weight: str) -> InputStats:
        """The expert's statistics for `weight` (empty when the router never sent it a token)."""
        return self.experts.get((expert, weight)) or InputStats(want_gram=self.want_gram)


@contextmanager
def observed_banks(banks: Iterable[tuple[str, nn.Module]], observe: dict | None = None, out_of: dict | None = None):
    """While open, each bank (name, module) runs `expert_forward` with the callbacks given for its name
    (`observe`: each expert's inputs; `out_of`: its outputs and router weights): the same
    computation as its own eager path (an instance attribute shadows its class's forward)."""
    banks = list(banks)
    for name, bank in banks:
        bank.forward = functools.partial(
            expert_forward,
            linear=bank_linear(bank),
            act_fn=bank.act_fn,
            observe=(observe or {}).get(name),
            out_of=(out_of or {}).get(name),
        )
    try:
        yield
    finally:
        for _, bank in banks:
            del bank.forward


@torch.inference_mode()
def collect_input_stats(
    model: nn.Module,
    layers: Iterable[tuple[str, nn.Module]],
    tokens: torch.Tensor,
    *,
    gram: bool = False,
    batch_size: int = 8,
    progress=None,
) -> dict[str, InputStats]:
    """Run `tokens` (n, seq_len) through `model`, accumulating input statistics of `layers`."""
    stats: dict[str, InputStats] = {}
    handles = []
    for name, module in layers:
        stats[name] = InputStats(want_gram=gram)
        handles.append(module.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0])))
    device = next(model.parameters()).device
    try:
        for i in range(0, len(tokens), batch_size):
            model(tokens[i : i + batch_size].to(device))
            if progress:
                progress("calibration", min(i + batch_size, len(tokens)), len(tokens))
    finally:
        for h in handles:
            h.remove()
    return stats


# --- block by block ------------------------------------------------------------------------------

CALIBRATION_BATCH = 8
"""Calibration sequences per forward pass, unless a technique's config says otherwise."""


@dataclass
class BlockInputs:
    """What one calibration batch feeds a decoder block."""

    hidden: torch.Tensor  # (batch, seq, hidden): the block's first argument
    args: tuple  # its other positional arguments
    kwargs: dict  # attention mask, position embeddings ...


@dataclass
class BlockStep:
    """One calibration step: the targeted layers of one block (or those outside the blocks) with their input stats."""

    name: str
    """The block's qualified name ("model.layers.3"); "" for the layers outside the blocks."""
    module: nn.Module
    """The decoder block, or the whole model for the layers outside the blocks."""
    layers: list[tuple[str, nn.Module]]
    stats: dict[str, InputStats]
    """Per layer; layers fed the very same tensor (q/k/v, gate/up) share one object."""
    batches: list[BlockInputs] = field(default_factory=list)
    """The block's inputs, one per calibration batch (empty when `module` is the whole model)."""

    def run(self, i: int = 0) -> torch.Tensor:
        """The block's output hidden states (batch, seq, hidden) on calibration batch i."""
        return block_output(self.module, self.batches[i])


def block_output(block: nn.Module, inputs: BlockInputs) -> torch.Tensor:
    out = block(inputs.hidden, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, tuple) else out  # (batch, seq, hidden)


class _Captured(Exception):
    """Raised by the capture hook once block 0 has its inputs: the rest of the model is not needed."""


def capture_block_inputs(
    model: nn.Module, block: nn.Module, tokens: torch.Tensor, batch_size: int
) -> list[BlockInputs]:
    """`block`'s inputs for every batch of `tokens` (n, seq_len), running the model only up to it."""
    captured: list[BlockInputs] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(BlockInputs(hidden, tuple(args[1:]), kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(tokens), batch_size):
            try:
                model(tokens[i : i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _block_stats(step: BlockStep, gram: bool, keep_outputs: bool) -> list[BlockInputs] | None:
    """Fill step.stats over the step's batches; with `keep_outputs`, the block's outputs as the next block's inputs.

    Layers fed the very same tensor share one InputStats: the Gram matrix is the costly part.
    `seen` holds this batch's inputs, so no address is reused while compared.
    """
    seen: list[tuple[torch.Tensor, str]] = []
    alias: dict[str, str] = {}

    def hook(name, x):
        first = next((n for t, n in seen if t is x), None)
        if first is None:
            seen.append((x, name))
            step.stats[name].add(x)
        else:
            alias[name] = first

    handles, banks = [], []
    for name, module in step.layers:
        if is_bank(module):
            step.stats[name] = ExpertStats(want_gram=gram)
            banks.append((name, module))
            continue
        step.stats[name] = InputStats(want_gram=gram)
        handles.append(module.register_forward_hook(lambda mod, args, out, name=name: hook(name, args[0])))
    outputs = []
    try:
        with observed_banks(banks, observe={n: step.stats[n].observe for n, _ in banks}):
            for b in step.batches:
                seen.clear()
                out = block_output(step.module, b)
                if keep_outputs:
                    outputs.append(replace(b, hidden=out))
    finally:
        for h in handles:
            h.remove()
    for name, first in alias.items():
        step.stats[name] = step.stats[first]
    return outputs if keep_outputs else None


@torch.no_grad()
def calibrate_blocks(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    tokens: torch.Tensor,
    *,
    gram: bool,
    sequential: bool = True,
    batch_size: int = CALIBRATION_BATCH,
) -> Iterator[BlockStep]:
    """Yield the targeted `layers` block by block, with the statistics of their inputs over `tokens` (n, seq_len).

    The caller changes the yielded block before asking for the next step. With `sequential`,
    the changed block then runs again to feed the next one; otherwise the next block gets the
    unchanged block's outputs. Layers outside the blocks come last (see the module doc).
    """
    was_training = model.training
    model.eval()
    try:
        found = decoder_blocks(model)
        prefix, blocks = found if found else ("", [])
        inside = [[(n, m) for n, m in layers if n.startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
        rest = [(n, m) for n, m in layers if not (found and n.startswith(prefix + "."))]
        rest_stats = (
            collect_input_stats(model, rest, tokens, gram=gram, batch_size=batch_size)
            if rest and not sequential
            else None
        )
        last = max((i for i, group in enumerate(inside) if group), default=-1)
        batches = capture_block_inputs(model, blocks[0], tokens, batch_size) if last >= 0 else []
        for i in range(last + 1):
            outputs = None
            if inside[i]:
                step = BlockStep(f"{prefix}.{i}", blocks[i], inside[i], {}, batches)
                outputs = _block_stats(step, gram, keep_outputs=not sequential)
                yield step
            if i < last:  # the next block's inputs: this block's outputs, changed (sequential) or not
                batches = (
                    outputs if outputs is not None else [replace(b, hidden=block_output(blocks[i], b)) for b in batches]
                )
        if rest:
            yield BlockStep(
                "",
                model,
                rest,
                rest_stats or collect_input_stats(model, rest, tokens, gram=gram, batch_size=batch_size),
            )
    finally:
        model.train(was_training)


def require_inputs(technique: str, step: BlockStep) -> None:
    """Raise when a targeted layer of `step` received no input (it is not on the forward path)."""
    unseen = [name for name, s in step.stats.items() if s.tokens == 0]
    if unseen:
        raise TechniqueError(
            f"{technique}: layers {unseen[:3]} received no input during calibration (not used in the forward pass?); leave them out of `targets`"
        )


def sample_calibration(tokenizer, docs: list[str], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets of the encoded text.

    Documents are encoded as [BOS] + tokens and concatenated, as the benchmark encodes them.
    Returns int64 (samples, seq_len).
    """

    stream = encode_documents(tokenizer, docs).ids
    if len(stream) < seq_len + 1:
        raise DataError(
            f"calibration text is too short: {len(stream)} tokens, need at least {seq_len + 1} for seq_len {seq_len}; pass a longer text or lower calibration.seq_len"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (samples,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
