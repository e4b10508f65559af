"""Training data at paper scale: the token cache's memory, start-up time and throughput (CPU, no GPU needed).

Generated stage-1 style records (one image, a 10-40 word caption, plain template) at each size, the image
placeholder worth 576 tokens (LLaVA-1.5's 336 px / 14 px grid) and the records reusing `--images` distinct
64 px images. Each figure is measured in a fresh child process, so peak memory is that process's own:

- dataset peak RSS: the child's peak RSS minus its RSS just before the dataset is made (model processor
  already loaded);
- time to first batch, cold (empty cache: tokenise, write, map, image preflight, grouped order, first
  collated batch) and warm (the same with the cache in place);
- tokenisation throughput: records / cold dataset seconds / the machine's cores, for each
  `--tokenize-workers` count (0: the library's default), and a cold start split into its phases (reading the
  file alone, building the cache, the dataset on the warm cache: image preflight and index);
- memory after a full pass over the data (every item, collated in batches of 64; the collator's pixels at
  64 px so a pass takes minutes, the items keep their 576 image tokens) with no data-loader workers and
  with 4, from /proc/PID/smaps of the main process and of each worker, split by kind of mapping (the token
  cache's files, other files such as libraries, anonymous memory, shared memory): RSS, PSS (pages shared
  between processes divided among them) and USS (pages of that process alone), after the first batch and
  after the pass (the growth of USS between them), and the ratios with workers to without of RSS, PSS and
  USS, of all memory and of the processes' own (anonymous + shared memory + cache pages: the libraries'
  pages are shared with every Python process on the machine, so their PSS depends on what else runs).
  The passes with workers: `pass4` as they run today; `pass4_mmap_threshold`: each worker's glibc malloc
  with a fixed mmap threshold of 64 KiB, so the batch buffers it frees go back to the system (glibc raises
  its threshold after each freed mapped block, the next batches then come from the heap, which keeps them);
  `pass4_freeze`, `pass4_collect_freeze`, `pass4_worker_freeze`: `gc.freeze()` in the parent or in each
  worker (copy-on-write through the workers' garbage collector, for comparison);
- two processes mapping one cache: the sum of their PSS on the cache files vs one process's RSS on them.

    OMP_NUM_THREADS=1 python bench/bench_data_scale.py --sizes 10000 100000 [600000] [--images 2000]
        [--tokenize-workers 0 2] [--passes pass0 pass4 pass4_mmap_threshold pass4_freeze] [--no-pass]
"""
import argparse, gc, json, multiprocessing, os, random, re, resource, subprocess, sys, tempfile, time
from pathlib import Path

WORDS = ("the chest x-ray shows a small nodule in the left lower lobe with no pleural effusion axial ct of the "
         "abdomen demonstrates a hypodense lesion mri brain t2 hyperintense focus histology haematoxylin eosin "
         "stain shows atypical cells gross specimen with a well circumscribed mass").split()


def make_data(root: Path, n: int, n_images: int, seed: int = 0) -> Path:
    "A JSONL file of `n` caption records over `n_images` generated images (made once per folder)."
    from PIL import Image
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        if not (root / "images" / f"{i}.png").exists():
            Image.new("RGB", (64, 64), (i % 250, 40, 90)).save(root / "images" / f"{i}.png")
    path = root / f"align_{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            cap = " ".join(rng.choices(WORDS, k=rng.randint(10, 40))) + "."
            f.write(json.dumps({"id": str(i), "image": f"{i % n_images}.png", "conversations": [
                {"from": "human", "value": "<image>\nDescribe the figure."}, {"from": "gpt", "value": cap}]}) + "\n")
    return path


def processor_576(root: Path):
    "The tiny preset's processor, its image processor at 336 px with 14 px patches: 576 image tokens."
    from llavamed.model import build_model
    from llavamed.train import image_token_count
    _, proc = build_model("tiny")
    proc.patch_size = 14
    proc.image_processor.crop_size = {"height": 336, "width": 336}
    proc.image_processor.size = {"shortest_edge": 336}
    assert image_token_count(proc) == 576, image_token_count(proc)
    return proc


def rss_mb(pid="self") -> float:
    "Current resident set size in MB."
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"): return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid, only: str | None = None) -> tuple[float, float]:
    "(PSS, RSS) in MB of process `pid`, of all its memory or only of mappings whose path contains `only`."
    got = memory_mb(pid, only)
    if only is None: return sum(k["pss"] for k in got.values()), sum(k["rss"] for k in got.values())
    return got["cache"]["pss"], got["cache"]["rss"]


KINDS = ("cache", "file", "anon", "shmem")  # token cache files, other files (libraries), anonymous, shared


def _kind(path: str, cache: str | None) -> str:
    "Which of `KINDS` a mapping with this path is."
    if cache and cache in path: return "cache"
    if path.startswith(("/dev/shm/", "/memfd:", "/SYSV")) or path.endswith("(deleted)"): return "shmem"
    return "file" if path.startswith("/") else "anon"  # '', [heap], [stack], [anon:...]


def memory_mb(pid, cache: str | None = None) -> dict:
    "RSS, PSS and USS (private clean + dirty) in MB of process `pid` by `KINDS`, from /proc/PID/smaps."
    out, kind = {k: {"rss": 0, "pss": 0, "uss": 0} for k in KINDS}, "anon"
    for line in open(f"/proc/{pid}/smaps"):
        head = line.split(None, 5)
        if re.match(r"[0-9a-f]+-[0-9a-f]+$", head[0]):
            kind = _kind(head[5].strip() if len(head) > 5 else "", cache)
        elif head[0] == "Rss:": out[kind]["rss"] += int(head[1])
        elif head[0] == "Pss:": out[kind]["pss"] += int(head[1])
        elif head[0] in ("Private_Clean:", "Private_Dirty:"): out[kind]["uss"] += int(head[1])
    return {k: {m: round(v / 1024, 1) for m, v in d.items()} for k, d in out.items()}


def _total(per_process: list[dict], measure: str) -> float:
    "The sum of `measure` over every process and kind."
    return round(sum(d[measure] for p in per_process for d in p.values()), 1)


def _freeze_in_worker(_):
    "A data-loader worker's first act: its collector leaves the objects it inherited alone."
    gc.freeze()


def _fixed_mmap_threshold(_=None):
    "glibc's malloc: blocks of 64 KiB and over mapped (unmapped when freed), the threshold no longer raised."
    import ctypes
    threshold = int(os.environ.get("BENCH_MMAP_THRESHOLD", 1 << 16))  # bytes; 64 KiB unless the environment says
    ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it ends the dynamic threshold


PASSES = {  # a full pass: (data-loader workers, their init function); the freezes keep the parent's objects
    "pass0": (0, None),  # out of the workers' garbage collections, each in another way
    "pass4": (4, None), "pass4_freeze": (4, None), "pass4_collect_freeze": (4, None),
    "pass4_worker_freeze": (4, _freeze_in_worker),
    "pass4_mmap_threshold": (4, _fixed_mmap_threshold)}  # each worker's malloc returns freed batch buffers


def child(args) -> None:
    "One measurement in this (fresh) process; prints one JSON line."
    import numpy as np, torch
    from llavamed.train import SupervisedDataset, Collator, grouped_order
    torch.set_num_threads(1)
    root, what = Path(args.root), args.child
    proc = processor_576(root)
    data = root / f"align_{args.n}.jsonl"
    before, before_pss, t0 = rss_mb(), pss_mb(os.getpid())[0], time.perf_counter()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if what in ("cold", "warm"):
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False,
                               tokenize_workers=args.tokenize_workers[0])
        t_ds = time.perf_counter() - t0
        order = grouped_order(ds.lengths, ds.has_image, 16, 8, seed=0)
        batch = Collator(proc)([ds[i] for i in order[:16]])
        t_first = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"what": what, "dataset_s": round(t_ds, 2), "first_batch_s": round(t_first, 2),
                          "dataset_peak_rss_mb": round(max(peak, peak0) - before, 1), "records": len(ds),
                          "batch_shape": list(batch["input_ids"].shape)}))
    elif what == "phases":  # where a cold start's time goes: reading, tokenising, the rest of the dataset
        from llavamed.core import iter_samples
        from llavamed.train import open_token_cache
        n_read = sum(1 for _ in iter_samples(data, skip_bad=True))
        t_read = time.perf_counter() - t0
        _, warm = open_token_cache(data, proc, template="plain", max_length=2048,
                                   workers=args.tokenize_workers[0])
        t_tokens = time.perf_counter() - t0 - t_read
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False)
        t_rest = time.perf_counter() - t0 - t_read - t_tokens
        batch = Collator(proc)([ds[i] for i in grouped_order(ds.lengths, ds.has_image, 16, 8, seed=0)[:16]])
        print(json.dumps({"what": what, "tokenize_workers": args.tokenize_workers[0], "was_warm": warm,
                          "read_s": round(t_read, 2), "read_records_per_s": round(n_read / t_read),
                          "cache_build_s": round(t_tokens, 2), "dataset_on_warm_cache_s": round(t_rest, 2),
                          "first_batch_s": round(time.perf_counter() - t0 - t_read - t_tokens - t_rest, 2),
                          "preflight_images": ds.preflight["images"],
                          "batch_shape": list(batch["input_ids"].shape)}))
    elif what in PASSES:
        from torch.utils.data import DataLoader
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False)
        workers = PASSES[what][0]
        proc.image_processor.crop_size = {"height": 64, "width": 64}  # the items keep their 576 image tokens;
        proc.image_processor.size = {"shortest_edge": 64}  # 64 px pixels keep a full pass within minutes
        dl = DataLoader(ds, batch_size=64, collate_fn=Collator(proc), num_workers=workers,
                        persistent_workers=workers > 0, worker_init_fn=PASSES[what][1])
        if what == "pass4_collect_freeze": gc.collect()
        if what in ("pass4_freeze", "pass4_collect_freeze"): gc.freeze()
        cache = str(ds.tokens.folder)
        def measure():  # by process (this one first, then its data-loader workers) and kind of mapping
            pids = [os.getpid()] + [c.pid for c in multiprocessing.active_children()]
            return [memory_mb(p, cache) for p in pids]
        n, first = 0, None
        for b in dl:
            n += b["input_ids"].shape[0]
            if first is None: first = measure()
        end = measure()
        growth = [{k: round(e[k]["uss"] - f[k]["uss"], 1) for k in KINDS} for f, e in zip(first, end)]
        totals = {f"{m}_{when}_mb": _total(got, m) for m in ("rss", "pss", "uss")
                  for when, got in (("first_batch", first), ("after_pass", end))}
        print(json.dumps({"what": what, "items": n, "processes": len(end),
                          "pss_before_dataset_mb": round(before_pss, 1), **totals,
                          "uss_growth_over_pass_mb": growth, "after_pass": end}))
    elif what == "map":  # touch every page of the cache's token files, then wait to be measured
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False)
        s = int(np.asarray(ds.tokens.ids).sum()) + int(np.asarray(ds.tokens.mask).sum())
        print(json.dumps({"folder": str(ds.tokens.folder), "sum": s}), flush=True)
        sys.stdin.readline()


def pass_ratios(workers: dict, none: dict) -> dict:
    "After the pass, with workers over without: RSS, PSS and USS of all memory and of the processes' own."
    own = lambda r, m: sum(p[k][m] for p in r["after_pass"] for k in ("anon", "shmem", "cache"))
    whole = lambda r, m: r[f"{m}_after_pass_mb"]
    return {**{m: round(whole(workers, m) / whole(none, m), 2) for m in ("rss", "pss", "uss")},
            **{f"own_{m}": round(own(workers, m) / own(none, m), 2) for m in ("rss", "pss", "uss")}}


def run_child(root, n, what, extra=(), cache=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **({"LLAVAMED_CACHE": str(cache)} if cache else {})}
    p = subprocess.run([sys.executable, __file__, "--child", what, "--root", str(root), "--n", str(n), *extra],
                       env=env, capture_output=True, text=True)
    if p.returncode: raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def two_processes(root, n):
    "Two processes map the same warm cache: their PSS on its files sums to about one copy."
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", "map", "--root", str(root), "--n", str(n)]
    ps = [subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    lines = [json.loads(p.stdout.readline()) for p in ps]
    folder = lines[0]["folder"]
    got = [pss_mb(p.pid, folder) for p in ps]
    for p in ps: p.stdin.write("\n"); p.stdin.flush(); p.wait()
    return {"cache_files_rss_one_mb": round(got[0][1], 1), "cache_files_pss_sum_mb": round(sum(g[0] for g in got), 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--no-pass", action="store_true", help="skip the full passes over the data")
    ap.add_argument("--passes", nargs="+", default=["pass0", "pass4", "pass4_mmap_threshold"], choices=PASSES,
                    help="full passes to measure (pass0: no workers, the denominator of the ratios)")
    ap.add_argument("--tokenize-workers", type=int, nargs="+", default=[0],
                    help="cold starts with these tokenising processes (0: the default, cores - 1)")
    ap.add_argument("--child"); ap.add_argument("--root"); ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.child: return child(args)
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ["LLAVAMED_CACHE"] = str(root / "cache")
    cores = len(os.sched_getaffinity(0))
    for n in args.sizes:
        make_data(root, n, args.images)
        res = {"records": n, "distinct_images": args.images, "cores": cores}
        for i, w in enumerate(args.tokenize_workers):  # the first fills the cache the rest of the run maps
            cold = run_child(root, n, "cold", ["--tokenize-workers", str(w)],
                             cache=None if i == 0 else Path(tempfile.mkdtemp(dir=root, prefix="cold-")))
            res[f"cold_tokenize_workers_{w}"] = {**cold,
                                                 "records_per_s_per_core": round(n / cold["dataset_s"] / cores)}
        res["warm"] = run_child(root, n, "warm")
        res["cold_phases"] = run_child(root, n, "phases", ["--tokenize-workers", str(args.tokenize_workers[0])],
                                       cache=Path(tempfile.mkdtemp(dir=root, prefix="phases-")))
        if not args.no_pass:
            for what in dict.fromkeys(["pass0", *args.passes]): res[what] = run_child(root, n, what)
            for what in args.passes:  # own memory: anonymous + shared memory + cache pages (the target: < 1.2x)
                if what != "pass0": res[f"ratio_{what}_to_pass0"] = pass_ratios(res[what], res["pass0"])
        res["two_processes"] = two_processes(root, n)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
