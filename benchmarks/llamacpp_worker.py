"""llama.cpp's side of bench_llamacpp.py: runs in the llama.cpp venv, answers one JSON request per line.

Requests (stdin) and answers (stdout), one JSON object per line:
  {"cmd": "load", "path": GGUF, "n_ctx": N, "threads": T}     -> {"n_vocab": V}
  {"cmd": "nll", "windows": [[ids], ...]}                      -> {"nll_sum": S, "n": N}
      each window evaluated from an empty cache; token t+1 scored from the logits after token t
  {"cmd": "prompt", "ids": [...]}                              -> {"first": token}
      prefill the prompt; the greedy next token is what "decode" feeds first
  {"cmd": "decode", "steps": K}                                -> {}
      K greedy steps from the prompt's cache, then the cache is rolled back to the prompt
  {"cmd": "noop"}                                              -> {} (times the round trip)
Nothing here imports frugalm: the two sides share only token ids.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from llama_cpp import Llama


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
    return float((lse - logits[np.arange(len(targets)), targets]).sum())


class Worker:
    def __init__(self):
        self.scorer = self.decoder = None
        self.prompt_len, self.first = 0, 0

    def load(self, path: str, n_ctx: int, threads: int) -> dict:
        common = {"n_ctx": n_ctx, "n_batch": n_ctx, "n_ubatch": n_ctx, "n_threads": threads,
                  "n_threads_batch": threads, "verbose": False}  # fmt: skip
        self.scorer = Llama(model_path=path, logits_all=True, **common)
        self.decoder = Llama(model_path=path, logits_all=False, **common)
        return {"n_vocab": self.decoder.n_vocab()}

    def nll(self, windows: list[list[int]]) -> dict:
        total, n = 0.0, 0
        for ids in windows:
            self.scorer.reset()
            self.scorer.eval(ids)
            logits = np.asarray(self.scorer.scores[: len(ids) - 1])
            total += _log_softmax_nll(logits, np.asarray(ids[1:]))
            n += len(ids) - 1
        return {"nll_sum": total, "n": n}

    def _argmax(self) -> int:
        logits = np.ctypeslib.as_array(self.decoder._ctx.get_logits(), shape=(self.decoder.n_vocab(),))
        return int(logits.argmax())

    def prompt(self, ids: list[int]) -> dict:
        self.decoder.reset()
        self.decoder.eval(ids)
        self.prompt_len, self.first = len(ids), self._argmax()
        return {"first": self.first}

    def decode(self, steps: int) -> dict:
        token = self.first
        for _ in range(steps):
            self.decoder.eval([token])
            token = self._argmax()
        self.decoder.n_tokens = self.prompt_len  # the next eval drops the cache beyond the prompt
        return {}


def main() -> None:
    worker = Worker()
    for line in sys.stdin:
        request = json.loads(line)
        cmd = request.pop("cmd")
        if cmd == "quit":
            break
        answer = {} if cmd == "noop" else getattr(worker, cmd)(**request)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
