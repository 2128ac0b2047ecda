"""The package's shape: no import cycle (function-level imports included), no
module over 500 lines, and docs/ARCHITECTURE.md naming only what exists."""

import ast
import re
from pathlib import Path

import pytest

from wsss_core.stages import STAGES

from conftest import REPO

PKG = REPO / "wsss_core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _under_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path) -> set[str]:
    """Every wsss_core module `name` imports, at the top or inside a function
    (not under `if TYPE_CHECKING:`, which never runs)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def absolute(level: int, module: str | None) -> str:
        if level == 0:
            return module or ""
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([module] if module else []))

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _under_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = absolute(child.level, child.module)
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in MODULES and m != name}


def import_graph() -> dict[str, set[str]]:
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    # the registry imports every module of the stages package on import (registry.discover)
    graph["wsss_core.stages"] |= {m for m in MODULES if m.startswith("wsss_core.stages.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_function_level_imports(tmp_path):
    """The checker itself: the cycle the package once had (the TTA module importing the stages inside a
    function, a stage importing the TTA module) is found."""
    src = "def predict_folder():\n    from .stages import open_run\n"
    (tmp_path / "m.py").write_text(src)
    global MODULES
    saved = MODULES
    try:
        MODULES = {**saved, "wsss_core.predict": tmp_path / "m.py"}
        graph = import_graph()
    finally:
        MODULES = saved
    assert "wsss_core.stages" in graph["wsss_core.predict"]
    assert any({"wsss_core.predict", "wsss_core.stages", "wsss_core.stages.predict"} <= set(c) for c in cycles(graph))


def test_no_module_is_over_500_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_widgets_and_viz_draw_without_reaching_into_stage_modules():
    """Pictures live in viz.py; the inspector reads stage outputs through the stages' data functions."""
    assert not {m for m in import_graph()["wsss_core.viz"] if m.startswith("wsss_core.stages")}


def test_architecture_doc_names_only_modules_that_exist():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_]+\.py)`", doc))
    assert named, "the doc names no module"
    files = [p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")]
    missing = sorted(n for n in named if not (REPO / n).is_file() and not any(f == n or f.endswith(f"/{n}")
                                                                             for f in files))
    assert missing == []
    assert "`wsss stages`" in doc


def test_wsss_stages_lists_every_registered_stage(capsys):
    """The list of stages a contributor reads comes from the registry: a new stage is in it by itself."""
    from wsss_core import cli

    assert cli.main(["stages"]) == 0
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert list(rows) == list(STAGES)
    for name, s in STAGES.items():
        row = rows[name]
        assert f"`stages/{s.fn.__module__.rsplit('.', 1)[-1]}.py`" in row and f"`{s.spec.folder}`" in row, name
        assert f"`{s.notebook.removesuffix('.ipynb')}`" in row, name
    assert rows["cams"].split("|")[5].strip() == "`cams`" and rows["report"].split("|")[5].strip() == "-"
    assert "data, classifier, label_filter" in rows["cams"]


def test_the_doc_names_no_stage_that_is_not_registered():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"^\| (\w+) \(`stages/", doc, re.M))
    assert named and named <= set(STAGES)
    assert not (REPO / "docs" / "INTERFACES.md").exists()


def test_architecture_doc_names_every_top_level_module():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    modules = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert [m for m in modules if f"`{m}`" not in doc] == []


# ------------------------------------------------------------------ notebooks: no loops or formulas
DRAWING = {"viz", "plt", "print", "display", "widgets"}  # what a notebook may call inside a loop
NOT_IN_NOTEBOOKS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.While, ast.Try, ast.With,
                    ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.AugAssign, ast.Global)
ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.MatMult)


def _root(func: ast.AST) -> str | None:
    while isinstance(func, ast.Attribute):
        func = func.value
    return func.id if isinstance(func, ast.Name) else None


def _draws(st: ast.stmt) -> bool:
    """A statement a loop of a notebook may hold: a drawing call, a name for a value to show, or an `if` / a
    nested loop of those."""
    if isinstance(st, ast.Expr) and isinstance(st.value, ast.Call):
        return _root(st.value.func) in DRAWING
    if isinstance(st, (ast.If, ast.For)):
        return all(_draws(s) for s in st.body + st.orelse)
    return isinstance(st, ast.Assign)


def _text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def notebook_rule_breaks(source: str) -> list[str]:
    """What in a notebook cell is a rule, a loop or a formula (ARCHITECTURE.md, rule 2): definitions,
    comprehensions, while / try / with, a loop that does more than draw, and arithmetic or a conditional
    expression outside the text it formats (f-strings, print / drawing arguments; a choice between two texts)."""
    source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    tree = ast.parse(source)
    shown = {id(sub) for node in ast.walk(tree)
             if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Call) and _root(node.func) in DRAWING)
             for sub in ast.walk(node)}
    breaks = []
    for node in ast.walk(tree):
        if isinstance(node, NOT_IN_NOTEBOOKS):
            breaks.append(f"line {node.lineno}: {type(node).__name__}")
        elif isinstance(node, ast.For) and not all(_draws(s) for s in node.body + node.orelse):
            breaks.append(f"line {node.lineno}: a loop that does more than draw")
        elif isinstance(node, (ast.BinOp, ast.IfExp)) and id(node) not in shown and \
                (isinstance(node, ast.BinOp) and isinstance(node.op, ARITHMETIC) or
                 isinstance(node, ast.IfExp) and not all(_text(b) for b in (node.body, node.orelse))):
            breaks.append(f"line {node.lineno}: a formula ({ast.unparse(node)})")
    return breaks


def test_notebooks_hold_no_loops_or_formulas():
    import nbformat

    found = []
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        for k, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                found += [f"{path.name} cell {k}: {b}" for b in notebook_rule_breaks(cell.source)]
    assert not found, found


@pytest.mark.parametrize("source, expected", [
    ("x = [a * 2 for a in values]", ["line 1: ListComp", "line 1: a formula (a * 2)"]),
    ("total = 0\nfor v in values:\n    total = total + v", ["line 3: a formula (total + v)"]),
    ("for v in values:\n    keep(v)", ["line 1: a loop that does more than draw"]),
    ("share = kept / images", ["line 1: a formula (kept / images)"]),
    ("x = 1.0 if flag else 0.5", ["line 1: a formula (1.0 if flag else 0.5)"]),
    ("note = f'{v:.1f}, ' if flag else ''", []),  # a choice between two texts
    ("def f(x):\n    return x", ["line 1: FunctionDef"]),
    ("%matplotlib inline\nfor i in ids:\n    viz.label_panels(rows(i))\n    plt.show()", []),
    ("print(f\"{100 * m['miou']:.1f}\")\nviz.plot(a - b)", []),  # formatting and drawing arguments
])
def test_the_notebook_rule_finds_loops_and_formulas(source, expected):
    assert notebook_rule_breaks(source) == expected


FILE_CALLS = {"read_json", "write_json", "write_text", "save_png", "save_npz", "read_npz", "save_torch", "read_torch",
              "read_text", "write_bytes", "read_bytes", "open"}


def test_stage_modules_read_and_write_files_only_through_artifacts():
    """ARCHITECTURE.md rule 3: every artifact's format has one reader / writer pair, in artifacts.py."""
    found = []
    for path in sorted((PKG / "stages").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name in FILE_CALLS:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, found
