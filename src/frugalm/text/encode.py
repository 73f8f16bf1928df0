"""Encoding evaluation text: documents as [doc-start token] + tokens, cut after a token budget.

The doc-start token is the tokenizer's BOS (its EOS when it has no BOS, as lm-evaluation-harness
does). `encode_documents` records exactly which text the kept tokens cover (per-word and per-byte
perplexities divide by it); `evaluated_documents` reads only as much of a file as that needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from frugalm.errors import DataError
from frugalm.text.files import iter_documents


@dataclass
class EncodedText:
    ids: torch.Tensor  # (n_tokens,) int64
    docs: list[str]  # the covered text, document by document (the last one possibly cut)
    doc_start_token: str | None

    @property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.docs)

    @property
    def n_words(self) -> int:
        return sum(len(d.split()) for d in self.docs)


def encode_documents(tokenizer, docs: list[str], max_tokens: int = 0) -> EncodedText:
    """Encode documents as [start] + tokens until `max_tokens`; record exactly what text was covered."""
    start_id = doc_start_id(tokenizer)
    start = [start_id] if start_id is not None else []
    ids: list[int] = []
    covered: list[str] = []
    for doc in docs:
        enc = encode_text(tokenizer, doc, offsets=tokenizer.is_fast)
        doc_ids = start + enc["input_ids"]
        room = max_tokens - len(ids) if max_tokens else len(doc_ids)
        if room <= len(start):
            break
        if len(doc_ids) > room:  # cut this document: keep the text its kept tokens cover
            kept = room - len(start)
            doc_ids = doc_ids[:room]
            if tokenizer.is_fast:
                doc = doc[: enc["offset_mapping"][kept - 1][1]]
            else:
                doc = tokenizer.decode(enc["input_ids"][:kept])
        ids += doc_ids
        covered.append(doc)
        if max_tokens and len(ids) >= max_tokens:
            break
    if len(ids) < 2:
        raise DataError("the evaluation text encodes to fewer than 2 tokens; pass a longer text")
    start_token = tokenizer.convert_ids_to_tokens(start_id) if start_id is not None else None
    return EncodedText(torch.tensor(ids, dtype=torch.long), covered, start_token)


def doc_start_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_text(tokenizer, doc: str, offsets: bool = False):
    return tokenizer(
        doc, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=offsets, verbose=False
    )  # frugalm windows long texts itself


FIRST_GUESS_CHARS_PER_TOKEN = 8
"""evaluated_documents first reads a document up to this many characters per token it needs."""
MARGIN_TOKENS = 256
"""Tokens a cut document must encode to beyond those evaluated, so that the cut cannot change them."""


def evaluated_documents(path, tokenizer, max_tokens: int) -> list[str]:
    """The documents of a checked text file that encode_documents(tokenizer, ..., max_tokens) covers.

    Read as a stream and stopped once they encode to `max_tokens`, so a huge file costs memory
    for the evaluated text only, and the child given these documents encodes exactly what it
    would from the whole text: the same tokens, covered text and figures. A document longer than
    a cap is read as its first characters; the cap starts at FIRST_GUESS_CHARS_PER_TOKEN per
    token and grows (re-reading) until the cut lies MARGIN_TOKENS past the evaluated tokens.
    max_tokens 0 (evaluate everything) reads every document.
    """
    if not max_tokens:
        return [doc for doc, _ in iter_documents(path)]
    cap = FIRST_GUESS_CHARS_PER_TOKEN * max_tokens + 4096
    while (docs := _documents_until(path, tokenizer, max_tokens, cap)) is None:
        cap *= 4
    return docs


def _documents_until(path, tokenizer, max_tokens: int, cap: int) -> list[str] | None:
    """Documents until `max_tokens` are covered (as encode_documents counts), each read up to
    `cap` characters; None when one was cut too early for its evaluated tokens to be trusted."""
    start = 0 if doc_start_id(tokenizer) is None else 1
    docs, n_tokens = [], 0
    documents = iter_documents(path, max_doc_chars=cap)
    try:
        for doc, complete in documents:
            if max_tokens - n_tokens <= start:  # encode_documents stops here too
                break
            doc_tokens = start + len(encode_text(tokenizer, doc)["input_ids"])
            if not complete and n_tokens + doc_tokens < max_tokens + MARGIN_TOKENS:
                return None
            docs.append(doc)
            n_tokens += doc_tokens
            if n_tokens >= max_tokens:
                break
    finally:
        documents.close()
    return docs
