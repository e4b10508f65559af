"""Docs checks that need no Quarto: process the notebooks as `nbdev-proc-nbs` does (Quarto only renders
the result), and require on every exported function and class a docstring and a lesson: a code cell of
its notebook, not exported and not hidden, that calls it (or instantiates the class, reads one of its
attributes, decorates with it, derives from it, catches it, or shows an instance in its stored output): an
AST check, so a name in a string, a comment or `show_doc(f)` is no lesson. With `--outputs` the lesson must
also show its value: at least one such cell has a stored output (`scripts/check_outputs.py --write`).

    python scripts/check_docs.py [--outputs]

`nbdev-proc-nbs` itself insists on installing Quarto first, so this calls the same processing step
(`nbdev.serve.proc_nbs`) directly. Where Quarto is installed, `nbdev-docs` builds the site. The last line
also gives two figures of the lessons' shape: the median number of lines of a code cell, and how many
lesson cells end on an expression and show its stored value.
"""
import argparse, ast, re, statistics, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
EXPORT = {"export", "exporti", "exports", "exportd"}  # nbdev's directives that put a cell into the module
CHECKS = {"test_eq", "test_ne", "test_fail", "test_close", "test_is", "test_warns", "test_stdout", "print"}

def exported_names(tree: ast.Module) -> set:
    "The names of a generated module's `__all__` (nbdev writes it with the exported names)."
    return next(({ast.literal_eval(e) for e in n.value.elts} for n in tree.body if isinstance(n, ast.Assign)
                 and any(getattr(t, "id", None) == "__all__" for t in n.targets)), set())

def undocumented(py: Path) -> list:
    "Exported functions and classes of a generated module without a docstring."
    tree = ast.parse(py.read_text(encoding="utf-8"))
    exported = exported_names(tree)
    defs = [n for n in ast.walk(tree) if isinstance(n, DEFS) and n.name in exported]
    return [f"{py.relative_to(ROOT)}: {n.name}" for n in defs if not ast.get_docstring(n)]

def parse_cell(source: str):
    "The AST of a code cell, IPython syntax (magics, `!`, top-level await) included; None if it cannot parse."
    from IPython.core.inputtransformer2 import TransformerManager
    try: code = TransformerManager().transform_cell(source)
    except Exception: code = source
    try: return compile(code, "<cell>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except SyntaxError: return None

def used_names(tree) -> set:
    "Names a cell calls (`f()`, `m.f()`), reads attributes of (`C.x`), decorates with, derives from, catches."
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name): used.add(node.func.id)
            elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                used.add(node.func.attr)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name): used.add(node.value.id)
        if isinstance(node, DEFS):
            used |= {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
        if isinstance(node, ast.ClassDef): used |= {b.id for b in node.bases if isinstance(b, ast.Name)}
        if isinstance(node, ast.ExceptHandler) and node.type is not None:  # `except C:` / `except (C, D):`
            used |= {t.id for t in getattr(node.type, "elts", [node.type]) if isinstance(t, ast.Name)}
    return used

def shown_instances(cell) -> set:
    "Class names whose instance a cell's stored output shows (its `text/plain` starts with `Name(`)."
    texts = ["".join(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", [])]
    return {m.group(1) for t in texts for m in [re.match(r"(?:[\w.]+\.)?([A-Za-z_]\w*)\(", t)] if m}

def ends_on_expression(tree) -> bool:
    "Whether a cell's last statement is a bare expression worth showing (not a check or a print)."
    if not tree or not tree.body or not isinstance(tree.body[-1], ast.Expr): return False
    value = tree.body[-1].value
    return not (isinstance(value, ast.Call) and getattr(value.func, "id", "") in CHECKS)

def lesson_cells(nb) -> list:
    "The code cells of a notebook a reader sees run: not exported, not hidden; (cell, its AST)."
    return [(c, parse_cell(c.source)) for c in nb.cells
            if c.cell_type == "code" and not (EXPORT | {"hide"}) & set(c.directives)]

def module_of(nb):
    "The module a notebook exports to (its `default_exp`), or None."
    from fastcore.basics import nested_attr
    found = next((c.directives["default_exp"] for c in nb.cells if "default_exp" in c.directives), None)
    found = found or nested_attr(nb, "metadata.nbdev.default_exp", None)
    return found[0] if isinstance(found, list) else found

def without_lesson(nb_path: Path, outputs: bool = False) -> list:
    "Exported functions and classes of a notebook that no lesson cell uses (with `outputs`: uses and shows)."
    from fastcore.nbio import read_nb
    nb = read_nb(nb_path)
    mod = module_of(nb)
    if mod is None: return []
    tree = ast.parse((ROOT / "llavamed" / f"{mod.replace('.', '/')}.py").read_text(encoding="utf-8"))
    defined = {n.name for n in tree.body if isinstance(n, DEFS)}
    used, shown = set(), set()
    for cell, cell_tree in lesson_cells(nb):
        names = (used_names(cell_tree) if cell_tree is not None else set()) | shown_instances(cell)
        used |= names
        if cell.get("outputs"): shown |= names
    names = sorted(exported_names(tree) & defined)
    where = nb_path.relative_to(ROOT) if nb_path.is_relative_to(ROOT) else nb_path
    return ([f"no lesson cell: {where}: {n}" for n in names if n not in used] +
            [f"no lesson cell shows an output: {where}: {n}" for n in names
             if outputs and n in used and n not in shown])

def shape(notebooks) -> dict:
    "Median lines of a code cell; lesson cells ending on an expression: all, and those with a stored output."
    from fastcore.nbio import read_nb
    lines, ending, shown = [], 0, 0
    for path in notebooks:
        nb = read_nb(path)
        lines += [len(c.source.splitlines()) for c in nb.cells if c.cell_type == "code"]
        for cell, tree in lesson_cells(nb):
            if ends_on_expression(tree): ending += 1; shown += bool(cell.get("outputs"))
    return dict(median_lines=statistics.median(lines) if lines else 0, ending=ending, shown=shown)

def main(argv=None) -> int:
    import os
    from nbdev.serve import proc_nbs
    parser = argparse.ArgumentParser(description="Docstrings and lesson cells of every exported name.")
    parser.add_argument("--outputs", action="store_true", help="a lesson must also have a stored output")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    cache = proc_nbs(n_workers=0)
    n = len(list(Path(cache).rglob("*.ipynb")))
    missing = [m for py in sorted((ROOT / "llavamed").glob("*.py")) for m in undocumented(py)]
    for m in missing: print(f"no docstring: {m}", file=sys.stderr)
    notebooks = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
    no_lesson = [m for nb in notebooks for m in without_lesson(nb, args.outputs)]
    for m in no_lesson: print(m, file=sys.stderr)
    fig = shape(notebooks)
    print(f"processed {n} notebooks for the docs; {len(missing)} exported names without a docstring, "
          f"{len(no_lesson)} without a lesson cell{' that shows an output' if args.outputs else ''}; "
          f"median {fig['median_lines']:g} lines per code cell; "
          f"{fig['shown']} of {fig['ending']} lesson cells "
          f"that end on an expression show a stored output")
    return 1 if missing or no_lesson or n == 0 else 0

if __name__ == "__main__": sys.exit(main())
