"Contracts of `scripts/check_outputs.py` (stored notebook outputs) and `scripts/check_docs.py` (lessons)."
import importlib.util, json, platform, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
KERNEL = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}

def script(name):
    "A script of `scripts/` imported as a module."
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

def code(cid, source, outputs=()):
    "A code cell as a clean notebook stores it."
    return {"cell_type": "code", "execution_count": None, "id": cid, "metadata": {}, "outputs": list(outputs),
            "source": source.splitlines(True)}

def result(text):
    "An `execute_result` output showing `text`."
    return {"data": {"text/plain": [text]}, "execution_count": None, "metadata": {},
            "output_type": "execute_result"}

def write_nb(path, cells):
    nb = {"cells": cells, "metadata": KERNEL, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path

def check_outputs(*args):
    return subprocess.run([sys.executable, str(SCRIPTS / "check_outputs.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)

@pytest.fixture
def notebooks(tmp_path):
    "A notebook whose stored outputs match a fresh run, and one whose second cell's output is stale."
    fresh = write_nb(tmp_path / "fresh.ipynb", [
        code("aaaa0001", "x = 20 + 1\nx", [result("21")]),
        code("aaaa0002", "#| notest\n'never run'", [result("'kept as stored'")])])
    stale = write_nb(tmp_path / "stale.ipynb", [
        code("bbbb0001", "'same'", [result("'same'")]),
        code("bbbb0002", "[1, 2, 3]", [result("[1, 2, 4]")])])
    return fresh, stale

def test_check_names_the_stale_cell_and_passes_a_fresh_notebook(notebooks):
    fresh, stale = notebooks
    res = check_outputs("--check", fresh, stale)  # two notebooks: the two-worker path
    assert res.returncode == 1, res.stderr
    problems = res.stderr.strip().splitlines()
    assert len(problems) == 1, res.stderr
    assert "stale.ipynb cell bbbb0002: line 1: stored" in problems[0], problems[0]
    assert "[1, 2, 4]" in problems[0] and "[1, 2, 3]" in problems[0], problems[0]
    assert "2 notebooks executed, 0 failed; compared 3 cells, 1 differ" in res.stdout
    assert check_outputs(fresh).returncode == 0

def test_write_stores_fresh_outputs_keeps_skipped_ones_and_leaves_the_notebook_clean(notebooks):
    fresh, stale = notebooks
    for nb in (stale, fresh): assert check_outputs("--write", nb).returncode == 0
    assert check_outputs("--check", stale, "--workers", "0").returncode == 0
    cells = {c["id"]: c for c in json.loads(fresh.read_text())["cells"]}
    assert cells["aaaa0002"]["outputs"][0]["data"]["text/plain"] == ["'kept as stored'"]  # notest: untouched
    before = stale.read_text()
    clean = Path(sys.executable).parent / "nbdev-clean"
    subprocess.run([str(clean), "--fname", str(stale)], cwd=ROOT, check=True)
    assert stale.read_text() == before

def test_an_absolute_path_and_a_failing_notebook_are_reported(tmp_path):
    nb = write_nb(tmp_path / "paths.ipynb", [code("cccc0001", "import tempfile\nstr(tempfile.mkdtemp())")])
    res = check_outputs("--write", nb)
    assert res.returncode == 1
    assert "paths.ipynb cell cccc0001: output shows an absolute or temporary path" in res.stderr, res.stderr
    bad = write_nb(tmp_path / "bad.ipynb", [code("dddd0001", "1 / 0")])
    res = check_outputs(bad)
    assert res.returncode == 1
    assert "bad.ipynb: failed to execute" in res.stderr and "ZeroDivisionError" in res.stderr, res.stderr
    assert "1 notebooks executed, 1 failed (" in res.stdout and "bad.ipynb)" in res.stdout, res.stdout

def test_outputs_compare_by_text_and_images_by_presence():
    co = script("check_outputs")
    png = {"output_type": "display_data", "metadata": {},
           "data": {"image/png": "AAAA", "text/plain": ["<Fig>"]}}
    other_png = {**png, "data": {"image/png": "BBBB", "text/plain": ["<Fig>"]}}
    no_png = {**png, "data": {"text/plain": ["<Fig>"]}}
    stream = {"output_type": "stream", "name": "stdout", "text": ["a\n", "b\n"]}
    assert co.shown_lines([stream, png]) == ["[stdout] a", "[stdout] b", "[text/plain] <Fig>", co.IMAGE]
    nb = lambda *outs: {"cells": [{"cell_type": "code", "id": "c1", "source": [], "outputs": list(outs)}]}
    assert co.differences(nb(png), nb(other_png), {"c1"}) == []
    assert co.differences(nb(png), nb(no_png), {"c1"}) == [("c1", 2, co.IMAGE, "")]
    assert co.differences(nb(png), nb(), set()) == []  # a cell that did not run keeps its stored output

def test_hazards_find_paths_addresses_timings_versions_unless_the_source_gave_the_number():
    co = script("check_outputs")
    out = lambda text: [{"output_type": "stream", "name": "stdout", "text": [text]}]
    kinds = lambda text, source="": [k for k, _ in co.hazards(out(text), source)]
    assert kinds(f"wrote {co.ROOT}/x.json") == ["an absolute or temporary path"]
    assert kinds("<Thing object at 0x7f3a2b1c0d90>") == ["a memory address"]
    assert kinds("scored 40 questions in 3.2s") == ["a timing"]
    assert kinds("100%|##| 3/3 [00:01<00:00, 2.50it/s]") == ["a timing"]
    assert kinds("[2026-01-02 03:04:05,006] [WARNING] x") == ["a timestamp"]
    assert kinds(f"python {platform.python_version()}") == ["a version of this environment"]
    assert kinds("2 done; 2.0s", source="RunStats(seconds=2.0)") == []
    assert kinds("relative/path.json 3 rows, https://example.org/tmp/x") == []

def test_a_lesson_is_a_call_an_attribute_a_decorator_a_base_or_a_catch_not_a_mention():
    cd = script("check_docs")
    tree = cd.parse_cell("r = f(1)\nC.load('x')\n@deco\ndef g(): pass\nclass D(Base): pass\n"
                         "try: mod.h()\nexcept Oops: pass\nshow_doc(k)\n'm in a string'\n"
                         "await a()\n%time z()")
    # a magic line parses (as IPython's call); `k`, passed as an argument, and `m`, in a string, are no use
    assert cd.used_names(tree) == {"f", "C", "load", "deco", "Base", "mod", "h", "Oops", "show_doc", "a",
                                   "get_ipython"}
    assert cd.ends_on_expression(cd.parse_cell("x = 1\nx"))
    assert not cd.ends_on_expression(cd.parse_cell("test_eq(1, 1)"))
    assert cd.shown_instances({"outputs": [result("Scores(n=3, closed=50.0)")]}) == {"Scores"}
