"""The token cache's tokenising pool: what sending records to the worker processes costs, and a compact transport.

`build_token_cache` with N > 1 workers pickles each `Sample` (dataclasses) to a worker and each record's result
(two numpy arrays) back. This measures, on the same generated stage-1 file (`bench_data_scale.make_data`: one
image, a 10-40 word caption, 576 image tokens), wall time and CPU time (this process and its children) per
record of:

- `1`: `build_token_cache(..., workers=1)`, in this process (the default on a 2-core machine: cores - 1);
- `2`: `build_token_cache(..., workers=2)`, today's pool;
- `compact2`: a pool of 2 sending each record as `(id, image, ((role, text), ...))` tuples in chunks of 1024
  and getting one bytes blob of ids, one of masks and a list of lengths back per chunk (the same
  `_compact_tokens` in the workers; the parent writes the two files). Its ids and masks are checked equal to
  `build_token_cache`'s.

    OMP_NUM_THREADS=1 python bench/bench_token_cache_pool.py --n 100000 --runs 1 2 compact2
"""
import argparse, multiprocessing, os, resource, sys, tempfile, time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_s() -> float:
    "CPU seconds of this process and its finished children."
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def compact_chunk(rows):
    "In a worker: `(id, image, turns)` rows -> (ids bytes, mask bytes, lengths, refused row numbers)."
    import numpy as np
    from llavamed.core import Sample, Turn
    from llavamed import train as T
    w, ids, masks, lengths, refused = T._WORKER, [], [], [], []
    for j, (rid, image, turns) in enumerate(rows):
        sample = Sample(id=rid, conversations=[Turn(role, text) for role, text in turns], image=image)
        got = T._compact_tokens(sample, w["tok"], w["template"], w["max_length"], w["n_img"], w["image_id"])
        if isinstance(got, str): refused.append(j); continue
        ids.extend(got[0]); masks.extend(got[1]); lengths.append(len(got[0]))
    return np.asarray(ids, np.int32).tobytes(), np.asarray(masks, np.uint8).tobytes(), lengths, refused


def compact_pool(data: Path, proc, template: str, workers: int, folder: Path) -> int:
    "Tokenise `data` into `folder/ids.bin` and `folder/mask.bin` with the compact transport; the records kept."
    from llavamed.core import iter_samples
    from llavamed import train as T
    settings = {"tok": proc.tokenizer, "template": template, "max_length": 2048,
                "n_img": T.image_token_count(proc), "image_id": proc.image_token_id}
    rows = ((s.id, s.image, tuple((t.role, t.text) for t in s.conversations))
            for s in iter_samples(data, skip_bad=True))
    kept = 0
    with open(folder / "ids.bin", "wb") as ids, open(folder / "mask.bin", "wb") as mask, \
            multiprocessing.get_context("fork").Pool(workers, T._init_worker, (settings,)) as pool:
        pending = deque()  # a few chunks in flight per worker
        def take():
            nonlocal kept
            got_ids, got_mask, lengths, _ = pending.popleft().get()
            ids.write(got_ids); mask.write(got_mask); kept += len(lengths)
        for chunk in T._chunks(rows, 1024):
            pending.append(pool.apply_async(compact_chunk, (chunk,)))
            if len(pending) >= 4 * workers: take()
        while pending: take()
    return kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--runs", nargs="+", default=["1", "2", "compact2"])
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
        if how.startswith("compact"): kept = compact_pool(data, proc, template, int(how[7:]), folder)
        else: kept = len(T.build_token_cache(iter_samples(data, skip_bad=True), proc, template, 2048, folder,
                                             int(how)))
        wall, cpu = time.perf_counter() - t0, cpu_s() - c0
        same = {h: all((folder / f).read_bytes() == (folders[h] / f).read_bytes() for f in ("ids.bin", "mask.bin"))
                for h in folders if h != how}
        print(f"{how:9s} {kept} records: {wall:6.1f} s wall ({kept / wall:6.0f}/s), CPU {cpu:6.1f} s "
              f"= {cpu / kept * 1e6:4.0f} us/record; load {load0:.1f}->{os.getloadavg()[0]:.1f}; "
              f"files equal to {same}", flush=True)


if __name__ == "__main__":
    main()
