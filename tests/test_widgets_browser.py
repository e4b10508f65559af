"""The widgets in a real browser: a ConversationBrowser on fixture data, rendered by Voilà in headless
Chromium (driven by Playwright), must show the first record with its image, clicking "next" must
change the record on screen, and TrainingCurves polling on a kernel thread must show lines appended to
a log while the page is open. A screenshot goes to $LLAVAMED_ARTIFACTS (default tests/artifacts/).

Needs the `voila` and `playwright` Python packages and Debian's `chromium` (installed here with apt when
/usr/bin/chromium is missing and we run as root); Playwright's own browser download is never used."""
import os, shutil, socket, subprocess, sys, time, urllib.request
from pathlib import Path
import pytest
from llavamed.core import append_jsonl

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent


def _artifacts() -> Path:
    folder = Path(os.environ.get("LLAVAMED_ARTIFACTS", ROOT / "tests" / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    if folder == ROOT / "tests" / "artifacts" and not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text("*\n")  # screenshots are never committed
    return folder


def _chromium() -> Path:
    "Debian's chromium, installed with apt when missing (the test setup's job on a fresh CI machine)."
    if not CHROMIUM.exists():
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.skip("no /usr/bin/chromium and cannot apt-get install it (not root or no apt)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, check=True,
                       env=env, stdout=subprocess.DEVNULL, timeout=600)
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0)); return sock.getsockname()[1]


def _log_point(log: Path, step: int):
    append_jsonl(log, {"step": step, "epoch": step / 10, "loss": 3 / step, "learning_rate": 1e-3})


def _fixture(d: Path) -> Path:
    "Three instruction records with real PNG images, and a notebook that shows them in a ConversationBrowser."
    import nbformat
    from PIL import Image, ImageDraw
    from llavamed.core import DOMAINS, write_json
    (d / "images").mkdir()
    for k, color in enumerate(["red", "lime", "blue"]):
        image = Image.new("RGB", (160, 120), "black")
        ImageDraw.Draw(image).ellipse((20 + 30 * k, 20, 100 + 30 * k, 100), fill=color)
        image.save(d / "images" / f"fig{k}.png")
    recs = [{"id": f"PMC{k}_F1", "image": f"fig{k}.png", "domain": {x: x == dom for x in DOMAINS},
             "conversations": [{"from": "human", "value": f"<image>\nWhat does figure {k} show?"},
                               {"from": "gpt", "value": f"A {color} disc on a black background ({dom})."}]}
            for k, (color, dom) in enumerate([("red", "chest_xray"), ("green", "mri"),
                                              ("blue", "histology")])]
    write_json(d / "records.json", recs)
    for step in (1, 2, 3): _log_point(d / "run" / "stage1" / "log_history.jsonl", step)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from llavamed.widgets import ConversationBrowser, TrainingCurves"),
                nbformat.v4.new_code_cell(f"ConversationBrowser({str(d / 'records.json')!r}).widget"),
                nbformat.v4.new_code_cell(
                    f"TrainingCurves({str(d / 'run')!r}, figsize=(3, 2)).start(interval=0.5)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, d / "browse.ipynb")
    return d / "browse.ipynb"


def _wait_http(url: str, proc, timeout: float = 60):
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None: raise RuntimeError(f"voila exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2): return
        except OSError: time.sleep(0.3)
    raise TimeoutError(f"voila did not answer at {url} within {timeout}s")


@pytest.mark.timeout(240)
def test_browser_next_changes_record(tmp_path):
    pytest.importorskip("voila"); pytest.importorskip("ipykernel")
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = _chromium()
    nb = _fixture(tmp_path)
    port = _free_port()
    voila = Path(sys.executable).parent / "voila"
    log = open(tmp_path / "voila.log", "w")
    command = [str(voila), str(nb), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
               "--Voila.token=", "--show_tracebacks=True"]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    art = _artifacts()
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_http(url, proc)
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(chromium), args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 600})
                page.goto(url, timeout=90_000)
                ident = page.locator(".llavamed-id")
                ident.wait_for(timeout=90_000)
                sync_api.expect(ident).to_contain_text("PMC0_F1", timeout=30_000)
                sync_api.expect(page.locator(".llavamed-turns")).to_contain_text("red disc")
                img = page.locator("img.llavamed-image")
                sync_api.expect(img).to_be_visible()
                assert img.evaluate("e => e.naturalWidth") > 0, "the image did not load"
                src0 = img.get_attribute("src")
                page.screenshot(path=str(art / "conversation_browser_first.png"))
                page.locator("button.llavamed-next").click()
                sync_api.expect(ident).to_contain_text("PMC1_F1", timeout=30_000)
                sync_api.expect(page.locator(".llavamed-turns")).to_contain_text("green disc")
                sync_api.expect(img).not_to_have_attribute("src", src0)  # the picture changed with the record
                page.screenshot(path=str(art / "conversation_browser_next.png"))
                search = page.get_by_placeholder("search text")  # the text search, committed with Enter
                search.fill("blue"); search.press("Enter")
                sync_api.expect(ident).to_contain_text("PMC2_F1", timeout=30_000)
                sync_api.expect(ident).to_contain_text("1/1 (of 3)")
                # live training curves: the kernel's polling thread picks up lines appended by a running job
                status = page.locator(".llavamed-curves-status")
                sync_api.expect(status).to_contain_text("3 points, step 3", timeout=30_000)
                curves = page.locator("img.llavamed-curves")
                src1 = curves.get_attribute("src")
                for step in (4, 5): _log_point(tmp_path / "run" / "stage1" / "log_history.jsonl", step)
                sync_api.expect(status).to_contain_text("5 points, step 5", timeout=30_000)
                sync_api.expect(curves).not_to_have_attribute("src", src1)
                page.screenshot(path=str(art / "widgets_live_curves.png"), full_page=True)
            finally: browser.close()
    except Exception:
        log.flush(); print((tmp_path / "voila.log").read_text()[-4000:]); raise
    finally:
        proc.terminate()
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
        log.close()
    assert (art / "conversation_browser_next.png").stat().st_size > 5000
