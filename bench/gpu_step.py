"""One training step and batched generation of a random-init 7B vision-language model in bf16, sequence 2048:
tokens/s and model FLOPs utilisation (MFU) of a stage-2 step (connector + LLM trained, vision tower frozen, as
`llavamed.families.set_stage(model, "instruct")` sets it) with gradient checkpointing on and off, then greedy
generation speed (prefill time and decode tokens/s) of a batch of image + question prompts.

Two shapes (`--model`):
- `llava`: LLaVA-Med v1.5 (CLIP ViT-L/14-336 + Mistral-7B-Instruct-v0.2 + mlp2x_gelu projector), 576 image tokens
  for its fixed 336 px image.
- `qwen2_5_vl`: Qwen2.5-VL-7B-Instruct (its config.json: LM hidden 3584, 28 layers, 28 heads / 4 KV heads,
  intermediate 18944, vocab 152064, M-RoPE sections 16/24/24; vision tower depth 32, hidden 1280, 16 heads, MLP
  3420, patch 14, window 112 px with full attention in blocks 7/15/23/31, 2 x 2 merger to 3584). Dynamic
  resolution: a `--image-px` side becomes (side / 28)^2 image tokens; the default 672 px gives 576, as LLaVA's.

    python bench/gpu_step.py                           # LLaVA shape on one 80 GB GPU (16 of 32 layers, batch 4)
    python bench/gpu_step.py --model qwen2_5_vl        # Qwen2.5-VL-7B shape (14 of 28 layers, batch 4)
    python bench/gpu_step.py --model qwen2_5_vl --layers 28 --batch 2   # the whole 7B (bf16 weights, gradients
                                                       # and AdamW states: about 63 GB before activations)
    python bench/gpu_step.py --tiny [--model qwen2_5_vl]                # tiny shapes on CPU (what the tests run)

MFU = model FLOPs per second / peak dense bf16 FLOP/s of the GPU. Model FLOPs per LLM token of a step =
6 x LM params (embedding lookup left out) + causal attention 6 x layers x seq x attention width + the connector
(6 x params, on the image tokens only) + the frozen tower's forward (2 x params x patches + its attention:
4 x patches x context x width per block, context = all patches or a window), the last two shared by a sample's
tokens. Recomputation is not counted, so checkpointing shows up as a lower MFU.
"""
import argparse, json, time

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16 FLOP/s
FULL_LAYERS = {"llava": 32, "qwen2_5_vl": 28}  # decoder layers of the real 7B models


def build_llava(tiny: bool, layers: int):
    "Config of a LLaVA-v1.5 shape (CLIP ViT-L/14-336 + Mistral-7B), or its tiny version."
    from transformers import CLIPVisionConfig, LlavaConfig, MistralConfig
    if tiny:
        vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=56, patch_size=14)
        tc = MistralConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512)
    else:  # openai/clip-vit-large-patch14-336 and mistralai/Mistral-7B-Instruct-v0.2 shapes
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        tc = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32002, max_position_embeddings=32768, rope_theta=1e6,
                           sliding_window=None)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tc.vocab_size - 1, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def build_qwen2_5_vl(tiny: bool, layers: int):
    "Config of a Qwen2.5-VL-7B shape, or its tiny version (ids of the special tokens at the end of the vocab)."
    from transformers import Qwen2_5_VLConfig
    if tiny:
        vocab, special = 1000, dict(image_token_id=999, video_token_id=998, vision_start_token_id=997,
                                    vision_end_token_id=996)
        text = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                      window_size=56, fullatt_block_indexes=[1])
    else:  # Qwen/Qwen2.5-VL-7B-Instruct's config.json
        vocab, special = 152064, dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                                      vision_end_token_id=151653)
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers, num_attention_heads=28,
                    num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    max_window_layers=28, tie_word_embeddings=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu")
    return Qwen2_5_VLConfig(text_config=dict(text, vocab_size=vocab, hidden_act="silu"), vision_config=vision,
                            **special)


def build(kind: str, tiny: bool, layers: int, device, dtype):
    "A random-init model of `kind` on `device`, trainable parts as stage 2 sets them."
    import torch
    from transformers import AutoModelForImageTextToText
    from llavamed.families import set_stage
    cfg = {"llava": build_llava, "qwen2_5_vl": build_qwen2_5_vl}[kind](tiny, layers)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(cfg).to(dtype)
    set_stage(model, "instruct")  # connector + LM trained, vision tower frozen
    return model, cfg


class Inputs:
    "Random token ids with one image per sample, its pixels and its image-token count for a model config."
    def __init__(self, cfg, batch: int, seq: int, image_px: int, device, dtype):
        import torch
        self.cfg, self.batch, self.seq, vc = cfg, batch, seq, cfg.vision_config
        if cfg.model_type == "llava":
            self.image_token, vocab = cfg.image_token_index, cfg.text_config.vocab_size - 2
            self.image_px = vc.image_size
            self.n_img = (vc.image_size // vc.patch_size) ** 2  # 576 at 336 px (CLS dropped)
            self.patches = self.n_img + 1
            self.pix = torch.randn(batch, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)
            self.extra = {}
        else:  # Qwen2.5-VL: sides in multiples of patch x merge, patches flattened (B x h x w, 3 x 2 x 14 x 14)
            unit = vc.patch_size * vc.spatial_merge_size
            self.image_px = max(unit, image_px // unit * unit)
            side = self.image_px // vc.patch_size
            self.patches, self.n_img = side * side, side * side // vc.spatial_merge_size ** 2
            self.image_token, vocab = cfg.image_token_id, min(cfg.vision_end_token_id, cfg.image_token_id) - 8
            width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
            self.pix = torch.randn(batch * self.patches, width, device=device, dtype=dtype)
            grid = torch.tensor([[1, side, side]] * batch, device=device)
            self.extra = {"image_grid_thw": grid}
        if self.n_img + 3 > seq: raise ValueError(f"sequence {seq} is shorter than {self.n_img} image tokens + 3")
        self.vocab, self.device = vocab, device

    def ids(self, length: int):
        "(B, length) random ids, the image's tokens at positions 1..n_img (Qwen: framed by vision start/end)."
        import torch
        ids = torch.randint(0, self.vocab, (self.batch, length), device=self.device)
        ids[:, 1:1 + self.n_img] = self.image_token
        if self.cfg.model_type != "llava":
            ids[:, 0], ids[:, 1 + self.n_img] = self.cfg.vision_start_token_id, self.cfg.vision_end_token_id
        return ids

    def kwargs(self, ids) -> dict:
        "The model's keyword inputs besides input_ids (pixels, image grid, modality of each token)."
        out = {"pixel_values": self.pix, **self.extra}
        if self.cfg.model_type != "llava": out["mm_token_type_ids"] = (ids == self.image_token).int()
        return out


def tower_flops(model, cfg, patches: int) -> float:
    "Forward FLOPs of the vision tower for one image of `patches` patches: linear layers + attention."
    from llavamed.families import parts
    vc, params = cfg.vision_config, sum(p.numel() for p in parts(model)["tower"].values())
    if cfg.model_type == "llava":
        contexts = [patches] * vc.num_hidden_layers
    else:  # window attention except in the full-attention blocks; a window holds (window / patch)^2 patches
        window = min(patches, (vc.window_size // vc.patch_size) ** 2)
        contexts = [patches if i in vc.fullatt_block_indexes else window for i in range(vc.depth)]
    return 2 * params * patches + sum(4 * patches * c * vc.hidden_size for c in contexts)


def flops_per_token(model, cfg, seq: int, n_img: int, patches: int) -> float:
    "Model FLOPs per LLM token of one training step (forward + backward, no recompute)."
    from llavamed.families import parts
    by_part = parts(model)
    lm = sum(p.numel() for n, p in by_part["lm"].items() if "embed_tokens" not in n)
    connector = sum(p.numel() for p in by_part["connector"].values())
    t = cfg.text_config
    width = t.num_attention_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
    attn = 6 * t.num_hidden_layers * seq * width  # causal QK^T and AV, fwd + bwd (half of 12·L·S·H)
    return 6 * lm + attn + (6 * connector * n_img + tower_flops(model, cfg, patches)) / seq


def train_runs(model, inputs: Inputs, steps: int, peak, fpt: float, device) -> dict:
    "Step time, tokens/s, MFU and peak memory with activation checkpointing off and on."
    import torch
    ids = inputs.ids(inputs.seq)
    labels = ids.masked_fill(ids == inputs.image_token, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device == "cuda")
    runs = {}
    for ckpt in (False, True):
        name = "checkpointing" if ckpt else "no_checkpointing"
        if ckpt: model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else: model.activation_checkpointing_disable()
        model.train()
        if device == "cuda": torch.cuda.reset_peak_memory_stats(); torch.cuda.empty_cache()
        try:
            for i in range(2 + steps):
                if i == 2:
                    if device == "cuda": torch.cuda.synchronize()
                    t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=labels, use_cache=False, **inputs.kwargs(ids)).loss
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            if device == "cuda": torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
            tps = inputs.batch * inputs.seq / dt
            runs[name] = {"step_s": round(dt, 4), "tokens_per_s": round(tps, 1),
                          "mfu": round(tps * fpt / peak, 4) if peak else None,
                          "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda"
                          else None}
        except torch.OutOfMemoryError as e:
            runs[name] = {"error": f"out of memory: {str(e)[:120]}"}
            opt.zero_grad(set_to_none=True); torch.cuda.empty_cache()
    model.activation_checkpointing_disable()
    del opt
    if device == "cuda": torch.cuda.empty_cache()
    return runs


def generation(model, inputs: Inputs, prompt_text: int, new_tokens: int, device) -> dict:
    "Greedy generation of `new_tokens` per prompt (image + `prompt_text` text tokens), batch of inputs.batch."
    import torch
    model.eval()
    ids = inputs.ids(inputs.n_img + 2 + prompt_text)
    gen = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, **inputs.kwargs(ids))

    def timed(n):
        if device == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad(): out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, **gen)
        if device == "cuda": torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + n, (out.shape, ids.shape, n)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    if device == "cuda": torch.cuda.reset_peak_memory_stats()
    prefill, total = timed(1), timed(new_tokens)
    decode = max(total - prefill, 1e-9)
    return {"batch": inputs.batch, "prompt_tokens": ids.shape[1], "new_tokens": new_tokens,
            "prefill_s": round(prefill, 4), "total_s": round(total, 4),
            "new_tokens_per_s": round(inputs.batch * new_tokens / total, 1),
            "decode_tokens_per_s": round(inputs.batch * (new_tokens - 1) / decode, 1),
            "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(FULL_LAYERS), default="llava", help="which 7B shape")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (for tests)")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default half of the 7B's: 16 of Mistral's 32, 14 of Qwen2.5's 28; "
                         "half fits 80 GB with AdamW)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--image-px", type=int, default=672,
                    help="image side for Qwen2.5-VL (its tokens: (side / 28)^2); LLaVA's is fixed at 336")
    ap.add_argument("--gen-batch", type=int, default=8, help="prompts generated together")
    ap.add_argument("--gen-text", type=int, default=64, help="text tokens of each prompt beside its image")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    a = ap.parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layers = a.layers or FULL_LAYERS[a.model] // 2
    seq = 64 if a.tiny else a.seq
    image_px = 112 if a.tiny and a.model == "qwen2_5_vl" else a.image_px
    gen_text, new_tokens = (8, 4) if a.tiny else (a.gen_text, a.new_tokens)
    model, cfg = build(a.model, a.tiny, layers, device, dtype)
    inputs = Inputs(cfg, a.batch, seq, image_px, device, dtype)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK.items() if k in gpu), None)
    fpt = flops_per_token(model, cfg, seq, inputs.n_img, inputs.patches)
    res = {"model": a.model, "device": gpu, "dtype": str(dtype).removeprefix("torch."),
           "layers": cfg.text_config.num_hidden_layers, "batch": a.batch, "seq": seq, "image_px": inputs.image_px,
           "image_tokens": inputs.n_img, "vision_patches": inputs.patches,
           "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "flops_per_token": fpt, "runs": train_runs(model, inputs, a.steps, peak, fpt, device)}
    try:
        res["generation"] = generation(model, Inputs(cfg, a.gen_batch, seq, image_px, device, dtype),
                                       gen_text, new_tokens, device)
    except torch.OutOfMemoryError as e:
        res["generation"] = {"error": f"out of memory: {str(e)[:120]}"}
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
