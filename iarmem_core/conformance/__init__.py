"""Conformance runner: recompute every tensor of an official golden folder with our models.

A golden folder (laid out like ../shared/golden/{var,rar,llamagen}) holds ``config.json`` (the official
constructor arguments and one entry per golden tensor), the official tiny state dicts and
``golden.pt``. `run` builds our models from that config, loads the state dicts strictly, recomputes
every listed tensor and compares: ids exactly, floats within 1e-4 (abs and rel). A listed tensor that
the family module does not produce is a failure, never a skip.

Each family module (``conformance/var.py``, ``rar.py``, ``llamagen.py``) exposes
``compute(golden_dir: Path, config: dict, golden: dict) -> dict[str, Tensor | list[Tensor]]``.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import torch

ATOL = 1e-4
RTOL = 1e-4
_FAMILY_MODULES = {"var": "var", "rar": "rar", "llamagen": "llamagen"}


def compare(ours: object, ref: object) -> dict:
    """{'ok', 'max_abs_err' | 'exact'} for a tensor or a list of tensors."""
    if isinstance(ref, (list, tuple)):
        if not isinstance(ours, (list, tuple)) or len(ours) != len(ref):
            n = len(ours) if isinstance(ours, (list, tuple)) else type(ours).__name__
            return {"ok": False, "error": f"expected a list of {len(ref)} tensors, got {n}"}
        parts = [compare(o, r) for o, r in zip(ours, ref)]
        out: dict = {"ok": all(p["ok"] for p in parts)}
        if all("exact" in p for p in parts):
            out["exact"] = all(p["exact"] for p in parts)
        else:
            out["max_abs_err"] = max(p.get("max_abs_err", math.inf) for p in parts)
        errs = [p["error"] for p in parts if "error" in p]
        if errs:
            out["error"] = errs[0]
        return out
    if not isinstance(ref, torch.Tensor):
        ref = torch.as_tensor(ref)
    if not isinstance(ours, torch.Tensor):
        ours = torch.as_tensor(ours)
    ours = ours.detach().cpu()
    if tuple(ours.shape) != tuple(ref.shape):
        return {"ok": False, "error": f"shape {list(ours.shape)} != golden {list(ref.shape)}"}
    if not ref.is_floating_point():
        exact = bool(torch.equal(ours.to(ref.dtype), ref))
        return {"ok": exact, "exact": exact, "mismatches": int((ours.to(ref.dtype) != ref).sum())}
    o, r = ours.double(), ref.double()
    err = float((o - r).abs().max()) if r.numel() else 0.0
    ok = bool(torch.allclose(o, r, atol=ATOL, rtol=RTOL)) and math.isfinite(err)
    return {"ok": ok, "max_abs_err": err}


def run(golden_dir: str | Path) -> dict:
    """Check every tensor listed in ``config.json["tensors"]``; returns the JSON-able report."""
    gdir = Path(golden_dir)
    cfg_path = gdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: not found; give a golden folder laid out like ../shared/golden/var")
    config = json.loads(cfg_path.read_text())
    family = str(config.get("family", "")).lower()
    if family not in _FAMILY_MODULES:
        raise ValueError(f"{cfg_path}: unknown family {config.get('family')!r}; expected VAR, RAR or LlamaGen")
    golden = torch.load(gdir / "golden.pt", map_location="cpu", weights_only=True)
    mod = importlib.import_module(f"iarmem_core.conformance.{_FAMILY_MODULES[family]}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    computed = mod.compute(gdir, config, golden)
    listed = config.get("tensors", {})
    report: dict = {"family": family, "golden_dir": str(gdir), "tensors": {}}
    for name in listed:
        if name not in golden:
            report["tensors"][name] = {"ok": False, "error": "listed in config.json but absent from golden.pt"}
        elif name not in computed:
            report["tensors"][name] = {"ok": False, "error": "not checked: no rule to recompute this tensor"}
        else:
            report["tensors"][name] = compare(computed[name], golden[name])
    report["n_checked"] = sum(1 for v in report["tensors"].values() if "error" not in v or v["ok"])
    report["n_listed"] = len(listed)
    report["all_ok"] = bool(listed) and all(v["ok"] for v in report["tensors"].values())
    return report
