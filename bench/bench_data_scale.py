"""Training data at paper scale: the token cache's memory, start-up time and throughput (CPU, no GPU needed).

Generated stage-1 style records (one image, a 10-40 word caption, plain template) at each size, the image
placeholder worth 576 tokens (LLaVA-1.5's 336 px / 14 px grid) and the records reusing `--images` distinct
64 px images. Each figure is measured in a fresh child process, so peak memory is that process's own:

- dataset peak RSS: the child's peak RSS minus its RSS just before the dataset is made (model processor
  already loaded);
- time to first batch, cold (empty cache: tokenise, write, map, image preflight, grouped order, first
  collated batch) and warm (the same with the cache in place);
- tokenisation throughput: records / cold dataset seconds / the machine's cores;
- memory after a full pass over the data (every item, collated in batches of 64; the collator's pixels at
  64 px so a pass takes minutes, the items keep their 576 image tokens) with no data-loader workers and
  with 4: the sum of the processes' PSS (pages shared between them counted once in all) after the first
  batch and after the pass (its growth is what copy-on-write of the dataset would add), beside the
  process's PSS just before the dataset was made;
- two processes mapping one cache: the sum of their PSS on the cache files vs one process's RSS on them.

    OMP_NUM_THREADS=1 python bench/bench_data_scale.py --sizes 10000 100000 [600000] [--images 2000]
"""
import argparse, json, multiprocessing, os, random, resource, subprocess, sys, tempfile, time
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
    if only is None:
        vals = dict(l.split(":", 1) for l in open(f"/proc/{pid}/smaps_rollup") if ":" in l and not l[0].isdigit() and not l.startswith(("5", "7")))
        return int(vals["Pss"].split()[0]) / 1024, int(vals["Rss"].split()[0]) / 1024
    pss = rss = 0; inside = False
    for line in open(f"/proc/{pid}/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5: inside = len(head) >= 6 and only in head[-1]
        elif inside and head[0] == "Pss:": pss += int(head[1])
        elif inside and head[0] == "Rss:": rss += int(head[1])
    return pss / 1024, rss / 1024


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
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False)
        t_ds = time.perf_counter() - t0
        order = grouped_order(ds.lengths, ds.has_image, 16, 8, seed=0)
        batch = Collator(proc)([ds[i] for i in order[:16]])
        t_first = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"what": what, "dataset_s": round(t_ds, 2), "first_batch_s": round(t_first, 2),
                          "dataset_peak_rss_mb": round(max(peak, peak0) - before, 1), "records": len(ds),
                          "batch_shape": list(batch["input_ids"].shape)}))
    elif what in ("pass0", "pass4"):
        from torch.utils.data import DataLoader
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False)
        workers = 4 if what == "pass4" else 0
        proc.image_processor.crop_size = {"height": 64, "width": 64}  # the items keep their 576 image tokens;
        proc.image_processor.size = {"shortest_edge": 64}  # 64 px pixels keep a full pass within minutes
        dl = DataLoader(ds, batch_size=64, collate_fn=Collator(proc), num_workers=workers,
                        persistent_workers=workers > 0)
        def total():  # PSS of this process and its data-loader workers
            pids = [os.getpid()] + [p.pid for p in multiprocessing.active_children()]
            return sum(pss_mb(p)[0] for p in pids), len(pids)
        n, first = 0, None
        for b in dl:
            n += b["input_ids"].shape[0]
            if first is None: first = total()[0]
        end, n_proc = total()
        print(json.dumps({"what": what, "items": n, "processes": n_proc, "pss_before_dataset_mb": round(before_pss, 1),
                          "pss_first_batch_mb": round(first, 1), "pss_after_pass_mb": round(end, 1),
                          "growth_over_pass_mb": round(end - first, 1)}))
    elif what == "map":  # touch every page of the cache's token files, then wait to be measured
        ds = SupervisedDataset(data, proc, root / "images", template="plain", text_only=False)
        s = int(np.asarray(ds.tokens.ids).sum()) + int(np.asarray(ds.tokens.mask).sum())
        print(json.dumps({"folder": str(ds.tokens.folder), "sum": s}), flush=True)
        sys.stdin.readline()


def run_child(root, n, what, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
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
    ap.add_argument("--child"); ap.add_argument("--root"); ap.add_argument("--n", type=int)
    args = ap.parse_args()
    if args.child: return child(args)
    root = Path(tempfile.mkdtemp(prefix="bench-data-"))
    os.environ["LLAVAMED_CACHE"] = str(root / "cache")
    cores = len(os.sched_getaffinity(0))
    for n in args.sizes:
        make_data(root, n, args.images)
        cold = run_child(root, n, "cold")
        warm = run_child(root, n, "warm")
        res = {"records": n, "distinct_images": args.images, "cores": cores, "cold": cold, "warm": warm,
               "records_per_s_per_core_cold": round(n / cold["dataset_s"] / cores)}
        if not args.no_pass:
            res["pass_no_workers"] = run_child(root, n, "pass0")
            res["pass_4_workers"] = run_child(root, n, "pass4")
            res["ratio_4_workers_to_none_after_pass"] = round(res["pass_4_workers"]["pss_after_pass_mb"]
                                                              / res["pass_no_workers"]["pss_after_pass_mb"], 2)
        res["two_processes"] = two_processes(root, n)
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
