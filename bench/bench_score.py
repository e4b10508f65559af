"""Scoring throughput per protocol of `llavamed score` (target >= 20K pairs/s for every protocol but the judged one).

Generated pairs: half closed (yes/no), half open, plus a share of multiple-choice questions; llava-med-run-eval
reads a candidate list of `--candidates` answers (PathVQA's training split has a few thousand distinct open
answers). Each protocol is timed alone (`score(..., protocol=P)`, reading both files included) and all five in
one call. With `--judged N`, the medevalkit judge is timed on N open questions against the loopback chat server
(tests/chat_server.py) with the real openai client: a measure of the request loop, not of a model.

    .venv/bin/python bench/bench_score.py --n 100000 --repeat 3
"""
import argparse, json, random, sys, tempfile, time
from pathlib import Path
from llavamed.eval import PROTOCOLS, score

WORDS = ("left right upper lower lobe lung heart liver kidney mass nodule effusion opacity ct mri x-ray chest "
         "abdomen brain normal abnormal none one two three the a an is there no yes not dont isnt").split()
OPTIONS = ["left lung", "right lung", "heart", "liver"]


def phrase(rng, lo, hi):
    s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return s + rng.choice(["", ".", "?", ", 3.5 cm", " (left)", "-sided"])


def make(n, d, choice_share=0.1, n_candidates=2000, seed=0):
    rng = random.Random(seed)
    gt, ans = [], []
    for i in range(n):
        turns = lambda g: [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": g}]
        if rng.random() < choice_share:
            k = rng.randrange(4)
            gt.append({"id": str(i), "image": f"{i}.png", "answer_type": "CHOICE", "options": OPTIONS,
                       "answer_label": "ABCD"[k], "conversations": turns(OPTIONS[k])})
            p = rng.choice(["ABCD"[k], f"({rng.choice('ABCD')})", f"The answer is {rng.choice('ABCD')}.",
                            rng.choice(OPTIONS), "A or B", phrase(rng, 2, 10)])
        else:
            closed = rng.random() < 0.5
            g = rng.choice(["yes", "no"]) if closed else phrase(rng, 1, 4)
            gt.append({"id": str(i), "image": f"{i}.png", "answer_type": "CLOSED" if closed else "OPEN",
                       "conversations": turns(g)})
            p = rng.choice([g, f"{rng.choice(['Yes', 'No'])}, {phrase(rng, 2, 12)}", phrase(rng, 1, 20),
                            g + " " + phrase(rng, 1, 8)])
        ans.append({"question_id": str(i), "prompt": "Q?", "text": p, "answer_id": str(i), "model_id": "bench",
                    "metadata": {"decoding": {"do_sample": False, "max_new_tokens": 64}}})
    rng.shuffle(ans)
    (d / "test.json").write_text(json.dumps(gt))
    (d / "answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in ans))
    (d / "candidates.json").write_text(json.dumps({"0": [phrase(rng, 1, 4) for _ in range(n_candidates)]}))
    return d / "answers.jsonl", d / "test.json", d / "candidates.json"


def timed(fn, repeat):
    runs = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        runs.append((time.perf_counter() - t0, time.process_time() - c0))
    return min(runs)


def judge_rate(d, n_open):
    "Seconds to judge `n_open` open questions through the loopback server (each request answered at once)."
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from chat_server import ChatServerProcess
    pred, gt, _ = make(n_open, d / "judged", choice_share=0.0) if (d / "judged").mkdir() is None else None
    with ChatServerProcess(reply_text="<think>ok</think>\n<judge>0</judge>") as srv:
        t0 = time.perf_counter()
        res = score(str(pred), str(gt), protocol="medevalkit", judge_model="bench-judge", base_url=srv.base_url,
                    api_key_env="none", judge_cache=str(d / "judged" / "cache.jsonl"), concurrency=32, quiet=True)
        return time.perf_counter() - t0, res.metrics["medevalkit"]["n_judged"]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="question/answer pairs")
    ap.add_argument("--repeat", type=int, default=3, help="runs per protocol; the best is reported (shared machines are noisy)")
    ap.add_argument("--candidates", type=int, default=2000, help="answers in llava-med-run-eval's candidate list")
    ap.add_argument("--judged", type=int, default=0, help="also time the medevalkit judge on this many open questions")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pred, gt, cand = make(args.n, d, n_candidates=args.candidates)
        print(f"{args.n:,} pairs ({args.candidates:,} candidates for llava-med-run-eval), best of {args.repeat}")
        for protocol in (*PROTOCOLS, ",".join(PROTOCOLS)):
            kw = {"candidates": str(cand)} if "run-eval" in protocol else {}
            dt, dc = timed(lambda: score(str(pred), str(gt), protocol=protocol, **kw), args.repeat)
            name = "all five in one call" if "," in protocol else protocol
            print(f"score --protocol {name:20}: {dt:6.2f} s wall ({dc:6.2f} s CPU) = {args.n / dt:>9,.0f} pairs/s wall, "
                  f"{args.n / dc:>9,.0f} pairs/s CPU (target >= 20,000)")
        if args.judged:
            dt, n = judge_rate(d, args.judged)
            print(f"score --protocol medevalkit --judge-model (loopback): {n} open questions judged in {dt:.2f} s = "
                  f"{n / dt:,.0f} questions/s (the request loop only; a real judge is far slower)")
