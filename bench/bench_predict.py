"""Questions/s of `llavamed predict` on the tiny model: batch 16 against batch 1 in one process, then two processes
under torchrun against one process, with the merged answer file compared byte for byte with the one-process file.

Every run is a real `llavamed predict` process (the two-process run is `torchrun --standalone --nproc_per_node 2
--no-python llavamed predict ...`), on the CPU, each process with `--threads` torch threads, so the figures
include start-up and model loading (wall) as well as generation alone (from each rank's result).

Rerun: .venv/bin/python bench/bench_predict.py --n 96 --max-new-tokens 16
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

BIN = Path(sys.executable).parent


def run_predict(argv: list, env: dict, launcher: list | None = None, log_dir: Path | None = None):
    "Run one `llavamed --json predict` (under `launcher` when given): (wall seconds, [each rank's result])."
    cmd = [*(launcher or []), str(BIN / "llavamed"), "--json", "predict", *map(str, argv)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode: sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    outs = [p.read_text() for p in sorted(log_dir.rglob("stdout.log"))] if log_dir else [proc.stdout]
    return wall, [json.loads(o[o.index("{"):]) for o in outs if "{" in o]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="questions answered per setting")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (OMP_NUM_THREADS)")
    args = ap.parse_args()
    from llavamed.synth import make_corpus, corpus_texts
    from llavamed.model import build_model, save_model
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), DS_ACCELERATOR="cpu")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_corpus(str(d / "corpus"), n_train=16, n_test=max(4, args.n // 4 + 1), size=64, n_chat=2, quiet=True)
        qs = json.loads((d / "corpus" / "vqa_test.json").read_text())[:args.n]
        (d / "test.json").write_text(json.dumps(qs))
        m, p = build_model("tiny", tokenizer_texts=corpus_texts(str(d / "corpus")))
        save_model(m, p, d / "model")
        common = ["--model", d / "model", "--data", d / "test.json", "--images", d / "corpus" / "images",
                  "--max-new-tokens", args.max_new_tokens, "--device", "cpu", "--quiet"]
        print(f"{len(qs)} questions, max_new_tokens={args.max_new_tokens}, {args.threads} torch thread(s) per "
              f"process, {os.cpu_count()} CPU cores")
        rates = {}
        for bs in (1, 16):
            wall, (res,) = run_predict([*common, "--batch-size", bs, "--out", d / f"b{bs}.jsonl"], env)
            rates[bs] = res["answered"] / res["seconds"]
            print(f"1 process, batch {bs:2}: {res['answered']} questions in {res['seconds']:.2f} s generation "
                  f"= {rates[bs]:.1f} questions/s ({wall:.1f} s wall with start-up and model load)")
        print(f"batch 16 / batch 1: {rates[16] / rates[1]:.2f}x")
        one_wall, (one,) = run_predict([*common, "--batch-size", 16, "--out", d / "one.jsonl"], env)
        logs = d / "torchrun_logs"
        two_wall, ranks = run_predict([*common, "--batch-size", 16, "--out", d / "two.jsonl"], env,
                                      [BIN / "torchrun", "--standalone", "--nproc_per_node", "2", "--log-dir", logs,
                                       "--redirects", "1", "--no-python"], logs)
        gen_two = max(r["seconds"] for r in ranks)
        n = len(qs)
        print(f"1 process : {n} questions, generation {one['seconds']:.2f} s = {n / one['seconds']:.1f} questions/s; "
              f"wall {one_wall:.1f} s = {n / one_wall:.2f} questions/s")
        print(f"2 processes: shares {sorted(r['answered'] for r in ranks)}, generation {gen_two:.2f} s (slower rank) "
              f"= {n / gen_two:.1f} questions/s; wall {two_wall:.1f} s = {n / two_wall:.2f} questions/s")
        print(f"2 processes / 1 process: {one['seconds'] / gen_two:.2f}x generation, {one_wall / two_wall:.2f}x wall")
        same = (d / "two.jsonl").read_bytes() == (d / "one.jsonl").read_bytes()
        merged = [r.get("merged") for r in ranks]
        print(f"merged answer file identical to the one-process file: {same} (merged by rank "
              f"{[r['rank'] for r in ranks if r.get('merged')]}, parts left: {(d / 'two.jsonl.parts').exists()})")
        if not same: sys.exit(1)
