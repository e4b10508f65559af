"""Docs checks that need no Quarto: process the notebooks as `nbdev-proc-nbs` does (Quarto only renders
the result), and require a docstring on every exported function and class.

`nbdev-proc-nbs` itself insists on installing Quarto first, so this calls the same processing step
(`nbdev.serve.proc_nbs`) directly. Where Quarto is installed, `nbdev-docs` builds the site.
"""
import ast, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def undocumented(py: Path) -> list:
    tree = ast.parse(py.read_text(encoding="utf-8"))
    exported = set()
    for node in tree.body:  # nbdev writes `__all__` with the exported names
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            exported = {ast.literal_eval(e) for e in node.value.elts}
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in exported:
            if not ast.get_docstring(node): missing.append(f"{py.relative_to(ROOT)}: {node.name}")
    return missing

def main() -> int:
    import os
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    cache = proc_nbs(n_workers=0)
    n = len(list(Path(cache).rglob("*.ipynb")))
    missing = [m for py in sorted((ROOT / "llavamed").glob("*.py")) for m in undocumented(py)]
    for m in missing: print(f"no docstring: {m}", file=sys.stderr)
    print(f"processed {n} notebooks for the docs; {len(missing)} exported names without a docstring")
    return 1 if missing or n == 0 else 0

if __name__ == "__main__": sys.exit(main())
