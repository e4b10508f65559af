"""Per model family on its tiny preset (llavamed.families), one process, 1 thread:

1. image tokens the model gets for one 336 x 336 px image;
2. training step throughput on stage-2 settings (connector + LM trainable): supervised records of 1-3
   exchanges with one image each, batches of 4 padded to the longest, tokens (not padding) per second of
   forward + backward + AdamW step, median over the timed steps (after one warm-up step);
3. batched generation throughput: batches of 4 prompts with one image each, left-padded, greedy,
   16 new tokens each (min_new_tokens = max_new_tokens), new tokens per second;
4. padding share of batches of 4 with llavamed.train's modality/length grouping vs random order, on the
   real per-record token counts (images of varied sizes: for Qwen2.5-VL, SmolVLM and LLaVA-OneVision the
   count depends on the image size).

Families whose processor needs a package that is not installed (torchvision, num2words) are reported as
skipped.

    OMP_NUM_THREADS=1 python bench/bench_families.py [--steps 8] [--records 64]
"""
import argparse, importlib.util, random, statistics, sys, time

WORDS = ("the chest x-ray shows a small nodule in the left lower lobe with no pleural effusion axial ct of the "
         "abdomen demonstrates a hypodense lesion mri brain t2 hyperintense focus").split()


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


def bench(preset: str, n_records: int, steps: int) -> dict:
    import torch
    from llavamed.core import IGNORE_INDEX
    from llavamed.families import build_family, family_of, family_tokens, image_tokens, record_messages, set_stage
    from llavamed.train import grouped_order, padding_share
    t0 = time.perf_counter()
    model, proc = build_family(preset, tokenizer_texts=[" ".join(WORDS)] * 20, vocab_size=400)
    built_s = time.perf_counter() - t0
    fam, tok = family_of(model), proc.tokenizer
    recs = records(n_records)
    lengths = [len(family_tokens(r, proc, [image(size, i)])["input_ids"]) for i, (r, size) in enumerate(recs)]
    rnd = list(range(len(recs))); random.Random(1).shuffle(rnd)
    grouped = grouped_order(lengths, [True] * len(recs), batch_size=4)
    # training: stage 2 (connector + LM), batches of 4 as the processor pads them
    set_stage(model, "instruct"); model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tok.padding_side = "right"
    times, counted = [], []
    for step in range(steps + 1):
        batch_recs = [recs[(4 * step + k) % len(recs)] for k in range(4)]
        ims = [image(size, k) for k, (_, size) in enumerate(batch_recs)]
        texts = [proc.apply_chat_template(record_messages(r, fam), tokenize=False) for r, _ in batch_recs]
        inputs = proc(text=texts, images=[[im] for im in ims], return_tensors="pt", padding=True)
        labels = torch.full_like(inputs["input_ids"], IGNORE_INDEX)
        for k, ((r, _), im) in enumerate(zip(batch_recs, ims)):
            lab = family_tokens(r, proc, [im])["labels"]
            labels[k, :len(lab)] = torch.tensor(lab)
        t = time.perf_counter()
        model(**inputs, labels=labels).loss.backward(); opt.step(); opt.zero_grad()
        if step: times.append(time.perf_counter() - t); counted.append(int(inputs["attention_mask"].sum()))
    train_tps = statistics.median(c / t for c, t in zip(counted, times))
    # batched generation: 4 prompts with an image each, left-padded, 16 new tokens each
    model.eval(); tok.padding_side = "left"
    gen = []
    for step in range(max(2, steps // 2) + 1):
        batch_recs = [recs[(4 * step + k) % len(recs)] for k in range(4)]
        texts = [proc.apply_chat_template(record_messages(dict(r, conversations=r["conversations"][:1]), fam),
                                          add_generation_prompt=True, tokenize=False) for r, _ in batch_recs]
        inputs = proc(text=texts, images=[[image(size, k)] for k, (_, size) in enumerate(batch_recs)],
                      return_tensors="pt", padding=True)
        t = time.perf_counter()
        with torch.no_grad(): model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        if step: gen.append(4 * 16 / (time.perf_counter() - t))
    return {"image_tokens_336": image_tokens(proc, (336, 336)), "build_s": built_s,
            "mean_len": statistics.mean(lengths), "train_tok_s": train_tps, "gen_tok_s": statistics.median(gen),
            "pad_random": padding_share(rnd, lengths, 4), "pad_grouped": padding_share(grouped, lengths, 4),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per family")
    ap.add_argument("--records", type=int, default=64, help="records for lengths and batches")
    args = ap.parse_args(argv)
    import torch
    from llavamed.families import TINY_PRESETS, family_of
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, batches of 4, {args.steps} timed steps, {args.records} records")
    print(f"{'preset':22} {'img tok/336px':>13} {'params':>8} {'mean len':>8} {'train tok/s':>11} "
          f"{'gen tok/s':>9} {'pad random':>10} {'pad grouped':>11}")
    for preset in TINY_PRESETS:
        missing = [p for p in family_of(preset).needs if importlib.util.find_spec(p) is None]
        if missing:
            print(f"{preset:22} skipped: needs {' and '.join(missing)}"); continue
        r = bench(preset, args.records, args.steps)
        print(f"{preset:22} {r['image_tokens_336']:>13} {r['params']:>8,} {r['mean_len']:>8.0f} "
              f"{r['train_tok_s']:>11,.0f} {r['gen_tok_s']:>9,.0f} {r['pad_random']:>10.1%} "
              f"{r['pad_grouped']:>11.1%}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
