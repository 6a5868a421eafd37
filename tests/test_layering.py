"""The library's import graph against ARCHITECTURE.md's layers, read with ast (nothing is imported).

launch -> engine -> {scheduler, model}; model -> kernels; scheduler imports nothing of the project.
No module circle, no private name imported from another module, no lazy import of the project in
scheduler/ (its modules form a one-way chain)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"kernels": 0, "scheduler": 1, "model": 1, "engine": 2, "launch": 3}
MAY_IMPORT = {"kernels": {"kernels"}, "scheduler": {"scheduler"}, "model": {"model", "kernels"},
              "engine": {"engine", "scheduler", "model", "kernels"}}


def modules():
    for pkg in MAY_IMPORT:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    yield name.removesuffix(".__init__"), path


def imports(name, path):
    """(imported project module, names taken from it, top level?) for each import of `name`."""
    tree = ast.parse(open(path).read())
    top = set(map(id, tree.body))
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], id(node) in top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base, [a.name for a in node.names], id(node) in top


def graph():
    mods = dict(modules())
    edges = {}
    for name, path in mods.items():
        edges[name] = []
        for target, names, top in imports(name, path):
            if target.split(".")[0] not in LAYER:
                continue
            # `from pkg import mod` imports the module pkg.mod
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            edges[name] += [(t, names if t == target else [], top) for t in (subs or [target])]
    return mods, edges


def test_no_arrow_up_the_layers_and_no_private_names():
    _, edges = graph()
    bad = []
    for src, targets in edges.items():
        pkg = src.split(".")[0]
        for dst, names, top in targets:
            if dst.split(".")[0] not in MAY_IMPORT[pkg]:
                bad.append(f"{src} -> {dst}")
            if dst != src and any(n.startswith("_") for n in names):
                bad.append(f"{src} takes private {names} from {dst}")
            if pkg == "scheduler" and not top:
                bad.append(f"{src} imports {dst} lazily")
    assert not bad, bad


def test_no_import_circle():
    mods, edges = graph()
    deps = {m: {d for d, _, _ in edges[m] if d in mods and d != m and not m.startswith(d + ".")}
            for m in mods}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(deps[m]):
            visit(d, path + [m])
        state[m] = "done"
    for m in sorted(mods):
        visit(m, [])
