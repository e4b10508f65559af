"""`llavamed synth` throughput: figures per second, end to end (render, encode, write every file).

Target: >= 50 figures/s at 224 px on one CPU core. Also prints the render-only rate per domain and the
end-to-end rate at 64 px (the demo's image size) for scale. Wall-clock and CPU time are both shown,
since the machine may be shared.

    nice .venv/bin/python bench/bench_synth.py [--n 1000]
"""
import argparse, tempfile, time
from pathlib import Path
from llavamed.core import DOMAINS
from llavamed.synth import make_corpus, render_figure, sample_findings

def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="figures per corpus (80% train, 20% test)")
    n = ap.parse_args().n
    with tempfile.TemporaryDirectory() as tmp:
        for size in (224, 64):
            wall, cpu = timed(lambda: make_corpus(Path(tmp) / str(size), n_train=n * 4 // 5, n_test=n - n * 4 // 5,
                                                  size=size, quiet=True))
            files = sum(1 for _ in (Path(tmp) / str(size)).rglob("*"))
            print(f"make_corpus {n} figures at {size:3d} px: {wall:6.2f} s wall, {cpu:6.2f} s CPU -> "
                  f"{n / wall:6.1f} figures/s (wall), {n / cpu:6.1f} figures/s (CPU); {files} files")
    figs = sample_findings(500, seed=1)
    for d in DOMAINS:
        fd = [f for f in figs if f["domain"] == d]
        wall, cpu = timed(lambda: [render_figure(f, 224, f["seed"]) for f in fd])
        print(f"render only, {d:10s} at 224 px: {len(fd) / cpu:6.1f} figures/s (CPU)")

if __name__ == "__main__": main()
