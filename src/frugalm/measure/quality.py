"""Quality: perplexity over rolling windows, fidelity to a reference model, robustness to noise.

Protocol (recorded with every figure): the text is split into documents at `<|endoftext|>`
lines; each document is encoded as [doc-start token] + tokens, where the doc-start token is
the tokenizer's BOS (its EOS when it has no BOS, as lm-evaluation-harness does); the streams
are concatenated and cut after `max_tokens`. Windows of `window` tokens start every `stride`
tokens; each window scores only the tokens the previous one did not, so with stride < window
every token but the very first is predicted from at least window - stride tokens of context,
and with stride == window the windows do not overlap (the first token of each is not
predicted). Per-word and per-byte perplexities divide the same total NLL by the words and UTF-8
bytes of the covered text, so models with different tokenizers compare.

A model that runs with a quantized KV cache (kv_cache_quant) is scored as it runs: each window
by chunked prefill through a fresh cache of its kind, `CHUNK_TOKENS` tokens per forward, so each
chunk attends to the past as the cache stores it plus itself. A whole-window forward uses no
cache and would hide the cache's effect. With a plain cache the two modes agree to float error.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from frugalm.errors import ConfigError
from frugalm.measure.metrics import Measurement
from frugalm.runtime import decoding
from frugalm.runtime.kv_cache import cache_factory as model_cache_factory
from frugalm.runtime.modules import inference_settings
from frugalm.text.encode import EncodedText, encode_documents
from frugalm.text.noise import add_char_noise

Progress = Callable[[str, int, int], None]
CHUNK_TOKENS = 64
"""Tokens per forward when a window is scored by chunked prefill through a KV cache."""


@dataclass(frozen=True)
class PerplexityProtocol:
    window: int = 512
    """Tokens per window; capped at the model's context."""
    stride: int = 256
    """Tokens between window starts; stride == window gives non-overlapping windows."""
    max_tokens: int = 65_536
    """Tokens of the text evaluated (0 = all)."""
    noise_rate: float = 0.05
    """Probability that a non-space character is edited, for the robustness figure."""
    noise_seed: int = 0
    robust_tokens: int = 16_384
    """Tokens of clean text used for the robustness figure (its noisy copy is scored whole)."""

    def check(self) -> None:
        if self.window < 2:
            raise ConfigError(f"perplexity window {self.window} is too small; use at least 2 tokens")
        if not 1 <= self.stride <= self.window:
            raise ConfigError(f"perplexity stride {self.stride} must be between 1 and the window ({self.window})")
        if not 0 <= self.noise_rate < 1:
            raise ConfigError(f"noise rate {self.noise_rate} must be in [0, 1)")


@dataclass
class Scores:
    nll_sum: float = 0.0
    n_predicted: int = 0
    kl_sum: float = 0.0
    n_agree: int = 0


def rolling_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_target) per window: tokens [first_target, end) are scored in [begin, end)."""
    spans, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        if end == n_tokens:
            return spans
        prev_end, begin = end, begin + stride


def _windows_per_batch(window: int, vocab: int) -> int:
    # Keep each (batch, window, vocab) float32 logits tensor near 256 MiB.
    return max(1, min(64, (1 << 26) // (window * vocab)))


@torch.inference_mode()
def score_text(
    model,
    encoded: EncodedText,
    window: int,
    stride: int,
    *,
    reference=None,
    progress: Progress | None = None,
    label: str = "perplexity",
    cache_factory: Callable[[int], object] | None = None,
) -> Scores:
    """Sum next-token NLL (and KL/agreement against `reference`) over the rolling windows.

    `cache_factory` (default: the model's own quantized KV cache, if it has one) makes the fresh
    cache each batch of windows is prefilled through in chunks; without one, whole windows. A
    compiled decode path does not apply: windows are prefill, eager either way.
    """

    kv_only = {"kv_cache": inference_settings(model).get("kv_cache")}
    cache_factory = cache_factory or model_cache_factory(model, kv_only)
    device = next(model.parameters()).device
    spans = rolling_windows(len(encoded.ids), window, stride)
    vocab = model.get_output_embeddings().out_features  # a Linear, or a quantized one (no .weight)
    per_batch = _windows_per_batch(window, vocab)
    scores = Scores()
    # Windows of equal length are batched; only the last one can be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        groups.setdefault(span[1] - span[0], []).append(span)
    done = 0
    for length, group in groups.items():
        for i in range(0, len(group), per_batch):
            batch = group[i : i + per_batch]
            _score_batch(model, reference, encoded.ids, batch, length, device, scores, cache_factory)
            done += len(batch)
            if progress:
                progress(label, done, len(spans))
    return scores


def logits_as_run(model, inputs: torch.Tensor, cache_factory=None) -> torch.Tensor:
    """(B, L, V) logits of each window: one forward, or chunked prefill through a fresh cache, or,
    for a variant decoding with the (lossy) confidence exit, token by token through it."""
    setting = inference_settings(model).get(decoding.SETTING) or {}
    if setting.get("method") == "confidence_exit":
        return decoding.exit_logits(model, inputs, setting, cache_factory)
    if cache_factory is None:
        return model(inputs).logits
    cache = cache_factory(inputs.shape[1])
    chunks = [
        model(inputs[:, i : i + CHUNK_TOKENS], past_key_values=cache, use_cache=True).logits
        for i in range(0, inputs.shape[1], CHUNK_TOKENS)
    ]
    return torch.cat(chunks, dim=1)


def _score_batch(model, reference, ids, batch, length, device, scores: Scores, cache_factory=None) -> None:
    inputs = torch.stack([ids[b:e] for b, e, _ in batch]).to(device)  # (B, L)
    # mask[k, j] is True when logits at j (predicting token j+1) count for window k.
    offsets = torch.arange(1, length, device=device)
    first = torch.tensor([f - b for b, _, f in batch], device=device)
    mask = offsets[None, :] >= first[:, None]  # (B, L-1)
    targets = inputs[:, 1:]
    logp = F.log_softmax(logits_as_run(model, inputs, cache_factory)[:, :-1].float(), dim=-1)  # (B, L-1, V)
    nll = -logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, L-1)
    scores.nll_sum += nll[mask].double().sum().item()
    scores.n_predicted += int(mask.sum())
    if reference is not None:
        ref_logp = F.log_softmax(reference(inputs).logits[:, :-1].float(), dim=-1)
        kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)  # KL(ref || model)
        scores.kl_sum += kl[mask].double().sum().item()
        scores.n_agree += int((logp.argmax(-1) == ref_logp.argmax(-1))[mask].sum())


def measure_quality(
    model,
    tokenizer,
    docs: list[str],
    protocol: PerplexityProtocol,
    *,
    context: int | None,
    data_desc: dict,
    reference=None,
    progress: Progress | None = None,
) -> list[Measurement]:
    """Perplexity (per token, word, byte), fidelity to `reference` when given, and robustness."""
    protocol.check()
    window = min(protocol.window, context) if context else protocol.window
    stride = min(protocol.stride, window)
    encoded = encode_documents(tokenizer, docs, protocol.max_tokens)
    scores = score_text(model, encoded, window, stride, reference=reference, progress=progress)
    proto = {
        **data_desc,
        **{k: v for k, v in asdict(protocol).items() if not k.startswith(("noise", "robust"))},
        "window": window,
        "stride": stride,
        "tokens": len(encoded.ids),
        "predicted_tokens": scores.n_predicted,
        "words": encoded.n_words,
        "bytes": encoded.n_bytes,
        "documents": len(encoded.docs),
        "doc_start_token": encoded.doc_start_token,
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "vocab_size": len(tokenizer),
        **_scoring_mode(model),
    }
    out = [
        Measurement("ppl_tok", math.exp(scores.nll_sum / scores.n_predicted), method="measured", protocol=proto),
        Measurement("ppl_word", math.exp(scores.nll_sum / max(1, encoded.n_words)), method="measured", protocol=proto),
        Measurement("ppl_byte", math.exp(scores.nll_sum / encoded.n_bytes), method="measured", protocol=proto),
    ]
    if reference is not None:
        out += [
            Measurement("kl_ref_nats", scores.kl_sum / scores.n_predicted, method="measured", protocol=proto),
            Measurement("top1_agree_frac", scores.n_agree / scores.n_predicted, method="measured", protocol=proto),
        ]
    out.append(_robustness(model, tokenizer, encoded, scores, protocol, window, stride, proto, progress))
    return out


def _scoring_mode(model) -> dict:

    kv = inference_settings(model).get("kv_cache")
    exit_setting = inference_settings(model).get(decoding.SETTING) or {}
    if exit_setting.get("method") == "confidence_exit":
        return {"scoring": "token by token through the confidence exit (teacher forcing): the lossy variant's own predictions",
                "decoding": exit_setting, **({"kv_cache": kv} if kv else {})}  # fmt: skip
    if not kv:
        return {"scoring": "whole windows, one forward each, no cache"}
    return {
        "scoring": f"chunked prefill through the quantized KV cache, {CHUNK_TOKENS} tokens per forward",
        "kv_cache": kv,
    }


def _robustness(
    model, tokenizer, encoded: EncodedText, scores: Scores, protocol, window, stride, proto, progress
) -> Measurement:
    """Per-byte perplexity of a seeded noisy copy of the text over that of the clean text.

    When the clean text is the very text perplexity scored (robust_tokens == max_tokens, the
    usual case on short evaluation texts), its score is reused: same windows, same numbers.
    """
    clean = encode_documents(tokenizer, encoded.docs, protocol.robust_tokens)
    noisy_docs = [add_char_noise(d, protocol.noise_rate, protocol.noise_seed + i) for i, d in enumerate(clean.docs)]
    noisy = encode_documents(tokenizer, noisy_docs)
    per_byte = []
    for label, enc in (("robustness clean", clean), ("robustness noisy", noisy)):
        same = enc is clean and enc.n_bytes == encoded.n_bytes and torch.equal(enc.ids, encoded.ids)
        s = scores if same else score_text(model, enc, window, stride, progress=progress, label=label)
        per_byte.append(math.exp(s.nll_sum / enc.n_bytes))
    rproto = {
        "data": proto.get("data"),
        "window": window,
        "stride": stride,
        "clean_tokens": len(clean.ids),
        "noisy_tokens": len(noisy.ids),
        "noise": {
            "rate": protocol.noise_rate,
            "seed": protocol.noise_seed,
            "ops": "substitute/delete/insert/swap, uniform",
        },
        "clean_ppl_byte": per_byte[0],
        "noisy_ppl_byte": per_byte[1],
    }
    return Measurement("robust_ppl_ratio", per_byte[1] / per_byte[0], method="measured", protocol=rproto)


def describe_text(path: str | None, text: str) -> dict:
    """What the protocol records about the evaluation text: its path and content hash."""
    return describe_data(path, hashlib.sha256(text.encode("utf-8")).hexdigest())


def describe_data(path: str | None, sha256: str) -> dict:
    """describe_text from the hash of the file's bytes (data.check_text_file), without the text."""
    return {"data": path or "(built-in)", "data_sha256": sha256}
