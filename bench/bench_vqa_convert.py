"""Speed and peak memory of `llavamed vqa-convert` on a hub-layout parquet file with embedded images.

Writes a VQA-RAD-shaped parquet file the way `datasets` writes it (`image` {bytes, path}, `question`,
`answer`; 100 rows per row group), then converts it in fresh child processes and reports rows/s (the
fastest of `--repeat` runs: this machine is shared) and the children's highest peak RSS (VmHWM), beside
the peak of a child that only imports the same modules (the floor) and the file's size. Memory should
stay near the floor whatever the file's size, since the rows are read one record batch at a time; a
second, smaller file shows that. pyarrow's `ParquetFile` pre-buffers the whole file by default; the
project's reader (`core._iter_parquet`) opens it with `pre_buffer=False, buffer_size=1 MiB`, which streams
pages even from a file written as one row group. 'pre_buffer on' forces pyarrow's default back, for the
side-by-side figure; 'off' is what `vqa-convert` does.

    .venv/bin/python bench/bench_vqa_convert.py                      # 20,000 and 5,000 rows
    .venv/bin/python bench/bench_vqa_convert.py --rows 20000 --image-px 384 --distinct 4000
    .venv/bin/python bench/bench_vqa_convert.py --row-group 0        # pyarrow's default: one row group
"""
import argparse, io, json, os, subprocess, sys, tempfile
from pathlib import Path

CHILD = """
import json, os, resource, sys, time
import pyarrow.parquet as pq
if os.environ.get("BENCH_PRE_BUFFER") == "on":  # pyarrow's default, in place of what core._iter_parquet asks for
    class PreBuffered(pq.ParquetFile):
        def __init__(self, *args, **kw):
            kw["pre_buffer"] = True; kw.pop("buffer_size", None); super().__init__(*args, **kw)
    pq.ParquetFile = PreBuffered
from llavamed.vqa import convert_vqa
def peak_kb():  # this process's own peak: ru_maxrss would carry the parent's peak over the exec
    try: return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "floor": print(json.dumps({"rss_kb": peak_kb()})); sys.exit()
t0 = time.perf_counter()
res = convert_vqa("vqa-rad", sys.argv[1], sys.argv[2])
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "rss_kb": peak_kb(),
                  "splits": res.splits, "skipped": res.skipped}))
"""


def images(distinct: int, px: int, seed: int = 0) -> list[bytes]:
    "`distinct` different JPEG pictures of px x px (smooth noise, so they compress like scans do)."
    import numpy as np
    from PIL import Image
    rng, out = np.random.default_rng(seed), []
    for _ in range(distinct):
        small = rng.integers(0, 256, (px // 16, px // 16), dtype=np.uint8)
        im = Image.fromarray(small).resize((px, px), Image.Resampling.BILINEAR).convert("RGB")
        buf = io.BytesIO(); im.save(buf, "JPEG", quality=90); out.append(buf.getvalue())
    return out


def write_parquet(path: Path, rows: int, pictures: list[bytes], row_group: int) -> Path:
    "A VQA-RAD-shaped hub parquet file: each picture asked about rows/len(pictures) times, a third yes/no."
    import pyarrow as pa, pyarrow.parquet as pq
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("question", pa.string()), ("answer", pa.string())],
                       metadata={b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, schema) as w:
        step = row_group or rows
        for start in range(0, rows, step):  # written a group at a time, so the bench itself stays small
            batch = [{"image": {"bytes": pictures[i % len(pictures)], "path": None},
                      "question": f"Is there an abnormality in region {i}?" if i % 3 else f"Where is the lesion {i}?",
                      "answer": ("yes" if i % 2 else "no") if i % 3 else "left lower lobe"}
                     for i in range(start, min(rows, start + step))]
            w.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=step)
    return path


def child(*argv: str, pre_buffer: str = "on") -> dict:
    "Run CHILD in a fresh interpreter and return its JSON line."
    env = {**os.environ, "BENCH_PRE_BUFFER": pre_buffer}
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="20000,5000", help="comma-separated file sizes in rows")
    ap.add_argument("--distinct", type=int, default=2000, help="distinct pictures (the hub repeats each one)")
    ap.add_argument("--image-px", type=int, default=256, help="picture side in pixels")
    ap.add_argument("--row-group", type=int, default=100, help="rows per row group (0: all in one, pyarrow's default)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest time and the highest peak are shown")
    ap.add_argument("--pre-buffer", default="on,off", help="'on': pyarrow's ParquetFile default (forced); "
                    "'off': ParquetFile(pre_buffer=False, buffer_size=1 MiB), as core reads")
    args = ap.parse_args()
    pictures = images(args.distinct, args.image_px)
    floor = child("floor")["rss_kb"] / 1024
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
          f"{args.distinct:,} distinct {args.image_px}px JPEGs of {sum(map(len, pictures)) / len(pictures) / 1024:.1f} KB on average; "
          f"{args.row_group or 'one'} rows per row group")
    print(f"floor (python + llavamed.vqa + pyarrow imported): {floor:,.0f} MB peak RSS")
    with tempfile.TemporaryDirectory() as d:
        for rows in map(int, args.rows.split(",")):
            src = write_parquet(Path(d) / f"rad{rows}/data/train-00000-of-00001.parquet", rows, pictures, args.row_group)
            for pre_buffer in args.pre_buffer.split(","):
                runs = []
                for k in range(args.repeat):
                    out = Path(d) / f"out{rows}_{pre_buffer}_{k}"
                    runs.append(got := child(str(src.parent.parent), str(out), pre_buffer=pre_buffer))
                    assert got["splits"]["train"]["total"] == rows and not got["skipped"], got
                got = {"wall_s": min(r["wall_s"] for r in runs), "rss_kb": max(r["rss_kb"] for r in runs)}
                n_files = sum(1 for _ in (out / "images/train").iterdir())
                print(f"{rows:>7,} rows, parquet {src.stat().st_size / 2**20:,.0f} MB, pre_buffer {pre_buffer:>3}: "
                      f"{got['wall_s']:.2f} s, "
                      f"{rows / got['wall_s']:,.0f} rows/s, peak RSS {got['rss_kb'] / 1024:,.0f} MB "
                      f"({got['rss_kb'] / 1024 - floor:+,.0f} MB over the floor); {n_files:,} image files written")
