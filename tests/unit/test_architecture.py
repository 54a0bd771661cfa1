"""Architecture rules that code review alone does not keep: no import circle anywhere in
``pipeline/`` (lazy imports inside functions included: a circle dodged by importing late is
still a circle), and the configuration imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool) -> set[str]:
    """Project modules imported anywhere in ``tree`` except under ``if TYPE_CHECKING:``."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m == "pipeline" or m.startswith("pipeline.")}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for target in _imports(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            # `from a.b import c` names module a.b.c, or a function of a.b. Parent packages'
            # __init__ run first too, but Python finishes a partly imported parent, so that
            # alone is no circle: a package whose __init__ lazily imports its children (a
            # registry) is fine as long as no child imports the package itself.
            module = target if target in paths else target.rpartition(".")[0]
            if module in paths and module != name:
                edges.add(module)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_pipeline():
    found = cycles(import_graph())
    assert not found, "import circles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_config_imports_no_torch():
    code = "import sys, pipeline.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", "import pipeline.config pulled in torch"


# ---------------------------------------------------------------------------------------
# Size and probing rules of issue 14's "Done when": no module over MAX_MODULE_LINES lines, no
# function over MAX_FUNCTION_LINES lines unless the comment line(s) right above its `def` (or
# above its decorators) start with LONG_MARKER and say why, and no duck typing (`hasattr`, or
# `getattr` with a default) between the loop, the objectives, the stream and the checkpoints.

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
LONG_MARKER = "# long:"
# Exceptions under review (each names a module or function and the branch that splits it); none now.
KNOWN_LONG_MODULES: set[str] = set()
KNOWN_LONG_FUNCTIONS: set[str] = set()
NO_PROBING = ("pipeline/train/loop.py", "pipeline/objectives/", "pipeline/train/checkpoint", "pipeline/data/stream.py")


def _sources() -> dict[str, str]:
    return {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted(PKG.rglob("*.py"))}


def long_modules(sources: dict[str, str]) -> list[str]:
    return [f"{path} ({len(src.splitlines())} lines)" for path, src in sources.items()
            if len(src.splitlines()) > MAX_MODULE_LINES]


def _marked_long(node: ast.AST, lines: list[str]) -> bool:
    """Whether the comment block right above the def (or its first decorator) starts with LONG_MARKER."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    i = first - 2  # the line above, 0-based
    block = []
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip())
        i -= 1
    return bool(block) and block[0].startswith(LONG_MARKER)


def long_functions(sources: dict[str, str]) -> list[str]:
    found = []
    for path, src in sources.items():
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and not _marked_long(node, lines):
                    found.append(f"{path}:{node.name} ({length} lines, line {node.lineno})")
    return found


def probes(sources: dict[str, str]) -> list[str]:
    """``hasattr(...)`` and three-argument ``getattr(...)`` calls (asking an object what it is)."""
    found = []
    for path, src in sources.items():
        if not path.startswith(NO_PROBING):
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
                    node.func.id == "hasattr" or (node.func.id == "getattr" and len(node.args) == 3)):
                found.append(f"{path}:{node.lineno} {node.func.id}(...)")
    return found


def _without_known(found: list[str], known: set[str]) -> list[str]:
    return [f for f in found if f.split(" ")[0] not in known]


def test_no_module_is_too_long():
    found = _without_known(long_modules(_sources()), KNOWN_LONG_MODULES)
    assert not found, f"modules over {MAX_MODULE_LINES} lines (split them along their concepts): {found}"


def test_no_function_is_too_long_without_saying_why():
    found = _without_known(long_functions(_sources()), KNOWN_LONG_FUNCTIONS)
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines: split them into named steps, or put a "
                       f"comment starting {LONG_MARKER!r} right above the def saying why it stays whole: {found}")


def test_no_duck_typing_between_loop_objectives_stream_and_checkpoints():
    found = probes(_sources())
    assert not found, f"probing instead of a typed contract (pipeline/objectives/base.py): {found}"


def test_the_rules_catch_planted_violations():
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    planted = {
        "pipeline/big.py": "x = 1\n" * (MAX_MODULE_LINES + 1),
        "pipeline/f.py": f"def f():\n{long_body}\n",
        "pipeline/g.py": f"# long: a parser loop that carries state\n@staticmethod\ndef g():\n{long_body}\n",
        "pipeline/h.py": f"# long\ndef h():\n{long_body}\n",  # no colon and no reason: not the marker
        "pipeline/objectives/x.py": "def k(o):\n    return hasattr(o, 'a') or getattr(o, 'b', None) or getattr(o, 'c')\n",
        "pipeline/track/y.py": "def k(o):\n    return hasattr(o, 'a')\n",  # outside the rule's modules
    }
    assert long_modules(planted) == [f"pipeline/big.py ({MAX_MODULE_LINES + 1} lines)"]
    assert [f.split(" ")[0] for f in long_functions(planted)] == ["pipeline/f.py:f", "pipeline/h.py:h"]
    assert probes(planted) == ["pipeline/objectives/x.py:2 hasattr(...)", "pipeline/objectives/x.py:2 getattr(...)"]
    assert _without_known(["pipeline/bench/data.py:run (77 lines, line 210)"], {"pipeline/bench/data.py:run"}) == []
    assert _without_known(["pipeline/bench/data.py:run (77 lines, line 210)"], set()) != []
