"""Benchmark of the widgets at the sizes of the released files, measured side by side in one run.

  1. ConversationBrowser over N alignment-style records (500K = the released alignment set): time to load,
     the first text search (builds the per-record search text), a repeated search, a domain filter,
     next and a jump to an id.
  2. TrainingCurves on a log of L lines: the first read, then a refresh after 10 appended lines, which
     reads only the appended bytes (ratio full read / refresh).

    .venv/bin/python bench/bench_widgets.py [--n 500000] [--log-lines 100000]
"""
from __future__ import annotations
import argparse, json, tempfile, time
from pathlib import Path
from llavamed.core import DOMAINS, append_jsonl, write_json
from llavamed.widgets import ConversationBrowser, TrainingCurves


def timed(fn):
    t = time.perf_counter(); out = fn(); return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--log-lines", type=int, default=100_000)
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    rows = [{"id": f"{30000000 + i}_F1", "image": f"{30000000 + i}_F1.jpg",
             "domain": {x: x == DOMAINS[i % 5] for x in DOMAINS},
             "conversations": [{"from": "human", "value": "<image>\nDescribe the figure concisely."},
                               {"from": "gpt", "value": f"Axial CT showing a {i % 97} mm nodule in the right lower lobe."}]}
            for i in range(a.n)]
    write_json(d / "alignment.json", rows, indent=None); del rows
    b, t_load = timed(lambda: ConversationBrowser(d / "alignment.json"))
    _, t_s1 = timed(lambda: b.search("42 mm nodule"))
    n_hit = len(b.view)
    _, t_s2 = timed(lambda: b.search("41 mm nodule"))
    _, t_dom = timed(lambda: b.filter(query=None, domain="mri"))
    _, t_next = timed(lambda: b.next())
    _, t_jump = timed(lambda: b.jump(f"{30000000 + a.n // 2}_F1"))
    print(f"ConversationBrowser, {a.n:,} records: load {t_load:.2f} s; first search {t_s1:.2f} s ({n_hit:,} hits); "
          f"repeated search {t_s2:.2f} s; domain filter {t_dom:.2f} s; next {t_next * 1e3:.2f} ms; "
          f"jump (clears filters) {t_jump:.2f} s")

    log = d / "run" / "stage1" / "log_history.jsonl"; log.parent.mkdir(parents=True)
    with open(log, "w") as f:
        for s in range(1, a.log_lines + 1):
            f.write(json.dumps({"step": s, "epoch": s / a.log_lines, "loss": 3 / s ** .3, "learning_rate": 2e-3}) + "\n")
    tc, t_first = timed(lambda: TrainingCurves(d / "run"))
    for s in range(a.log_lines + 1, a.log_lines + 11): append_jsonl(log, {"step": s, "epoch": 1.0, "loss": 0.1, "learning_rate": 0})
    new, t_ref = timed(tc.refresh)
    _, t_png = timed(tc.png)
    print(f"TrainingCurves, {a.log_lines:,} log lines: first read {t_first * 1e3:.1f} ms; refresh after 10 appended lines "
          f"{t_ref * 1e3:.2f} ms ({new} new points, {t_first / max(t_ref, 1e-9):.0f}x less than a full read); "
          f"figure {t_png * 1e3:.0f} ms")


if __name__ == "__main__": main()
