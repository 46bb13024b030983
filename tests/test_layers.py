"""The package's folders are its layers; imports point down only and close no cycle.

Every import is parsed (function-local ones included), so a lazy import cannot hide an upward
dependency. Order, bottom to top (same-rank packages may not import each other):
    errors < core < models < data < runs < training < analysis < {results, sweeps} < cli < linft/__init__
"""
import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "linft"
RANK = {"errors": 0, "core": 1, "models": 2, "data": 3, "runs": 4, "training": 5, "analysis": 6,
        "results": 7, "sweeps": 7, "cli": 8, "__init__": 9, "__main__": 9}
ALLOWED_IN_CORE = {"torch"} | set(sys.stdlib_module_names)


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module named by an import in the file (absolute names)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from linft.cli import data` names the module linft.cli.data (and runs linft.cli's
            # __init__, which is not an edge: a package may re-export what lies below it)
            out |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        imports = _imports(path)
        for imp in imports:
            submodule_of_package = any(i.startswith(imp + ".") and i in mods for i in imports)
            if imp in mods and imp != name and not submodule_of_package:
                deps.add(imp)
        graph[name] = deps
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_module_belongs_to_a_known_layer():
    unknown = sorted(m for m in _graph() if _layer(m) not in RANK)
    assert not unknown, f"modules outside the layer map: {unknown}"


def test_no_import_points_up_a_layer():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            a, b = _layer(mod), _layer(dep)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports that point up (or sideways) a layer:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    graph = _graph()
    # package __init__ re-exports are edges too; a cycle is a strongly connected component of size > 1
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not comps, f"import cycles: {comps}"


def test_core_imports_torch_and_the_standard_library_only():
    for path in (PKG / "core").rglob("*.py"):
        for imp in _imports(path):
            top = imp.split(".")[0]
            assert top in ALLOWED_IN_CORE or imp.startswith(("linft.core", "linft.errors")), (path.name, imp)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_curated_api_resolves_lazily():
    import subprocess
    import sys as _sys
    code = ("import sys, linft; assert 'torch' not in sys.modules, 'import linft pulled in torch'; "
            "[getattr(linft, n) for n in linft.__all__]; print('ok')")
    out = subprocess.run([_sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
