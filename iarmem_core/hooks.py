"""Unit hooks: one naming scheme over VAR, RAR and LlamaGen, scoped by context managers.

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
Position groups (`IARAdapter.position_groups`) are sets of token indices in this same space.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "CallInfo",
    "HookPoint",
    "UnitEdit",
    "bind_hook_points",
    "call_scope",
    "capture",
    "current_call",
    "edit",
    "hook_points",
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
        active = _ACTIVE.get()
        if not active:
            return x
        info = _CALL.get()
        for hook in active:
            if hook.owner == self.owner and hook.kind == self.kind and self.block in hook.blocks:
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


def _owner_of(model: nn.Module) -> int:
    owner = getattr(model, "_iarmem_owner", 0)
    if not owner:
        raise TypeError(f"{type(model).__name__} has no bound hook points (call bind_hook_points in its __init__)")
    return owner


@dataclass(frozen=True)
class _Hook:
    owner: int
    kind: str
    blocks: frozenset[int]
    fn: Callable[[HookPoint, torch.Tensor, CallInfo | None], torch.Tensor | None]


@contextmanager
def _activate(hooks: Sequence[_Hook]) -> Iterator[None]:
    token = _ACTIVE.set(_ACTIVE.get() + tuple(hooks))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


CaptureFn = Callable[[int, torch.Tensor, CallInfo | None], None]


@contextmanager
def capture(model: nn.Module, fn: CaptureFn, blocks: Sequence[int] | None = None, kind: str = "post") -> Iterator[None]:
    """Call ``fn(block, acts_BTU, info)`` with the unit activations of each selected block.

    ``kind="post"`` gives the units (fc2 input), ``"pre"`` the pre-activations. The tensor is the live
    activation: reduce it inside `fn`, do not keep it (rule 2 of ARCHITECTURE.md). With a CFG-doubled
    batch the first half of dim 0 is the conditional half (see ``info.cfg_doubled``).
    """
    owner = _owner_of(model)
    all_blocks = {hp.block for hp in hook_points(model).values()}
    sel = frozenset(all_blocks if blocks is None else blocks)

    def _fn(hp: HookPoint, x: torch.Tensor, info: CallInfo | None) -> None:
        fn(hp.block, x, info)

    with _activate([_Hook(owner, kind, sel, _fn)]):
        yield


EDIT_OPS = ("fc1_scale", "zero", "out_scale")
CFG_HALVES = ("both", "cond", "uncond")


@dataclass(frozen=True)
class UnitEdit:
    """A serialisable edit of units: ``units`` maps block -> unit indices.

    - ``fc1_scale``: multiply the units' fc1 weight rows by ``factor``, biases unchanged (the paper's
      edit; LlamaGen: the rows of the gate projection w1, which has no bias). Applied as
      ``pre = factor * (pre - b) + b`` on the pre-activation, which equals editing the weights but never
      touches the shared parameters.
    - ``zero``: the unit's output is 0.
    - ``out_scale``: the unit's output (the fc2 input column) is multiplied by ``factor``.

    ``cfg_half`` restricts the edit to the conditional or unconditional half of a CFG-doubled batch;
    calls without CFG are always edited.
    """

    units: dict[int, tuple[int, ...]] = field(default_factory=dict)
    op: str = "fc1_scale"
    factor: float = 0.5
    cfg_half: str = "both"

    def __post_init__(self) -> None:
        if self.op not in EDIT_OPS:
            raise ValueError(f"unknown edit op {self.op!r}: expected one of {EDIT_OPS}")
        if self.cfg_half not in CFG_HALVES:
            raise ValueError(f"unknown cfg_half {self.cfg_half!r}: expected one of {CFG_HALVES}")
        if not 0.0 <= float(self.factor) <= 1.0 and self.op != "zero":
            raise ValueError(f"edit factor must be in [0, 1], got {self.factor}")
        norm = {int(b): tuple(sorted({int(u) for u in us})) for b, us in self.units.items() if len(us)}
        object.__setattr__(self, "units", norm)

    @property
    def n_units(self) -> int:
        return sum(len(u) for u in self.units.values())

    def to_dict(self) -> dict:
        return {
            "units": {str(b): list(u) for b, u in sorted(self.units.items())},
            "op": self.op,
            "factor": float(self.factor),
            "cfg_half": self.cfg_half,
        }

    @classmethod
    def from_dict(cls, d: dict) -> UnitEdit:
        return cls(
            units={int(b): tuple(u) for b, u in d.get("units", {}).items()},
            op=d.get("op", "fc1_scale"),
            factor=float(d.get("factor", 0.5)),
            cfg_half=d.get("cfg_half", "both"),
        )


def _rows(x: torch.Tensor, info: CallInfo | None, cfg_half: str) -> slice:
    if cfg_half == "both" or info is None or not info.cfg_doubled:
        return slice(None)
    half = x.shape[0] // 2
    return slice(0, half) if cfg_half == "cond" else slice(half, None)


@contextmanager
def edit(model: nn.Module, spec: UnitEdit | None) -> Iterator[None]:
    """Apply `spec` to every forward of `model` inside the block (this thread only); no-op for None."""
    if spec is None or spec.n_units == 0:
        yield
        return
    owner = _owner_of(model)
    points = hook_points(model)
    idx_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
    for b in spec.units:
        if f"blocks.{b}.mlp.hook_post" not in points:
            raise IndexError(f"edit names block {b}, but the model has blocks 0..{len(points) // 2 - 1}")

    def _index(block: int, device: torch.device) -> torch.Tensor:
        key = (block, device)
        if key not in idx_cache:
            idx_cache[key] = torch.tensor(spec.units[block], dtype=torch.long, device=device)
        return idx_cache[key]

    f = float(spec.factor)

    def _pre(hp: HookPoint, x: torch.Tensor, info: CallInfo | None) -> torch.Tensor:
        idx = _index(hp.block, x.device)
        rows = _rows(x, info, spec.cfg_half)
        x = x.clone()
        sel = x[rows][..., idx]
        bias = hp.bias()
        if bias is None:
            new = sel * f
        else:
            b = bias[idx].to(x.dtype)
            new = (sel - b) * f + b
        x[rows, ..., idx] = new
        return x

    def _post(hp: HookPoint, x: torch.Tensor, info: CallInfo | None) -> torch.Tensor:
        idx = _index(hp.block, x.device)
        rows = _rows(x, info, spec.cfg_half)
        x = x.clone()
        x[rows, ..., idx] = 0.0 if spec.op == "zero" else x[rows][..., idx] * f
        return x

    blocks = frozenset(spec.units)
    hook = _Hook(owner, "pre", blocks, _pre) if spec.op == "fc1_scale" else _Hook(owner, "post", blocks, _post)
    with _activate([hook]):
        yield
