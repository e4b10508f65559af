"""One training step of a LLaVA-Med v1.5-shaped model (CLIP ViT-L/14-336 + Mistral-7B shape + mlp2x_gelu projector),
random init, bf16, 576 image tokens per sample, sequence 2048: tokens/s and model FLOPs utilisation (MFU) with
gradient checkpointing on and off, training what stage 2 trains (projector + LLM; vision tower frozen).

    python bench/gpu_step.py                 # on one 80 GB GPU (default: 16 of Mistral's 32 layers, batch 4)
    python bench/gpu_step.py --layers 32 --batch 1
    python bench/gpu_step.py --tiny          # tiny shapes on CPU (what the test runs)

MFU = model FLOPs per second / peak dense bf16 FLOP/s of the GPU. Model FLOPs per token = 6 x trainable params
(forward + backward) + causal attention 6 x layers x seq x hidden + the frozen tower's forward (2 x params x patches,
shared by a sample's tokens). Recomputation is not counted, so checkpointing shows up as a lower MFU.
"""
import argparse, json, time

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16 FLOP/s


def build(tiny: bool, layers: int, device, dtype):
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, MistralConfig
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
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tc.vocab_size - 1, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(dtype)
    model.model.vision_tower.requires_grad_(False)
    return model, cfg


def flops_per_token(model, cfg, seq: int, n_img: int) -> float:
    "Model FLOPs per LLM token of one training step (forward + backward, no recompute)."
    vis = sum(p.numel() for p in model.model.vision_tower.parameters())
    train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "embed_tokens" not in n)
    t = cfg.text_config
    attn = 6 * t.num_hidden_layers * seq * t.hidden_size  # causal QK^T and AV, fwd + bwd (half of 12·L·S·H)
    n_patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
    return 6 * train + attn + 2 * vis * n_patches / seq  # vision tower: forward only, shared by the sample's tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (for tests)")
    ap.add_argument("--layers", type=int, default=16, help="Mistral decoder layers (32 = full 7B; 16 fits 80 GB with AdamW)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    a = ap.parse_args(argv)
    import torch
    device = "cuda" if torch.cuda.is_available() and not a.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    seq = 64 if a.tiny else a.seq
    model, cfg = build(a.tiny, a.layers, device, dtype)
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2  # 576 at 336 px
    ids = torch.randint(0, cfg.text_config.vocab_size - 2, (a.batch, seq), device=device)  # (B, S)
    ids[:, 1:1 + n_img] = cfg.image_token_index
    pix = torch.randn(a.batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device, dtype=dtype)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device == "cuda")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK.items() if k in gpu), None)
    fpt = flops_per_token(model, cfg, seq, n_img)
    res = {"device": gpu, "layers": cfg.text_config.num_hidden_layers, "batch": a.batch, "seq": seq, "image_tokens": n_img,
           "params": sum(p.numel() for p in model.parameters()), "flops_per_token": fpt, "runs": {}}
    for ckpt in (False, True):
        if ckpt: model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else: model.activation_checkpointing_disable()
        model.train()
        if device == "cuda": torch.cuda.reset_peak_memory_stats(); torch.cuda.empty_cache()
        try:
            for i in range(2 + a.steps):
                if i == 2:
                    if device == "cuda": torch.cuda.synchronize()
                    t0 = time.perf_counter()
                loss = model(input_ids=ids, pixel_values=pix, labels=ids, use_cache=False).loss
                loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
            if device == "cuda": torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / a.steps
            tps = a.batch * seq / dt
            res["runs"]["checkpointing" if ckpt else "no_checkpointing"] = {
                "step_s": round(dt, 4), "tokens_per_s": round(tps, 1),
                "mfu": round(tps * fpt / peak, 4) if peak else None,
                "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None}
        except torch.OutOfMemoryError as e:
            res["runs"]["checkpointing" if ckpt else "no_checkpointing"] = {"error": f"out of memory: {str(e)[:120]}"}
            opt.zero_grad(set_to_none=True); torch.cuda.empty_cache()
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
