"""PIL vs torchvision ("fast") image processors, per model family: time per image and pixel difference.

With torchvision installed transformers has two backends for each family's image processor: the PIL one
(`...ImageProcessorPil`, what `llavamed.families.build_family` and `llavamed.model.make_image_processor` build)
and the torchvision one (`...ImageProcessor`, what `AutoProcessor.from_pretrained` picks by default when
torchvision is present). For each family, both backends with the same settings (the PIL processor saved, then
loaded back through `AutoImageProcessor.from_pretrained(dir, backend=...)`, as a checkpoint would be), on
seeded synthetic scans (smooth anatomy-like shapes, a gradient and mild noise) of each size:

- milliseconds per image, one image per call (as a data loader's `__getitem__` calls it) and per image in a
  call of 8 images of the same size; median over the repeats, `torch.set_num_threads(--threads)`;
- the largest and the mean absolute difference of `pixel_values` (normalised, what the model sees), the share
  of values that differ at all, and whether the other outputs (Qwen's image grid, SmolVLM's tile masks, OneVision's image sizes) and shapes agree;
  one 8-bit level is 1 / 255 / std after normalisation (0.015 for CLIP's std, 0.0078 for std 0.5).

Settings per family (`--settings`): `hub`: the released models' preprocessor_config.json (LLaVA-Med v1.5 /
llava-1.5: CLIP 336 px, pad to square; Qwen2.5-VL-7B-Instruct: 3136..12845056 pixels; Qwen3-VL: 16 px patches,
65536..16777216 pixels; gemma-3-4b-it: 896 px, pan-and-scan off; SmolVLM-Instruct: 1536 px longest edge in
384 px tiles; llava-onevision-qwen2-0.5b-ov-hf: 384 px, anyres_max_9 grid); `tiny`: the tiny presets'
processors (`build_family`).

    OMP_NUM_THREADS=1 python bench/bench_image_processors.py [--sizes 336x336,1024x1024] [--repeats 10]
        [--settings hub,tiny] [--threads 1]
"""
import argparse, os, statistics, sys, tempfile, time

CLIP_MEAN, HALF = [0.48145466, 0.4578275, 0.40821073], [0.5] * 3


def hub_processors() -> dict:
    "The PIL image processor of each family with its released model's settings."
    import transformers as T
    from llavamed.model import make_image_processor
    onevision_grid = [[384 * h, 384 * w] for h in range(1, 7) for w in range(1, 7)]  # anyres_max_9's pinpoints
    return {
        "llava": make_image_processor(336, "pad"),
        "llava (crop)": make_image_processor(336, "crop"),
        "qwen2_5_vl": T.Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 12845056}),
        "qwen3_vl": T.Qwen2VLImageProcessorPil(size={"shortest_edge": 65536, "longest_edge": 16777216},
                                                patch_size=16, merge_size=2, image_mean=HALF, image_std=HALF),
        "gemma3": T.Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False,
                                            image_mean=HALF, image_std=HALF),
        "smolvlm": T.SmolVLMImageProcessorPil(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}),
        "llava_onevision": T.LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384},
                                                             image_grid_pinpoints=onevision_grid,
                                                             image_mean=HALF, image_std=HALF),
    }


def tiny_processors() -> dict:
    "The PIL image processor of each tiny preset."
    from llavamed.families import TINY_PRESETS, build_family
    out = {}
    for preset in TINY_PRESETS:
        _, proc = build_family(preset, tokenizer_texts=["a small corpus of words"] * 4, vocab_size=300)
        out[preset] = proc.image_processor
    return out


def both_backends(pil_processor):
    "(PIL, torchvision) processors with the same settings, loaded back from the saved PIL one."
    from transformers import AutoImageProcessor
    with tempfile.TemporaryDirectory() as d:
        pil_processor.save_pretrained(d)
        return (AutoImageProcessor.from_pretrained(d, backend="pil"),
                AutoImageProcessor.from_pretrained(d, backend="torchvision"))


def scan(size: tuple[int, int], seed: int):
    "A seeded synthetic grey-scale scan as RGB: body ellipse, organs, a gradient and mild noise."
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter
    rng = np.random.default_rng(seed)
    w, h = size
    im = Image.new("L", size, 10)
    draw = ImageDraw.Draw(im)
    draw.ellipse([w * 0.08, h * 0.12, w * 0.92, h * 0.88], fill=110)
    for _ in range(6):
        cx, cy, r = rng.uniform(0.25, 0.75) * w, rng.uniform(0.3, 0.7) * h, rng.uniform(0.04, 0.12) * min(w, h)
        draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=int(rng.integers(40, 230)))
    im = im.filter(ImageFilter.GaussianBlur(max(1, min(w, h) // 200)))
    a = np.asarray(im, dtype=np.float32) + np.linspace(0, 25, w)[None, :] + rng.normal(0, 4, (h, w))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")


def run(processor, images) -> dict:
    return processor(images=images, return_tensors="pt")


def timed_ms(processor, images, repeats: int) -> float:
    "Median milliseconds per image of calling `processor` on `images` (after one warm-up call)."
    run(processor, images)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); run(processor, images); times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times) / len(images)


def compare(pil_out, fast_out) -> dict:
    "Max and mean |difference| of pixel_values, the share of values that differ, whether the rest agrees."
    import torch
    a, b = pil_out["pixel_values"], fast_out["pixel_values"]
    if a.shape != b.shape:
        return {"same_shape": False, "max": None, "mean": None, "share": None, "others_equal": False,
                "shapes": f"{tuple(a.shape)} vs {tuple(b.shape)}"}
    diff = (a.float() - b.float()).abs()
    others = sorted(set(pil_out) | set(fast_out) - {"pixel_values"})
    others_equal = all(k in pil_out and k in fast_out and torch.equal(torch.as_tensor(pil_out[k]),
                                                                      torch.as_tensor(fast_out[k]))
                       for k in others if k != "pixel_values")
    return {"same_shape": True, "max": float(diff.max()), "mean": float(diff.mean()),
            "share": float((diff > 1e-6).float().mean()), "others_equal": others_equal, "shapes": str(tuple(a.shape))}


def level(processor) -> float:
    "One 8-bit grey level after the processor's normalisation (the smallest step a rounding can make)."
    std = processor.image_std if getattr(processor, "do_normalize", True) else [1.0]
    return 1 / 255 / min(std)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="336x336,1024x1024", help="image sizes WxH, comma-separated")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (median)")
    ap.add_argument("--settings", default="hub,tiny", help="hub and/or tiny (see the module docstring)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--batch", type=int, default=8, help="images per call of the batched measurement")
    args = ap.parse_args(argv)
    import torch, torchvision, transformers
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}"
          f", {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
          f", median of {args.repeats} calls; ms per image (1 per call | {args.batch} per"
          f" call); |diff| of normalised pixel_values; level = one 8-bit step after normalisation")
    print(f"{'family':28} {'size':>9} {'PIL ms':>15} {'fast ms':>15} {'speedup':>11} {'max|diff|':>9} "
          f"{'mean|diff|':>10} {'differ':>7} {'level':>6} {'others':>6}  pixel_values")
    verdicts = []
    groups = {"hub": hub_processors, "tiny": tiny_processors}
    for setting in args.settings.split(","):
        for name, pil_processor in groups[setting]().items():
            pil, fast = both_backends(pil_processor)
            label = f"{name} [{setting}]"
            for size in sizes:
                one = [scan(size, 0)]
                many = [scan(size, k) for k in range(args.batch)]
                cmp = compare(run(pil, one), run(fast, one))
                times = [timed_ms(p, imgs, args.repeats) for p in (pil, fast) for imgs in (one, many)]
                pil_1, pil_n, fast_1, fast_n = times
                max_d = "-" if cmp["max"] is None else f"{cmp['max']:.4f}"
                mean_d = "-" if cmp["mean"] is None else f"{cmp['mean']:.5f}"
                share = "-" if cmp["share"] is None else f"{cmp['share']:.2%}"
                print(f"{label:28} {'%dx%d' % size:>9} {pil_1:>6.2f} | {pil_n:>6.2f} {fast_1:>6.2f} | {fast_n:>6.2f} "
                      f"{pil_1 / fast_1:>4.1f} | {pil_n / fast_n:>4.1f} {max_d:>9} {mean_d:>10} {share:>7} "
                      f"{level(pil):>6.4f} {'same' if cmp['others_equal'] else 'DIFF':>6}  {cmp['shapes']}")
                sys.stdout.flush()
                verdicts.append((label, size, pil_1 / fast_1, pil_n / fast_n, cmp, level(pil)))
            print(f"{'':28} classes: {type(pil).__name__} vs {type(fast).__name__}")
    print("\nverdict (faster: both speedups > 1; equal: same shapes and other outputs, max |diff| < 1e-2; "
          "within a level: max |diff| <= one 8-bit step)")
    for label in dict.fromkeys(v[0] for v in verdicts):
        rows = [v for v in verdicts if v[0] == label]
        faster = all(min(r[2], r[3]) > 1 for r in rows)
        same = all(r[4]["same_shape"] and r[4]["others_equal"] for r in rows)
        equal = same and all(r[4]["max"] < 1e-2 for r in rows)
        within = same and all(r[4]["max"] <= r[5] * 1.001 for r in rows)
        worst = max((r[4]["max"] for r in rows if r[4]["max"] is not None), default=float("nan"))
        print(f"{label:28} faster: {'yes' if faster else 'no':3}  equal: {'yes' if equal else 'no':3}  "
              f"within a level: {'yes' if within else 'no':3}  speedup {min(min(r[2], r[3]) for r in rows):.1f}x"
              f"..{max(max(r[2], r[3]) for r in rows):.1f}x  max|diff| {worst:.4f}")


if __name__ == "__main__":
    main()
