"Questions/s of `llavamed predict` on the tiny model: batch 16 against batch 1, measured side by side in one run."
import argparse, json, tempfile, time
from pathlib import Path

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=64, help="questions answered per setting")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    from llavamed.synth import make_corpus, corpus_texts
    from llavamed.model import build_model, save_model
    from llavamed.predict import predict
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_corpus(str(d / "corpus"), n_train=16, n_test=max(4, args.n // 4 + 1), size=64, n_chat=2, quiet=True)
        qs = json.loads((d / "corpus" / "vqa_test.json").read_text())[:args.n]
        (d / "test.json").write_text(json.dumps(qs))
        m, p = build_model("tiny", tokenizer_texts=corpus_texts(str(d / "corpus")))
        save_model(m, p, d / "model")
        kw = dict(images=str(d / "corpus" / "images"), max_new_tokens=args.max_new_tokens, device=args.device, quiet=True)
        predict(str(d / "model"), str(d / "test.json"), out=str(d / "warm.jsonl"), batch_size=4, limit=4, **kw)  # warm-up
        rates = {}
        for bs in (1, 16):
            t0 = time.perf_counter()
            r = predict(str(d / "model"), str(d / "test.json"), out=str(d / f"b{bs}.jsonl"), batch_size=bs, **kw)
            rates[bs] = r.answered / r.seconds
            print(f"batch {bs:2}: {r.answered} questions in {r.seconds:.2f} s generation "
                  f"({time.perf_counter() - t0:.2f} s with model load) = {rates[bs]:.1f} questions/s")
        print(f"batch 16 / batch 1 speed-up: {rates[16] / rates[1]:.2f}x (max_new_tokens={args.max_new_tokens}, "
              f"{len(qs)} questions, device={args.device or 'auto'})")
