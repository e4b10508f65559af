"""Docs checks that need no Quarto: process the notebooks as `nbdev-proc-nbs` does (Quarto only renders
the result), and require on every exported function and class a docstring and a lesson: a code cell of
its notebook, not exported, that uses it.

`nbdev-proc-nbs` itself insists on installing Quarto first, so this calls the same processing step
(`nbdev.serve.proc_nbs`) directly. Where Quarto is installed, `nbdev-docs` builds the site.
"""
import ast, json, re, sys
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

def without_lesson(nb_path: Path) -> list:
    "Exported functions and classes of a notebook that no non-exported code cell of it uses."
    cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
    src = ["".join(c["source"]) for c in cells]
    mod = next((m.group(1) for s in src for m in [re.search(r"#\|\s*default_exp\s+(\S+)", s)] if m), None)
    if mod is None: return []
    tree = ast.parse((ROOT / "llavamed" / f"{mod.replace('.', '/')}.py").read_text(encoding="utf-8"))
    exported = next(({ast.literal_eval(e) for e in n.value.elts} for n in tree.body if isinstance(n, ast.Assign)
                     and any(getattr(t, "id", None) == "__all__" for t in n.targets)), set())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    lessons = "\n".join(s for s, c in zip(src, cells) if c["cell_type"] == "code" and not re.match(r"\s*#\|\s*export", s))
    return [f"{nb_path.relative_to(ROOT)}: {n}" for n in sorted(exported & defined) if not re.search(rf"\b{re.escape(n)}\b", lessons)]

def main() -> int:
    import os
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    cache = proc_nbs(n_workers=0)
    n = len(list(Path(cache).rglob("*.ipynb")))
    missing = [m for py in sorted((ROOT / "llavamed").glob("*.py")) for m in undocumented(py)]
    for m in missing: print(f"no docstring: {m}", file=sys.stderr)
    no_lesson = [m for nb in sorted((ROOT / "nbs").glob("*.ipynb")) for m in without_lesson(nb)]
    for m in no_lesson: print(f"no lesson cell: {m}", file=sys.stderr)
    print(f"processed {n} notebooks for the docs; {len(missing)} exported names without a docstring, "
          f"{len(no_lesson)} without a lesson cell")
    return 1 if missing or no_lesson or n == 0 else 0

if __name__ == "__main__": sys.exit(main())
