"""The compiled decode path: a static KV cache and `torch.compile` of the one-token step (gpt-fast's approach).

A decode step at batch 1 is a few hundred small kernels whose Python and dispatch overhead is a
large share of the step on CPU; compiled as one graph (inductor: fused C++ loops on CPU, Triton
on CUDA) against a cache whose tensors never change shape, that overhead goes. Prefill (more than
one new token) stays eager: its kernels are large and its shapes vary. The graph runs under
`GraphSwitches` (plain attention, a rotary table) and, on CPU, inductor's C++ wrapper
(`compile_graph`); the compiled draft rounds of runtime/decoding use the same two.

`install(model)` replaces the model's `forward` with a dispatcher: a call with one new token per
sequence and a `StaticDecodeCache` runs the compiled graph, anything else the eager forward. The
graph is compiled on its first call for each (batch, cache length) shape and reused after; each
compilation's wall time is logged on the model (`compile_log`): it is a cost of deploying the
variant, paid once per process and shape (inductor's on-disk cache shortens later ones). A
variant carries the path as `"inference": {"compiled_decode": {...}}` (techniques/compile_decode,
or `frugalm bench --compile`), and whoever runs it asks `cache_factory` for its static caches.

Written here rather than taken from `model.generate(cache_implementation="static")`: the
benchmark times single steps and whole generations outside `generate`, and needs the cache
restorable (`crop`) and the compile time on record.
"""

from __future__ import annotations

import functools
import re
import time

import torch
from torch import nn
from transformers.cache_utils import StaticCache

from frugalm.errors import TechniqueError

SETTING = "compiled_decode"
"""Key of the inference setting; its value is {"mode": torch.compile mode}."""
MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
COMPILE_LOG_ATTR = "frugalm_compile_log"


class StaticDecodeCache(StaticCache):
    """transformers' StaticCache (preallocated, written in place) that can also forget its newest tokens."""

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the newest `-tokens_to_remove` tokens: the write position moves back; the slots are overwritten later."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        with torch.inference_mode():  # the counter is an inference tensor when the cache was filled in that mode
            for layer in self.layers:
                if layer.is_initialized:
                    layer.cumulative_length.sub_(min(-tokens_to_remove, int(layer.cumulative_length)))

    def rewind(self, tokens: int) -> None:
        """Keep the first `tokens` tokens (the next write goes to position `tokens`); later slots are overwritten later."""
        with torch.inference_mode():
            for layer in self.layers:
                layer.cumulative_length.fill_(tokens)


def check_fits(model: nn.Module, where: str) -> None:
    if not getattr(model, "_can_compile_fullgraph", False):
        raise TechniqueError(
            f"{where}: {type(model).__name__} does not support a static KV cache in one compiled graph (transformers' _can_compile_fullgraph); run it without compiled decode"
        )
    if next(model.parameters()).device.type == "cpu":
        from torch._inductor import cpp_builder  # deferred: inductor is slow to import

        try:
            cpp_builder.get_cpp_compiler()
        except Exception as e:  # its lookup raises its own error types, which vary between torch versions
            raise TechniqueError(
                f"{where}: torch.compile on CPU builds C++ and found no compiler ({type(e).__name__}); install g++ (apt install g++) or run without compiled decode"
            ) from None


def static_cache(model: nn.Module, max_tokens: int) -> StaticDecodeCache:
    """An empty static cache holding `max_tokens` tokens per sequence (its tensors are allocated on first use)."""
    return StaticDecodeCache(config=model.config, max_cache_len=max_tokens)


def install(model: nn.Module, settings: dict) -> nn.Module:
    """Route `model`'s one-token steps on a StaticDecodeCache through `torch.compile` (idempotent)."""
    if getattr(model.forward, "frugalm_compiled", False):
        return model
    check_fits(model, SETTING)
    eager = model.forward
    graph = compile_graph(eager, model, settings.get("mode", "default"), model_as="self")
    log: list[dict] = []
    switches_for: dict[tuple[int, int], GraphSwitches] = {}  # per (batch, cache length)

    @functools.wraps(eager)
    def forward(input_ids=None, *args, past_key_values=None, **kwargs):
        if (isinstance(past_key_values, StaticDecodeCache) and input_ids is not None and input_ids.shape[1] == 1
                and not model.training):  # fmt: skip
            length = past_key_values.layers[0].max_cache_len
            switches = switches_for.get((input_ids.shape[0], length))
            if switches is not None:
                with switches:
                    return graph(input_ids, *args, past_key_values=past_key_values, **kwargs)
            t = time.perf_counter()
            switches = switches_for[(input_ids.shape[0], length)] = GraphSwitches(model, length)
            with switches:
                out = graph(input_ids, *args, past_key_values=past_key_values, **kwargs)
            log.append({"batch": input_ids.shape[0], "cache_tokens": length, "first_call_s": time.perf_counter() - t})
            return out
        return eager(input_ids, *args, past_key_values=past_key_values, **kwargs)

    forward.frugalm_compiled = True
    model.forward = forward
    setattr(model, COMPILE_LOG_ATTR, log)
    return model


def compile_graph(fn, model: nn.Module, mode: str = "default", *, model_as: str):
    """`torch.compile(fn)` as one static-shape graph of `model`, which `fn` reaches by the name
    `model_as` (its `self`, or a closure's variable), with these choices:

    - on CPU, inductor's C++ wrapper, which calls the kernels from C++: with the default Python
      wrapper a stories260K step spent more time reinterpreting buffers and checking strides in
      Python (~200 calls per step) than in its kernels;
    - guards on the call only (`call_guards`): the model is taken as it was when the graph was
      made;
    - compilations of its own (`isolate_recompiles`): entries are kept per code object, and two
      models' forwards share one, so one model's call must never find a graph traced on another.
    """
    from torch._inductor import list_mode_options  # deferred: inductor is slow to import (~1.4 s)

    options = {**list_mode_options(mode), "guard_filter_fn": call_guards(model_as)}
    if next(model.parameters()).device.type == "cpu":
        options["cpp_wrapper"] = True
    return torch.compile(fn, fullgraph=True, dynamic=False, options=options, isolate_recompiles=True)


def call_guards(model_as: str):
    """A guard filter (torch.compile's guard_filter_fn) that keeps the guards on the call and drops
    those on the model's Python objects and on globals.

    Kept: every tensor's (shape, dtype, device, strides, aliasing; the model's parameters
    included, so a model cast or moved after compiling compiles again), the global state (grad
    mode, default device, ...), and the other arguments' (the cache's layers and flags, the
    keyword arguments). Dropped: the rest, ~1,100 of stories260K's 1,267 (counted), on its modules,
    hooks, config values and imported functions, all re-checked on every call (transformers'
    configs answer through a Python `__getattribute__`): stories260K's compiled step ran 1.26x
    faster without them, the 135M stand-in's 1.01x (`benchmarks/bench_decode.py --only guards`,
    paired). So hooks added, modules swapped or config values changed after a graph was made are
    not seen by it: frugalm compiles the model as it will run, and a model in training mode runs
    eager (install).
    """

    def keep(entries) -> list[bool]:
        return [
            e.guard_type in ("TENSOR_MATCH", "DUPLICATE_INPUT")
            or not e.name
            or (not e.is_global and _root(e.name) != model_as)
            for e in entries
        ]

    return keep


def _root(source: str) -> str:
    """The variable a guard's source starts from: "draft" in "dict(type(draft)...)['x']" or "draft._modules[...]"."""
    return re.match(r"(?:\w+\()*(\w*)", source).group(1)


class GraphSwitches:
    """What a compiled call of `model` runs under, switched on for the call and restored after:

    - attention in its plain matmul-softmax form ("eager") in every config the model's modules
      read (a layer view has its own and its blocks' model's), which inductor fuses into its
      loops: on stories260K's draft a round ran in 1.2 ms against 1.9 ms calling the SDPA kernel;
    - the model-level rotary embedding (transformers' *RotaryEmbedding) replaced by `RotaryTable`,
      its cos and sin for positions 0..`length`-1 computed once by the module itself (whatever its
      rope type): inside a graph inductor otherwise inlines the cos and sin into the attention
      kernels and recomputes them there (a 4-guess round of stories260K's 4-block draft: 4.3 ms
      against 1.9 ms with the table).
    """

    def __init__(self, model: nn.Module, length: int):
        self.slot = _rotary_slot(model)
        self.table = RotaryTable(getattr(*self.slot), length, next(model.parameters()).device) if self.slot else None
        found: dict[int, object] = {}
        todo = [model.config, *(getattr(m, "config", None) for m in model.modules())]
        while todo:
            config = todo.pop()
            if config is not None and id(config) not in found:
                found[id(config)] = config
                todo += [getattr(config, key, None) for key in getattr(config, "sub_configs", ())]
        self.configs = list(found.values())
        self.saved: list = []

    # Both switches write the attributes directly: through the config's and the module's own
    # __setattr__ (validation, recursion into sub-configs) they cost ~0.2 ms per call, a fifth of a
    # stories260K step.
    def __enter__(self):
        self.saved = [(config, config._attn_implementation_internal) for config in self.configs]
        for config in self.configs:
            object.__setattr__(config, "_attn_implementation_internal", "eager")
        if self.slot:
            parent, attr = self.slot
            self.saved.append(parent._modules[attr])
            parent._modules[attr] = self.table
        return self

    def __exit__(self, *exc):
        if self.slot:
            parent, attr = self.slot
            parent._modules[attr] = self.saved.pop()
        for config, implementation in self.saved:
            object.__setattr__(config, "_attn_implementation_internal", implementation)
        return False


class RotaryTable(nn.Module):
    """A rotary embedding's cos and sin for positions 0..length-1, looked up per position (see GraphSwitches)."""

    def __init__(self, rotary: nn.Module, length: int, device):
        super().__init__()
        cos, sin = rotary(torch.zeros(1, 1, device=device), torch.arange(length, device=device)[None])
        self.cos, self.sin = cos[0], sin[0]

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def _rotary_slot(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the model-level rotary embedding (transformers' *RotaryEmbedding), if any."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr
    return None


def log_compile(model: nn.Module, record: dict) -> None:
    """Add one compilation's record to `model`'s log (compile_log)."""
    if COMPILE_LOG_ATTR not in model.__dict__:
        setattr(model, COMPILE_LOG_ATTR, [])
    getattr(model, COMPILE_LOG_ATTR).append(record)


def compile_log(model: nn.Module) -> list[dict]:
    """One record per compiled shape: batch, cache tokens, and the wall time of its first call (compilation plus one step), seconds."""
    return list(getattr(model, COMPILE_LOG_ATTR, None) or [])
