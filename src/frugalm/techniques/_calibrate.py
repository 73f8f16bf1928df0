"""Calibration statistics of Linear inputs, gathered with forward hooks.

Wanda needs, per targeted layer, the L2 norm of each input feature over the calibration
tokens; GPTQ, SparseGPT and AWQ need the (in, in) second-moment matrix H = X^T X (or per-channel
means of |x|). `collect_input_stats` runs the model once over the calibration batches with
hooks on the chosen layers and accumulates, in float64 where sums get long.

This is the one-pass ("parallel") variant: every layer sees the inputs produced by the
original model. The original papers calibrate layer by layer on the outputs of the already
compressed earlier layers ("sequential"); techniques that want that call
`collect_input_stats` again per block after compressing the previous ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from frugalm.errors import DataError
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


@torch.inference_mode()
def collect_input_stats(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], tokens: torch.Tensor, *, gram: bool = False, batch_size: int = 8, progress=None) -> dict[str, InputStats]:
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


def sample_calibration(tokenizer, docs: list[str], samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets of the encoded text.

    Documents are encoded as [BOS] + tokens and concatenated, as the benchmark encodes them.
    Returns int64 (samples, seq_len).
    """

    stream = encode_documents(tokenizer, docs).ids
    if len(stream) < seq_len + 1:
        raise DataError(f"calibration text is too short: {len(stream)} tokens, need at least {seq_len + 1} for seq_len {seq_len}; pass a longer text or lower calibration.seq_len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq_len, (samples,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])
