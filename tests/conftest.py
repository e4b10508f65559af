import os, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

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
