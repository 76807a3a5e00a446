"""Reading and editing units: `capture` the activations at named hook points, `edit` units with a `UnitEdit`.

The mechanism (named `HookPoint`s in every model, thread-local scoped hooks, which token each row
predicts) is `iarmem_core.models.hook_points`; this module is what the analysis does with it.

- ``capture(model, fn, names=UNITS)`` calls ``fn(block, acts_BTU, info)`` at every matched point;
  names are glob patterns over the canonical names, as in TransformerLens: ``UNITS`` =
  ``("blocks.*.mlp.hook_post",)`` (the units), ``PRE`` = the pre-activations, ``"blocks.3.mlp.hook_post"``
  one block.
- ``edit(model, UnitEdit(units={block: (unit, ...)}, op, factor))`` applies an edit to every forward
  inside the block, in this thread only; a shared model object is never modified.
- ``edit(model, BatchedEdit(edits, row_edit))`` carries a *different* edit per batch row: row b of every
  forward inside the block gets ``edits[row_edit[b]]`` (-1: unedited). One generation pass then measures
  many edits at once (the ranked edit and its random draws, every k of a sweep). Each row's values are
  computed with the same elementwise operations as the one-edit path, so a row equals the same row run
  alone with `UnitEdit` whenever the forward itself is batch-invariant (see `BatchedEdit`).
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
    "BatchedEdit",
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


@dataclass(frozen=True)
class BatchedEdit:
    """E unit edits carried by one batch: row b of every forward gets ``edits[row_edit[b]]`` (-1: no edit).

    ``row_edit`` has one entry per batch row of the *conditional* batch (the B rows the caller passes to
    ``generate``). With a CFG-doubled call (``info.cfg_doubled``, batch ``[cond; uncond]`` of 2B rows) row b
    and row B + b are the same sample; each edit's ``cfg_half`` picks the halves it applies to, as for a
    single edit. KV-cache generation needs nothing special: every call covers one scale / token of all rows.

    Equality with the one-edit path: the edited values of row b are the same elementwise operations as
    `edit(model, edits[row_edit[b]])` (fc1_scale: ``pre = f * (pre - b) + b`` on the row's units, i.e. the
    weight edit), bit for bit. A whole generation equals the one-edit run when the transformer forward gives
    the same row values for both batch shapes: on CPU batches of 4, 8, 16, 32 rows agree in the tests, while
    e.g. 7 vs 16 rows differ in the last bits (matrix-multiply blocking), which can flip a greedy argmax.
    Random sampling draws noise by batch position, so sampled tokens of a row depend on the batch layout.

    Example:
        >>> be = BatchedEdit.tiled([ranked, rnd1, rnd2], rows_per_edit=8)   # 24 rows: 8 per edit
        >>> with edit(model, be):
        ...     tokens = adapter.generate(labels.repeat(3), ...)
    """

    edits: tuple[UnitEdit | None, ...]
    row_edit: tuple[int, ...]

    def __post_init__(self) -> None:
        edits = tuple(None if e is None or e.n_units == 0 else e for e in self.edits)
        rows = tuple(int(r) for r in self.row_edit)
        bad = [r for r in rows if not -1 <= r < len(edits)]
        if bad:
            raise IndexError(f"row_edit names edit {bad[0]}, but there are {len(edits)} edits (-1 = none)")
        for e in edits:
            if e is not None and not isinstance(e, UnitEdit):
                raise TypeError(f"BatchedEdit.edits holds UnitEdit values or None, got {type(e).__name__}")
        object.__setattr__(self, "edits", edits)
        object.__setattr__(self, "row_edit", rows)

    @classmethod
    def tiled(cls, edits: Sequence[UnitEdit | None], rows_per_edit: int) -> BatchedEdit:
        """Rows ``[edit 0 x n, edit 1 x n, ...]``: the batch is the n items repeated once per edit."""
        n = int(rows_per_edit)
        return cls(tuple(edits), tuple(e for e in range(len(edits)) for _ in range(n)))

    @property
    def n_rows(self) -> int:
        return len(self.row_edit)

    @property
    def n_units(self) -> int:
        """Units edited in any row (0: the batch is unedited)."""
        used = {r for r in self.row_edit if r >= 0}
        return sum(self.edits[r].n_units for r in used if self.edits[r] is not None)

    def rows(self, i: int, j: int) -> BatchedEdit:
        """The edit of the sub-batch of rows [i, j) (for a batch loop over the rows)."""
        return BatchedEdit(self.edits, self.row_edit[i:j])


def _rows(x: torch.Tensor, info: CallInfo | None, cfg_half: str) -> slice:
    if cfg_half == "both" or info is None or not info.cfg_doubled:
        return slice(None)
    half = x.shape[0] // 2
    return slice(0, half) if cfg_half == "cond" else slice(half, None)


@contextmanager
def edit(model: nn.Module, spec: UnitEdit | BatchedEdit | None) -> Iterator[None]:
    """Apply `spec` to every forward of `model` inside the block (this thread only); no-op for None.

    `spec` is one `UnitEdit` for every row, or a `BatchedEdit` with one edit per batch row.
    """
    if spec is None or spec.n_units == 0:
        yield
        return
    if isinstance(spec, BatchedEdit):
        with _batched_edit(model, spec):
            yield
        return
    points = hook_points(model)
    idx_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
    _check_blocks(points, spec.units)

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


def _check_blocks(points: dict, blocks) -> None:
    for b in blocks:
        if f"blocks.{b}.mlp.hook_post" not in points:
            raise IndexError(f"edit names block {b}, but the model has blocks 0..{len(points) // 2 - 1}")


class _RowUnits:
    """Per block and hook kind: the units each row of a BatchedEdit edits, as a padded index [R, K] (K = the
    most units any row edits in that block), with its factor and op per row; built on demand per (device,
    doubled) and cached for the duration of the `edit` block.

    Only the K selected columns are read and written (a gather and a scatter), so a batch costs about what
    the one-edit path costs, not a pass over all units. A row with fewer than K units repeats its own first
    unit (the same value is written twice); a row without an edit in this block points at unit 0 and writes
    its own value back (`keep`)."""

    def __init__(self, spec: BatchedEdit):
        self.spec = spec
        self.cache: dict[tuple, tuple | None] = {}

    def get(self, block: int, kind: str, device: torch.device, doubled: bool):
        """(idx [R, K] long, keep [R, 1] bool, factor [R] float32, zero [R] bool) for R = B (2B doubled), or
        None when no row edits this block at this kind."""
        key = (block, kind, device, doubled)
        if key not in self.cache:
            B = self.spec.n_rows
            halves = ("cond", "uncond") if doubled else (None,)
            rows: list[tuple[int, ...]] = []
            factor = torch.ones(len(halves) * B, dtype=torch.float32)
            zero = torch.zeros(len(halves) * B, dtype=torch.bool)
            for h, half in enumerate(halves):
                for b, r in enumerate(self.spec.row_edit):
                    e = self.spec.edits[r] if r >= 0 else None
                    ok = e is not None and block in e.units and (e.op == "fc1_scale") == (kind == "pre")
                    if ok and half is not None and e.cfg_half not in ("both", half):
                        ok = False
                    rows.append(e.units[block] if ok else ())
                    if ok:
                        factor[h * B + b] = float(e.factor)
                        zero[h * B + b] = e.op == "zero"
            K = max((len(u) for u in rows), default=0)
            if K == 0:
                self.cache[key] = None
            else:
                idx = torch.tensor([list(u) + [u[0]] * (K - len(u)) if u else [0] * K for u in rows], dtype=torch.long)
                keep = torch.tensor([[not u] for u in rows], dtype=torch.bool)
                self.cache[key] = (idx.to(device), keep.to(device), factor.to(device), zero.to(device))
        return self.cache[key]


@contextmanager
def _batched_edit(model: nn.Module, spec: BatchedEdit) -> Iterator[None]:
    points = hook_points(model)
    used = {r for r in spec.row_edit if r >= 0}
    edits = [spec.edits[r] for r in sorted(used) if spec.edits[r] is not None]
    for e in edits:
        _check_blocks(points, e.units)
    names: set[str] = set()
    for e in edits:
        kind = "pre" if e.op == "fc1_scale" else "post"
        for b in e.units:
            names.add(f"blocks.{b}.mlp.hook_{kind}")
    table = _RowUnits(spec)
    B = spec.n_rows

    def _fn(hp: HookPoint, x: torch.Tensor, info: CallInfo | None) -> torch.Tensor | None:
        doubled = info is not None and info.cfg_doubled
        if x.shape[0] != (2 * B if doubled else B):
            raise ValueError(
                f"a BatchedEdit of {B} rows met a batch of {x.shape[0]} rows at {hp.hook_name}"
                f"{' (CFG-doubled: expected ' + str(2 * B) + ')' if doubled else ''}: generate exactly the "
                "rows the edit was built for (BatchedEdit.rows(i, j) for a slice of them)"
            )
        got = table.get(hp.block, hp.kind, x.device, doubled)
        if got is None:
            return None
        idx, keep, factor, zero = got
        R, K = idx.shape
        shape = (R,) + (1,) * (x.ndim - 2)
        idx_x = idx.view(shape + (K,)).expand(*x.shape[:-1], K)
        sel = x.gather(-1, idx_x)
        # the same elementwise operations as the one-edit path, in the same dtype (factor in float32, as a
        # Python scalar is applied to a float32 tensor; the product is rounded to x's dtype before the bias)
        f = factor.view(shape + (1,))
        if hp.kind == "pre":
            bias = hp.bias()
            if bias is None:
                new = (sel * f).to(x.dtype)
            else:
                b = bias.to(x.dtype)[idx].view(shape + (K,))
                new = ((sel - b) * f).to(x.dtype) + b
        else:
            new = torch.where(zero.view(shape + (1,)), torch.zeros((), dtype=x.dtype, device=x.device), sel * f)
            new = new.to(x.dtype)
        new = torch.where(keep.view(shape + (1,)), sel, new)
        # x is the fresh output of the layer before the point: without autograd it is written in place
        return (x.clone() if torch.is_grad_enabled() else x).scatter_(-1, idx_x, new)

    with active(model, frozenset(names), _fn):
        yield
