"""Tasks: likelihood-scored items built from the evaluation text, each item's score kept.

Perplexity averages over every token and misses damage that shows on the tokens that matter.
Three tasks are built from any text, with no labels (the text is its own answer key):

- `cloze`: the last word of a sentence (or line), completed greedily from the text before it
  (LAMBADA's protocol: correct when every token of the word is the model's argmax).
- `choice`: the true next sentence (or line) against `choices - 1` sentences of the same length
  band taken from other documents; correct when the true one has the highest log-likelihood per
  UTF-8 byte (lm-evaluation-harness's `acc_norm`, which does not favour short options).
- `code`: identifier completion: a name (3+ characters, not a Python keyword) at a place where it
  was already used in the same document, completed greedily and exactly. Meant for code (the
  built-in model's text); on prose it tests recall of names.

Sentences end at `.`, `!` or `?` followed by whitespace, or at a line break, so prose splits into
sentences and code into lines. Items are a seeded sample of every candidate in the evaluated
documents; each is scored from at most `context_tokens` tokens: the doc-start token (BOS, as for
perplexity) and the text just before it. Context and answer are encoded together and split where
the context's own encoding ends (as lm-evaluation-harness does), whitespace between them going
with the answer. The same text, tokenizer and protocol give the same items, so a variant and its
reference are scored on the very same items and compared item by item (`stats.bootstrap_delta`).

Models are scored as they run (`quality.logits_as_run`: through a quantized KV cache, through
the confidence exit). Why not lm-evaluation-harness here: these tasks are built from the user's
own evaluation text, which lm-eval cannot do, and must run in the measuring child without the
optional extra; lm-eval tasks run through `frugalm eval` (benchmark/harness.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import keyword
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from frugalm.errors import ConfigError
from frugalm.measure import cascade as cascade_sweep
from frugalm.measure.compute import count_flops
from frugalm.measure.metrics import Measurement
from frugalm.measure.quality import logits_as_run
from frugalm.measure.stats import bootstrap_delta
from frugalm.runtime import cascade, prompt_pruning
from frugalm.runtime.cascade import CONFIDENCES
from frugalm.runtime.kv_cache import cache_factory as model_cache_factory
from frugalm.runtime.modules import inference_settings
from frugalm.text.encode import doc_start_id, encode_text

TASKS = ("cloze", "choice", "code")
Progress = Callable[[str, int, int], None]
_SENTENCE = re.compile(r"[^\n]*?(?:[.!?](?=\s)|$)", re.MULTILINE)
_LAST_WORD = re.compile(r"(\w+)\W*$")
_NAME = re.compile(r"(?<![\w.])[A-Za-z_]\w{2,}|(?<=\.)[A-Za-z_]\w{2,}")
_TRIVIAL_NAMES = frozenset(keyword.kwlist) | {"self", "cls"}
MAX_SENTENCE_CHARS = 240
"""Longest sentence (or line) a multiple-choice option may be."""
CHARS_PER_TOKEN = 16
"""Text read back from an item's position per context token wanted (then cut to the token budget)."""


@dataclass(frozen=True)
class TaskProtocol:
    tasks: tuple[str, ...] | None = None
    """Tasks scored (cloze, choice, code); by default (None) cloze and choice, and code on the built-in text."""
    items: int = 400
    """Items per task at most: a seeded sample of the candidates in the evaluated text."""
    context_tokens: int = 128
    """Tokens of context per item at most (the doc-start token and the text just before the answer)."""
    choices: int = 4
    """Options per multiple-choice item: the true continuation and choices - 1 from other documents."""
    seed: int = 0
    """Seed of the item sample, the distractors and the bootstrap."""

    def check(self) -> None:
        unknown = sorted(set(self.tasks or ()) - set(TASKS))
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}; choose among {', '.join(TASKS)}")
        if self.items < 1 or self.context_tokens < 8 or self.choices < 2:
            raise ConfigError(
                f"tasks need items >= 1, context_tokens >= 8 and choices >= 2 (got {self.items}, {self.context_tokens}, {self.choices})"
            )


@dataclass
class Item:
    doc: int
    at: int
    """Character offset of the answer in its document."""
    context: str
    options: list[str]
    """The answer first; then the distractors (choice only)."""


@dataclass
class ItemScores:
    """Per item: its score (1 correct, 0 not), its options' log-likelihoods per byte (choice), the
    confidences of its answer (runtime/cascade.CONFIDENCES), and the FLOPs counted for it."""

    correct: list[float]
    option_scores: list[list[float]] = field(default_factory=list)
    confidence: dict[str, list[float]] = field(default_factory=dict)
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    """Wall time of the forwards, per batch, shared among its items by their unpadded tokens (not
    meaningful from a pass that counted FLOPs: the counter slows it)."""


def build_items(task: str, docs: list[str], protocol: TaskProtocol, strict: bool = True) -> tuple[list[Item], int]:
    """(a seeded sample of at most protocol.items items, the number of candidates). Multiple choice
    needs sentences from other documents: without enough, an error (`strict`) or no items."""
    rng = random.Random(f"{task}:{protocol.seed}")
    candidates = {"cloze": _cloze_candidates, "choice": _choice_candidates, "code": _code_candidates}[task](docs)
    rng.shuffle(candidates)
    picked = sorted(candidates[: protocol.items])
    items = []
    sentences = _all_sentences(docs) if task == "choice" else []
    if task == "choice" and picked and not strict and len({d for d, _ in sentences}) < 2:
        return [], len(candidates)
    for doc, at, answer in picked:
        context = docs[doc][max(0, at - CHARS_PER_TOKEN * protocol.context_tokens) : at]
        stripped = context.rstrip()
        space = context[len(stripped) :]
        options = [space + answer]
        if task == "choice":
            options += [space + s for s in _distractors(sentences, doc, answer, protocol.choices - 1, rng)]
        items.append(Item(doc, at, stripped, options))
    return items, len(candidates)


def _sentences(doc: str):
    """(start, text) of each non-blank sentence or line of a document."""
    for m in _SENTENCE.finditer(doc):
        text = m.group().strip()
        if text:
            yield m.start() + m.group().index(text), text


def _cloze_candidates(docs: list[str]) -> list[tuple[int, int, str]]:
    out = []
    for d, doc in enumerate(docs):
        eighth = next(itertools.islice(re.finditer(r"\S+", doc), 7, None), None)  # 8 words before the answer
        for start, text in _sentences(doc):
            m = _LAST_WORD.search(text)
            at = start + m.start(1) if m else 0
            if m and eighth is not None and len(m.group(1)) >= 2 and at >= eighth.end():
                out.append((d, at, m.group(1)))
    return out


def _choice_candidates(docs: list[str]) -> list[tuple[int, int, str]]:
    out = []
    for d, doc in enumerate(docs):
        for k, (start, text) in enumerate(_sentences(doc)):
            if k >= 1 and 8 <= len(text) <= MAX_SENTENCE_CHARS:
                out.append((d, start, text))
    return out


def _code_candidates(docs: list[str]) -> list[tuple[int, int, str]]:
    out = []
    for d, doc in enumerate(docs):
        seen = set()
        for m in _NAME.finditer(doc):
            name = m.group()
            if name in seen and name not in _TRIVIAL_NAMES:
                out.append((d, m.start(), name))
            seen.add(name)
    return out


def _all_sentences(docs: list[str]) -> list[tuple[int, str]]:
    return sorted(((d, text) for d, doc in enumerate(docs) for _, text in _sentences(doc)
                   if 8 <= len(text) <= MAX_SENTENCE_CHARS),
                  key=lambda s: len(s[1]))  # fmt: skip


def _distractors(sentences: list[tuple[int, str]], doc: int, answer: str, k: int, rng: random.Random) -> list[str]:
    """k sentences of other documents, drawn from those nearest in length to the answer (a band of
    about 8k of them), so that length alone does not give the answer away."""
    pool = [s for d, s in sentences if d != doc and s != answer]
    if len(pool) < k:
        raise ConfigError(
            f"the evaluation text has too few sentences in other documents for {k + 1}-way multiple choice; pass a text with more documents or fewer --task-choices"
        )
    pool.sort(key=lambda s: abs(len(s) - len(answer)))
    return rng.sample(pool[: max(8 * k, k)], k)


def _encode_item(tokenizer, item: Item, budget: int, max_len: int | None) -> tuple[list[int], list[list[int]]]:
    """(context ids with the doc-start token, each option's ids), the context cut from the left to
    `budget` tokens and, with the longest option, to the model's context `max_len` (options cut last)."""
    start = doc_start_id(tokenizer)
    ctx = encode_text(tokenizer, item.context)["input_ids"] if item.context else []
    options = []
    for option in item.options:
        whole = encode_text(tokenizer, item.context + option)["input_ids"]
        split = whole[len(ctx) :] if whole[: len(ctx)] == ctx else encode_text(tokenizer, option)["input_ids"]
        options.append(split or encode_text(tokenizer, option)["input_ids"])
    if max_len:
        budget = max(2, min(budget, max_len - max(map(len, options))))
        options = [o[: max_len - budget] for o in options]
    room = budget - (1 if start is not None else 0)
    ctx = ctx[max(0, len(ctx) - room) :]
    return ([start] if start is not None else []) + ctx, options


@torch.inference_mode()
def score_items(
    model, tokenizer, items: list[Item], task: str, protocol: TaskProtocol, *, max_len=None, progress=None,
    flops: bool = False,
) -> ItemScores:  # fmt: skip
    """Each item's score from one forward per (context + option) sequence, batched by length, as the
    model runs; with each answer's confidences (runtime/cascade.CONFIDENCES) and, with `flops`, the
    FLOPs each item's sequences cost (torch's counter per batch, shared by unpadded tokens)."""
    cache_factory = model_cache_factory(model, {"kv_cache": inference_settings(model).get("kv_cache")})
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    pruning = inference_settings(model).get(prompt_pruning.SETTING)
    seqs = []  # (item, option, ids, first answer position, answer bytes)
    for i, item in enumerate(items):
        ctx, options = _encode_item(tokenizer, item, protocol.context_tokens, max_len)
        if pruning:  # a variant that prunes its prompts scores from its own, pruned, context
            ctx = prompt_pruning.prune(model, torch.tensor([ctx], device=device), pruning)[0].tolist()
        for j, ans in enumerate(options):
            seqs.append((i, j, ctx + ans, len(ctx), len(item.options[j].encode("utf-8"))))
    seqs.sort(key=lambda s: len(s[2]))
    n_bytes = [[0] * len(item.options) for item in items]
    scores = ItemScores([0.0] * len(items), [[0.0] * len(item.options) for item in items],
                        {c: [0.0] * len(items) for c in CONFIDENCES}, [0.0] * len(items), [0.0] * len(items))  # fmt: skip
    done = 0
    while done < len(seqs):
        longest = len(seqs[min(len(seqs), done + 64) - 1][2])
        batch = seqs[done : done + max(1, min(64, (1 << 26) // (longest * vocab)))]
        length = len(batch[-1][2])
        inputs = torch.tensor([(ids + [0] * length)[:length] for _, _, ids, _, _ in batch], device=device)
        run = {}
        forward = lambda: run.setdefault("logits", logits_as_run(model, inputs, cache_factory))  # noqa: B023, E731
        t0 = time.perf_counter()
        per_token = count_flops(forward) / inputs.numel() if flops else 0.0
        if not flops:
            forward()
        elapsed = time.perf_counter() - t0
        unpadded = sum(len(ids) for _, _, ids, _, _ in batch)
        for row, (i, j, ids, first, size) in enumerate(batch):
            target = torch.tensor(ids[first:], device=device)
            logp = F.log_softmax(run["logits"][row, first - 1 : len(ids) - 1].float(), dim=-1)
            scores.option_scores[i][j] = logp.gather(-1, target[:, None]).sum().item() / size
            n_bytes[i][j] = size
            scores.flops[i] += per_token * len(ids)
            scores.seconds[i] += elapsed * len(ids) / unpadded
            if j == 0 and task != "choice":
                scores.correct[i] = float((logp.argmax(-1) == target).all())
                _completion_confidence(logp, scores.confidence, i)
        done += len(batch)
        if progress:
            progress(f"task {task}", done, len(seqs))
    if task == "choice":
        for i, s in enumerate(scores.option_scores):
            scores.correct[i] = float(max(range(len(s)), key=lambda k: s[k]) == 0)
            _choice_confidence(s, sum(n_bytes[i]) / len(s), scores.confidence, i)
    else:
        scores.option_scores = []
    return scores


def _completion_confidence(logp: torch.Tensor, out: dict, i: int) -> None:
    """Confidences of a greedy completion from its (tokens, vocab) log-probabilities."""
    p = logp.exp()
    top = p.topk(2, dim=-1).values
    out["max_prob"][i] = logp.max(-1).values.sum().exp().item()
    out["margin"][i] = (top[:, 0] - top[:, 1]).min().item()
    out["entropy"][i] = 1 - (-(p * logp).sum(-1)).mean().item() / math.log(p.shape[-1])


def _choice_confidence(per_byte: list[float], mean_bytes: float, out: dict, i: int) -> None:
    """Confidences of a multiple-choice answer: the options' probabilities among themselves, from their
    log-likelihoods per byte scaled to the options' mean length (same ranking as the answer's)."""
    p = torch.softmax(torch.tensor(per_byte, dtype=torch.float64) * mean_bytes, 0)
    top = p.topk(2).values
    out["max_prob"][i] = top[0].item()
    out["margin"][i] = (top[0] - top[1]).item()
    out["entropy"][i] = 1 + (p * p.clamp_min(1e-300).log()).sum().item() / math.log(len(per_byte))


def default_tasks(builtin_text: bool) -> tuple[str, ...]:
    return ("cloze", "choice", "code") if builtin_text else ("cloze", "choice")


def items_digest(items: list[Item]) -> str:
    """sha256 of the items (documents, places, contexts, options): equal digests, same items."""
    return hashlib.sha256(json.dumps([asdict(i) for i in items]).encode("utf-8")).hexdigest()


def measure_tasks(
    model, tokenizer, docs: list[str], protocol: TaskProtocol, *, data_desc: dict, context=None, reference=None,
    reference_scores: dict[str, list[float]] | None = None, progress=None,
) -> list[Measurement]:  # fmt: skip
    """acc_<task> per task, each item's score as the figure's samples; with a reference, the paired
    difference model - reference and its bootstrap intervals (paired and unpaired) in protocol["paired"].
    A cascade variant (runtime/cascade) answers its own task through the cascade, with its cost figures.

    `reference_scores` {task: item scores} are the reference's scores of these items as an earlier
    run measured them (same model files, items and settings: the caller's key says so); a task
    missing from it is scored on `reference` and added to it."""
    protocol.check()
    setting = inference_settings(model).get(cascade.SETTING)
    out = []
    for task in protocol.tasks or ():
        items, candidates = build_items(task, docs, protocol)
        if not items:  # bench's prepare() drops or refuses such a task before the child starts
            raise ConfigError(f"task {task}: the evaluation text has no items for it; pass a longer text")
        proto = {**data_desc, **asdict(protocol), "tasks": None, "task": task, "items": len(items),
                 "candidates": candidates, "items_sha256": items_digest(items),
                 "scoring": "as the model runs (its kernels, its KV cache, its decoding exit)"}  # fmt: skip
        if setting and setting["task"] == task:
            correct, figures = _through_cascade(
                model, tokenizer, items, task, protocol, context, setting, proto, progress
            )
            out += figures
        else:
            scores = score_items(model, tokenizer, items, task, protocol, max_len=context, progress=progress)
            correct = scores.correct
            if setting:
                proto["scoring"] += f"; the large model alone (the cascade routes {setting['task']} items)"
        if reference is not None:
            known = reference_scores is not None and len(reference_scores.get(task) or ()) == len(items)
            if known:
                ref_correct = reference_scores[task]
            else:
                ref_correct = score_items(reference, tokenizer, items, task, protocol, max_len=context, progress=progress).correct  # fmt: skip
                if reference_scores is not None:
                    reference_scores[task] = ref_correct
            paired = bootstrap_delta(correct, ref_correct, seed=protocol.seed)
            proto["paired"] = {
                **paired,
                "reference_value": sum(ref_correct) / len(ref_correct),
                "of": "model - reference",
                "reference_scored": "in an earlier run (same files, items, settings)" if known else "in this run",
            }
        out.append(Measurement(f"acc_{task}", sum(correct) / len(items), method="measured", n=len(items),
                               protocol=proto, samples=correct))  # fmt: skip
    return out


def _through_cascade(model, tokenizer, items, task, protocol, context, setting, proto, progress):
    """Item scores of the cascade (the small model's answer unless its confidence is below tau), and
    its cost figures; the sweep over every threshold on these items is stored beside them."""
    small = cascade.small_of(model)
    if small is None:
        raise ValueError("this cascade variant has no small model attached (load it with load_model)")
    s, large = (score_items(m, tokenizer, items, task, protocol, max_len=context, progress=progress, flops=True)
                for m in (small, model))  # fmt: skip
    cascade_sweep.time_items(
        [small, model], [s, large], lambda m: score_items(m, tokenizer, items, task, protocol, max_len=context)
    )
    up = cascade.escalate(s.confidence[setting["confidence"]], setting["tau"])
    correct = [large.correct[i] if e else s.correct[i] for i, e in enumerate(up)]
    cost = (sum(s.flops) + sum(f for f, e in zip(large.flops, up) if e)) / sum(large.flops)
    seconds = (sum(s.seconds) + sum(t for t, e in zip(large.seconds, up) if e)) / sum(large.seconds)
    analysis = {c: cascade_sweep.analyse(s, large, 0.01, c) for c in ("flops", "seconds")}
    proto["scoring"] = (
        "through the cascade: the small model answers, the large one when the small one's confidence < tau"
    )
    proto["cascade"] = {**setting, "small_accuracy": analysis["flops"]["small_accuracy"],
                        "large_accuracy": analysis["flops"]["large_accuracy"],
                        "cost_ratio": cost, "time_ratio": seconds, "escalated_frac": sum(up) / len(up),
                        "sweep_on_these_items": analysis}  # fmt: skip
    cp = {"task": task, "items": len(items), "cascade": setting, "counter": "torch.utils.flop_counter.FlopCounterMode",
          "what": "small model on every item + large model on the escalated ones, over the large model on every item"}  # fmt: skip
    tp = {**cp, "what": "the same, in wall time of the forwards as they ran here", "timing": cascade_sweep.TIMING}
    return correct, [
        Measurement("cascade_cost_ratio", cost, method="counted", n=len(items), protocol=cp),
        Measurement("cascade_time_ratio", seconds, method="measured", n=len(items), protocol=tp),
        Measurement("cascade_escalated_frac", sum(up) / len(up), method="measured", n=len(items), protocol=cp),
    ]
