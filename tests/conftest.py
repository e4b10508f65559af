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
