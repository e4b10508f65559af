"""Questions/s of `llavamed.predict.predict` per model family, on each family's tiny preset saved to a folder:
batch 8 against batch 1, in one process with one torch thread, on the synthetic corpus' VQA test questions (each
with its figure, `--size` px), greedy, `--max-new-tokens` new tokens at most. The figure is the generation time
`predict` reports (image loading, processing and generation; the model load is left out), and the answers of
the two batch sizes are compared: left-padded batched answers must equal one-at-a-time answers.

Families whose processor needs a package that is not installed are reported as skipped.

Rerun: OMP_NUM_THREADS=1 .venv/bin/python bench/bench_predict_families.py --n 24 --max-new-tokens 8
"""
import argparse, importlib.util, json, os, tempfile
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="questions answered per setting")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="side of the corpus' figures in pixels")
    ap.add_argument("--presets", default=None, help="comma-separated presets (default: every one)")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed (imported by transformers) warns when guessing
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the weight loading and saving bars
    torch.set_num_threads(1)
    from llavamed.families import TINY_PRESETS, family_of
    from llavamed.model import load_model, save_model
    from llavamed.predict import predict
    from llavamed.synth import corpus_texts, make_corpus
    presets = args.presets.split(",") if args.presets else list(TINY_PRESETS)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        make_corpus(str(d / "corpus"), n_train=8, n_test=max(args.n, 8), size=args.size, n_chat=1, quiet=True)
        questions = json.loads((d / "corpus" / "vqa_test.json").read_text())[:args.n]
        (d / "vqa.json").write_text(json.dumps(questions))
        texts = corpus_texts(str(d / "corpus"))
        print(f"{len(questions)} questions, {args.size} px figures, greedy, at most {args.max_new_tokens} new tokens, "
              f"1 thread, torch {torch.__version__}")
        print(f"{'preset':<22}{'batch 1 q/s':>12}{'batch 8 q/s':>12}{'speed-up':>10}  batched == alone")
        for preset in presets:
            missing = [p for p in family_of(preset).needs if importlib.util.find_spec(p) is None]
            if missing:
                print(f"{preset:<22}skipped: its processor needs {' and '.join(missing)}"); continue
            torch.manual_seed(0)
            save_model(*load_model(preset, device="cpu", dtype="float32", tokenizer_texts=texts), d / preset)
            runs = {}
            for batch in (1, 8):
                out = d / f"{preset}-{batch}.jsonl"
                res = predict(str(d / preset), str(d / "vqa.json"), images=str(d / "corpus" / "images"),
                              out=str(out), batch_size=batch, max_new_tokens=args.max_new_tokens, quiet=True,
                              device="cpu", dtype="float32")
                answers = [json.loads(line)["text"] for line in out.read_text().splitlines()]
                runs[batch] = (res.questions_per_s, answers)
            same = runs[1][1] == runs[8][1]
            print(f"{preset:<22}{runs[1][0]:>12.2f}{runs[8][0]:>12.2f}{runs[8][0] / runs[1][0]:>9.2f}x  "
                  f"{'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
