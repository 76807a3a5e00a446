"""The architecture, enforced: no forbidden import between layers (layers.toml), and no import cycle."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RULES = tomllib.loads((ROOT / "layers.toml").read_text())
SOURCES = ["app.py", "app_pages", "iarmem_app", "iarmem_core"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, prefixes in RULES["layers"].items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = layer, len(p)
    return best


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, module-level?) for every import in the file, function-local ones and
    importlib.import_module("...") / __import__("...") string literals included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        level0 = id(node) in top
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, level0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, node.lineno, level0))
            out += [(f"{base}.{a.name}", node.lineno, level0) for a in node.names]  # submodules imported by name
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                out.append((node.args[0].value, node.lineno, False))
    return out


def files() -> list[Path]:
    out = []
    for s in SOURCES:
        p = ROOT / s
        out += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return out


def known_modules() -> set[str]:
    return {module_name(f) for f in files()}


def test_every_module_has_a_layer():
    missing = sorted(m for m in known_modules() if layer_of(m) is None)
    assert not missing, f"modules without a layer in layers.toml: {missing}"


def test_no_forbidden_import():
    known = known_modules()
    bad = []
    for f in files():
        src = layer_of(module_name(f))
        for target, line, _ in imports_of(f):
            if target not in known:
                continue
            dst = layer_of(target)
            if dst in RULES["forbidden"].get(src, []):
                bad.append(f"{f.relative_to(ROOT)}:{line}: {src} imports {target} ({dst})")
    assert not bad, "forbidden imports (see layers.toml):\n" + "\n".join(bad)


def test_the_rules_catch_a_function_local_import_and_an_importlib_string(tmp_path):
    # the checker itself: a models-layer file that imports analysis inside a function and by string
    f = ROOT / "iarmem_core" / "models" / "_layer_probe_tmp.py"
    f.write_text(
        "def f():\n    from iarmem_core import unitmem\n    import importlib\n"
        "    importlib.import_module('iarmem_core.cli')\n"
    )
    try:
        found = {(t, layer_of(t)) for t, _, _ in imports_of(f)}
        assert ("iarmem_core.unitmem", "analysis") in found and ("iarmem_core.cli", "face") in found
        assert layer_of(module_name(f)) == "models"
    finally:
        f.unlink()


def test_no_import_cycle():
    """Module-level imports form no cycle (a package's __init__ re-exporting its submodules is not one)."""
    known = known_modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for f in files():
        m = module_name(f)
        for target, _, level0 in imports_of(f):
            if level0 and target in known and target != m and not m.startswith(target + "."):
                graph[m].add(target)
    # a submodule importing its own package's __init__ is how Python packages work; drop parent edges
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"
