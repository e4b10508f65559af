"""Counts of how the package is built: readers, print sites, plotters, long functions, cell sizes, stored outputs.

Run from the repository root: `python scripts/house_stats.py` (prints one line per figure, or `--json`)."""
import ast, json, re, statistics, sys
from pathlib import Path

PKG, NBS = Path("llavamed"), Path("nbs")

def modules():
    "The generated modules of the package, without the index."
    return [p for p in sorted(PKG.glob("*.py")) if p.name not in ("_modidx.py", "__init__.py")]

def functions(tree):
    "Every function and method definition of a module."
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]

def notebook_lines(p: Path) -> list[str]:
    "Lines of a module that come from notebook cells: not the docstring, `__all__` or cell markers nbdev writes."
    lines, out, in_all = p.read_text().splitlines(), [], False
    for l in lines[next((i for i, l in enumerate(lines) if l.startswith("# %%")), 0):]:
        if l.startswith("__all__"): in_all = True
        if not in_all and not l.startswith("# %%"): out.append(l)
        if in_all and l.rstrip().endswith("]"): in_all = False
    return out

def count(pattern):
    "Lines of library code matching `pattern`."
    return sum(len(re.findall(pattern, p.read_text(), re.M)) for p in modules())

def cells():
    "The code cells of every notebook, tutorials included."
    for nb in sorted(NBS.rglob("*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            if c["cell_type"] == "code": yield nb, c

def last_is_expression(src: str) -> bool:
    "Whether a cell's last statement is a bare expression (a value worth showing), not a call for its effect."
    try: body = ast.parse(src).body
    except SyntaxError: return False
    return bool(body) and isinstance(body[-1], ast.Expr) and not (
        isinstance(body[-1].value, ast.Call) and getattr(body[-1].value.func, "id", "") in ("print", "test_eq", "test_fail", "test_close"))

def stats() -> dict:
    "Every figure, by name."
    trees = {p: ast.parse(p.read_text()) for p in modules()}
    fns = [f for t in trees.values() for f in functions(t)]
    train_params = next((len(f.args.args) + len(f.args.kwonlyargs) for f in functions(trees[PKG / "train.py"])
                         if f.name == "train"), None)
    code = [(nb, c) for nb, c in cells()]
    lens = [len("".join(c["source"]).splitlines()) for _, c in code]
    shown = [(nb, c) for nb, c in code if not "".join(c["source"]).lstrip().startswith(("#| export", "#|export"))
             and "#| hide" not in "".join(c["source"]) and last_is_expression("".join(c["source"]))]
    return {
        "file readers (def read_*/load_* of JSON-like files)": count(r"^def (read_json|read_jsonl|iter_json|iter_records|load_vqa|load_questions|load_benchmark|vqa_questions|load_answers)\b"),
        "'conversatons' sites": count(r"conversatons"),
        "redirect_stdout sites": count(r"redirect_stdout\("),
        "print( sites outside cli.py": sum(len(re.findall(r"\bprint\(", p.read_text())) for p in modules() if p.name != "cli.py"),
        "loss plotters": count(r"^def \w*plot\w*loss\w*\("),
        "evaluation orchestrators": count(r"^def (vqa_eval|_eval_step|_judge_step|write_report|evaluate)\b"),
        "train() parameters": train_params,
        "functions over 50 lines": sum(1 for f in fns if f.end_lineno - f.lineno + 1 > 50),
        "lines over 110 characters (code from notebooks)": sum(1 for p in modules() for l in notebook_lines(p) if len(l) > 110),
        "median lines per code cell": statistics.median(lens),
        "lesson cells ending on an expression": len(shown),
        "  of them with a stored output": sum(1 for _, c in shown if c.get("outputs")),
    }

if __name__ == "__main__":
    s = stats()
    if "--json" in sys.argv: print(json.dumps(s, indent=1))
    else:
        for k, v in s.items(): print(f"{k}: {v}")
