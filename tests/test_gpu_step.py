"bench/gpu_step.py in its tiny CPU mode: both 7B shapes (LLaVA-v1.5, Qwen2.5-VL) train a step and generate."
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# image tokens and tower patches of the tiny shapes: LLaVA 56 px / 14 px patches = 4 x 4 (+ CLS);
# Qwen2.5-VL 112 px = 8 x 8 patches of 14 px, merged 2 x 2 into 16 tokens
TINY = {"llava": (16, 17), "qwen2_5_vl": (16, 64)}


def run_tiny(kind: str) -> dict:
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_step.py"), "--tiny", "--model", kind, "--steps", "1",
                        "--batch", "2", "--gen-batch", "3"], env=ENV, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout[p.stdout.index("{"):])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_gpu_step_tiny_trains_and_generates(kind):
    res = run_tiny(kind)
    assert res["model"] == kind and (res["image_tokens"], res["vision_patches"]) == TINY[kind]
    assert 0 < res["trainable"] < res["params"]  # the vision tower is frozen, as in stage 2
    assert res["flops_per_token"] > 6 * 0.5 * res["params"]
    for k in ("no_checkpointing", "checkpointing"): assert res["runs"][k]["tokens_per_s"] > 0, res["runs"]
    gen = res["generation"]
    assert (gen["batch"], gen["new_tokens"], gen["prompt_tokens"]) == (3, 4, TINY[kind][0] + 2 + 8), gen
    assert gen["new_tokens_per_s"] > 0 and gen["prefill_s"] > 0


def test_gpu_step_qwen_shape_is_qwen2_5_vl_7b():
    "The full-size config (built on the meta device: no memory) has Qwen2.5-VL-7B-Instruct's 8.29 B parameters."
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    try: import gpu_step
    finally: sys.path.remove(str(ROOT / "bench"))
    model, cfg = gpu_step.build("qwen2_5_vl", False, 28, "meta", torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 8.29
    inputs = gpu_step.Inputs(cfg, 1, 2048, 672, "meta", torch.bfloat16)
    assert (inputs.n_img, inputs.patches, inputs.pix.shape[1]) == (576, 2304, 1176)
