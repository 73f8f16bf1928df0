"""Named, fixed inference workloads: prompt length, output length, batch size.

A workload that does not fit the model's context is refused, or, when the user asks for it,
scaled down to fit and recorded as scaled (`Workload.scaled_from`); it is never silently
truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from frugalm.errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_tokens: int
    output_tokens: int
    batch_size: int
    description: str
    scaled_from: tuple[int, int] | None = None
    """(prompt_tokens, output_tokens) of the named workload when it was scaled to fit a context."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        return cls(**{**d, "scaled_from": tuple(d["scaled_from"]) if d.get("scaled_from") else None})

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "batch_size": self.batch_size,
            "description": self.description,
            "scaled_from": list(self.scaled_from) if self.scaled_from else None,
        }


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("chat", 128, 64, 1, "One interactive request: 128-token prompt, 64 new tokens, batch 1."),
        Workload("batch8", 128, 64, 8, "Eight requests served together: 128-token prompts, 64 new tokens, batch 8."),
        Workload("prefill", 256, 1, 8, "Prompt processing: batch 8 x 256-token prompts, one new token each."),
        Workload(
            "long", 1536, 256, 1, "Long context: 1,536-token prompt, 256 new tokens, batch 1 (stresses the KV cache)."
        ),
    ]
}
DEFAULT_WORKLOADS = ("chat", "batch8")


def get_workloads(names) -> list[Workload]:
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        hints = "; ".join(f"unknown workload '{n}'{did_you_mean(n, WORKLOADS)}" for n in bad)
        raise ConfigError(f"{hints}. Valid choices: {', '.join(WORKLOADS)}")
    return [WORKLOADS[n] for n in dict.fromkeys(names)]


def fit_to_context(workload: Workload, context: int | None, *, scale: bool) -> Workload:
    """Return the workload unchanged if it fits `context`, a recorded scaled copy if `scale`, else raise."""
    if context is None or workload.total_tokens <= context:
        return workload
    if not scale:
        raise ConfigError(
            f"workload '{workload.name}' needs {workload.total_tokens} tokens (prompt {workload.prompt_tokens} + "
            f"output {workload.output_tokens}) but the model's context is {context}; pick a shorter workload "
            f"or pass --scale-workloads to scale it to fit (recorded as scaled)"
        )
    factor = context / workload.total_tokens
    prompt = max(1, int(workload.prompt_tokens * factor))
    output = max(1, min(context - prompt, int(workload.output_tokens * factor)))
    return replace(
        workload,
        prompt_tokens=prompt,
        output_tokens=output,
        scaled_from=(workload.prompt_tokens, workload.output_tokens),
    )
