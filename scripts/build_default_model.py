"""The built-in default model: a ~2.4M-parameter Llama trained here on the Python standard library.

`frugalm bench` with no model argument must run on a fresh machine with no download, so frugalm
ships a small but real language model in `src/frugalm/assets/default_model/` and held-out text
for it in `src/frugalm/assets/default_eval.txt`. Both are rebuilt by
`python scripts/build_default_model.py` (a build script: nothing in the package imports it).

Corpus: every Python install carries the same kind of text, the standard library's `.py` sources
and the documentation topics in `pydoc_data/topics.py`. Each file or topic is one document. A
stable hash of the document's name puts about 5% of them in a held-out split that is never
trained on; a prefix of that split (sorted by name, capped in size) is the evaluation text,
documents separated by a line containing exactly `<|endoftext|>`.

Tokenizer: byte-level BPE (GPT-2 style, no unknown tokens), 4096 entries, `<s>` BOS, `</s>` EOS.
Model: `LlamaForCausalLM` with tied embeddings and a 512-token context, trained by
`frugalm.training.loop` on 512-token windows of the training stream ([BOS] doc [EOS] concatenated).

It does not aim to be a useful assistant: it is a model whose quality is measurably far above a
unigram baseline, so that compression techniques have something real to lose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from frugalm.assets import DEFAULT_MODEL_DIR
from frugalm.atomic import atomic_folder, write_text_atomic
from frugalm.errors import DataError
from frugalm.text.files import DOC_SEPARATOR  # a line holding only this ends a document
from frugalm.training.loop import TrainConfig, train_causal_lm

HELD_OUT_PER_MILLE = 50
"""Documents whose name hashes below this (out of 1000) are held out."""
EVAL_MAX_BYTES = 360_000
"""Cap on the evaluation text written from the held-out split (UTF-8 bytes)."""
MAX_DOC_BYTES = 256_000
"""Source files larger than this are left out, a guard against huge generated modules."""
CONTEXT = 512
"""Context length of the model and of the perplexity windows."""
VOCAB_SIZE = 4096
DEFAULT_STEPS = 1500
SPECIAL_TOKENS = ("<s>", "</s>")  # ids 0 (BOS) and 1 (EOS, also padding)

# Directories never read: third-party code, the test suites, IDLE (and config-*, see below).
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "__pycache__"}
# Generated files (codec tables, token and keyword lists, stringprep tables) say so in their header.
_GENERATED = re.compile(r"gencodec\.py|DO NOT EDIT|auto-?generated|automatically generated", re.IGNORECASE)

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    return Path(os.__file__).resolve().parent


def stdlib_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """(name, text) for every stdlib source file and pydoc topic, sorted by name.

    Names are paths relative to the stdlib root; topics are `pydoc_data/topics.py/<topic>`.
    """
    root = root or stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata") or rel.as_posix() == "pydoc_data/topics.py":
            continue
        if path.stat().st_size > MAX_DOC_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a handful of installs carry non-UTF-8 or unreadable files; skip, not fail
        if not _GENERATED.search(text[:600]):
            docs.append((rel.as_posix(), text))
    docs.extend((f"pydoc_data/topics.py/{key}", text) for key, text in _pydoc_topics(root).items())
    docs = [(name, text) for name, text in docs if text.strip() and not _has_separator(text)]
    return sorted(docs)


def _pydoc_topics(root: Path) -> dict[str, str]:
    # Executed from the file rather than imported, so that `root` (not sys.path) decides.
    path = root / "pydoc_data" / "topics.py"
    if not path.exists():
        return {}
    namespace: dict = {}
    exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)
    return dict(namespace.get("topics", {}))


def _has_separator(text: str) -> bool:
    return any(line.strip() == DOC_SEPARATOR for line in text.splitlines())


def is_held_out(name: str) -> bool:
    """Stable across machines and runs: the first 4 bytes of sha256(name), modulo 1000."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def split_corpus(docs: Sequence[tuple[str, str]]) -> tuple[list, list]:
    """(training documents, held-out documents), both in name order."""
    return [d for d in docs if not is_held_out(d[0])], [d for d in docs if is_held_out(d[0])]


def eval_documents(held_out: Sequence[tuple[str, str]], max_bytes: int = EVAL_MAX_BYTES) -> list[tuple[str, str]]:
    """Held-out documents in name order, skipping any that would push the total past max_bytes."""
    chosen, total = [], 0
    for name, text in held_out:
        size = len(text.encode("utf-8")) + len(DOC_SEPARATOR) + 2
        if total + size <= max_bytes:
            chosen.append((name, text))
            total += size
    return chosen


def format_eval_text(texts: Iterable[str]) -> str:
    """Documents, each ending in a newline, separated by a line containing exactly DOC_SEPARATOR."""
    return f"{DOC_SEPARATOR}\n".join(t if t.endswith("\n") else t + "\n" for t in texts)


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE):
    """Byte-level BPE trained on `texts`, wrapped as a PreTrainedTokenizerFast that adds BOS."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = SPECIAL_TOKENS
    # Like Llama tokenizers: tokenizer(text) gives [BOS] + ids; add_special_tokens=False gives ids.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, 0), (eos, 1)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        model_max_length=CONTEXT,
    )


def encode_documents(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [enc.ids for enc in tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]


# ----------------------------------------------------------------------------- quality


def unigram_perplexity(train_ids: Iterable[Sequence[int]], eval_ids: Iterable[Sequence[int]], vocab_size: int) -> float:
    """Per-token perplexity on eval_ids of an add-one smoothed unigram fitted on train_ids.

    Both arguments are iterables of documents (sequences of token ids).
    """
    import torch

    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in train_ids:
        counts += torch.bincount(torch.as_tensor(ids, dtype=torch.long), minlength=vocab_size).double()
    log_p = torch.log((counts + 1) / (counts.sum() + vocab_size))  # (vocab,)
    flat = torch.cat([torch.as_tensor(ids, dtype=torch.long) for ids in eval_ids])
    return float(torch.exp(-log_p[flat].mean()))


PERPLEXITY_PROTOCOL = (
    "each held-out document is tokenized without special tokens and prefixed with BOS; the "
    f"sequence is cut into non-overlapping windows of {CONTEXT} predicted tokens (the context "
    "restarts at each window); every document token is predicted exactly once, BOS never is; "
    "perplexity = exp(total negative log-likelihood / number of predicted tokens), float32."
)


def heldout_perplexity(model, docs_ids: Sequence[Sequence[int]], bos_id: int, batch_size: int = 8) -> float:
    """Per-token perplexity of a causal LM on documents; the protocol is PERPLEXITY_PROTOCOL."""
    import torch
    import torch.nn.functional as F

    windows = []  # (inputs, targets) pairs, at most CONTEXT each
    for ids in docs_ids:
        seq = [bos_id, *ids]
        for start in range(0, len(seq) - 1, CONTEXT):
            chunk = seq[start : start + CONTEXT + 1]
            windows.append((chunk[:-1], chunk[1:]))
    if not windows:
        raise DataError("held-out text: no tokens to score; give at least one non-empty document.")
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            group = windows[i : i + batch_size]
            width = max(len(inp) for inp, _ in group)
            # Right padding never affects earlier positions under a causal mask; padded targets are ignored.
            inputs = torch.full((len(group), width), bos_id, dtype=torch.long)  # (batch, width)
            targets = torch.full((len(group), width), -100, dtype=torch.long)  # (batch, width)
            for row, (inp, tgt) in enumerate(group):
                inputs[row, : len(inp)] = torch.tensor(inp)
                targets[row, : len(tgt)] = torch.tensor(tgt)
            logits = model(input_ids=inputs.to(device)).logits.float()  # (batch, width, vocab)
            nll += F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), reduction="sum").item()
            count += int((targets != -100).sum())
    return float(torch.exp(torch.tensor(nll / count, dtype=torch.float64)))


# ----------------------------------------------------------------------------- model and build


def model_config(vocab_size: int):
    """hidden 192, 4 layers, 6 query / 2 key-value heads (head dim 32), SwiGLU 512, tied embeddings."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        dtype="float32",
    )


def default_train_config(steps: int, seed: int):

    # Small batches: this budget (~1.5M tokens) is limited by the number of updates. Measured
    # after 491,520 training tokens (perplexity on the first 30,000 held-out tokens): batch
    # 8/4/2 windows gave 306/187/153 at lr 3e-3, batch 2 gave 149 at lr 1.5e-3, and lr 8e-3
    # was worse (497 at batch 8).
    return TrainConfig(
        steps=steps,
        batch_size=2,
        seq_len=CONTEXT,
        lr=2e-3,
        min_lr_ratio=0.1,
        warmup_steps=min(50, steps // 10),
        weight_decay=0.1,
        grad_clip=1.0,
        seed=seed,
        log_every=max(1, min(50, steps // 10)),
    )


def training_stream(docs_ids: Sequence[Sequence[int]], bos_id: int, eos_id: int):
    """1-D int64 tensor: [BOS] doc [EOS] for every training document, concatenated."""
    import torch

    return torch.tensor([t for ids in docs_ids for t in (bos_id, *ids, eos_id)], dtype=torch.long)


def build_default_model(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: Progress | None = None,
    corpus_limit: int | None = None,
    eval_text_path: str | Path | None = None,
) -> dict:
    """Build the default model into `out_dir` and return the build record (also frugalm_build.json).

    The held-out evaluation text goes to `eval_text_path` (default: `default_eval.txt` beside
    out_dir, which for the shipped folder is `DEFAULT_EVAL_PATH`). `corpus_limit` keeps only
    the first N documents, for quick tests. Everything is written into a temporary sibling folder
    that is renamed to out_dir only when complete, so a partial build never sits at out_dir.
    """
    say = progress or (lambda message: None)
    out_dir = Path(out_dir).resolve()
    eval_text_path = Path(eval_text_path) if eval_text_path else out_dir.parent / "default_eval.txt"
    with atomic_folder(out_dir) as tmp:
        record, eval_text = _build_into(tmp, steps=steps, seed=seed, say=say, corpus_limit=corpus_limit)
        write_build_record(tmp, record)
        write_text_atomic(eval_text_path, eval_text)
    say(f"wrote {out_dir} and {eval_text_path}")
    return record


@dataclass(frozen=True)
class _Corpus:
    train_docs: list[tuple[str, str]]
    held_out: list[tuple[str, str]]
    evals: list[tuple[str, str]]  # the held-out documents written to the evaluation text
    tokenizer: object  # PreTrainedTokenizerFast
    train_ids: list[list[int]]
    eval_ids: list[list[int]]


def _prepare_corpus(corpus_limit: int | None, say: Progress) -> _Corpus:
    train_docs, held_out = split_corpus(stdlib_documents()[:corpus_limit])
    evals = eval_documents(held_out)
    if not train_docs or not evals:
        raise DataError(
            f"corpus: {len(train_docs)} training and {len(evals)} held-out documents "
            f"from {stdlib_root()}; raise corpus_limit={corpus_limit} or use a full Python install."
        )
    say(f"corpus: {len(train_docs)} training documents, {len(held_out)} held out ({len(evals)} in the eval text)")
    tokenizer = train_tokenizer((text for _, text in train_docs), VOCAB_SIZE)
    return _Corpus(
        train_docs,
        held_out,
        evals,
        tokenizer,
        train_ids=encode_documents(tokenizer, [text for _, text in train_docs]),
        eval_ids=encode_documents(tokenizer, [text for _, text in evals]),
    )


def _build_into(folder: Path, *, steps: int, seed: int, say: Progress, corpus_limit: int | None) -> tuple[dict, str]:
    """Train and score the model, save it into `folder`; return (build record, evaluation text)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    start = time.perf_counter()
    corpus = _prepare_corpus(corpus_limit, say)
    tokenizer = corpus.tokenizer
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = training_stream(corpus.train_ids, bos_id, eos_id)
    say(f"tokenizer: {len(tokenizer)} tokens; {stream.numel()} training tokens")

    torch.manual_seed(seed)  # the model's initial weights
    model = LlamaForCausalLM(model_config(len(tokenizer)))
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    say(f"model: {sum(p.numel() for p in model.parameters())} parameters; training {steps} steps")
    config = default_train_config(steps, seed)
    result = train_causal_lm(model, stream, config, progress=say)

    say("scoring held-out text")
    ppl = heldout_perplexity(model, corpus.eval_ids, bos_id)
    unigram = unigram_perplexity(corpus.train_ids, corpus.eval_ids, len(tokenizer))
    say(f"held-out perplexity {ppl:.2f} per token (unigram {unigram:.2f}); final train loss {result.final_loss:.4f}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    eval_text = format_eval_text(text for _, text in corpus.evals)
    record = {
        **_corpus_record(corpus, eval_text),
        **_model_record(model, folder),
        "train_config": asdict(config),
        "train_tokens_seen": result.tokens_seen,
        "train_wall_time_s": round(result.wall_time_s, 1),
        "train_loss_curve": [[step, round(loss, 4)] for step, loss in result.losses],
        "final_train_loss": round(result.final_loss, 4),
        "heldout_perplexity": round(ppl, 3),
        "unigram_perplexity": round(unigram, 3),
        "perplexity_protocol": PERPLEXITY_PROTOCOL,
        "unigram_protocol": "add-one smoothed unigram fitted on the training documents' tokens, "
        "scored on the same predicted held-out tokens",
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "build_wall_time_s": round(time.perf_counter() - start, 1),
    }
    return record, eval_text


def _corpus_record(corpus: _Corpus, eval_text: str) -> dict:
    return {
        "corpus": "Python standard library .py sources (no site-packages, test suites, idlelib or "
        "generated tables) plus pydoc_data/topics.py topics; one document per file or topic",
        "corpus_root": str(stdlib_root()),
        "python_version": platform.python_version(),
        "held_out_rule": f"sha256(name)[:4] as big-endian int % 1000 < {HELD_OUT_PER_MILLE}",
        "train_documents": len(corpus.train_docs),
        "train_tokens": sum(map(len, corpus.train_ids)),
        "held_out_documents": len(corpus.held_out),
        "eval_documents": len(corpus.evals),
        "eval_tokens": sum(map(len, corpus.eval_ids)),
        "eval_text_bytes": len(eval_text.encode("utf-8")),
        "eval_text_sha256": hashlib.sha256(eval_text.encode("utf-8")).hexdigest(),
        "tokenizer": f"byte-level BPE (tokenizers), {len(corpus.tokenizer)} entries, <s>=BOS (added by the "
        "tokenizer), </s>=EOS and padding; trained on the training documents",
        "vocab_size": len(corpus.tokenizer),
    }


def _model_record(model, folder: Path) -> dict:
    shape_keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
    )
    return {
        "model_shape": {key: getattr(model.config, key) for key in shape_keys},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": (folder / "model.safetensors").stat().st_size,
    }


def write_build_record(folder: Path, record: dict) -> None:
    text = json.dumps(record, indent=2)
    text = re.sub(r"\[\s+(\d+),\s+([-\d.e]+)\s+\]", r"[\1, \2]", text)  # one line per (step, loss)
    (folder / "frugalm_build.json").write_text(text + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frugalm.default_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR, help="model folder (default: the shipped one)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: the shipped build used one, so a default rebuild repeats it exactly,
    # and on a small shared machine a second contended OpenMP thread slows training down.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    record = build_default_model(
        args.out, steps=args.steps, seed=args.seed, progress=lambda message: print(message, flush=True)
    )
    keys = (
        "parameters",
        "train_tokens_seen",
        "train_wall_time_s",
        "final_train_loss",
        "heldout_perplexity",
        "unigram_perplexity",
        "eval_text_bytes",
        "build_wall_time_s",
    )
    for key in keys:
        print(f"{key}: {record[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
