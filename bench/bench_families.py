"""Per model family on its tiny preset (llavamed.families), one process, 1 thread:

1. image tokens the model gets for one 336 x 336 px image (`families.image_tokens`);
2. stage-2 training throughput through `llavamed.train.train` (the `instruct` stage: connector + LM trainable,
   batches of 4 from the length-grouped sampler, `num_workers=0`, fp32, no checkpointing): supervised records of
   1-3 exchanges with one image each (PNG files of varied sizes, 64-400 px sides); non-padding tokens per second
   of the optimiser step (forward + backward + AdamW; a callback times each step and a forward hook counts the
   batch's tokens), median over the timed steps after one warm-up step, and end to end (data loading and image
   processing included) over the same steps;
3. batched generation throughput through `llavamed.generate.generate_batch`: the records' first questions with
   their images, batches of 4 (left-padded), greedy, 16 new tokens each (the model's generation config sets
   min_new_tokens = max_new_tokens so every answer has 16), new tokens per second of the whole call (prompt
   encoding and image processing included), median over the timed batches after a warm-up batch;
4. padding share of batches of 4: in the training run itself (padding / all tokens of its batches), and over
   the whole data set with `llavamed.train.grouped_order` vs random order, on the token counts the run's
   dataset gives each record (Qwen2.5-VL, Qwen3-VL, SmolVLM and LLaVA-OneVision: counts that depend on the
   image size).

Where llavamed's own path fails for a family, the row falls back to a bare loop with the family's processor
(`families.family_tokens` labels, `model.generate` on `processor(...)` inputs, `families.build_family`), marks
the figure with `*`, and the failure is printed below the table. Families whose processor needs a package that
is not installed (torchvision, num2words) are reported as skipped.

    OMP_NUM_THREADS=1 python bench/bench_families.py [--steps 8] [--records 64] [--presets tiny,tiny-gemma3]
"""
import argparse, importlib.util, json, os, random, statistics, sys, tempfile, time
from pathlib import Path

WORDS = ("the chest x-ray shows a small nodule in the left lower lobe with no pleural effusion axial ct of the "
         "abdomen demonstrates a hypodense lesion mri brain t2 hyperintense focus").split()
BATCH, NEW_TOKENS = 4, 16


def records(n: int, seed: int = 0):
    "Conversations of 1-3 exchanges with one image each, and an image size per record (64-400 px sides)."
    rng = random.Random(seed)
    out = []
    for i in range(n):
        conv = []
        for k in range(rng.randint(1, 3)):
            q = " ".join(rng.choices(WORDS, k=rng.randint(5, 14))) + "?"
            a = " ".join(rng.choices(WORDS, k=rng.randint(4, 30))) + "."
            conv += [{"from": "human", "value": ("<image>\n" + q) if k == 0 else q}, {"from": "gpt", "value": a}]
        out.append(({"id": str(i), "image": f"{i}.png", "conversations": conv},
                    (rng.randint(64, 400), rng.randint(64, 400))))
    return out


def image(size, seed):
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    im = Image.new("RGB", size, (rng.randint(0, 80),) * 3)
    ImageDraw.Draw(im).ellipse([size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2], fill=(200, 190, 180))
    return im


def write_data(recs, folder: Path) -> Path:
    "The records as a LLaVA JSON file beside an images folder of their PNGs."
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, (r, size) in enumerate(recs): image(size, i).save(folder / "images" / r["image"])
    (folder / "train.json").write_text(json.dumps([r for r, _ in recs]))
    return folder / "train.json"


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def step_timer():
    "A TrainerCallback timing each optimiser step, counting its tokens (a forward hook), keeping the dataset."
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps, self.ends, self.batch_tokens, self.hook, self.dataset = [], [], [], None, None

        def _count(self, module, args, kwargs):
            mask = kwargs.get("attention_mask")
            if mask is not None and module.training: self.batch_tokens.append((int(mask.sum()), mask.numel()))

        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
            self.hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.dataset = getattr(train_dataloader, "dataset", None)

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.seen = time.perf_counter(), len(self.batch_tokens)

        def on_step_end(self, args, state, control, **kw):
            now, counts = time.perf_counter(), self.batch_tokens[self.seen:]
            self.steps.append((now - self.t0, sum(t for t, _ in counts), sum(n for _, n in counts)))
            self.ends.append(now)

        def on_train_end(self, args, state, control, **kw):
            if self.hook is not None: self.hook.remove()

    return StepTimer()


def train_llavamed(preset: str, data: Path, out: Path, steps: int) -> dict:
    "Stage-2 tokens/s through llavamed.train, padding shares from its dataset's lengths and its batches."
    from llavamed.train import RunConfig, StageConfig, grouped_order, padding_share, train
    timer = step_timer()
    stage = StageConfig.load("instruct", global_batch_size=BATCH, per_device_batch_size=BATCH, lr=1e-4,
                             warmup_ratio=0.0)
    run = RunConfig(model=preset, data=str(data), images=str(data.parent / "images"), out=str(out),
                    max_steps=steps + 1, num_workers=0, quiet=True, save_steps=10 ** 6, grad_ckpt="off",
                    precision="fp32", overwrite=True)
    res = train(stage, run, callbacks=[timer])
    timed = timer.steps[1:]
    if not timed: raise RuntimeError(f"llavamed.train ran {len(timer.steps)} steps, none timed")
    lengths, has_image = list(timer.dataset.lengths), list(timer.dataset.has_image)
    rnd = list(range(len(lengths))); random.Random(1).shuffle(rnd)
    real, every = sum(r for _, r, _ in timed), sum(e for _, _, e in timed)
    return {"train_tok_s": statistics.median(r / t for t, r, _ in timed),
            "train_e2e_tok_s": real / (timer.ends[-1] - timer.ends[0]),
            "pad_run": 1 - real / every, "mean_len": statistics.mean(lengths),
            "pad_random": padding_share(rnd, lengths, BATCH),
            "pad_grouped": padding_share(grouped_order(lengths, has_image, batch_size=BATCH), lengths, BATCH),
            "steps": res.steps}


def train_bare(model, proc, recs, steps: int) -> dict:
    "Stage-2 tokens/s of a bare loop with the family's processor; padding shares on family_tokens lengths."
    import torch
    from llavamed.core import IGNORE_INDEX
    from llavamed.families import family_of, family_tokens, record_messages, set_stage
    from llavamed.train import grouped_order, padding_share
    fam, tok = family_of(model), proc.tokenizer
    lengths = [len(family_tokens(r, proc, [image(size, i)])["input_ids"]) for i, (r, size) in enumerate(recs)]
    rnd = list(range(len(recs))); random.Random(1).shuffle(rnd)
    grouped = grouped_order(lengths, [True] * len(recs), batch_size=BATCH)
    set_stage(model, "instruct"); model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    side, tok.padding_side = tok.padding_side, "right"
    times, counted, every, t_start = [], [], [], None
    for step in range(steps + 1):
        idx = grouped[BATCH * step % len(grouped):][:BATCH]
        batch_recs = [(recs[i][0], image(recs[i][1], i)) for i in idx]
        texts = [proc.apply_chat_template(record_messages(r, fam), tokenize=False) for r, _ in batch_recs]
        inputs = proc(text=texts, images=[[im] for _, im in batch_recs], return_tensors="pt", padding=True)
        labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
        for k, (r, im) in enumerate(batch_recs):
            lab = family_tokens(r, proc, [im])["labels"]
            labels[k, :len(lab)] = torch.tensor(lab)
        t = time.perf_counter()
        model(**inputs, labels=labels).loss.backward(); opt.step(); opt.zero_grad()
        if step:
            times.append(time.perf_counter() - t)
            counted.append(int(inputs["attention_mask"].sum())); every.append(inputs["attention_mask"].numel())
        else: t_start = time.perf_counter()
    tok.padding_side = side
    return {"train_tok_s": statistics.median(c / t for c, t in zip(counted, times)),
            "train_e2e_tok_s": sum(counted) / (time.perf_counter() - t_start),
            "pad_run": 1 - sum(counted) / sum(every), "mean_len": statistics.mean(lengths),
            "pad_random": padding_share(rnd, lengths, BATCH), "pad_grouped": padding_share(grouped, lengths, BATCH),
            "steps": steps + 1}


def prompts(recs, fam):
    "Each record's first question as chat messages, and its image."
    from llavamed.families import record_messages
    return ([record_messages(dict(r, conversations=r["conversations"][:1]), fam) for r, _ in recs],
            [image(size, i) for i, (_, size) in enumerate(recs)])


def generate_llavamed(model, proc, recs, batches: int) -> dict:
    "New tokens/s of llavamed.generate.generate_batch, one call per batch of 4, 16 new tokens each."
    from llavamed.families import family_of
    from llavamed.generate import generate_batch
    convs, ims = prompts(recs, family_of(model))
    model.eval(); model.generation_config.min_new_tokens = NEW_TOKENS
    rates = []
    for b in range(batches + 1):
        sl = slice(BATCH * b % len(recs), BATCH * b % len(recs) + BATCH)
        t = time.perf_counter()
        answers = generate_batch(model, proc, convs[sl], ims[sl], max_new_tokens=NEW_TOKENS, batch_size=BATCH)
        if b: rates.append(len(answers) * NEW_TOKENS / (time.perf_counter() - t))
    return {"gen_tok_s": statistics.median(rates)}


def generate_bare(model, proc, recs, batches: int) -> dict:
    "New tokens/s of model.generate on the family processor's left-padded batches (encoding not timed)."
    import torch
    from llavamed.families import family_of
    convs, ims = prompts(recs, family_of(model))
    model.eval(); tok = proc.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    rates = []
    for b in range(batches + 1):
        lo = BATCH * b % len(recs)
        texts = [proc.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in convs[lo:lo + BATCH]]
        inputs = proc(text=texts, images=[[im] for im in ims[lo:lo + BATCH]], return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        if b: rates.append(len(texts) * NEW_TOKENS / (time.perf_counter() - t))
    tok.padding_side = side
    return {"gen_tok_s": statistics.median(rates)}


def bench(preset: str, n_records: int, steps: int, work: Path, bare: bool) -> dict:
    from llavamed.families import build_family, image_tokens
    recs = records(n_records)
    data = write_data(recs, work / preset)
    texts = [" ".join(WORDS)] * 20
    model, proc = build_family(preset, tokenizer_texts=texts, vocab_size=400)
    r = {"image_tokens_336": image_tokens(proc, (336, 336)), "params": sum(p.numel() for p in model.parameters()),
         "failed": {}, "bare": set()}
    for part, ours, fallback in (("train", lambda: train_llavamed(preset, data, work / preset / "out", steps),
                                  lambda: train_bare(*build_family(preset, tokenizer_texts=texts, vocab_size=400),
                                                     recs, steps)),
                                 ("generate", lambda: generate_llavamed(model, proc, recs, max(2, steps // 2)),
                                  lambda: generate_bare(model, proc, recs, max(2, steps // 2)))):
        try:
            if bare: raise RuntimeError("--bare")
            r.update(ours())
        except Exception as e:
            if not bare: r["failed"][part] = first_line(e)
            r["bare"].add(part); r.update(fallback())
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per family")
    ap.add_argument("--records", type=int, default=64, help="records for lengths and batches")
    ap.add_argument("--presets", default=None, help="comma-separated tiny presets (default: all)")
    ap.add_argument("--bare", action="store_true", help="bare loops only (not llavamed.train / generate)")
    args = ap.parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark, also where a GPU is present (train would take it)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # deepspeed (imported with Trainer) logs its CPU guess otherwise
    import logging, torch, transformers
    transformers.utils.logging.disable_progress_bar()  # the weights' writing bars of each saved run
    from llavamed.families import TINY_PRESETS, family_of
    torch.set_num_threads(1)
    for name in ("llavamed", "transformers"):  # the table is the output; the libraries' warnings stay quiet
        logging.getLogger(name).setLevel(logging.ERROR)
    presets = args.presets.split(",") if args.presets else TINY_PRESETS
    import subprocess
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"],
                          capture_output=True, text=True).stdout.strip() or "?"
    print(f"llavamed at {head}, torch {torch.__version__}, transformers {transformers.__version__}, 1 thread, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, batches of {BATCH}, "
          f"{args.steps} timed steps, {args.records} records, {NEW_TOKENS} new tokens per answer")
    print(f"{'preset':22} {'img tok/336px':>13} {'params':>8} {'mean len':>8} {'train tok/s':>11} "
          f"{'e2e tok/s':>9} {'gen tok/s':>9} {'pad run':>8} {'pad random':>10} {'pad grouped':>11}")
    failures = []
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        for preset in presets:
            missing = [p for p in family_of(preset).needs if importlib.util.find_spec(p) is None]
            if missing:
                print(f"{preset:22} skipped: needs {' and '.join(missing)}"); continue
            r = bench(preset, args.records, args.steps, Path(tmp), args.bare)
            star = {p: "*" if p in r["bare"] else " " for p in ("train", "generate")}
            print(f"{preset:22} {r['image_tokens_336']:>13} {r['params']:>8,} {r['mean_len']:>8.0f} "
                  f"{r['train_tok_s']:>10,.0f}{star['train']} {r['train_e2e_tok_s']:>8,.0f}{star['train']} "
                  f"{r['gen_tok_s']:>8,.0f}{star['generate']} {r['pad_run']:>8.1%} {r['pad_random']:>10.1%} "
                  f"{r['pad_grouped']:>11.1%}")
            failures += [(preset, part, msg) for part, msg in r["failed"].items()]
            sys.stdout.flush()
    print("train: llavamed.train (stage instruct); gen: llavamed.generate.generate_batch; * a bare loop instead"
          + (" (--bare)" if args.bare else f"; llavamed's path failed {len(failures)} time(s)"))
    for preset, part, msg in failures:
        print(f"  {preset} {part}: llavamed's path failed: {msg}")


if __name__ == "__main__":
    main()
