"""Does the demo's model learn from the image, on a model family beside LLaVA? `llavamed demo --family NAME`
end to end (synthetic corpus, template teacher, stage 1 connector only, stage 2 connector + LM, the VQA test
split answered with the real image and with a blank one), one run per family, side by side.

For each family it prints the closed accuracy (official LLaVA-Med scorer, percent; yes/no questions balanced
by construction, so 50 is chance) with the image, with a blank image (predict's `blank` ablation), their
difference (what the image adds), the strict closed accuracy, the open recall, the image tokens per figure,
and the training and total seconds. Every run uses the family's demo defaults (`DemoConfig(family=...)`)
except the sizes below, which keep a run to a few minutes on a shared 2-core CPU; `--n-train`/`--n-test`
change them. Runs go to `--out/FAMILY` and a rerun reuses finished steps (`--fresh` redoes them).

    nice .venv/bin/python bench/bench_family_learning.py [--families gemma3,llava] [--n-train 600] [--n-test 100]
        [--out /tmp/llavamed_family_learning] [--threads 2] [--fresh]
"""
import argparse, json, tempfile, time
from pathlib import Path


def run(family: str, a) -> dict:
    "One demo run of `family`; its report's figures."
    from llavamed.pipeline import DemoConfig, run_pipeline
    cfg = DemoConfig(family=family, n_train=a.n_train, n_test=a.n_test, n_chat=a.n_chat, seed=a.seed,
                     threads=a.threads)
    t0 = time.perf_counter()
    rep = run_pipeline(cfg, Path(a.out) / family, fresh=a.fresh, quiet=not a.progress).report
    return {"family": family, "model": rep["model"], "closed": rep["closed_accuracy"],
            "closed_blank": rep["closed_accuracy_blank_image"], "delta": rep["closed_accuracy_delta_blank"],
            "strict_closed": rep["strict_closed_accuracy"], "open_recall": rep["open_recall"],
            "image_tokens": rep["sizes"]["image_tokens"], "n_closed": _n_closed(Path(a.out) / family),
            "stage2_steps": rep["sizes"]["stage2_steps"], "train_s": rep["train_seconds"],
            "total_s": rep["total_seconds"], "wall_s": time.perf_counter() - t0}


def _n_closed(root: Path) -> int:
    "Closed questions in the run's VQA test split."
    return json.loads((root / "evaluate" / "scores_none.json").read_text())["official"]["n_closed"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="gemma3,llava", help="comma-separated families, run in this order")
    ap.add_argument("--n-train", type=int, default=600, help="training figures of each run")
    ap.add_argument("--n-test", type=int, default=100, help="test figures (about 3 closed questions each)")
    ap.add_argument("--n-chat", type=int, default=5, help="benchmark figures (the proxy-judged conversations)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "llavamed_family_learning"),
                    help="one demo folder per family under it")
    ap.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    ap.add_argument("--progress", action="store_true", help="show the demo's progress lines and bars")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    a = ap.parse_args()
    rows = []
    for family in a.families.split(","):
        rows.append(run(family.strip(), a))
        r = rows[-1]
        print(f"{r['family']}: closed {r['closed']:.1f} with the image, {r['closed_blank']:.1f} blank, "
              f"difference {r['delta']:+.1f} ({r['n_closed']} closed questions); {r['total_s']:.0f} s", flush=True)
    cols = ("family", "model", "closed", "closed_blank", "delta", "strict_closed", "open_recall", "image_tokens",
            "n_closed", "stage2_steps", "train_s", "total_s")
    print(f"\nn_train={a.n_train} n_test={a.n_test} seed={a.seed} threads={a.threads} "
          "(closed accuracy: official scorer, percent; 50 = chance)")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
