"""The package's shape: no import circles between its modules, its packages depending one way (as the layout in
DESIGN.md has them), no function longer than 80 lines (feedback migrations aside: generated)."""

import ast
from pathlib import Path

import rlhfkit

SRC = Path(rlhfkit.__file__).parent
MAX_FUNCTION_LINES = 80
# package -> what it never imports: the shared tools (text, models) sit below what uses them, rewards below
# evaluation (which measures with them), and neither rewards nor evaluation run a trainer
NEVER_IMPORTS = {
    "rlhfkit.reward": ("rlhfkit.evaluation", "rlhfkit.online", "rlhfkit.sft", "rlhfkit.dpo"),
    "rlhfkit.evaluation": ("rlhfkit.online", "rlhfkit.sft", "rlhfkit.dpo", "rlhfkit.reward.train"),
    "rlhfkit.text": ("rlhfkit.evaluation", "rlhfkit.reward", "rlhfkit.retrieval", "rlhfkit.online"),
    "rlhfkit.models": ("rlhfkit.evaluation", "rlhfkit.online", "rlhfkit.sft", "rlhfkit.dpo"),
    "rlhfkit.dpo": ("rlhfkit.online",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in SRC.rglob("*.py")
            if "migrations" not in p.parts}


def imported(node: ast.Import | ast.ImportFrom, importer: str, known: set[str]) -> set[str]:
    """The rlhfkit modules one import statement names: `import a.b`, `from a import b` (module a.b where b is one,
    else a's __init__), relative imports resolved against `importer`."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & known
    base = node.module or ""
    if node.level:  # relative: against the importer's package (itself, for an __init__)
        package = importer.split(".")
        package = package[: len(package) - node.level + (1 if is_package(importer) else 0)]
        base = ".".join(package + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names} & known


def is_package(name: str) -> bool:
    return (SRC.parent / name.replace(".", "/") / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    """module -> the rlhfkit modules it imports anywhere: at module level and inside functions."""
    trees = modules()
    known = set(trees)
    return {name: {m for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for m in imported(node, name, known)} - {name}
            for name, tree in trees.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    circles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not circles, f"modules that import each other, directly or round a circle: {circles}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_packages_depend_one_way():
    wrong = [f"{m} imports {i}" for m, imports in import_graph().items() for package, never in NEVER_IMPORTS.items()
             if within(m, package) for i in sorted(imports) if any(within(i, n) for n in never)]
    assert not wrong, wrong


def test_the_import_graph_sees_function_level_imports():
    graph = import_graph()
    assert "rlhfkit.sft" in graph["rlhfkit.pipeline"]  # imported inside _run_stage
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]


def test_no_function_over_80_lines():
    """In the package (migrations aside) and in benchmarks/."""
    benchmarks = SRC.parent.parent / "benchmarks"
    trees = modules() | {f"benchmarks.{p.stem}": ast.parse(p.read_text(encoding="utf-8"), str(p))
                         for p in benchmarks.glob("*.py")}
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines" for name, tree in trees.items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them): {long}"


def test_every_rlhfkit_import_in_tests_benchmarks_and_examples_names_a_module_that_exists():
    """A module moved (say ppo/ -> online/) leaves no import of its old path behind in code outside the package,
    where no import of the package itself would notice; the names each `from rlhfkit.X import a` takes exist too."""
    known = set(modules())
    repo = SRC.parent.parent
    stale = []
    for path in [*(repo / "tests").rglob("*.py"), *(repo / "benchmarks").rglob("*.py"), *(repo / "examples").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("rlhfkit"):
                names = [] if node.module in known else [node.module]
                names += [f"{node.module}.{a.name}" for a in node.names if node.module in known
                          and f"{node.module}.{a.name}" not in known and not _defines(node.module, a.name)]
                stale += [f"{path.relative_to(repo)}:{node.lineno} {n}" for n in names]
            elif isinstance(node, ast.Import):
                stale += [f"{path.relative_to(repo)}:{node.lineno} {a.name}" for a in node.names
                          if a.name.startswith("rlhfkit") and a.name not in known]
    assert not stale, stale


def _defines(module: str, name: str) -> bool:
    import importlib

    return hasattr(importlib.import_module(module), name)
