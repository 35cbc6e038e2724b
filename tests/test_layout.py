"The package's layout: concerns as subpackages, imports pointing down only, pruning methods named only in pruning/."
import ast, re
from pathlib import Path
import mm_research

PKG = Path(mm_research.__file__).parent
# Ground floor, then the concerns from low to high, then the top. An import may point to its own concern or lower.
FLOORS = {"ground": ("core", "stats", "zoo", "inspect", "checkpoints", "cache", "train"),
          "top": ("setups", "runner", "reproduce", "cli")}
RANK = {"ground": 0, "structure": 1, "memory": 2, "speech": 3, "llava": 3, "pruning": 4, "gated": 5, "top": 6}
PRUNING_WORDS = re.compile(r"fastv|visionzip|sparsevlm|token ?scorer", re.I)     # the methods, by name


def modules() -> dict[str, Path]:
    "Every module of the package by dotted name (without the package), generated files excluded."
    return {".".join(p.relative_to(PKG).with_suffix("").parts): p for p in PKG.rglob("*.py")
            if p.name not in ("__init__.py", "_modidx.py")}


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    "(imported project module, inside a function?) for every project import of module `name`."
    tree, out = ast.parse(path.read_text()), []
    pkg = name.split(".")[:-1]
    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                base = pkg[:len(pkg) - child.level + 1] if child.level else []
                mod = ".".join(base + (child.module or "").split(".")) if child.level else child.module or ""
                if child.level or mod.startswith("mm_research"):
                    mod = mod.removeprefix("mm_research").strip(".")
                    targets = [f"{mod}.{a.name}".strip(".") for a in child.names]
                    out.extend((t if t in modules() else mod, inner) for t in targets)
            elif isinstance(child, ast.Import):
                out.extend((a.name.removeprefix("mm_research.").removeprefix("mm_research"), inner)
                           for a in child.names if a.name.startswith("mm_research"))
            visit(child, inner)
    visit(tree, False)
    return [(m, n) for m, n in out if m in modules()]


def concern(name: str) -> str:
    "The concern of module `name`: its subpackage, or the floor of a flat module."
    head = name.split(".")[0]
    return next((floor for floor, names in FLOORS.items() if head in names), head)


def test_concerns_are_subpackages():
    subs = {p.name for p in PKG.iterdir() if p.is_dir() and (p/"__init__.py").exists()}
    assert {"structure", "memory", "speech", "llava", "pruning", "gated"} <= subs
    assert set(map(concern, modules())) <= set(RANK), set(map(concern, modules())) - set(RANK)


def test_imports_point_down_and_not_inside_functions():
    bad = []
    for name, path in modules().items():
        for target, nested in imports(name, path):
            if nested and concern(name) != "top":     # the CLI path may import lazily to answer fast
                bad.append(f"{name} imports {target} inside a function")
            same = concern(target) == concern(name)
            if not same and RANK[concern(target)] >= RANK[concern(name)]: bad.append(f"{name} imports up: {target}")
    assert not bad, "\n".join(bad)


def test_no_import_by_string_outside_the_top():
    "No module below the top imports a project module by name at run time (importlib): the checks could not see it."
    bad = []
    for name, path in modules().items():
        if concern(name) == "top": continue
        for node in ast.walk(ast.parse(path.read_text())):
            fn = getattr(node, "func", None)
            called = getattr(fn, "attr", getattr(fn, "id", ""))
            if called in ("import_module", "__import__") and any(
                    isinstance(a, ast.Constant) and str(a.value).startswith("mm_research") for a in node.args):
                bad.append(f"{name}: {ast.unparse(node)[:80]}")
    assert not bad, bad


def test_no_import_circle():
    graph = {n: {t for t, _ in imports(n, p)} - {n} for n, p in modules().items()}
    state = {}
    def visit(n, path):
        if state.get(n) == "done": return
        assert state.get(n) != "open", "import circle: " + " -> ".join(path + [n])
        state[n] = "open"
        for t in sorted(graph[n]): visit(t, path + [n])
        state[n] = "done"
    for n in sorted(graph): visit(n, [])


def test_pruning_methods_are_named_only_in_pruning():
    "Outside pruning/ no module names a pruning method: the CLI and the setups reach them through the registry."
    named = {n: sorted(set(PRUNING_WORDS.findall(p.read_text()))) for n, p in modules().items()
             if concern(n) != "pruning"}
    assert not {n: w for n, w in named.items() if w}, named


def test_pruning_base_imports_no_method():
    base = {t for t, _ in imports("pruning.base", modules()["pruning.base"])}
    assert not {t for t in base if concern(t) == "pruning"}, base


EXPERIMENTS = sorted((PKG.parent/"nbs"/"experiments").glob("*.ipynb"))
MAX_FUNCTION_LINES, MAX_PROJECT_MODULES = 12, 8     # "about 10" lines and "about 8" modules, as the layout asks


def experiment_code(path: Path) -> ast.Module:
    "The code cells of experiment notebook `path` as one module (IPython lines dropped)."
    import json
    cells = json.loads(path.read_text())["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return ast.parse("\n".join(l for l in code.split("\n") if not l.lstrip().startswith(("%", "!"))))


def project_modules(tree: ast.Module) -> tuple[set[str], list[str]]:
    "The project modules an experiment imports, and the names it reaches through a module that does not export them."
    import importlib
    found, aliases, hidden = set(), {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mm_research"):
            mod = node.module.removeprefix("mm_research").strip(".")
            for a in node.names:
                full = f"{mod}.{a.name}".strip(".")
                found.add(full if full in modules() else mod)
                if full in modules(): aliases[a.asname or a.name] = full
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mm_research."):
                    found.add(a.name.removeprefix("mm_research."))
                    if a.asname: aliases[a.asname] = a.name.removeprefix("mm_research.")
    for node in ast.walk(tree):      # `study.keep_count` would hide a module: only what a module exports counts
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            mod = aliases[node.value.id]
            if node.attr not in getattr(importlib.import_module(f"mm_research.{mod}"), "__all__", ()):
                hidden.append(f"{mod}.{node.attr}")
    return found, hidden


def test_experiments_read_as_methods_sections():
    "Each experiment imports from at most about 8 project modules and defines no function longer than about 10 lines."
    assert EXPERIMENTS, "no experiment notebooks found"
    bad = []
    for path in EXPERIMENTS:
        tree = experiment_code(path)
        mods, hidden = project_modules(tree)
        if len(mods) > MAX_PROJECT_MODULES:
            bad.append(f"{path.name} imports {len(mods)} project modules: {sorted(mods)}")
        bad += [f"{path.name} reaches {name}, which its module does not export" for name in sorted(set(hidden))]
        bad += [f"{path.name}: {f.name} has {f.end_lineno - f.lineno + 1} lines" for f in ast.walk(tree)
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                and f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not bad, "\n".join(bad)


def test_module_docstrings_are_whole_sentences():
    "Each module's docstring (its notebook's one-line description) is a sentence that ends: none stops mid-way."
    cut = {n: ast.get_docstring(ast.parse(p.read_text())) or "" for n, p in modules().items()}
    assert not {n: d for n, d in cut.items() if not d.rstrip().endswith((".", ".)", ".`")) or "\n" in d.strip()}, cut
