"""Benchmark of the widgets at the sizes of the released files, measured side by side in one run.

  1. ConversationBrowser over N alignment-style records (500K = the released alignment set): time to load
     (read through `llavamed.core.iter_records`, the project's one streaming reader), the first text search
     (builds the per-record search text), a repeated search, a domain filter, next and a jump to an id.
  2. TrainingCurves on a log of L lines: the first read, then a refresh after 10 appended lines, which
     reads only the appended bytes (ratio full read / refresh).

    .venv/bin/python bench/bench_widgets.py [--n 500000] [--log-lines 100000]
"""
from __future__ import annotations
import argparse, json, tempfile, time
from pathlib import Path
from llavamed.core import DOMAINS, append_jsonl, write_json
from llavamed.widgets import ConversationBrowser, TrainingCurves


def timed(action):
    "The result of `action()` and the seconds it took."
    start = time.perf_counter(); result = action()
    return result, time.perf_counter() - start


def alignment_records(n: int) -> list[dict]:
    "N records shaped like the released alignment set: one caption turn each, the domains in turn."
    caption = "Axial CT showing a {} mm nodule in the right lower lobe."
    return [{"id": f"{30000000 + i}_F1", "image": f"{30000000 + i}_F1.jpg",
             "domain": {name: name == DOMAINS[i % 5] for name in DOMAINS},
             "conversations": [{"from": "human", "value": "<image>\nDescribe the figure concisely."},
                               {"from": "gpt", "value": caption.format(i % 97)}]}
            for i in range(n)]


def bench_browser(folder: Path, n: int):
    "Load, search, filter, move and jump over `n` records."
    write_json(folder / "alignment.json", alignment_records(n), indent=None)
    browser, t_load = timed(lambda: ConversationBrowser(folder / "alignment.json"))
    _, t_search = timed(lambda: browser.search("42 mm nodule"))
    n_hits = len(browser.view)
    _, t_again = timed(lambda: browser.search("41 mm nodule"))
    _, t_domain = timed(lambda: browser.filter(query=None, domain="mri"))
    _, t_next = timed(lambda: browser.next())
    _, t_jump = timed(lambda: browser.jump(f"{30000000 + n // 2}_F1"))
    print(f"ConversationBrowser, {n:,} records: load {t_load:.2f} s; first search {t_search:.2f} s "
          f"({n_hits:,} hits); repeated search {t_again:.2f} s; domain filter {t_domain:.2f} s; "
          f"next {t_next * 1e3:.2f} ms; jump (clears filters) {t_jump:.2f} s")


def bench_curves(folder: Path, n_lines: int):
    "The first read of an `n_lines` log, then a refresh after 10 appended lines, and the figure."
    log = folder / "run" / "stage1" / "log_history.jsonl"; log.parent.mkdir(parents=True)
    with open(log, "w") as log_file:
        for step in range(1, n_lines + 1):
            point = {"step": step, "epoch": step / n_lines, "loss": 3 / step ** .3, "learning_rate": 2e-3}
            log_file.write(json.dumps(point) + "\n")
    curves, t_first = timed(lambda: TrainingCurves(folder / "run"))
    for step in range(n_lines + 1, n_lines + 11):
        append_jsonl(log, {"step": step, "epoch": 1.0, "loss": 0.1, "learning_rate": 0})
    new, t_refresh = timed(curves.refresh)
    _, t_png = timed(curves.png)
    ratio = t_first / max(t_refresh, 1e-9)
    print(f"TrainingCurves, {n_lines:,} log lines: first read {t_first * 1e3:.1f} ms; refresh after 10 "
          f"appended lines {t_refresh * 1e3:.2f} ms ({new} new points, {ratio:.0f}x less than a full read); "
          f"figure {t_png * 1e3:.0f} ms")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--log-lines", type=int, default=100_000)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    bench_browser(folder, args.n)
    bench_curves(folder, args.log_lines)


if __name__ == "__main__": main()
