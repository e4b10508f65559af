"""Benchmark of llavamed.generate / llavamed.model on CPU.

Measures, in one run:
  1. tiny preset, `generate_batch` on 16 image questions, exactly `--new` new tokens each: tokens/s at batch size 1
     vs batch size 16 (target >= 4x), and, in the same run, preprocessing time per image (`encode_prompts`:
     template + image processor + tokenizer at 64 px) and the v1.5 image processor alone at 336 px (pad to square);
  2. peak memory of `load_model(dir, dtype='bfloat16')` for a moderately sized random LLaVA saved to disk, measured in
     a fresh subprocess as peak RSS (VmHWM) after loading (and reading every weight) minus peak RSS after a
     warm-up load of a tiny model (imports, code paths), vs the parameter bytes
     (target <= 1.2x);
  3. where a model comes from: a raw release-layout checkpoint (SentencePiece tokenizer) given as --model converts
     once into the cache (seconds), later resolves reuse the copy (milliseconds), and a hub id resolves from a hub
     cache layout with HF_HUB_OFFLINE=1 (milliseconds per call).

    .venv/bin/python bench/bench_generate.py [--new 32] [--threads 1] [--lm-layers 8] [--lm-width 1024]
        [--skip-memory] [--skip-resolve]
"""
from __future__ import annotations
import argparse, hashlib, json, os, subprocess, sys, tempfile, time
from pathlib import Path


def bench_generation(args):
    import torch
    from PIL import Image
    from llavamed.model import build_model, make_image_processor
    from llavamed.generate import encode_prompts, generate_batch
    torch.manual_seed(0)
    model, proc = build_model("tiny")
    qs = [f"Question {i}: is there a nodule in the {'left' if i % 2 else 'right'} lung?" for i in range(16)]
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in qs]
    imgs = [Image.new("RGB", (120 + 7 * i, 96), (20 * i, 100, 200 - 10 * i)) for i in range(16)]
    generate_batch(model, proc, convs[:2], imgs[:2], max_new_tokens=4, batch_size=2)  # warm-up
    model.generation_config.min_new_tokens = args.new  # every answer has exactly `new` tokens: a fair count
    res = {}
    for bs in (1, 16):
        t0 = time.perf_counter()
        outs = generate_batch(model, proc, convs, imgs, max_new_tokens=args.new, batch_size=bs)
        dt = time.perf_counter() - t0
        res[bs] = {"seconds": dt, "tokens_per_s": 16 * args.new / dt}
        print(f"batch {bs:2d}: {16 * args.new} new tokens in {dt:6.2f} s = {16 * args.new / dt:8.1f} tokens/s")
    ratio = res[16]["tokens_per_s"] / res[1]["tokens_per_s"]
    print(f"batch 16 / batch 1 throughput: {ratio:.2f}x (target >= 4x)")
    t0 = time.perf_counter()
    for _ in range(5): encode_prompts(model, proc, convs, imgs)
    pre = (time.perf_counter() - t0) / (5 * 16)
    big = [Image.new("RGB", (512, 384), (10 * i, 90, 160)) for i in range(16)]
    ip = make_image_processor(336, "pad")
    t0 = time.perf_counter()
    for _ in range(3): ip(big, return_tensors="pt")
    pre336 = (time.perf_counter() - t0) / (3 * 16)
    print(f"preprocessing per image: {pre * 1e3:.2f} ms (tiny, 64 px, template+tokenizer+pixels); "
          f"{pre336 * 1e3:.2f} ms (336 px pad-to-square, pixels only)")
    return {"tokens_per_s_b1": res[1]["tokens_per_s"], "tokens_per_s_b16": res[16]["tokens_per_s"], "ratio": ratio,
            "preprocess_ms_per_image": pre * 1e3, "preprocess_336_ms_per_image": pre336 * 1e3}


LOAD = r"""
import sys, json
import torch, transformers
from llavamed.model import load_model
import llavamed.generate
def hwm():  # peak RSS of this process image in kB (ru_maxrss would carry the parent's peak across exec)
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
load_model(sys.argv[2], dtype="bfloat16", device="cpu")  # warm-up: the same code paths on a tiny model
base = hwm()
model, proc = load_model(sys.argv[1], dtype="bfloat16", device="cpu")
peak = hwm()
# safetensors weights may stay memory-mapped until used: touch every page, as a forward pass would
with torch.no_grad(): s = [float(p.max()) for p in model.parameters()]  # reads every page, no copy
touched = hwm()
n = sum(p.numel() * p.element_size() for p in model.parameters())
assert all(p.dtype == torch.bfloat16 for p in model.parameters())
print(json.dumps({"base_kb": base, "peak_kb": peak, "touched_kb": touched, "param_bytes": n}))
"""


def bench_load_memory(args):
    import torch
    from llavamed.model import ModelConfig, build_model, save_model, TINY_VISION
    vision = dict(TINY_VISION, image_size=224, patch_size=14, hidden_size=768, intermediate_size=3072,
                  num_hidden_layers=12, num_attention_heads=12)
    lm = dict(hidden_size=args.lm_width, intermediate_size=int(args.lm_width * 2.75), num_hidden_layers=args.lm_layers,
              num_attention_heads=args.lm_width // 64, num_key_value_heads=args.lm_width // 64,
              max_position_embeddings=2048, tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as d:
        model, proc = build_model(ModelConfig(vision=vision, lm=lm, vocab_size=32000), dtype="float32")
        model = model.to(torch.bfloat16)
        n_params = sum(p.numel() for p in model.parameters())
        save_model(model, proc, d)
        del model
        save_model(*build_model("tiny"), Path(d) / "tiny")
        on_disk = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
        r = subprocess.run([sys.executable, "-c", LOAD, d, str(Path(d) / "tiny")], capture_output=True, text=True, check=True)
    m = json.loads(r.stdout.strip().splitlines()[-1])
    delta = (m["touched_kb"] - m["base_kb"]) * 1024
    ratio = delta / m["param_bytes"]
    print(f"load_model bf16 alone (weights not yet touched): peak RSS growth {(m['peak_kb'] - m['base_kb']) / 1024:.0f} MiB")
    print(f"random LLaVA: {n_params / 1e6:.0f}M parameters, {m['param_bytes'] / 2**20:.0f} MiB in bf16 "
          f"({on_disk / 2**20:.0f} MiB safetensors)")
    print(f"load_model bf16 + touching every weight: peak RSS growth {delta / 2**20:.0f} MiB = {ratio:.2f}x "
          f"parameter bytes (target <= 1.2x)")
    return {"params_m": n_params / 1e6, "param_mib": m["param_bytes"] / 2**20, "peak_growth_mib": delta / 2**20,
            "load_ratio": ratio}


def _to_hub_cache(folder: Path, repo: str, cache: Path, commit: str = "ab12" * 10) -> None:
    "Lay `folder` out in `cache` as huggingface_hub does: blobs by hash, refs/main, snapshot symlinks."
    root = cache / f"models--{repo.replace('/', '--')}"
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True); blob.write_bytes(f.read_bytes())
        link = root / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True); link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True); (root / "refs" / "main").write_text(commit)


def bench_resolve(args):
    from llavamed.model import resolve_model, resolve_source, tiny_release_checkpoint
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        os.environ.update(LLAVAMED_CACHE=str(d / "cache"), HF_HOME=str(d / "hf"), HF_HUB_OFFLINE="1")
        os.environ.pop("HF_HUB_CACHE", None)
        rel = tiny_release_checkpoint(d / "release", tokenizer="sentencepiece")
        t0 = time.perf_counter(); resolve_model(rel); first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(20): resolve_model(rel)
        again = (time.perf_counter() - t0) / 20
        _to_hub_cache(rel, "org/release", d / "hf" / "hub")
        t0 = time.perf_counter()
        for _ in range(20): resolve_source("org/release")
        hub = (time.perf_counter() - t0) / 20
    print(f"raw release as --model: first resolve (converts) {first:.2f} s, later resolves {again * 1e3:.1f} ms; "
          f"hub id from the cache offline {hub * 1e3:.1f} ms")
    return {"convert_first_s": first, "resolve_cached_ms": again * 1e3, "resolve_hub_offline_ms": hub * 1e3}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new", type=int, default=32, help="new tokens per answer")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable figures on a shared machine)")
    ap.add_argument("--lm-layers", type=int, default=8)
    ap.add_argument("--lm-width", type=int, default=1024)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-resolve", action="store_true")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    out = bench_generation(args)
    if not args.skip_memory: out.update(bench_load_memory(args))
    if not args.skip_resolve: out.update(bench_resolve(args))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
