"""lm-eval's LM interface over a model loaded by frugalm, scored and decoded as it runs.

Scoring follows frugalm's quality code, so lm-eval's perplexities and frugalm's agree:
- every sequence starts with the doc-start token (BOS, else EOS: `text.encode.doc_start_id`),
  the context of a loglikelihood request too (lm-eval's HFLM adds it only to an empty context);
- logits come from `quality.logits_as_run`: packed weights on their kernels, through the
  variant's quantized KV cache if it has one, through the confidence exit if it decodes so;
- rolling log-likelihood uses lm-eval's own windows (`utils.get_rolling_token_windows`, context 1).
  Over [start] + tokens of one document they are windows of L+1 tokens every L tokens, which is
  frugalm's `rolling_windows(n, L + 1, L)` except for a document's last, partial window: lm-eval
  slides it back to a full L tokens of context, frugalm starts it at the next multiple of L (and
  so predicts its tokens from less context). They agree exactly when a document's token count is
  at most L or a multiple of L; on 12 TinyStories documents (one longer than L = 512) lm-eval's
  word perplexity came out 2% below frugalm's.
- generation is greedy through the variant's cache. Lossless decoding strategies (speculative,
  prompt lookup, early exit) give plain greedy's output, so plain greedy runs; the lossy
  confidence exit runs as itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from frugalm.errors import ConfigError, ModelError
from frugalm.measure.quality import logits_as_run
from frugalm.models import LoadedModel, context_length
from frugalm.runtime import decoding
from frugalm.runtime.kv_cache import cache_factory
from frugalm.text.encode import doc_start_id, encode_text


class HarnessLM:
    """lm-eval's LM interface over a loaded frugalm model.

    Registered as a virtual subclass of `lm_eval.api.model.LM` (`LM.register`) rather than
    inheriting from it, so this module imports without the optional extra.
    """

    rank, world_size = 0, 1

    def __init__(self, loaded: LoadedModel, max_length: int | None = None):
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.start_id = doc_start_id(self.tokenizer)
        if self.start_id is None:
            raise ModelError(
                f"'{loaded.source.ref}': its tokenizer has neither a BOS nor an EOS token, which lm-eval needs to score a document's first token; save one with the tokenizer"
            )
        self.max_length = max_length or context_length(self.model.config) or 2048
        self.scoring_cache = cache_factory(self.model, {"kv_cache": loaded.inference.get("kv_cache")})
        self.decode_cache = cache_factory(self.model)
        self.inference = loaded.inference
        self.exit_setting = loaded.inference.get(decoding.SETTING) or {}

    def describe(self) -> dict:
        """How this model was scored, for the protocol of its figures."""
        kv, exits = self.inference.get("kv_cache"), self.exit_setting.get("method") == "confidence_exit"
        scoring = "one forward per sequence"
        if kv:
            scoring = f"chunked prefill through its quantized KV cache ({kv})"
        if exits:
            scoring = "token by token through its confidence exit (teacher forcing)"
        return {
            "max_length": self.max_length,
            "doc_start_token": self.tokenizer.convert_ids_to_tokens(self.start_id),
            "doc_start": "before every context and document (BOS, else EOS), as frugalm's perplexity",
            "scoring": scoring,
            "generation": "greedy through its confidence exit" if exits else "greedy",
            "inference": self.inference,
        }

    def _ids(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)["input_ids"] if text else []

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(log p(continuation | [start] + context), is it the greedy continuation) per request."""
        pairs = []
        for context, continuation in (r.args for r in requests):
            spaces = len(context) - len(context.rstrip())  # trailing spaces go with the continuation, as in HFLM
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self._ids(context)
            pairs.append(([self.start_id, *ctx], self._ids(context + continuation)[len(ctx) :]))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """log p(document) over lm-eval's rolling windows of [start] + tokens, one document at a time."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # deferred: optional extra

        pairs, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            windows = get_rolling_token_windows(self._ids(text), self.start_id, self.max_length, 1)
            for window in map(make_disjoint_window, windows):
                pairs.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._score(pairs), strict=True):
            totals[i] += logp
        return totals

    @torch.inference_mode()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Score each continuation after its context, the last max_length + 1 tokens of the two.

        Longest first, right-padded in batches (causal: padding after a sequence changes nothing
        before it), each batch's (B, L, V) float32 logits kept near 256 MiB.
        """
        rows = []
        for ctx, cont in pairs:
            full = (ctx + cont)[-(self.max_length + 1) :]
            n = min(len(cont), len(full) - 1)
            rows.append((full[:-1], full[len(full) - n :]))  # (input, targets: its last n positions' next tokens)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        vocab = self.model.get_output_embeddings().out_features
        pad = self.tokenizer.pad_token_id or 0
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        done = 0
        while done < len(order):
            longest = len(rows[order[done]][0])
            batch = order[done : done + max(1, min(64, (1 << 26) // (longest * vocab)))]
            inputs = torch.tensor([rows[i][0] + [pad] * (longest - len(rows[i][0])) for i in batch], device=self.device)
            logits = logits_as_run(self.model, inputs, self.scoring_cache)  # (B, longest, V)
            for row, i in enumerate(batch):
                inp, targets = rows[i]
                if not targets:
                    continue
                target = torch.tensor(targets, device=self.device)
                logp = F.log_softmax(logits[row, len(inp) - len(targets) : len(inp)].float(), dim=-1)
                ll = logp.gather(-1, target[:, None]).double().sum().item()
                out[i] = (ll, bool((logp.argmax(-1) == target).all()))
            done += len(batch)
        return out

    def generate_until(self, requests) -> list[str]:
        """Greedy continuation of each context until a stop string, EOS or max_gen_toks tokens."""
        out = []
        for r in requests:
            context, kwargs = r.args
            if kwargs.get("do_sample"):
                raise ConfigError(
                    f"task '{r.task_name}' asks for sampling (do_sample: true); frugalm eval decodes greedily: set do_sample: false in its generation_kwargs"
                )
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = int(kwargs.get("max_gen_toks", 256))
            ids = [self.start_id, *self._ids(context)][-max(1, self.max_length - n_new) :]
            out.append(self._greedy(ids, n_new, until))
        return out

    @torch.inference_mode()
    def _greedy(self, ids: list[int], n_new: int, until: list[str]) -> str:
        prompt = torch.tensor([ids], device=self.device)
        if self.exit_setting.get("method") == "confidence_exit":
            cache = self.decode_cache(len(ids) + n_new) if self.decode_cache else None
            new = decoding.exit_generate(self.model, prompt, n_new, self.exit_setting, cache=cache)
            return _cut(self.tokenizer.decode(_before_eos(new, self.tokenizer.eos_token_id)), until)
        cache = self.decode_cache(len(ids) + n_new) if self.decode_cache else None
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        new, x = [], prompt
        for _ in range(n_new):
            token = int(self.model(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
            if token == self.tokenizer.eos_token_id:
                break
            new.append(token)
            if until and any(s in self.tokenizer.decode(new) for s in until):
                break
            x = torch.tensor([[token]], device=self.device)
        return _cut(self.tokenizer.decode(new), until)


def _before_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def _cut(text: str, until: list[str]) -> str:
    """The text before the earliest stop string."""
    return text[: min([text.find(s) for s in until if s in text], default=len(text))]
