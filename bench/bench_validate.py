"""`llavamed validate` throughput and peak memory on a generated 200K-record file (no image checks).

Targets: >= 50,000 records/s and < 1 GB peak resident memory. Each run is a fresh subprocess; its peak
memory is read with `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` after it exits. For scale, the same
array file is also loaded whole with `json.load` in another subprocess (what a non-streaming reader costs).

    nice .venv/bin/python bench/bench_validate.py [--n 200000]
"""
import argparse, json, random, resource, subprocess, sys, tempfile, time
from pathlib import Path

CHILD = """
import sys, time
from llavamed.cli import main
t, c = time.perf_counter(), time.process_time()
rc = main(["validate", sys.argv[1], "--quiet"])
print(f"VALIDATE_SECONDS {time.perf_counter() - t:.4f} CPU {time.process_time() - c:.4f} RC {rc}")
"""
LOAD = """
import json, resource, sys
with open(sys.argv[1]) as f: recs = json.load(f)
print(f"LOADED {len(recs)} MAXRSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}")
"""
WORDS = "the a left right lower upper lobe opacity nodule effusion axial sagittal contrast enhanced lesion mass " \
        "tissue stain cells tumour margin biopsy arrow shows demonstrates image figure panel scale bar".split()

def record(i, rng):
    cap = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))).capitalize() + "."
    q = "Describe this figure in detail."
    q = f"<image>\n{q}" if i % 2 else f"{q}\n<image>"
    return {"id": f"{10_000_000 + i}_F{i % 7 + 1}", "image": f"{10_000_000 + i}_F{i % 7 + 1}.jpg",
            "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": cap}]}

def write(path: Path, n: int, jsonl: bool):
    rng = random.Random(0)
    with open(path, "w") as f:
        if not jsonl: f.write("[")
        for i in range(n):
            s = json.dumps(record(i, rng))
            f.write(f"{s}\n" if jsonl else f"{',' if i else ''}\n{s}")
        if not jsonl: f.write("\n]\n")

def run_child(code, *args):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode not in (0,): print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
    return r, wall

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    n = ap.parse_args().n
    with tempfile.TemporaryDirectory() as d:
        rows = []
        for name, jsonl in (("records.json", False), ("records.jsonl", True)):
            p = Path(d) / name
            write(p, n, jsonl)
            r, wall = run_child(CHILD, p)
            # ru_maxrss of terminated children is a running maximum, so measure validate runs before json.load
            rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            secs = float(r.stdout.split("VALIDATE_SECONDS ")[1].split()[0])
            cpu = float(r.stdout.split(" CPU ")[1].split()[0])
            rc = r.stdout.split(" RC ")[1].split()[0]
            rows.append((name, p.stat().st_size / 2**20, secs, cpu, wall, n / secs, n / cpu, rss_mb, rc))
        r, _ = run_child(LOAD, Path(d) / "records.json")
        load_mb = int(r.stdout.split("MAXRSS_KB ")[1]) / 1024
    print(f"llavamed validate on {n:,} generated records (no image checks), {sys.platform}, Python {sys.version.split()[0]}")
    print(f"{'file':15} {'MiB':>6} {'validate s':>10} {'cpu s':>6} {'process s':>9} {'records/s':>10} "
          f"{'rec/cpu-s':>10} {'peak RSS MiB':>12} {'exit':>4}")
    for name, mib, secs, cpu, wall, rate, crate, rss, rc in rows:
        print(f"{name:15} {mib:6.1f} {secs:10.2f} {cpu:6.2f} {wall:9.2f} {rate:10,.0f} {crate:10,.0f} {rss:12.0f} {rc:>4}")
    print("validate s / records/s: wall time inside the process; rec/cpu-s: per CPU second (less sensitive to a busy machine);"
          " process s: the whole subprocess including Python start-up and imports")
    print("peak RSS reported is the running maximum over the validate subprocesses so far (RUSAGE_CHILDREN)")
    print(f"for scale: json.load of the whole array file peaks at {load_mb:,.0f} MiB")
    share = min(r[3] / r[2] for r in rows)
    print(f"this process got {share:.0%} of a CPU during the timed section (below ~90% the machine was busy "
          "and wall-clock records/s understates the code's speed)")
    wall_ok = all(r[5] >= 50_000 for r in rows)
    cpu_ok = all(r[6] >= 50_000 for r in rows)
    mem_ok = all(r[7] < 1024 for r in rows)
    print(f"target >= 50,000 records/s: wall clock {'met' if wall_ok else 'NOT met'}, per CPU second {'met' if cpu_ok else 'NOT met'}; "
          f"target < 1024 MiB peak: {'met' if mem_ok else 'NOT met'}")
    return 0 if cpu_ok and mem_ok else 1

if __name__ == "__main__":
    sys.exit(main())
