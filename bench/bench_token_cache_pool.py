"""The token cache's tokenising pool against one process: wall and CPU time per record.

`build_token_cache` with N > 1 workers sends each chunk of 1024 records to a worker as plain
`(id, image, ((role, text), ...))` tuples and gets one blob of ids, one of masks and a list of token counts
back per chunk (pickling `Sample` dataclasses out and two arrays per record back cost 40-45 us of CPU per
record, more than a second core gained on 2 cores). On the same generated stage-1 file
(`bench_data_scale.make_data`: one image, a 10-40 word caption, 576 image tokens) this prints wall time and
CPU time (this process and its children) per record for each worker count, and checks that the files are equal.

    OMP_NUM_THREADS=1 python bench/bench_token_cache_pool.py --n 100000 --runs 1 2
"""
import argparse, os, resource, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_s() -> float:
    "CPU seconds of this process and its finished children."
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", nargs="+", default=["1", "2"], help="worker counts to compare")
    args = ap.parse_args()
    import torch
    from bench_data_scale import make_data, processor_576
    from llavamed.core import iter_samples
    from llavamed import train as T
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    data, proc = make_data(root, args.n, args.images), processor_576(root)
    template, folders = T.resolve_template(proc, "plain"), {}
    for how in args.runs:
        folder = folders[how] = Path(tempfile.mkdtemp(dir=root, prefix=f"{how}-"))
        c0, t0, load0 = cpu_s(), time.perf_counter(), os.getloadavg()[0]
        kept = len(T.build_token_cache(iter_samples(data, skip_bad=True), proc, template, 2048, folder, int(how)))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        same = {h: all((folder / f).read_bytes() == (folders[h] / f).read_bytes() for f in ("ids.bin", "mask.bin"))
                for h in folders if h != how}
        print(f"{how:9s} {kept} records: {wall:6.1f} s wall ({kept / wall:6.0f}/s), CPU {cpu:6.1f} s "
              f"= {cpu / kept * 1e6:4.0f} us/record; load {load0:.1f}->{os.getloadavg()[0]:.1f}; "
              f"files equal to {same}", flush=True)


if __name__ == "__main__":
    main()
