import os, sys, shutil, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The token cache and converted releases of every test (and of the commands tests start) go to a folder of
# this run's own, never into the user's ~/.cache/llavamed; removed when the run ends.
CACHE = tempfile.mkdtemp(prefix="llavamed-test-cache-")
os.environ["LLAVAMED_CACHE"] = CACHE

def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE, ignore_errors=True)

@pytest.fixture(scope="session")
def llavamed_cmd():
    "The installed `llavamed` console command (from the same environment as the test run)."
    exe = BIN / "llavamed"
    return str(exe) if exe.exists() else shutil.which("llavamed")

def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError: has_cuda = False
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for it in items:
        if "cuda" in it.keywords and not has_cuda: it.add_marker(skip)


def save_tiny_parts(d: Path, texts: list[str] | None = None) -> Path:
    "A tiny CLIP tower, a tiny SigLIP tower and a tiny Llama LM with its tokenizer, saved under `d` as downloads are."
    import torch
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig,
                              SiglipVisionModel)
    from llavamed.model import TINY_LM, TINY_VISION, train_tokenizer
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(d / "clip")
    SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2)).save_pretrained(d / "siglip")
    tok = train_tokenizer(texts, vocab_size=400)
    LlamaForCausalLM(LlamaConfig(**TINY_LM, vocab_size=len(tok))).save_pretrained(d / "lm")
    tok.save_pretrained(d / "lm")
    return d
