"""Benchmark `llavamed pmc-pairs` on generated PMC packages served from a loopback HTTP server.

Each package holds a JATS article (20 paragraphs citing its figures by xref, ranges and plain text, a table,
supplementary material), its 2-6 figures as JPEG or PNG with a GIF thumbnail each, and a PDF, in PMC's layout.
Measures, for one worker and for the fetcher's default concurrency (8): articles/s and figures/s end to end,
the peak resident memory of the process making the pairs (a child process: its VmHWM), and the bytes kept
on disk per figure against the tarball bytes downloaded. Also the JATS parse rate alone (articles/s, one thread).

    .venv/bin/python bench/bench_pmc_pairs.py [--packages 2000] [--latency 0.02]
"""
from __future__ import annotations
import argparse, io, json, os, random, shutil, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tar_server import TarServer, jats_article, make_tar, oa_file_list  # noqa: E402

CAPTIONS = ["Posteroanterior chest radiograph showing a right upper lobe opacity.", "Axial contrast-enhanced CT of the abdomen.",
            "(A) Axial T2-weighted MRI and (B) FLAIR image of the brain.", "H&amp;E staining, original magnification x400.",
            "Gross specimen showing the cut surface of the resected kidney.", "Kaplan-Meier survival curves of both groups."]


def image_pool(rng: random.Random, n: int = 40) -> list[tuple[bytes, str]]:
    "Distinct figures (noisy, so they compress like photographs) as (bytes, extension), and their GIF thumbnails."
    from PIL import Image
    out = []
    for i in range(n):
        im = Image.frombytes("RGB", (200, 150), rng.randbytes(200 * 150 * 3))
        buf = io.BytesIO(); fmt = "JPEG" if i % 3 else "PNG"
        (im.convert("L") if fmt == "PNG" else im).save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        thumb = io.BytesIO(); im.resize((50, 38)).save(thumb, "GIF")
        out.append((buf.getvalue(), "jpg" if fmt == "JPEG" else "png", thumb.getvalue()))
    return out


def build(server: TarServer, n: int, rng: random.Random) -> tuple[list[dict], int, int, list[bytes]]:
    "Register `n` packages; returns the list rows, the tarball bytes, the figure count and the article XMLs."
    pool, pdf = image_pool(rng), rng.randbytes(40_000)
    rows, total, n_figs, xmls = [], 0, 0, []
    for i in range(n):
        pmcid, pmid = f"PMC{5_000_000 + i}", str(30_000_000 + i)
        k = rng.randint(2, 6)
        figs = [{"id": f"F{j}", "label": f"Figure {j}", "caption": f"<p>{rng.choice(CAPTIONS)}</p>",
                 "href": f"{pmcid}-g{j:03d}"} for j in range(1, k + 1)]
        paras = [f'Result {p} is shown (<xref ref-type="fig" rid="F{1 + p % k}">Figure {1 + p % k}</xref>). '
                 f"It held in every case. Figs. 1-{k} agree with <italic>earlier</italic> work (Smith et al. 2001)."
                 for p in range(20)]
        xml = jats_article(pmid, pmcid, figs, paras)
        members = {f"{pmcid}/{pmcid}.nxml": xml, f"{pmcid}/{pmcid}.pdf": pdf}
        for j in range(1, k + 1):
            data, ext, thumb = pool[rng.randrange(len(pool))]
            members[f"{pmcid}/{pmcid}-g{j:03d}.{ext}"] = data
            members[f"{pmcid}/{pmcid}-g{j:03d}.gif"] = thumb
        body = make_tar(members)
        total += len(body); n_figs += k; xmls.append(xml)
        rows.append({"pmcid": pmcid, "pmid": pmid})
        server.add(f"/oa_package/{pmcid[-2:]}/{pmcid[-4:-2]}/{pmcid}.tar.gz", body)
    return rows, total, n_figs, xmls


CHILD = """
import json, sys, time
from llavamed.pmc_pairs import fetch_pairs
csv, out, mirror, workers = sys.argv[1:5]
t0 = time.perf_counter()
res = fetch_pairs(csv, out, mirror=mirror, workers=int(workers), quiet=True)
wall = time.perf_counter() - t0
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would count the forking parent's (the server's) memory
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"wall_s": wall, "peak_kb": peak_kb, **res.to_json()}))
"""


def du(d: Path) -> int: return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", type=int, default=2000); ap.add_argument("--latency", type=float, default=0.02)
    args = ap.parse_args()
    from llavamed.pmc_pairs import parse_xml, read_article
    work = Path(tempfile.mkdtemp(prefix="bench_pmc_pairs_"))
    try:
        with TarServer(latency=args.latency) as server:
            t0 = time.perf_counter()
            rows, tar_bytes, n_figs, xmls = build(server, args.packages, random.Random(0))
            print(f"{args.packages:,} packages, {n_figs:,} figures, {tar_bytes / 2**20:.1f} MiB of tarballs "
                  f"(built in {time.perf_counter() - t0:.1f} s); latency {args.latency * 1000:.0f} ms/request")
            t0 = time.perf_counter()
            parsed = sum(len(read_article(parse_xml(x)).figures) for x in xmls)
            dt = time.perf_counter() - t0
            print(f"JATS parse alone (one thread): {len(xmls) / dt:,.0f} articles/s, {parsed / dt:,.0f} figures/s "
                  f"({sum(map(len, xmls)) / len(xmls) / 1024:.1f} KiB per article XML)")
            csv = work / "oa_file_list.csv"; csv.write_text(oa_file_list(rows))
            for workers in (1, 8):
                out = work / f"out_w{workers}"
                r = subprocess.run([sys.executable, "-c", CHILD, str(csv), str(out), server.base, str(workers)],
                                   capture_output=True, text=True, check=True)
                res = json.loads(r.stdout.strip().splitlines()[-1])
                kept = du(out / "images")
                assert res["pairs"] == n_figs and res["failed_articles"] == 0, res
                print(f"workers={workers}: {res['wall_s']:.1f} s, {res['articles'] / res['wall_s']:,.1f} articles/s, "
                      f"{res['pairs'] / res['wall_s']:,.1f} figures/s written; peak RSS {res['peak_kb'] / 1024:.0f} MiB; "
                      f"downloaded {res['bytes_downloaded'] / 2**20:.1f} MiB ({res['bytes_downloaded'] / res['pairs'] / 1024:.1f} KiB "
                      f"per figure), kept {kept / 2**20:.1f} MiB of images ({kept / res['pairs'] / 1024:.1f} KiB per figure, "
                      f"{kept / res['bytes_downloaded']:.0%} of the tarball bytes); fig_captions.json "
                      f"{(out / 'fig_captions.json').stat().st_size / 2**20:.1f} MiB, manifest "
                      f"{(out / 'manifest.jsonl').stat().st_size / 2**20:.1f} MiB")
    finally: shutil.rmtree(work)


if __name__ == "__main__": main()
