"""Render `nbs/index.ipynb` to `README.md` without Quarto (`--check`: fail if README.md differs).

Markdown cells are copied as they are, code cells become fenced Python blocks, and their text
outputs follow in plain fences. Cells marked `#| hide` are left out, as in the docs site.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    parts = []
    for cell in nb["cells"]:
        src = "".join(cell["source"]).strip("\n")
        if cell["cell_type"] == "markdown":
            parts.append(src)
        elif cell["cell_type"] == "code":
            lines = src.splitlines()
            if any(l.strip() in ("#| hide", "#|hide") for l in lines): continue
            lines = [l for l in lines if not l.startswith("#|")]
            if lines: parts.append("```python\n" + "\n".join(lines) + "\n```")
            for out in cell.get("outputs", []):
                text = out.get("text") or out.get("data", {}).get("text/plain")
                if text: parts.append("```\n" + "".join(text).rstrip("\n") + "\n```")
    body = "\n\n".join(p for p in parts if p)
    return "<!-- Generated from nbs/index.ipynb by scripts/readme.py: edit the notebook, not this file. -->\n\n" + body + "\n"

def main(argv):
    want = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if "--check" in argv:
        if not readme.exists() or readme.read_text(encoding="utf-8") != want:
            print("README.md is out of sync with nbs/index.ipynb: run `python scripts/readme.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(want, encoding="utf-8")
    return 0

if __name__ == "__main__": sys.exit(main(sys.argv[1:]))
