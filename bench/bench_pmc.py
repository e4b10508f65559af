"""Benchmark `llavamed pmc` against a loopback server: 200 tarballs, 50 ms latency per request, 10% 404, 5% corrupt.

Measures, in one run: wall time with 8 workers vs 1 worker (target >= 5x), peak disk use of the output folder
and of the temp folder (sampled every 5 ms), and the manifest counts (every figure and tarball accounted for once).

    .venv/bin/python bench/bench_pmc.py [--tarballs 200] [--latency 0.05]
"""
from __future__ import annotations
import argparse, json, os, random, shutil, sys, tempfile, threading, time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tar_server import TarServer, image_bytes, make_tar  # noqa: E402
from llavamed.pmc import fetch_figures  # noqa: E402

PMC = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package"


def du(*dirs) -> int:
    "Bytes of all files under `dirs` (files vanishing mid-walk are skipped)."
    n = 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for f in files:
                try: n += os.stat(os.path.join(root, f)).st_size
                except FileNotFoundError: pass
    return n


class DiskSampler(threading.Thread):
    "Samples the disk use of some folders until stopped; keeps the peak."
    def __init__(self, *dirs, every=0.005):
        super().__init__(daemon=True); self.dirs, self.every, self.peak, self.stop = dirs, every, 0, threading.Event()
    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, du(*self.dirs)); time.sleep(self.every)
    def __exit__(self, *a): self.stop.set(); self.join(); self.peak = max(self.peak, du(*self.dirs))
    def __enter__(self): self.start(); return self


def build(server: TarServer, n: int, rng: random.Random) -> tuple[list[dict], dict, int]:
    "Register `n` tarballs (10% absent, 5% corrupt) and return the URL-list rows, the expected statuses, total tar bytes."
    rows, expect, total = [], {}, 0
    kinds = ["404"] * (n // 10) + ["corrupt"] * (n // 20)
    kinds += ["ok"] * (n - len(kinds)); rng.shuffle(kinds)
    for i, kind in enumerate(kinds):
        pmcid = f"PMC{1000000 + i}"
        figs = [f"{pmcid}/fig{j}.jpg" for j in range(rng.randint(1, 3))]
        for j, m in enumerate(figs):
            pid = f"{30000000 + i}_F{j + 1}"
            rows.append({"pmc_tar_url": f"{PMC}/{pmcid[-2:]}/{pmcid}.tar.gz", "image_file_path": m, "pair_id": pid})
            expect[pid] = {"404": "not_found", "corrupt": "corrupt", "ok": "ok"}[kind]
        if kind == "404": continue
        members = {f"{pmcid}/{pmcid}.pdf": rng.randbytes(150_000)}  # the article itself comes first, as in PMC
        members.update({m: image_bytes((96, 96), tuple(rng.randrange(256) for _ in range(3)), "PNG") for m in figs})
        body = make_tar(members)
        if kind == "corrupt": body = body[: len(body) * 2 // 3]
        total += len(body)
        server.add(f"/oa_package/{pmcid[-2:]}/{pmcid}.tar.gz", body)
    return rows, expect, total


def run_once(server, urls, workers, work: Path) -> dict:
    out, tmp = work / f"out_w{workers}", work / f"tmp_w{workers}"
    tmp.mkdir(parents=True)
    server.requests.clear()
    old = tempfile.tempdir; tempfile.tempdir = str(tmp)
    try:
        with DiskSampler(out, tmp) as ds:
            t0 = time.perf_counter()
            s = fetch_figures(str(urls), str(out), workers=workers, quiet=True, mirror=server.base)
            wall = time.perf_counter() - t0
    finally: tempfile.tempdir = old
    man = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "summary": s.to_json(), "peak_disk": ds.peak, "manifest": man,
            "requests": dict(server.requests), "final_out": du(out)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tarballs", type=int, default=200); ap.add_argument("--latency", type=float, default=0.05)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_pmc_"))
    try:
        with TarServer(latency=args.latency) as server:
            rows, expect, tar_bytes = build(server, args.tarballs, random.Random(0))
            urls = work / "urls.jsonl"
            urls.write_text("".join(json.dumps(r) + "\n" for r in rows))
            n_tar = len({r["pmc_tar_url"] for r in rows})
            print(f"{n_tar} tarballs ({sum(v != 'not_found' for v in expect.values())} figures in served tarballs, "
                  f"{tar_bytes / 2**20:.1f} MiB of tarballs), {len(rows)} figures, latency {args.latency * 1000:.0f} ms/request")
            res = {w: run_once(server, urls, w, work) for w in (8, 1)}
        for w, r in res.items():
            man = r["manifest"]
            ids = Counter(m["pair_id"] for m in man)
            once = set(ids) == set(expect) and all(v == 1 for v in ids.values())
            right = all(m["status"] == expect[m["pair_id"]] for m in man)
            tars_once = len(r["requests"]) == n_tar and all(v == 1 for v in r["requests"].values())
            counts = Counter(m["status"] for m in man)
            print(f"workers={w}: wall {r['wall_s']:.2f} s; peak disk (out + temp) {r['peak_disk'] / 2**20:.2f} MiB "
                  f"(final images {r['final_out'] / 2**20:.2f} MiB; tarballs served {tar_bytes / 2**20:.1f} MiB); "
                  f"manifest {dict(sorted(counts.items()))}; every figure once: {once}; statuses as built: {right}; "
                  f"every tarball requested once: {tars_once}")
        print(f"speed-up 8 vs 1 workers: {res[1]['wall_s'] / res[8]['wall_s']:.1f}x (target >= 5x)")
    finally: shutil.rmtree(work)


if __name__ == "__main__": main()
