"""Benchmark of `llavamed instruct` against the loopback chat-completions server (tests/chat_server.py).

Measures, in one run:
  1. 500 captions, 200 ms server latency: wall time at concurrency 32 vs concurrency 1 (target >= 20x) and
     requests sent per caption (target 1.00 without faults);
  2. the same with 10% injected faults (429 + Retry-After, 500, slow past the timeout, dropped connection,
     unparseable reply): every caption ends done or failed with a reason, no id twice in the output, retries;
  3. SIGKILL of a `llavamed instruct` process halfway, then a rerun: requests for already-saved captions (target 0);
  4. (--scale N) N captions through the batch backend (--backend batch) with the provider's 24-hour window
     simulated as a 10-minute batch compressed 100x (6 s; polls every 0.3-1 s instead of 30-60 s): requests per
     caption (target 1.00), batches, bytes uploaded, wall time, cost at the batch price; then the request loop
     on the same captions (concurrency 32): requests per caption, wall time, cost at the full price;
  5. (--scale N) the cleaning rules' counts (v1 and v2) on the synthetic corpus's teacher output (template teacher).

    .venv/bin/python bench/bench_instruct.py [--n 500] [--latency 0.2] [--c1-n 500]
    .venv/bin/python bench/bench_instruct.py --only-scale --scale 10000 [--synth 2000]
    .venv/bin/python bench/bench_instruct.py --n 500 --c1-n 100 --scale 10000 --synth 2000   (all five)
"""
from __future__ import annotations
import argparse, collections, os, signal, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from chat_server import ChatServerProcess  # noqa: E402
from teacher_input import pair_ids, write_teacher_input  # noqa: E402
from llavamed.client import load_checkpoint  # noqa: E402
from llavamed.core import read_jsonl  # noqa: E402
from llavamed.instruct import self_instruct, sidecar_path  # noqa: E402

KEY_ENV = "LLAVAMED_BENCH_KEY"


def timed_run(cap, out, srv, **kw):
    srv.reset()
    t0 = time.perf_counter()
    rep = self_instruct(str(cap), str(out), teacher="openai", base_url=srv.base_url, model="bench",
                        api_key_env=KEY_ENV, quiet=True, price_prompt=2.5, price_completion=10.0, **kw)
    return time.perf_counter() - t0, rep, srv.stats()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="captions")
    ap.add_argument("--latency", type=float, default=0.2, help="server seconds per reply")
    ap.add_argument("--c1-n", type=int, default=None, help="captions for the concurrency-1 run (default: --n)")
    ap.add_argument("--fault-rate", type=float, default=0.1)
    ap.add_argument("--scale", type=int, default=0, help="captions for the batch-vs-loop comparison (0: skip)")
    ap.add_argument("--synth", type=int, default=2000, help="synthetic-corpus figures for the cleaning counts")
    ap.add_argument("--only-scale", action="store_true", help="run only parts 4 and 5")
    a = ap.parse_args()
    if a.only_scale:
        os.environ[KEY_ENV] = "sk-bench-not-a-real-key-000"
        return scale(a.scale or 10_000, a.synth, Path(tempfile.mkdtemp(prefix="bench_instruct_scale_")))
    c1_n = a.c1_n or a.n
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key-000"
    tmp = Path(tempfile.mkdtemp(prefix="bench_instruct_"))
    cap = write_teacher_input(tmp / "captions.json", a.n, facts=False)
    cap1 = write_teacher_input(tmp / "captions_c1.json", c1_n, facts=False)
    print(f"captions: {a.n}, server latency {a.latency * 1000:.0f} ms, server in a child process; work dir {tmp}")

    import openai  # noqa: F401  (import once up front: a one-off cost, not a cost of either concurrency)
    with ChatServerProcess(latency=a.latency) as srv:
        # 1. concurrency 32 vs 1
        t32, rep32, st32 = timed_run(cap, tmp / "c32.jsonl", srv, concurrency=32)
        t1, rep1, st1 = timed_run(cap1, tmp / "c1.jsonl", srv, concurrency=1)
        per32, per1 = t32 / a.n, t1 / c1_n
        print("\n[1] throughput, no faults")
        print(f"  concurrency 32: {a.n} captions in {t32:.2f} s ({a.n / t32:.1f}/s), {rep32.records} records, "
              f"requests/caption {st32['requests'] / a.n:.2f}, peak in flight {st32['max_inflight']}, "
              f"cost ${rep32.run['cost']:.4f} at $2.50/$10 per 1M tokens")
        print(f"  concurrency 1:  {c1_n} captions in {t1:.2f} s ({c1_n / t1:.1f}/s), {rep1.records} records, "
              f"requests/caption {st1['requests'] / c1_n:.2f}")
        note = "" if c1_n == a.n else f" (concurrency 1 measured on {c1_n} captions, compared per caption)"
        print(f"  speed-up 32 vs 1: {per1 / per32:.1f}x (target >= 20x){note}")

        # 2. 10% faults
        srv.configure(fault_rate=a.fault_rate, faults=["429", "500", "slow", "drop", "garbage"],
                      retry_after=0.2, slow_seconds=2.0)
        tf, repf, stf = timed_run(cap, tmp / "faults.jsonl", srv, concurrency=32, timeout=1.0, backoff=0.05, max_attempts=6)
        tf2, repf2, stf2 = timed_run(cap, tmp / "faults2.jsonl", srv, concurrency=32, timeout=1.0, backoff=0.05, max_attempts=2)
        srv.configure(fault_rate=0.0)
        ids = set(pair_ids(cap))
        print(f"\n[2] {a.fault_rate:.0%} injected faults (timeout 1 s, slow replies 2 s, Retry-After 0.2 s)")
        for label, name, t, rep, st in (("max 6 attempts", "faults", tf, repf, stf), ("max 2 attempts", "faults2", tf2, repf2, stf2)):
            ck = load_checkpoint(sidecar_path(tmp / f"{name}.jsonl"))
            out_ids = [r["id"] for r in read_jsonl(tmp / f"{name}.jsonl")]
            status = collections.Counter(r["status"] for r in ck.values())
            no_reason = [k for k, r in ck.items() if r["status"] != "done" and not r.get("reason")]
            final = collections.Counter(r["reason"] for r in ck.values() if r["status"] != "done")
            raw_lines = sum(1 for _ in read_jsonl(sidecar_path(tmp / f"{name}.jsonl")))
            print(f"  {label}: {t:.2f} s; server actions: {st['by_action']}")
            print(f"    every caption accounted for: {set(ck) == ids} ({dict(status)}); not done without a reason: {len(no_reason)}"
                  + (f"; final reasons: {dict(final)}" if final else ""))
            print(f"    output: {len(out_ids)} records, duplicated ids: {len(out_ids) - len(set(out_ids))}; "
                  f"checkpoint lines: {raw_lines} for {len(ck)} captions")
            print(f"    requests {st['requests']} = {st['requests'] / a.n:.2f}/caption; retries {rep.run['retries']}; "
                  f"failed attempts by reason: {rep.run['reasons']}")

        # 3. SIGKILL halfway, rerun
        out = tmp / "kill.jsonl"
        raw = sidecar_path(out)
        cmd = [str(Path(sys.executable).parent / "llavamed"), "instruct", "--captions", str(cap), "--out", str(out),
               "--teacher", "openai", "--base-url", srv.base_url, "--model", "bench", "--api-key-env", KEY_ENV,
               "--concurrency", "8", "--quiet"]
        srv.reset()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None and (not raw.exists() or sum(1 for _ in open(raw)) < a.n // 2): time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL); p.wait()
        saved = {k for k, r in load_checkpoint(raw).items() if r["status"] == "done"}
        first = srv.stats()
        srv.reset()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        tr = time.perf_counter() - t0
        second = srv.stats()
        again = sum(n for k, n in second["by_key"].items() if k in saved)
        out_ids = [x["id"] for x in read_jsonl(out)]
        print("\n[3] SIGKILL halfway (concurrency 8), then rerun")
        print(f"  killed after {first['requests']} requests with {len(saved)} captions saved "
              f"({first['requests'] - len(saved)} in flight, lost)")
        print(f"  rerun: exit {r.returncode}, {tr:.2f} s, {second['requests']} requests; "
              f"requests for already-saved captions: {again} (target 0)")
        print(f"  final output: {len(out_ids)} records, {len(set(out_ids))} distinct ids, all captions: {set(out_ids) == ids}")
    if a.scale: print(); scale(a.scale, a.synth, tmp)


def scale(n: int, n_synth: int, tmp: Path):
    "Parts 4 and 5: batch backend vs request loop on `n` captions; cleaning counts on the synthetic corpus."
    cap = write_teacher_input(tmp / "captions.json", n, facts=False)
    prices = dict(price_prompt=2.5, price_completion=10.0)
    import openai  # noqa: F401
    print(f"[4] {n} captions, server in a child process; work dir {tmp}")
    with ChatServerProcess(batch_seconds=6.0, latency=0.05) as srv:
        t0 = time.perf_counter()
        rep = self_instruct(str(cap), str(tmp / "batch.jsonl"), teacher="openai", base_url=srv.base_url, model="bench",
                            api_key_env=KEY_ENV, quiet=True, backend="batch", batch_max_requests=4000,
                            poll_interval=0.3, poll_max=1.0, **prices)
        tb, st = time.perf_counter() - t0, srv.stats()
        print(f"  batch backend: {rep.records} records in {tb:.1f} s (the simulated window: 6 s per batch, batches "
              f"in parallel); {st['batches_created']} batches of <= 4,000 requests; requests/caption "
              f"{(st['batch_lines'] + st['requests']) / n:.2f} (batch lines {st['batch_lines']}, chat requests "
              f"{st['requests']}); uploaded {st['upload_bytes']:,} bytes in {st['uploads']} files "
              f"({st['upload_bytes'] / n:,.0f} bytes/caption); {rep.run['polls']} status checks; cost "
              f"${rep.run['cost']:.2f} at the batch price (half of $2.50/$10 per 1M tokens)")
        srv.reset()
        t0 = time.perf_counter()
        rep2 = self_instruct(str(cap), str(tmp / "loop.jsonl"), teacher="openai", base_url=srv.base_url, model="bench",
                             api_key_env=KEY_ENV, quiet=True, concurrency=32, **prices)
        tl, st2 = time.perf_counter() - t0, srv.stats()
        print(f"  request loop (concurrency 32, 50 ms server latency): {rep2.records} records in {tl:.1f} s "
              f"({n / tl:.0f}/s); requests/caption {st2['requests'] / n:.2f}; cost ${rep2.run['cost']:.2f} at the "
              f"full price; the batch's cost is {rep.run['cost'] / rep2.run['cost']:.2f} of it")
    from llavamed.instruct import build_output, load_captions
    for rules in ("v1", "v2"):
        b = build_output(load_captions(cap), sidecar_path(tmp / "batch.jsonl"), tmp / "unused.jsonl", rules, write=False)
        print(f"  rules {rules} on the loopback teacher's {n} replies: {b['records']} records, "
              f"{b['pairs_out']}/{b['pairs_in']} pairs kept; rule hits {dict(sorted(b['rule_hits'].items()))}")
    from llavamed.synth import make_corpus
    corpus = tmp / "synth"
    t0 = time.perf_counter()
    make_corpus(str(corpus), n_train=n_synth, n_test=max(10, n_synth // 8), size=64, n_chat=5, quiet=True)
    print(f"\n[5] cleaning on the synthetic corpus's teacher output ({n_synth} training figures, template "
          f"teacher; corpus made in {time.perf_counter() - t0:.0f} s)")
    for rules in ("v1", "v2"):
        r = self_instruct(str(corpus / "instruct_captions.json"), str(tmp / f"synth_{rules}.jsonl"), quiet=True,
                          rules=rules)
        print(f"  rules {rules}: {r.records}/{r.figures} records, {r.pairs_out}/{r.pairs_in} pairs kept; rule hits "
              f"{dict(sorted(r.rule_hits.items()))}; samples dropped {dict(sorted(r.samples_dropped.items()))}")


if __name__ == "__main__":
    main()
