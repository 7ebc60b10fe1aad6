"""DESIGN.md's layering: the library `elastic_export` imports none of `engines`, `training`,
`validation`; only its command line (elastic_export/cli.py) composes them, inside commands."""

import ast
from pathlib import Path

import elastic_export

UPPER = {"engines", "training", "validation"}
PKG = Path(elastic_export.__file__).parent


def upper_imports(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, module, at module level) of every import of an upper package in ``tree``."""
    found = []

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            found.extend((child.lineno, n, top) for n in names if n.split(".")[0] in UPPER)
            inner = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, top and not inner)

    visit(tree, True)
    return found


def test_upper_imports_finds_what_it_should():
    tree = ast.parse("import engines.trt\nfrom validation import x\ndef f():\n    from training.y import z\n"
                     "import elastic_export.engines_like\nfrom .engines import q\n")
    assert upper_imports(tree) == [(1, "engines.trt", True), (2, "validation", True), (4, "training.y", False)]


def test_library_imports_no_runtime_trainer_or_validator():
    bad = []
    for f in sorted(PKG.rglob("*.py")):
        found = upper_imports(ast.parse(f.read_text(), str(f)))
        if f.name == "cli.py" and f.parent == PKG:
            found = [x for x in found if x[2]]  # the CLI may import them, lazily inside commands only
        bad += [f"{f.relative_to(PKG.parent)}:{line}: {mod}" for line, mod, _ in found]
    assert not bad, "elastic_export imports an upper layer:\n" + "\n".join(bad)
