"""Hook mechanics on a toy module: scoping, thread isolation, exception safety, edit semantics."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from iarmem_core import hooks
from iarmem_core.models import hook_points


class ToyMLP(nn.Module):
    def __init__(self, d=4, u=6):
        super().__init__()
        self.fc1 = nn.Linear(d, u)
        self.hook_pre = hook_points.HookPoint()
        self.act = nn.GELU(approximate="tanh")
        self.hook_post = hook_points.HookPoint()
        self.fc2 = nn.Linear(u, d)
        self.hook_pre.set_bias_source(self.fc1)

    def forward(self, x):
        return self.fc2(self.hook_post(self.act(self.hook_pre(self.fc1(x)))))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.ModuleDict({"mlp": ToyMLP()}) for _ in range(2)])
        hook_points.bind_hook_points(self, lambda p: (int(p.split(".")[1]), p.rsplit("_", 1)[1]))

    def forward(self, x):
        with hook_points.call_scope(torch.arange(x.shape[1])):
            for b in self.blocks:
                x = x + b["mlp"](x)
        return x


def test_names_and_state_dict_unchanged():
    m = Toy()
    assert sorted(hook_points.hook_points(m)) == [f"blocks.{i}.mlp.hook_{k}" for i in range(2) for k in ("post", "pre")]
    assert not any("hook" in k for k in m.state_dict())


def test_capture_sees_units_and_positions_and_is_removed():
    m, x = Toy(), torch.randn(3, 5, 4)
    seen = {}
    with hooks.capture(m, lambda b, a, info: seen.setdefault(b, (a.clone(), info.target_index.clone()))):
        m(x)
    assert set(seen) == {0, 1}
    a0, pos = seen[0]
    ref = m.blocks[0]["mlp"].act(m.blocks[0]["mlp"].fc1(x))
    torch.testing.assert_close(a0, ref)
    assert pos.tolist() == [0, 1, 2, 3, 4]
    seen.clear()
    m(x)
    assert seen == {}


def test_fc1_scale_edit_equals_weight_edit_and_is_undone():
    m, x = Toy(), torch.randn(2, 3, 4)
    base = m(x)
    spec = hooks.UnitEdit(units={1: [0, 2]}, op="fc1_scale", factor=0.5)
    with hooks.edit(m, spec):
        edited = m(x)
    ref = Toy()
    with torch.no_grad():
        ref.blocks[1]["mlp"].fc1.weight[[0, 2]] *= 0.5
    torch.testing.assert_close(edited, ref(x))
    assert not torch.allclose(edited, base)
    torch.testing.assert_close(m(x), base)


def test_zero_and_out_scale():
    m, x = Toy(), torch.randn(2, 3, 4)
    got = {}
    with (
        hooks.edit(m, hooks.UnitEdit(units={0: [1]}, op="zero")),
        hooks.capture(m, lambda b, a, i: got.setdefault(b, a.clone()), names="blocks.0.mlp.hook_post"),
    ):
        m(x)
    assert torch.all(got[0][..., 1] == 0) and torch.any(got[0][..., 0] != 0)
    got.clear()
    with hooks.capture(m, lambda b, a, i: got.setdefault("plain", a.clone()), names="blocks.0.mlp.hook_post"):
        m(x)
    with (
        hooks.edit(m, hooks.UnitEdit(units={0: [1]}, op="out_scale", factor=0.25)),
        hooks.capture(m, lambda b, a, i: got.setdefault("scaled", a.clone()), names="blocks.0.mlp.hook_post"),
    ):
        m(x)
    torch.testing.assert_close(got["scaled"][..., 1], got["plain"][..., 1] * 0.25)


def test_exception_inside_removes_edit():
    m, x = Toy(), torch.randn(2, 3, 4)
    base = m(x)
    with pytest.raises(RuntimeError):
        with hooks.edit(m, hooks.UnitEdit(units={0: [0, 1, 2]}, op="zero")):
            raise RuntimeError("boom")
    torch.testing.assert_close(m(x), base)


def test_cfg_half_only_edits_that_half():
    m = Toy()
    x = torch.randn(1, 3, 4).repeat(2, 1, 1)  # [cond; uncond] with equal inputs

    def fwd():
        with hook_points.call_scope(torch.arange(3), cfg_doubled=True):
            h = x
            for b in m.blocks:
                h = h + b["mlp"](h)
        return h

    with hooks.edit(m, hooks.UnitEdit(units={0: [0, 1, 2, 3]}, op="zero", cfg_half="uncond")):
        out = fwd()
    torch.testing.assert_close(out[0], m(x[:1])[0])
    assert not torch.allclose(out[0], out[1])


def test_edit_in_one_thread_is_invisible_in_another():
    m, x = Toy(), torch.randn(2, 3, 4)
    base = m(x)
    inside, release, result = threading.Event(), threading.Event(), {}

    def editor():
        with hooks.edit(m, hooks.UnitEdit(units={0: list(range(6)), 1: list(range(6))}, op="zero")):
            result["edited"] = m(x)
            inside.set()
            release.wait(5)

    t = threading.Thread(target=editor)
    t.start()
    inside.wait(5)
    result["other"] = m(x)  # runs while the other thread is inside its edit
    release.set()
    t.join()
    torch.testing.assert_close(result["other"], base)
    assert not torch.allclose(result["edited"], base)


def test_edit_spec_roundtrip_and_validation():
    spec = hooks.UnitEdit(units={3: [5, 1, 5]}, op="out_scale", factor=0.3, cfg_half="cond")
    assert spec.units == {3: (1, 5)} and spec.n_units == 2
    assert hooks.UnitEdit.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError):
        hooks.UnitEdit(units={0: [1]}, op="bogus")
    with pytest.raises(ValueError):
        hooks.UnitEdit(units={0: [1]}, factor=1.5)


# ---------------------------------------------------------------------------------------------------
# batched edits: one edit per batch row
def _one_edit_path(m, x, edits_per_row, cfg_doubled=False):
    """The one-edit path at the same batch composition: the whole batch under each row's UnitEdit, keeping
    that row (a linear layer's rows are not bit-stable across batch sizes, so the batch is kept)."""
    out = torch.empty_like(x)
    B = len(edits_per_row)
    for b, e in enumerate(edits_per_row):
        with hooks.edit(m, e):
            h = _fwd(m, x, cfg_doubled)
        out[b] = h[b]
        if cfg_doubled:
            out[B + b] = h[B + b]
    return out


def _fwd(m, x, cfg_doubled=False):
    with hook_points.call_scope(torch.arange(x.shape[1]), cfg_doubled=cfg_doubled):
        h = x
        for blk in m.blocks:
            h = h + blk["mlp"](h)
    return h


def test_batched_edit_equals_each_row_under_its_own_edit_bit_for_bit():
    m = Toy()
    edits = [
        hooks.UnitEdit(units={1: [0, 2]}, op="fc1_scale", factor=0.5),
        hooks.UnitEdit(units={0: [1, 3, 5], 1: [4]}, op="fc1_scale", factor=0.3),
        hooks.UnitEdit(units={0: [2]}, op="zero"),
        hooks.UnitEdit(units={1: [1, 5]}, op="out_scale", factor=0.25),
    ]
    row_edit = (0, 1, -1, 2, 3, 1, 0)  # 7 rows, one unedited, edits repeated
    x = torch.randn(len(row_edit), 3, 4)
    want = _one_edit_path(m, x, [edits[r] if r >= 0 else None for r in row_edit])
    with hooks.edit(m, hooks.BatchedEdit(tuple(edits), row_edit)):
        got = _fwd(m, x)
    assert torch.equal(got, want)
    # and the fc1 edit equals editing the weights
    ref = Toy()
    with torch.no_grad():
        ref.blocks[1]["mlp"].fc1.weight[[0, 2]] *= 0.5
    torch.testing.assert_close(got[0], _fwd(ref, x)[0])
    # outside the block nothing is edited
    assert torch.equal(_fwd(m, x), _fwd(Toy(), x))


def test_batched_edit_on_cfg_doubled_batches_follows_each_edits_half():
    m = Toy()
    edits = (
        hooks.UnitEdit(units={0: [0, 1, 2, 3]}, op="zero", cfg_half="uncond"),
        hooks.UnitEdit(units={1: [1, 2]}, op="fc1_scale", factor=0.5, cfg_half="cond"),
        hooks.UnitEdit(units={0: [5]}, op="out_scale", factor=0.5),
    )
    row_edit = (2, 0, 1, -1)
    x = torch.randn(2 * len(row_edit), 3, 4)  # [cond (4 rows); uncond (4 rows)]
    want = _one_edit_path(m, x, [edits[r] if r >= 0 else None for r in row_edit], cfg_doubled=True)
    with hooks.edit(m, hooks.BatchedEdit(edits, row_edit)):
        got = _fwd(m, x, cfg_doubled=True)
        with pytest.raises(ValueError, match="BatchedEdit of 4 rows met a batch of 3 rows"):
            _fwd(m, x[:3])
    assert torch.equal(got, want)
    # row 1's edit is uncond-only: its conditional row is untouched, its unconditional row is edited
    plain = _fwd(Toy(), x, cfg_doubled=True)
    assert torch.equal(got[1], plain[1]) and not torch.equal(got[5], plain[5])


def test_batched_edit_values_and_slices():
    e = hooks.UnitEdit(units={0: [1]}, op="zero")
    be = hooks.BatchedEdit.tiled([e, None, hooks.UnitEdit()], rows_per_edit=3)
    assert be.row_edit == (0, 0, 0, 1, 1, 1, 2, 2, 2) and be.edits == (e, None, None)
    assert be.n_rows == 9 and be.n_units == 1
    assert be.rows(3, 9).n_units == 0 and be.rows(2, 4).row_edit == (0, 1)
    with pytest.raises(IndexError, match="names edit 3"):
        hooks.BatchedEdit((e,), (0, 3))
    m = Toy()
    with pytest.raises(IndexError, match="block 7"):
        with hooks.edit(m, hooks.BatchedEdit((hooks.UnitEdit(units={7: [0]}),), (0,))):
            pass
