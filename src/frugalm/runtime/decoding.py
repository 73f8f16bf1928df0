"""Decoding strategies a variant carries beyond its weights: speculative, prompt-lookup and early-exit decoding.

All three are greedy speculation, lossless by construction: a proposer guesses up to `k` next
tokens, the target scores the last accepted token and the guesses in one forward, and keeps the
longest prefix of guesses equal to its own argmax plus its own token after it. The output is the
target's greedy output; only where a batched forward rounds differently from single-token steps
can an argmax between two near-tied logits flip, which `greedy_agree_frac` measures.

Proposers:
- `DraftProposer`: a smaller model with the target's tokenizer guesses greedily with its own KV
  cache (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318). With
  `threshold` > 0 it stops guessing once its top probability falls below it (adaptive k).
- `CompiledDraftProposer`: the same guesses, each round's draft steps run as one compiled graph on
  a static cache (the `compiled` option of speculative and early exit; gpt-fast's approach).
- `PromptLookupProposer`: the tokens that followed the latest earlier occurrence of the newest
  n-gram in the prompt and the output so far (Saxena 2023, "prompt lookup decoding"). No model.
- Early exit (self-speculation, LayerSkip: Elhoushi et al. 2024, arXiv:2404.16710): a
  `DraftProposer` over `layer_view(model, L)`, the target's own first L blocks with its final
  norm and head (shared weights, no copy). LayerSkip also shares the first L layers' KV cache
  between draft and verification; here the view keeps its own cache (L layers' worth of extra
  cache, and the verification recomputes those layers), which keeps the target's forward untouched.

Written here rather than taken from transformers' assisted generation (`generate(assistant_model=
..., prompt_lookup_num_tokens=...)`), whose greedy output is the same: on stories260K at batch 1
(one core) it ran 0.25-0.38x the speed of plain greedy `generate` with truncated drafts and 0.66x
with prompt lookup, because its per-round bookkeeping (candidate generators, logits processors,
stopping criteria) costs more than these models' forwards; and it reports neither how many guesses
were made nor how many were kept, which the benchmark stores. Batch 1 only, as there.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from frugalm.runtime import compiled

SETTING = "decoding"
"""Key of the inference setting: {"method": one of METHODS, "k": ..., ...}."""
METHODS = ("speculative", "prompt_lookup", "early_exit", "confidence_exit")
DRAFT_ATTR = "frugalm_draft"
"""Model attribute holding a speculative variant's draft model (kept out of the module tree and its state dict)."""
DRAFT_DIR = "draft"
"""Subfolder of a speculative artifact holding its draft, a variant folder of its own."""


@dataclass
class DecodeStats:
    """Counts of one or more generations (counted, not timed)."""

    generated: int = 0
    """Tokens generated (the prompt's first token included)."""
    target_forwards: int = 0
    """Forwards of the target model, the prompt's included."""
    rounds: int = 0
    """Verification forwards that checked at least one guess."""
    drafted: int = 0
    """Guesses checked."""
    accepted: int = 0
    """Guesses kept."""
    draft_forwards: int = 0
    blocks_run: int = 0
    """Decoder blocks run for the generated tokens after the prompt (confidence exit: fewer than all)."""
    exit_tokens: int = 0
    """Tokens after the prompt decoded by the confidence exit loop."""

    @property
    def accept_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def accept_len_mean(self) -> float | None:
        """Guesses kept per verification round (the target's own token after them not counted)."""
        return self.accepted / self.rounds if self.rounds else None

    @property
    def target_fwd_per_tok(self) -> float | None:
        return self.target_forwards / self.generated if self.generated else None

    @property
    def blocks_per_tok(self) -> float | None:
        return self.blocks_run / self.exit_tokens if self.exit_tokens else None


# --- proposers -----------------------------------------------------------------------------------


class DraftProposer:
    """Greedy guesses from a draft model (or a layer view of the target) with its own KV cache."""

    def __init__(self, draft: nn.Module, threshold: float = 0.0):
        self.draft, self.threshold = draft, threshold
        self.cache, self.fed = None, 0

    def start(self, tokens: int) -> None:
        self.cache, self.fed = DynamicCache(config=self.draft.config), 0

    def propose(self, seq: list[int], k: int, stats: DecodeStats) -> list[int]:
        guesses: list[int] = []
        new = torch.tensor([seq[self.fed :]], device=_device(self.draft))
        while len(guesses) < k:
            logits = self.draft(new, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            stats.draft_forwards += 1
            self.fed += new.shape[1]
            token = int(logits.argmax())
            if self.threshold > 0 and guesses and F.softmax(logits.float(), -1)[token] < self.threshold:
                break
            guesses.append(token)
            new = torch.tensor([[token]], device=new.device)
        return guesses

    def keep(self, length: int) -> None:
        """The sequence's first `length` tokens are final; forget anything cached beyond them."""
        if self.fed > length:
            self.cache.crop(length - self.fed)
            self.fed = length


class CompiledDraftProposer:
    """A draft's greedy guesses with each round's draft steps compiled into one graph (torch.compile).

    On CPU a small draft's eager step is almost all per-operator overhead (stories260K's half-depth
    draft: ~0.45 of a target step whatever its width), so the guesses cost about what they save.
    Here one call runs a whole round: the draft reads the sequence's last two tokens (the newest
    is never cached yet; re-reading the one before keeps the input shape fixed) and guesses `k`
    tokens greedily, every step in the same graph against a static KV cache
    (runtime/compiled.StaticDecodeCache), with no Python between steps and no host read until the
    round's end. The cache holds a multiple of `BUCKET` tokens, enough for the generation, and is
    reused by every generation of that length; each (k, cache length) compiles once per process
    (tens of seconds on CPU), logged on the target (runtime/compiled.compile_log) as a cost of
    running the variant. The prompt is read eagerly. The graph runs under runtime/compiled's
    GraphSwitches (plain attention, a rotary table), as the compiled decode step does. Guesses are
    checked by the target as always, so the output stays the target's greedy output.
    """

    BUCKET = 128

    def __init__(self, draft: nn.Module, k: int, threshold: float = 0.0, log_on: nn.Module | None = None):
        compiled.check_fits(draft, "compiled draft rounds")
        self.draft, self.k, self.threshold, self.log_on = draft, k, threshold, log_on
        self.cache, self.fed = None, 0

    def start(self, tokens: int) -> None:
        length = -(-(tokens + self.k) // self.BUCKET) * self.BUCKET
        caches = self.draft.__dict__.setdefault("frugalm_round_caches", {})
        if length not in caches:
            caches[length] = compiled.static_cache(self.draft, length)
        self.cache, self.fed = caches[length], 0

    def propose(self, seq: list[int], k: int, stats: DecodeStats) -> list[int]:
        device, base = _device(self.draft), len(seq) - 2
        if self.fed < base:  # the prompt (and anything else not yet read), eagerly
            self.cache.rewind(self.fed)
            self.draft(torch.tensor([seq[self.fed : base]], device=device), past_key_values=self.cache, use_cache=True,
                       logits_to_keep=1)  # fmt: skip
            stats.draft_forwards += 1
        self.cache.rewind(base)
        tokens, top = self._round()(torch.tensor([seq[-2:]], device=device), self.cache)
        stats.draft_forwards += self.k
        self.fed = base + 1 + self.k  # the two read, and every guess but the last
        guesses, top = tokens[0, :k].tolist(), top[0, :k].tolist()
        if self.threshold > 0:
            low = [i for i in range(1, len(guesses)) if top[i] < self.threshold]
            guesses = guesses[: low[0]] if low else guesses
        return guesses

    def keep(self, length: int) -> None:
        self.fed = min(self.fed, length)

    def _round(self):
        rounds = self.draft.__dict__.setdefault("frugalm_rounds", {})
        if self.k in rounds:
            return rounds[self.k]
        draft, k = self.draft, self.k

        def run(tokens: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
            logits = draft(tokens, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            guesses, tops = [], []
            for i in range(k):
                token = logits.argmax(-1, keepdim=True)
                guesses.append(token)
                tops.append(F.softmax(logits.float(), -1).amax(-1, keepdim=True))
                if i < k - 1:
                    logits = draft(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            return torch.cat(guesses, 1), torch.cat(tops, 1)

        graph, switches = compiled.compile_graph(run, draft, model_as="draft"), {}

        def call(tokens: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
            t, length = time.perf_counter(), cache.layers[0].max_cache_len
            first = length not in switches
            if first:
                switches[length] = compiled.GraphSwitches(draft, length)
            with switches[length]:
                out = graph(tokens, cache)
            if first:
                record = {
                    "what": "draft round",
                    "k": k,
                    "cache_tokens": length,
                    "first_call_s": time.perf_counter() - t,
                }
                compiled.log_compile(self.log_on if self.log_on is not None else draft, record)
            return out

        rounds[k] = call
        return call


class PromptLookupProposer:
    """Guesses the tokens that followed the latest earlier occurrence of the newest n-gram (n from max_ngram down to min_ngram)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, tokens: int) -> None:
        pass

    def propose(self, seq: list[int], k: int, stats: DecodeStats) -> list[int]:
        t = torch.tensor(seq)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            windows = t[:-1].unfold(0, n, 1)  # every earlier n-gram, the newest one excluded
            hits = (windows == t[-n:]).all(1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                return seq[start : start + k]
        return []

    def keep(self, length: int) -> None:
        pass


def layer_view(model: nn.Module, blocks_path: str, layers: int) -> nn.Module:
    """The model with only its first `layers` decoder blocks, sharing every weight (no copy)."""
    parent_path, _, attr = blocks_path.rpartition(".")
    view = _shallow(model)
    view.config = copy.copy(model.config)
    view.config.num_hidden_layers = layers
    if isinstance(getattr(view.config, "layer_types", None), list):
        view.config.layer_types = view.config.layer_types[:layers]
    # copy the module path down to the blocks' parent, so the original keeps its own tree
    holder, names = view, parent_path.split(".") if parent_path else []
    for name in names:
        child = _shallow(getattr(holder, name))
        holder._modules[name] = child
        holder = child
    holder._modules[attr] = nn.ModuleList(list(getattr(holder, attr))[:layers])
    if hasattr(holder, "config"):
        holder.config = view.config
    return view


def _shallow(module: nn.Module) -> nn.Module:
    out = copy.copy(module)
    out._modules = dict(module._modules)
    return out


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- the loop ------------------------------------------------------------------------------------


def _first_token(model: nn.Module, ids: torch.Tensor, cache, stats: DecodeStats, clock) -> list[int]:
    """The prompt's pass through every block (batch 1), filling `cache`: its greedy next token."""
    if ids.shape[0] != 1:
        raise ValueError(f"decoding strategies run at batch 1, got a batch of {ids.shape[0]}")
    t = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    stats.target_forwards += 1
    first = [int(out.logits[0, -1].argmax())]
    if clock is not None:
        clock.append((time.perf_counter() - t, 1))
    return first


@torch.inference_mode()
def generate(model: nn.Module, ids: torch.Tensor, n_new: int, *, proposer=None, k: int = 4, cache=None,
             stats: DecodeStats | None = None, clock: list[tuple[float, int]] | None = None) -> list[int]:  # fmt: skip
    """Greedy-generate `n_new` tokens after `ids` (1, prompt): plain when `proposer` is None, else
    speculatively with up to `k` guesses per round. `cache`: the target's empty cache (one that can
    `crop`, e.g. a quantized one); None: a DynamicCache. Counts go into `stats`; with `clock`,
    (seconds, tokens produced) of the prompt's pass and of every round after it (each ends on a
    host read of the argmax, so the device has finished)."""
    stats = stats if stats is not None else DecodeStats()
    cache = cache if cache is not None else DynamicCache(config=model.config)
    seq, new = ids[0].tolist(), _first_token(model, ids, cache, stats, clock)
    if proposer is not None:
        proposer.start(len(seq) + n_new)
    while len(new) < n_new:
        t, before = time.perf_counter(), len(new)
        guesses = proposer.propose(seq + new, min(k, n_new - len(new) - 1), stats) if proposer is not None else []
        x = torch.tensor([[new[-1], *guesses]], device=ids.device)
        logits = model(x, past_key_values=cache, use_cache=True, logits_to_keep=x.shape[1]).logits[0]
        stats.target_forwards += 1
        best = logits.argmax(-1).tolist()
        kept = 0
        while kept < len(guesses) and guesses[kept] == best[kept]:
            kept += 1
        if guesses:
            stats.rounds += 1
            stats.drafted += len(guesses)
            stats.accepted += kept
            if kept < len(guesses):
                cache.crop(kept - len(guesses))  # the rejected guesses leave the target's cache
        new += guesses[:kept] + [best[kept]]  # at most n_new: guesses were capped at what was left minus one
        if proposer is not None:
            proposer.keep(len(seq) + len(new) - 1)  # the newest token is not yet in any cache
        if clock is not None:
            clock.append((time.perf_counter() - t, len(new) - before))
    stats.generated += len(new)
    return new


# --- confidence exit (lossy) ---------------------------------------------------------------------


class ExitParts:
    """The pieces of a Llama-family model the confidence exit loop runs one by one."""

    def __init__(self, model: nn.Module, setting: dict):
        self.blocks = model.get_submodule(setting["blocks"])
        self.norm = model.get_submodule(setting["norm"])
        self.rotary = model.get_submodule(setting["rotary"])
        self.embed, self.head = model.get_input_embeddings(), model.get_output_embeddings()
        self.first, self.threshold = setting["layers"], setting["threshold"]
        attn = self.blocks[0].self_attn
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = getattr(attn, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads

    def step(self, token: torch.Tensor, cache, stats: DecodeStats) -> torch.Tensor:
        """Logits (vocab,) of one new token (1, 1) at the cache's next position, exiting at the first
        block from `first` on whose prediction's top probability reaches `threshold`. The blocks it
        skips still get this position's keys and values, computed from the exit's hidden state (CALM's
        state propagation), so later tokens attend over every position in every block."""
        position = torch.tensor([[cache.get_seq_length()]], device=token.device)
        h = self.embed(token)
        cos_sin = self.rotary(h, position_ids=position)
        last = len(self.blocks)
        for i, block in enumerate(self.blocks):
            h = block(h, attention_mask=None, position_ids=position, past_key_values=cache, use_cache=True,
                      position_embeddings=cos_sin)  # fmt: skip
            if self.first <= i + 1 < last:
                logits = self.head(self.norm(h))[0, -1]
                if F.softmax(logits.float(), -1).max() >= self.threshold:
                    self._propagate(h, i + 1, cos_sin, cache)
                    stats.blocks_run += i + 1
                    stats.exit_tokens += 1
                    return logits
        stats.blocks_run += last
        stats.exit_tokens += 1
        return self.head(self.norm(h))[0, -1]

    def _propagate(self, h: torch.Tensor, start: int, cos_sin, cache) -> None:
        cos, sin = cos_sin
        for j in range(start, len(self.blocks)):
            block = self.blocks[j]
            x = block.input_layernorm(h)
            k = block.self_attn.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = block.self_attn.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
            cache.update(k, v, j)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.inference_mode()
def exit_generate(model: nn.Module, ids: torch.Tensor, n_new: int, setting: dict, *, cache=None,
                  stats: DecodeStats | None = None, clock: list[tuple[float, int]] | None = None) -> list[int]:  # fmt: skip
    """Greedy-generate `n_new` tokens with the confidence exit (lossy): the prompt runs through every
    block, each new token exits at the first confident block (ExitParts.step)."""
    stats = stats if stats is not None else DecodeStats()
    cache = cache if cache is not None else DynamicCache(config=model.config)
    parts, new = ExitParts(model, setting), _first_token(model, ids, cache, stats, clock)
    while len(new) < n_new:
        t = time.perf_counter()
        new.append(int(parts.step(torch.tensor([[new[-1]]], device=ids.device), cache, stats).argmax()))
        stats.target_forwards += 1
        if clock is not None:
            clock.append((time.perf_counter() - t, 1))
    stats.generated += len(new)
    return new


@torch.inference_mode()
def exit_logits(model: nn.Module, inputs: torch.Tensor, setting: dict, cache_factory=None) -> torch.Tensor:
    """(B, L, V) logits of each window fed token by token through the confidence exit (teacher
    forcing): what the lossy variant predicts at every position, for perplexity and fidelity."""
    parts, rows = ExitParts(model, setting), []
    for row in inputs:
        cache = cache_factory(len(row)) if cache_factory else DynamicCache(config=model.config)
        stats = DecodeStats()
        rows.append(torch.stack([parts.step(token.view(1, 1), cache, stats) for token in row]))
    return torch.stack(rows)


def attach_draft(model: nn.Module, draft: nn.Module) -> None:
    """Keep `draft` with `model` without making it a submodule (it is saved in its own folder)."""
    model.__dict__[DRAFT_ATTR] = draft


def draft_of(model: nn.Module) -> nn.Module | None:
    return model.__dict__.get(DRAFT_ATTR)


def proposer_for(model: nn.Module, setting: dict):
    """The proposer a variant's decoding setting asks for."""
    method = setting["method"]
    if method == "speculative":
        draft = draft_of(model)
        if draft is None:
            raise ValueError("this speculative variant has no draft model attached (load it with load_model)")
        if setting.get("compile"):
            return CompiledDraftProposer(draft, setting["k"], setting.get("threshold", 0.0), log_on=model)
        return DraftProposer(draft, setting.get("threshold", 0.0))
    if method == "prompt_lookup":
        return PromptLookupProposer(setting.get("max_ngram", 3), setting.get("min_ngram", 1))
    if method == "early_exit":
        if setting.get("compile"):  # one view per model, so its compiled rounds are reused
            views = model.__dict__.setdefault("frugalm_exit_views", {})
            key = (setting["blocks"], setting["layers"])
            if key not in views:
                views[key] = layer_view(model, *key)
            return CompiledDraftProposer(views[key], setting["k"], setting.get("threshold", 0.0), log_on=model)
        return DraftProposer(layer_view(model, setting["blocks"], setting["layers"]), setting.get("threshold", 0.0))
    if method == "confidence_exit":
        return None  # not speculation: its own loop (exit_generate)
    raise ValueError(f"unknown decoding method {method!r}; known: {', '.join(METHODS)}")
