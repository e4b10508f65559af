"""Serving speed on the tiny presets: questions/s through `llavamed serve` (transformers serve) at concurrency 1
and 8 against `llavamed predict` in process, and the time from `llavamed serve` start to the first answer; for
LLaVA's tiny preset and one other family's (Gemma 3 by default).

    .venv/bin/python bench/bench_serve.py --questions 48 --max-new-tokens 16 [--presets tiny,tiny-gemma3]

Each preset is built with seeded random weights and saved once (`llavamed.model.save_model`), so the server and
predict load the same folder, its generation config listing every token `llavamed.generate` stops at (the tiny
Gemma 3 preset lists only `<end_of_turn>`, and a random model writes `<eos>` too: predict would stop there and
the server not); every question has its own 64x64 PNG. predict runs in this process (model loaded
first, not timed: its questions/s is generation only); the server runs as `llavamed serve` in a child process
on a free loopback port, asked through `llavamed.serve.answer_with_api` (the real openai client, image parts
as PNG data URLs). Answers are compared question by question (greedy: they should all be equal). Where
`llavamed predict` cannot run a family's folder, its in-process figure is `generate_batch` on the same
questions (marked `*`, the failure printed).
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


def in_process(model_dir: Path, data: Path, out: Path, batch_size: int, kw: dict) -> tuple[float, str]:
    "Questions/s of `llavamed predict` on the folder (answers written to `out`); '' or '*' and why it fell back."
    from llavamed.predict import predict
    try:
        res = predict(model=str(model_dir), data=str(data), out=str(out), batch_size=batch_size, device="cpu",
                      dtype="float32", **kw)
        return res.questions_per_s, ""
    except Exception as e:  # a family predict cannot run yet: time generate_batch on the same questions
        from PIL import Image
        from llavamed.generate import generate_batch
        from llavamed.model import load_model
        from llavamed.predict import question_messages
        from llavamed.core import load_questions
        out.unlink(missing_ok=True)
        model, proc = load_model(model_dir, device="cpu", dtype="float32")
        qs = load_questions(data)
        t0 = time.perf_counter()
        rows = []
        for k in range(0, len(qs), batch_size):
            chunk = qs[k:k + batch_size]
            convs = [question_messages(q)[0] for q in chunk]
            imgs = [Image.open(data.parent / q.image).convert("RGB") for q in chunk]
            texts = generate_batch(model, proc, convs, imgs, max_new_tokens=kw["max_new_tokens"])
            rows += [{"question_id": q.id, "text": t} for q, t in zip(chunk, texts)]
        qps = len(qs) / (time.perf_counter() - t0)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return qps, f"* ({type(e).__name__}: {str(e)[:160]})"


def served(model_dir: Path, data: Path, tmp: Path, tag: str, kw: dict) -> tuple[float, dict, int]:
    "Seconds from `llavamed serve` start to its first answer, questions/s by concurrency, and its exit status."
    from llavamed.serve import answer_with_api
    name, port = str(model_dir.resolve()), free_port()
    base = f"http://127.0.0.1:{port}/v1"
    exe = Path(sys.executable).parent / "llavamed"
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model_dir), "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"serve-{tag}.log", "w"))
    try:
        first_answer(base, name, time.monotonic() + 600)
        startup = time.perf_counter() - t0
        qps = {}
        for conc in (1, 8):
            res = answer_with_api(str(data), str(tmp / f"{tag}-api{conc}.jsonl"), base, model=name,
                                  concurrency=conc, batch_size=64, **kw)
            qps[conc] = res.questions_per_s
    finally:
        proc.terminate()
        code = proc.wait(60)
    return startup, qps, code


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16, help="predict's batch size")
    ap.add_argument("--presets", default="tiny,tiny-gemma3", help="comma-separated presets (llavamed.families)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from llavamed.generate import generation_kwargs  # (imports torch/transformers before timing)
    from llavamed.model import build_model, save_model
    from llavamed.predict import predict

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    data = make_data(tmp / "data", args.questions)
    kw = dict(max_new_tokens=args.max_new_tokens, quiet=True)
    print(f"{args.questions} questions (64x64 PNG each), max_new_tokens {args.max_new_tokens}, greedy, "
          f"CPU ({os.cpu_count()} cores), torch {torch.__version__}")
    for preset in args.presets.split(","):
        torch.manual_seed(0)
        model, proc = build_model(preset)
        # the saved generation config lists every token llavamed's generate stops at (as released Gemma 3 and
        # Qwen checkpoints list end of turn and end of text), so the server stops where predict does
        model.generation_config.eos_token_id = generation_kwargs(model, proc)["eos_token_id"]
        model_dir = save_model(model, proc, tmp / preset)
        tag = preset
        try:
            predict(model=str(model_dir), data=str(data), out=str(tmp / f"{tag}-warmup.jsonl"), batch_size=2,
                    limit=2, device="cpu", dtype="float32", **kw)  # first-call costs kept out of the figures
        except Exception: pass  # in_process says why
        local, marks = {}, {}
        for bs in sorted({1, args.batch_size}):
            local[bs], marks[bs] = in_process(model_dir, data, tmp / f"{tag}-predict{bs}.jsonl", bs, kw)
        startup, remote, code = served(model_dir, data, tmp, tag, kw)

        def texts(path):
            return {r["question_id"]: r["text"] for r in map(json.loads, Path(path).read_text().splitlines())}
        ref = texts(tmp / f"{tag}-predict1.jsonl")
        same = {f: sum(texts(tmp / f"{tag}-{f}.jsonl").get(q) == t for q, t in ref.items())
                for f in (f"predict{args.batch_size}", "api1", "api8")}
        print(f"{preset}:")
        for bs, qps in local.items():
            mark = marks[bs][:1]
            print(f"  in process (llavamed predict{' -> generate_batch' if mark else ''}), batch {bs:>2}: "
                  f"{qps:6.2f} questions/s{mark} (model loaded, not timed)")
        for conc, qps in remote.items():
            print(f"  llavamed serve, concurrency {conc}:      {qps:6.2f} questions/s (HTTP + PNG data URLs)")
        print(f"  llavamed serve start -> first answered request: {startup:.1f} s (exit status on SIGTERM: {code})")
        print("  answers equal to in process at batch 1: " + ", ".join(f"{f} {n}/{len(ref)}" for f, n in same.items()))
        for bs, why in marks.items():
            if why: print(f"  {why[2:]} (batch {bs})")


if __name__ == "__main__":
    main()
