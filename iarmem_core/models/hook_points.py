"""The hook mechanism: named identity points in every model, and scoped, thread-local hooks on them.

Every model in `iarmem_core.models` places two `HookPoint` identity modules in each MLP:

- ``blocks.{i}.mlp.hook_pre``:  the pre-activation (VAR/RAR: ``fc1(x)``; LlamaGen: the gate ``w1(x)``)
- ``blocks.{i}.mlp.hook_post``: the *unit* activations, i.e. the input of the MLP output projection
  (VAR/RAR: ``GELU(fc1 x)``; LlamaGen: ``silu(w1 x) * w3 x``), shape ``[B, T, U]``.

A HookPoint has no parameters (state dicts are unchanged) and costs one ContextVar read when no hook
is active. Active hooks live in a ContextVar, not on the module: a model object shared by several
threads (Streamlit sessions) only ever sees the hooks of the thread that entered the ``with`` block,
and the hooks vanish on exit, also when an exception is raised inside.

Each model forward declares which *token* every sequence row predicts (`call_scope`): row t of the
current call predicts token ``target_index[t]`` of the flattened token sequence (-1: predicts none,
e.g. RAR's class-token row). Teacher forcing covers all rows at once; KV-cache generation covers one
scale (VAR) or one token (next-token) per call, and with CFG the batch is ``[cond; uncond]``.

This module is the mechanism only; what is done at the points (capture, unit edits) lives in
`iarmem_core.hooks`.

Shape letters used in tensor names across iarmem: B batch (images or sequences), T rows of one forward
call (sequence positions), N flat tokens of an image, U units of a block, L blocks (layers), G position
groups, K top images, S scale groups, V vocabulary (or views, as noted), C channels, H W height width.
"""

from __future__ import annotations

import contextvars
import fnmatch
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "CallInfo",
    "HookFn",
    "HookPoint",
    "active",
    "bind_hook_points",
    "call_scope",
    "current_call",
    "hook_points",
    "match_names",
    "observe",
    "owner_of",
]

_owner_ids = itertools.count(1)


@dataclass(frozen=True)
class CallInfo:
    """What the current forward call covers."""

    target_index: torch.Tensor  # [T] long: token index predicted by each row, -1 for none
    cfg_doubled: bool = False  # the batch is [cond; uncond] (classifier-free guidance)
    mode: str = "teacher"  # "teacher" (whole sequence) or "generate" (one KV-cache step)


_CALL: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("iarmem_call", default=None)
_ACTIVE: contextvars.ContextVar[tuple[_Hook, ...]] = contextvars.ContextVar("iarmem_hooks", default=())


def current_call() -> CallInfo | None:
    """The CallInfo of the forward call in progress in this thread, or None outside any model call."""
    return _CALL.get()


@contextmanager
def call_scope(target_index: torch.Tensor, cfg_doubled: bool = False, mode: str = "teacher") -> Iterator[None]:
    """Declare, for the duration of one model forward, which token each sequence row predicts."""
    token = _CALL.set(CallInfo(target_index, cfg_doubled, mode))
    try:
        yield
    finally:
        _CALL.reset(token)


class HookPoint(nn.Module):
    """Identity at a capturable value. `bind_hook_points` gives it its canonical name and owner."""

    def __init__(self) -> None:
        super().__init__()
        self.hook_name = ""  # e.g. "blocks.3.mlp.hook_post", set by bind_hook_points
        self.block = -1
        self.kind = ""  # "pre" or "post"
        self.owner = 0  # id of the model that owns this point
        # Bias of the linear layer whose output this point sees (pre-activation points only), used by
        # the fc1-row edit. Stored outside nn.Module's registry so the state dict is unchanged.
        object.__setattr__(self, "_bias_fn", lambda: None)

    def set_bias_source(self, linear: nn.Linear) -> None:
        object.__setattr__(self, "_bias_fn", lambda: linear.bias)

    def bias(self) -> torch.Tensor | None:
        return self._bias_fn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hooks = _ACTIVE.get()
        if not hooks:
            return x
        info = _CALL.get()
        for hook in hooks:
            if hook.owner == self.owner and self.hook_name in hook.names:
                out = hook.fn(self, x, info)
                if out is not None:
                    x = out
        return x

    def extra_repr(self) -> str:
        return self.hook_name


def bind_hook_points(model: nn.Module, block_of: Callable[[str], tuple[int, str]]) -> int:
    """Name every HookPoint of `model` canonically and stamp it with a fresh owner id.

    `block_of(module_path)` maps a HookPoint's module path to (block index, "pre" | "post").
    Returns the owner id (also stored as ``model._iarmem_owner``).
    """
    owner = next(_owner_ids)
    for path, mod in model.named_modules():
        if isinstance(mod, HookPoint):
            block, kind = block_of(path)
            mod.block, mod.kind, mod.owner = block, kind, owner
            mod.hook_name = f"blocks.{block}.mlp.hook_{kind}"
    object.__setattr__(model, "_iarmem_owner", owner)
    return owner


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """Canonical name -> HookPoint for a bound model."""
    return {m.hook_name: m for m in model.modules() if isinstance(m, HookPoint) and m.hook_name}


def owner_of(model: nn.Module) -> int:
    """The owner id that `bind_hook_points` stamped on `model` (TypeError if it has none)."""
    owner = getattr(model, "_iarmem_owner", 0)
    if not owner:
        raise TypeError(f"{type(model).__name__} has no bound hook points (call bind_hook_points in its __init__)")
    return owner


def match_names(model: nn.Module, patterns: Sequence[str] | str) -> frozenset[str]:
    """The hook names of `model` matched by glob `patterns` (e.g. ``"blocks.*.mlp.hook_post"``).

    A pattern that matches nothing is an error that lists the names there are.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    names = hook_points(model)
    out: set[str] = set()
    for p in patterns:
        got = fnmatch.filter(names, p)
        if not got:
            some = ", ".join(sorted(names)[:4])
            raise KeyError(f"no hook point of {type(model).__name__} matches {p!r} (names look like {some}, ...)")
        out.update(got)
    return frozenset(out)


HookFn = Callable[[HookPoint, torch.Tensor, CallInfo | None], torch.Tensor | None]


@dataclass(frozen=True)
class _Hook:
    owner: int
    names: frozenset[str]
    fn: HookFn


@contextmanager
def active(model: nn.Module, names: frozenset[str], fn: HookFn) -> Iterator[None]:
    """Call ``fn(point, x, info)`` at the named points of `model` inside the block (this thread only).

    A non-None return value replaces the value flowing through the point. Hooks are removed on exit,
    also when an exception is raised inside.
    """
    token = _ACTIVE.set(_ACTIVE.get() + (_Hook(owner_of(model), frozenset(names), fn),))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def observe(
    model: nn.Module, patterns: Sequence[str] | str, fn: Callable[[int, torch.Tensor, CallInfo | None], None]
) -> Iterator[None]:
    """Call ``fn(block, x, info)`` with the value at every point matched by `patterns` (read only)."""

    def _fn(hp: HookPoint, x: torch.Tensor, info: CallInfo | None) -> None:
        fn(hp.block, x, info)

    with active(model, match_names(model, patterns), _fn):
        yield
