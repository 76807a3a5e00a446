"""Reading and editing units: `capture` the activations at named hook points, `edit` units with a `UnitEdit`.

The mechanism (named `HookPoint`s in every model, thread-local scoped hooks, which token each row
predicts) is `iarmem_core.models.hook_points`; this module is what the analysis does with it.

- ``capture(model, fn, names=UNITS)`` calls ``fn(block, acts_BTU, info)`` at every matched point;
  names are glob patterns over the canonical names, as in TransformerLens: ``UNITS`` =
  ``("blocks.*.mlp.hook_post",)`` (the units), ``PRE`` = the pre-activations, ``"blocks.3.mlp.hook_post"``
  one block.
- ``edit(model, UnitEdit(units={block: (unit, ...)}, op, factor))`` applies an edit to every forward
  inside the block, in this thread only; a shared model object is never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from iarmem_core.models.hook_points import CallInfo, HookPoint, active, hook_points, match_names, observe

__all__ = [
    "CFG_HALVES",
    "EDIT_OPS",
    "PRE",
    "UNITS",
    "CallInfo",
    "UnitEdit",
    "active",
    "capture",
    "edit",
    "match_unit_names",
    "unit_names",
]

UNITS = ("blocks.*.mlp.hook_post",)  # the units: input channels of the MLP output projection, [B, T, U]
PRE = ("blocks.*.mlp.hook_pre",)  # their pre-activations (fc1 / w1 outputs)

CaptureFn = Callable[[int, torch.Tensor, CallInfo | None], None]


def match_unit_names(model: nn.Module) -> frozenset[str]:
    """The names of every unit hook point of `model` (``UNITS``), for `active`."""
    return match_names(model, UNITS)


def unit_names(blocks: Sequence[int], kind: str = "post") -> tuple[str, ...]:
    """Hook names of the units (``kind="post"``) or pre-activations (``"pre"``) of `blocks`."""
    return tuple(f"blocks.{int(b)}.mlp.hook_{kind}" for b in blocks)


@contextmanager
def capture(model: nn.Module, fn: CaptureFn, names: Sequence[str] | str = UNITS) -> Iterator[None]:
    """Call ``fn(block, acts_BTU, info)`` with the live value at each hook point matched by `names`.

    The tensor is the live activation: reduce it inside `fn`, do not keep it (rule 2 of ARCHITECTURE.md).
    With a CFG-doubled batch the first half of dim 0 is the conditional half (see ``info.cfg_doubled``).
    """

    with observe(model, names, fn):
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

    kind = "pre" if spec.op == "fc1_scale" else "post"
    names = frozenset(f"blocks.{b}.mlp.hook_{kind}" for b in spec.units)
    with active(model, names, _pre if spec.op == "fc1_scale" else _post):
        yield
