"""Serving speed on the tiny preset: questions/s through `llavamed serve` (transformers serve) at concurrency 1
and 8 against `llavamed predict` in process, and the time from `llavamed serve` start to the first answer.

    .venv/bin/python bench/bench_serve.py --questions 48 --max-new-tokens 16

The model is the tiny preset with seeded random weights, saved once, so the server and predict load the
same folder; every question has its own 64x64 PNG. predict runs in this process (model loaded first, not
timed: its questions/s is generation only); the server runs as `llavamed serve` in a child process on a
free loopback port, asked through `llavamed.serve.answer_with_api` (the real openai client, image parts
as PNG data URLs). Answers are compared question by question (greedy: they should all be equal).
"""
import argparse, json, os, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_data(d: Path, n: int) -> Path:
    "images/ with n distinct PNGs and vqa.json with one closed question about each."
    import numpy as np
    from PIL import Image
    from llavamed.core import IMAGE_TOKEN
    rng = np.random.default_rng(0)
    (d / "images").mkdir(parents=True)
    recs = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "images" / f"i{k}.png")
        recs.append({"id": f"q{k}", "image": f"images/i{k}.png", "answer_type": "CLOSED",
                     "conversations": [{"from": "human", "value": f"Question {k}: is the organ enlarged?\n{IMAGE_TOKEN}"},
                                       {"from": "gpt", "value": "yes" if k % 2 else "no"}]})
    (d / "vqa.json").write_text(json.dumps(recs))
    return d / "vqa.json"


def first_answer(base: str, name: str, deadline: float) -> None:
    "Ask until the server answers one chat request (it is not listening while the model loads)."
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    req = urllib.request.Request(f"{base}/chat/completions", data=body, headers={"Content-Type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                if r.status == 200: return
        except OSError:
            if time.monotonic() > deadline: raise
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="predict's batch size")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from llavamed.generate import generate_batch  # noqa: F401  (imports torch/transformers before timing)
    from llavamed.model import build_model, save_model
    from llavamed.predict import predict
    from llavamed.serve import answer_with_api

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data = make_data(tmp / "data", args.questions)
    torch.manual_seed(0)
    model_dir = save_model(*build_model("tiny"), tmp / "tiny")
    name = str(model_dir.resolve())
    kw = dict(max_new_tokens=args.max_new_tokens, quiet=True)

    predict(model=str(model_dir), data=str(data), out=str(tmp / "warmup.jsonl"), batch_size=2, limit=2, device="cpu",
            dtype="float32", **kw)  # first-call costs (allocator, kernels) kept out of the figures
    local = {}
    for bs in sorted({1, args.batch_size}):
        res = predict(model=str(model_dir), data=str(data), out=str(tmp / f"predict{bs}.jsonl"), batch_size=bs,
                      device="cpu", dtype="float32", **kw)
        local[bs] = res.questions_per_s

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    exe = Path(sys.executable).parent / "llavamed"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w"))
    try:
        first_answer(base, name, time.monotonic() + 600)
        startup = time.perf_counter() - t0
        served = {}
        for conc in (1, 8):
            res = answer_with_api(str(data), str(tmp / f"api{conc}.jsonl"), base, model=name, concurrency=conc,
                                  batch_size=64, **kw)
            served[conc] = res.questions_per_s
    finally:
        proc.terminate()
        code = proc.wait(60)

    def texts(path):
        return {r["question_id"]: r["text"] for r in map(json.loads, Path(path).read_text().splitlines())}
    ref = texts(tmp / "predict1.jsonl")
    same = {f: sum(texts(tmp / f)[q] == t for q, t in ref.items())
            for f in (f"predict{args.batch_size}.jsonl", "api1.jsonl", "api8.jsonl")}
    print(f"tiny preset, {args.questions} questions (64x64 PNG each), max_new_tokens {args.max_new_tokens}, "
          f"greedy, CPU ({os.cpu_count()} cores), torch {torch.__version__}")
    for bs, qps in local.items():
        print(f"  llavamed predict in process, batch {bs:>2}: {qps:6.2f} questions/s (model loaded, not timed)")
    for conc, qps in served.items():
        print(f"  llavamed serve, concurrency {conc}:      {qps:6.2f} questions/s (HTTP + PNG data URLs)")
    print(f"  llavamed serve start -> first answered request: {startup:.1f} s (exit status on SIGTERM: {code})")
    print("  answers equal to predict at batch 1: " + ", ".join(f"{f} {n}/{len(ref)}" for f, n in same.items()))


if __name__ == "__main__":
    main()
