"""Execute the notebooks as `nbdev-test` does and compare (or store) the outputs they show.

    python scripts/check_outputs.py [--check] [NB ...]  # exit 1 when a stored output differs from a fresh run
    python scripts/check_outputs.py --write [NB ...]    # store the fresh outputs, then clean the notebook

Each notebook runs the way `nbdev-test` runs it: nbdev's `NBProcessor(..., process=True)`, the cells that
`nbdev.test.nb_test_cells` selects (the skip flags are `[tool.nbdev] tst_flags`), an execnb `CaptureShell`
with the notebook's folder as working directory, `IN_TEST=1`, two notebooks at a time; and `COLUMNS=80`, so
help texts and progress bars wrap alike from any terminal. Without NB it runs every notebook `nbdev-test`
would. `--write` and then `--check` is the test of determinism: the second run must show what the first
stored.

`--check` compares the text that the docs show: `text/plain`, `text/markdown`, streams and errors. Images are
compared by presence only (PNG bytes vary across matplotlib builds). `--flags slow` also runs the cells marked
`#| slow` (as `nbdev-test --flags slow`): with `--write` it stores their outputs, which a plain `--check` then
leaves as they are. A skipped cell keeps its stored output
unchecked. `--write` stores the outputs of every executed cell and cleans the notebook with nbdev's
`clean_nb` (outputs kept: `clear_all = false`), so `nbdev-clean` leaves it unchanged.

Both modes report an output that cannot be the same on another machine or another run: an absolute path
(a temporary folder, the home folder, the checkout) or a temporary file's name, a memory address (`at 0x...`),
a timing, a timestamp, or the version of Python, torch, transformers or numpy that ran it (unless the cell's
source holds it as a literal). Those are errors: the lesson should show a relative path, a name, a count.
"""
import argparse, copy, json, os, platform, re, shutil, sys, tempfile, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "<image>"  # what an image output compares as: its presence, not its bytes

def config():
    "The nbdev settings of this repository."
    from nbdev.config import get_config
    return get_config(ROOT)

def skip_flags(cfg) -> list:
    "The flags whose cells `nbdev-test` skips (`[tool.nbdev] tst_flags`)."
    flags = cfg.tst_flags
    return flags.split() if isinstance(flags, str) else list(flags or [])

def default_notebooks(cfg) -> list:
    "The notebooks `nbdev-test` runs when given no path."
    from nbdev.doclinks import nbglob
    return sorted(p.absolute() for p in nbglob(cfg.nbs_path, as_path=True)
                  if not (p.parent / ".notest").exists())

def run_notebook(path, flags=(), cell_timeout=None, basepath=None, profile=True) -> dict:
    "Execute the notebook at `path` as `nbdev-test` does: the source and fresh outputs of each cell it runs."
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.process import NBProcessor
    from nbdev.test import nb_test_cells
    path = Path(path).absolute()
    if basepath and str(basepath) not in sys.path: sys.path.insert(0, str(basepath))
    os.environ["IN_TEST"] = "1"
    os.environ["COLUMNS"] = "80"  # argparse and tqdm wrap to the terminal's width: one width everywhere
    cache = tempfile.mkdtemp(prefix="llavamed-nb-cache-")  # a cold token cache: what a first reader sees
    os.environ["LLAVAMED_CACHE"] = cache
    nb = NBProcessor(path, rm_directives=False, process=True).nb
    run_ids = {c.id for c in nb_test_cells(path, flags)}
    shell = CaptureShell(path, profile=profile)
    try:
        with working_directory(path.parent):
            shell.run_all(nb, exc_stop=True, preproc=lambda c: c.id not in run_ids, cell_timeout=cell_timeout)
    except BaseException:
        return dict(path=str(path), error=shell.prettytb(fname=path) or traceback.format_exc())
    finally:
        shell.close(); shutil.rmtree(cache, ignore_errors=True)
    cells = {c.id: dict(source=c.source, outputs=json.loads(json.dumps(c.get("outputs", []))))
             for c in nb.cells if c.id in run_ids}
    return dict(path=str(path), error=None, cells=cells)

def run_all(paths, workers=2, force=()) -> list:
    "Execute `paths` in `workers` processes (0: in this one), as `nbdev-test --n-workers` does."
    from fastcore.parallel import parallel
    cfg = config()
    kw = dict(flags=[f for f in skip_flags(cfg) if f not in force], cell_timeout=cfg.cell_timeout or None, basepath=str(cfg.config_path),
              profile=bool(cfg.exec_profile))
    if cfg.get("test_setup"):  # as nbdev-test: the configured setup sees every cell that will run
        from nbdev.config import import_obj
        from nbdev.test import nb_test_cells
        import_obj(cfg.test_setup)([c for p in paths for c in nb_test_cells(p, kw["flags"])])
    if workers == 0 or len(paths) == 1: return [run_notebook(p, **kw) for p in paths]
    run = run_notebook
    if __name__ == "__main__":  # a worker's IPython shell replaces `__main__`: pass the function by module
        sys.path.insert(0, str(Path(__file__).parent))
        from check_outputs import run_notebook as run
    return list(parallel(run, paths, n_workers=workers, pause=0.01, **kw))

# --- what an output shows --------------------------------------------------------------------------------

def joined(value) -> str:
    "A notebook text field (a string or a list of lines) as one string."
    return "".join(value) if isinstance(value, list) else str(value)

def shown_lines(outputs) -> list:
    "The lines a cell's outputs show, as they are compared: text kept, each image as a placeholder."
    lines = []
    for out in outputs:
        kind = out.get("output_type")
        if kind == "stream":
            lines += [f"[{out.get('name')}] {line}" for line in joined(out.get("text", "")).splitlines()]
        elif kind == "error": lines.append(f"[error] {out.get('ename')}: {out.get('evalue')}")
        elif kind in ("execute_result", "display_data"):
            data = out.get("data", {})
            for mime in ("text/markdown", "text/plain"):
                if mime in data: lines += [f"[{mime}] {line}" for line in joined(data[mime]).splitlines()]
            if any(m.startswith("image/") for m in data): lines.append(IMAGE)
    return lines

def all_text(outputs) -> str:
    "Every text an output holds (any text mime, streams, error values): what the hazard scan reads."
    texts = []
    for out in outputs:
        if "text" in out: texts.append(joined(out["text"]))
        if "evalue" in out: texts.append(str(out["evalue"]))
        texts += [joined(v) for k, v in out.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(texts)

def hazard_patterns() -> dict:
    "Name -> regex of what differs between machines or runs."
    roots = {tempfile.gettempdir(), "/tmp", "/var/folders", "/private/var", str(Path.home()), str(ROOT),
             str(ROOT.parent), sys.prefix}
    roots = sorted((r.rstrip("/") for r in roots if r and r != "/"), key=len, reverse=True)
    path = (r"(?<![\w/.:~-])(?:" + "|".join(re.escape(r) for r in roots) + r")(?=/|\b)[^\s'\")\]>,]*"
            r"|\btmp[a-z0-9_]{8}\b")  # the name `tempfile` gives a temporary file or folder
    timing = (r"\b(?:took|taking|elapsed|seconds?|secs?|time|timing|duration|runtime|wall|in|after)\b"
              r"[^\n\d]{0,20}\d+(?:\.\d+)?\s?(?:s|sec|secs|seconds|ms|min|minutes)\b"
              r"|\b\d+\.\d+\s?(?:s|sec|secs|seconds|ms)\b"
              r"|\b\d+(?:\.\d+)?\s?(?:it/s|s/it)\b|\b\d\d:\d\d<\d\d:\d\d")  # progress bars
    return {"an absolute or temporary path": re.compile(path),
            "a memory address": re.compile(r"\bat 0x[0-9a-fA-F]+|\b0x[0-9a-f]{8,}\b"),
            "a timing": re.compile(timing, re.I),
            "a timestamp": re.compile(r"\b\d{4}-\d\d-\d\d[ T]\d\d:\d\d(?::\d\d)?"),
            "a version of this environment": re.compile("|".join(rf"(?<![\w.]){re.escape(v)}(?![\w.])"
                                                                 for v in environment_versions()) or "(?!)")}

def environment_versions() -> list:
    "The versions of Python and of the big libraries here (x.y.z): an output showing one differs elsewhere."
    from importlib.metadata import PackageNotFoundError, version
    found = [platform.python_version()]
    for package in ("torch", "transformers", "numpy"):
        try: found.append(version(package).split("+")[0])
        except PackageNotFoundError: pass
    return [v for v in found if v.count(".") >= 2]

def echoed(found: str, source: str) -> bool:
    "Whether `found`, or every number in it, is a literal of the cell's source: a value it was given."
    if found in source: return True
    numbers = re.findall(r"\d+(?:\.\d+)?", found)
    return bool(numbers) and all(re.search(rf"(?<![\d.]){re.escape(n)}(?![\d.])", source) for n in numbers)

def hazards(outputs, source: str = "", patterns=None) -> list:
    "What in a cell's fresh outputs cannot be the same elsewhere: (kind, the text found)."
    text, found = all_text(outputs), []
    for name, rx in (patterns or hazard_patterns()).items():
        hits = [m.group(0) for m in rx.finditer(text)]
        if name != "an absolute or temporary path": hits = [h for h in hits if not echoed(h, source)]
        if hits: found.append((name, hits[0]))
    return found

# --- stored versus fresh -----------------------------------------------------------------------------------

def clean(nb: dict) -> dict:
    "`nb` cleaned as `nbdev-clean` cleans it with this repository's settings (outputs kept)."
    from nbdev.clean import clean_nb
    cfg = config()
    keys = [cfg.get(k) or [] for k in ("allowed_metadata_keys", "allowed_cell_metadata_keys")]
    clean_nb(nb, cfg.clear_all, *keys, cfg.clean_ids, cfg.get("allowed_out_metadata_keys") or [])
    return nb

def with_outputs(nb: dict, cells: dict) -> tuple:
    "A copy of `nb` holding the fresh outputs of `cells` where a cell's source is still the one that ran."
    nb, changed = copy.deepcopy(nb), []
    for cell in nb["cells"]:
        fresh = cells.get(cell.get("id"))
        if fresh is None or cell["cell_type"] != "code": continue
        if joined(cell["source"]) != fresh["source"]: changed.append(cell["id"]); continue
        cell["outputs"] = copy.deepcopy(fresh["outputs"])
    return clean(nb), changed

def first_difference(stored: list, fresh: list) -> tuple:
    "The 1-based number of the first differing line and the two lines there ('' past the end)."
    for i in range(max(len(stored), len(fresh))):
        a = stored[i] if i < len(stored) else ""
        b = fresh[i] if i < len(fresh) else ""
        if a != b: return i + 1, a, b
    return None

def differences(stored_nb: dict, fresh_nb: dict, ran: set) -> list:
    "(cell id, line number, stored line, fresh line) for each executed cell whose shown output changed."
    fresh = {c.get("id"): c for c in fresh_nb["cells"]}
    found = []
    for cell in stored_nb["cells"]:
        if cell.get("id") not in ran or cell["cell_type"] != "code": continue
        diff = first_difference(shown_lines(cell.get("outputs", [])),
                                shown_lines(fresh[cell["id"]].get("outputs", [])))
        if diff: found.append((cell["id"], *diff))
    return found

def short(text: str, start: int = 0, width: int = 60) -> str:
    "`text` quoted, cut to `width` characters from `start` (a shown cut is marked '...')."
    start = max(0, min(start, len(text) - width))
    cut = text[start:start + width]
    return ("..." if start else "") + repr(cut) + ("..." if start + width < len(text) else "")

def diverge(a: str, b: str) -> int:
    "The index of the first character where `a` and `b` differ, less a little context."
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return max(0, i - 20)

def name_of(path) -> str:
    "`path` relative to the working directory when it lies below it."
    path = Path(path)
    try: return str(path.relative_to(Path.cwd()))
    except ValueError: return str(path)

def report(result: dict, write: bool, patterns=None) -> dict:
    "Compare (or store) one executed notebook; problem lines and counts."
    from fastcore.nbio import write_nb
    path, problems = Path(result["path"]), []
    name = name_of(path)
    if result["error"]:
        return dict(problems=[f"{name}: failed to execute:\n{result['error']}"], compared=0, differ=0,
                    hazards=0)
    stored = json.loads(path.read_text(encoding="utf-8"))
    fresh_nb, changed = with_outputs(stored, result["cells"])
    problems += [f"{name} cell {cid}: its source changed while it ran; output not stored" for cid in changed]
    found = [(cid, kind, text) for cid, cell in result["cells"].items()
             for kind, text in hazards(cell["outputs"], cell["source"], patterns)]
    problems += [f"{name} cell {cid}: output shows {kind}, not the same on every machine and run: "
                 f"{short(text)}" for cid, kind, text in found]
    diffs = [] if write else differences(clean(copy.deepcopy(stored)), fresh_nb, set(result["cells"]))
    for cid, line, a, b in diffs:
        at = diverge(a, b)
        shown = (f"stored {short(a, at)} | fresh {short(b, at)}" if a or line > 1
                 else f"no stored output | fresh {short(b)}")
        problems.append(f"{name} cell {cid}: line {line}: {shown}")
    if write: write_nb(fresh_nb, path)
    return dict(problems=problems, compared=len(result["cells"]), differ=len(diffs) + len(changed),
                hazards=len({cid for cid, _, _ in found}))

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="store the fresh outputs into the notebooks")
    mode.add_argument("--check", action="store_true", help="fail when a stored output differs (the default)")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: those nbdev-test runs)")
    parser.add_argument("--flags", default="",
                        help="also run the cells with these skip flags, space-separated (as nbdev-test --flags)")
    parser.add_argument("--workers", type=int, default=2,
                        help="notebooks executed at once (0: one after another in this process)")
    args = parser.parse_args(argv)
    paths = [Path(p).absolute() for p in args.notebooks] or default_notebooks(config())
    missing = [str(p) for p in paths if not p.is_file()]
    if missing: parser.error(f"no such notebook: {', '.join(missing)}")
    patterns, totals, failed = hazard_patterns(), dict(compared=0, differ=0, hazards=0), []
    for result in run_all(paths, args.workers, force=args.flags.split()):
        res = report(result, args.write, patterns)
        for line in res["problems"]: print(line, file=sys.stderr)
        if result["error"]: failed.append(name_of(result["path"]))
        for k in totals: totals[k] += res[k]
    done = (f"stored the outputs of {totals['compared']} cells" if args.write
            else f"compared {totals['compared']} cells, {totals['differ']} differ")
    which = f" ({', '.join(failed)})" if failed else ""
    print(f"{len(paths)} notebooks executed, {len(failed)} failed{which}; {done}; "
          f"{totals['hazards']} show a path, address, time or version that differs elsewhere")
    return 1 if failed or totals["differ"] or totals["hazards"] else 0

if __name__ == "__main__": sys.exit(main())
