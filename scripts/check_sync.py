"""Fail when the notebooks and the generated package disagree, or when a notebook is not clean.

Runs `nbdev-export` and `nbdev-clean`, and reports every file they changed, naming the notebook that
generates each changed module. Files are compared by content, so it works with or without git.
"""
import hashlib, json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def snapshot(folder: Path, pattern: str) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob(pattern))
            if ".ipynb_checkpoints" not in p.parts}

def changed(before: dict, after: dict) -> list:
    return sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))

def notebook_of(module: Path) -> str:
    """The notebook whose `#| default_exp` names `module` (or the module path when none does)."""
    name = ".".join(module.relative_to(ROOT / "llavamed").with_suffix("").parts)
    for nb in sorted((ROOT / "nbs").rglob("*.ipynb")):
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            if re.search(rf"^#\|\s*default_exp\s+{re.escape(name)}\s*$", "".join(cell["source"]), re.M):
                return str(nb.relative_to(ROOT))
    return f"(no notebook exports {name})"

def main() -> int:
    ok = True
    before = snapshot(ROOT / "llavamed", "*.py")
    subprocess.run([BIN / "nbdev-export"], cwd=ROOT, check=True)
    for p in changed(before, snapshot(ROOT / "llavamed", "*.py")):
        ok = False
        print(f"nbdev-export changed {p.relative_to(ROOT)}: its notebook {notebook_of(p)} and the module disagree "
              f"(edit the notebook, run nbdev-export, commit both)", file=sys.stderr)
    before = snapshot(ROOT / "nbs", "*.ipynb")
    subprocess.run([BIN / "nbdev-clean"], cwd=ROOT, check=True)
    for p in changed(before, snapshot(ROOT / "nbs", "*.ipynb")):
        ok = False
        print(f"{p.relative_to(ROOT)} was not clean: run nbdev-clean and commit it", file=sys.stderr)
    if ok: print("notebooks and package in sync; notebooks clean")
    return 0 if ok else 1

if __name__ == "__main__": sys.exit(main())
