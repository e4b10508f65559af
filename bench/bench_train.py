"""Training benchmarks on CPU, each measured side by side in one run:

1. padding share of tokens per batch of 16, modality/length grouping vs random order, on synthetic
   instruction-style conversations (target <= 10% with grouping);
2. Trainer overhead: steady-state speed of `llavamed.train.train` (steps 3..N; collating in the loop, one
   process) vs a bare forward/backward/step loop over the same batches in the same order, collated
   beforehand, tiny preset. The figure is the median over steps of (bare step time / trainer step time),
   pairing each batch with itself, since a shared machine stalls a few steps of either loop at random
   (target >= 0.9); the ratios of median and of mean step times are printed beside it;
3. collator throughput at 336 px in one DataLoader worker process (target >= 100 samples/s), beside the same
   collator calling transformers' image processor instead of `llavamed.images.pixel_values`.

    OMP_NUM_THREADS=1 python bench/bench_train.py [--quick]
"""
import argparse, json, random, sys, tempfile, time
from pathlib import Path

WORDS = ("the chest x-ray shows a small nodule in the left lower lobe with no pleural effusion axial ct of the "
         "abdomen demonstrates a hypodense lesion mri brain t2 hyperintense focus histology haematoxylin eosin "
         "stain shows atypical cells gross specimen with a well circumscribed mass").split()


def conversations(n: int, images: Path | None, size=(512, 400), seed=0, text_only=0.1):
    "Instruction-style records: 1-5 exchanges, question 6-20 words, answers 5-90 words; a share are text-only."
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        has_img = rng.random() >= text_only
        conv = []
        for k in range(rng.randint(1, 5)):
            q = " ".join(rng.choices(WORDS, k=rng.randint(6, 20))) + "?"
            a = " ".join(rng.choices(WORDS, k=rng.choice([rng.randint(5, 15), rng.randint(20, 90)]))) + "."
            conv += [{"from": "human", "value": ("<image>\n" + q) if k == 0 and has_img else q}, {"from": "gpt", "value": a}]
        r = {"id": str(i), "conversations": conv}
        if has_img:
            r["image"] = f"{i % 64}.png"
            if images is not None and not (images / r["image"]).exists():
                im = Image.new("RGB", size, (rng.randint(0, 80),) * 3)
                ImageDraw.Draw(im).ellipse([rng.randint(0, 300), 100, 400, 300], fill=(200, 190, 180))
                im.save(images / r["image"])
        recs.append(r)
    return recs


def padding(proc, root: Path, n=2000, bs=16):
    from llavamed.core import Sample
    from llavamed.train import SupervisedDataset, grouped_order, padding_share
    (root / "pad_images").mkdir(exist_ok=True)  # the records' 64 distinct images: the image preflight checks them
    ds = SupervisedDataset([Sample.from_json(r) for r in conversations(n, root / "pad_images", size=(64, 48))], proc,
                           root / "pad_images")
    L, I = ds.lengths, ds.has_image
    rnd = list(range(len(L))); random.Random(0).shuffle(rnd)
    g = grouped_order(L, I, bs, seed=0)
    return {"records": len(L), "mean_len": round(sum(L) / len(L), 1), "batch": bs,
            "padding_grouped": round(padding_share(g, L, bs), 4), "padding_random": round(padding_share(rnd, L, bs), 4)}


def overhead(root: Path, steps=20, bs=8):
    import torch
    from transformers import LlavaForConditionalGeneration
    from llavamed.model import build_model, save_model
    from llavamed.train import SupervisedDataset, Collator, RunConfig, StageConfig, grouped_order, train
    (root / "images").mkdir(exist_ok=True)
    recs = conversations(steps * bs, root / "images", size=(96, 80))
    (root / "train.json").write_text(json.dumps(recs))
    torch.manual_seed(0)
    m, p = build_model("tiny", tokenizer_texts=WORDS)
    save_model(m, p, root / "base")
    from transformers import TrainerCallback
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): stamps.append(time.perf_counter())

    train(StageConfig.load("instruct", global_batch_size=bs, per_device_batch_size=bs, lr=1e-4, epochs=1),
          RunConfig(model=str(root / "base"), data=str(root / "train.json"), images=str(root / "images"),
                    out=str(root / "run"), max_steps=steps, num_workers=0, save_steps=10_000), callbacks=[Clock()])
    # steady state: step times after step 2 (start-up excluded on both sides); the median step time is
    # the figure, since a shared machine stalls a few steps of either loop at random
    import statistics
    trainer_dt = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    # the bare loop: same model, same order, batches collated before the clock starts
    model = LlavaForConditionalGeneration.from_pretrained(root / "base").train()
    model.model.vision_tower.requires_grad_(False)
    ds = SupervisedDataset(str(root / "train.json"), p, root / "images")
    order = grouped_order(ds.lengths, ds.has_image, bs, seed=42)
    col = Collator(p)
    batches = [col([ds[i] for i in order[s:s + bs]]) for s in range(0, steps * bs, bs)]
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
    ends = []
    for b in batches:
        loss = model(**b).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    bare_dt = [b - a for a, b in zip(ends[1:], ends[2:])]
    trainer_sps, bare_sps = bs / statistics.median(trainer_dt), bs / statistics.median(bare_dt)
    mean_ratio = (sum(bare_dt) / len(bare_dt)) / (sum(trainer_dt) / len(trainer_dt))
    paired = statistics.median(b / t for b, t in zip(bare_dt, trainer_dt))  # same batch, same position in both loops
    return {"steps": steps, "batch": bs, "trainer_samples_per_s": round(trainer_sps, 2),
            "bare_loop_samples_per_s": round(bare_sps, 2), "ratio": round(paired, 3),
            "ratio_of_medians": round(trainer_sps / bare_sps, 3), "ratio_of_means": round(mean_ratio, 3)}


def collator(root: Path, n=320, bs=16):
    "Samples/s through a one-worker DataLoader: our collator vs the same collator calling the processor per image."
    import torch
    from llavamed.core import Sample
    from llavamed.model import build_model, TINY_VISION
    from llavamed.train import SupervisedDataset, Collator
    (root / "img336").mkdir(exist_ok=True)
    recs = [Sample.from_json(r) for r in conversations(n, root / "img336", size=(512, 400), text_only=0.0)]
    _, p = build_model("tiny", tokenizer_texts=WORDS, vision={**TINY_VISION, "image_size": 336, "patch_size": 14})
    ds = SupervisedDataset(recs, p, root / "img336")

    class ViaProcessor(Collator):  # the reference: transformers' image processor on the list of images
        def __call__(self, items):
            b = super().__call__([{**it, "image": None} for it in items])
            b["pixel_values"] = self.processor.image_processor([it["image"] for it in items], return_tensors="pt")["pixel_values"]
            return b

    def rate(collate):
        dl = torch.utils.data.DataLoader(ds, batch_size=bs, num_workers=1, collate_fn=collate)
        it = iter(dl)
        first = next(it)  # worker start-up is not throughput
        t0 = time.perf_counter(); k = 0
        for b in it: k += len(b["input_ids"])
        return first, k, k / (time.perf_counter() - t0)

    first, k, ours = rate(Collator(p))
    _, _, ref = rate(ViaProcessor(p))
    return {"image_px": 336, "source_px": [512, 400], "pixel_values": list(first["pixel_values"].shape),
            "image_tokens": ds.n_image_tokens, "samples": k, "samples_per_s": round(ours, 1),
            "samples_per_s_via_processor": round(ref, 1), "speedup": round(ours / ref, 2)}


def main(argv=None):
    ap = argparse.ArgumentParser(); ap.add_argument("--quick", action="store_true", help="smaller sizes (for tests)")
    a = ap.parse_args(argv)
    from llavamed.model import build_model
    _, proc = build_model("tiny", tokenizer_texts=WORDS)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        out["padding"] = padding(proc, d, n=300 if a.quick else 2000)
        print(json.dumps({"padding": out["padding"]}), flush=True)
        out["collator"] = collator(d, n=48 if a.quick else 320)
        print(json.dumps({"collator": out["collator"]}), flush=True)
        out["trainer_overhead"] = overhead(d, steps=4 if a.quick else 40)
        print(json.dumps({"trainer_overhead": out["trainer_overhead"]}), flush=True)
    return out


if __name__ == "__main__":
    main()
