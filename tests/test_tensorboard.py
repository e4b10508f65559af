"`llavamed train --report-to tensorboard`: a real tiny run writes event files whose scalars equal its own logs."
import json, os, random, shutil, tempfile
from pathlib import Path
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from llavamed.core import IMAGE_TOKEN, read_jsonl
from llavamed.model import build_model, save_model

os.environ["LLAVAMED_CACHE"] = tempfile.mkdtemp(prefix="llavamed-test-cache-")  # not the user's cache
torch.set_num_threads(1)


def make_data(root: Path, n: int, seed: int) -> Path:
    "A LLaVA JSON file of `n` caption records over 64 px figures in `root/images`."
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        side = rng.choice(["left", "right"])
        Image.new("RGB", (64, 64), (rng.randint(0, 250), 40, 90)).save(root / "images" / f"s{seed}_{i}.png")
        recs.append({"id": f"s{seed}_{i}", "image": f"s{seed}_{i}.png", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the figure."},
            {"from": "gpt", "value": f"A chest X-ray with a nodule in the {side} lung."}]})
    path = root / f"data_{seed}.json"
    path.write_text(json.dumps(recs))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A 4-step stage-2 run of the tiny preset logging every step to TensorBoard, with an eval every 2 steps."
    root = tmp_path_factory.mktemp("tb")
    data, held_out = make_data(root, 16, seed=0), make_data(root, 4, seed=1)
    texts = [t["value"] for p in (data, held_out) for r in json.loads(p.read_text()) for t in r["conversations"]]
    torch.manual_seed(0)
    save_model(*build_model("tiny", tokenizer_texts=texts), root / "base")
    os.environ.pop("TENSORBOARD_LOGGING_DIR", None)  # the event files go under OUT/runs/
    train(root, root / "run", "--max-steps", "4", "--eval-data", str(held_out), "--eval-steps", "2")
    return root / "run"


def train(root: Path, out: Path, *extra: str) -> None:
    "`llavamed train` of the tiny model saved in `root` on its first data file, logging to TensorBoard."
    from llavamed.cli import main
    rc = main(["train", "--stage", "instruct", "--model", str(root / "base"), "--data", str(root / "data_0.json"),
               "--images", str(root / "images"), "--out", str(out), "--global-batch-size", "4",
               "--per-device-batch-size", "4", "--num-workers", "0", "--lr", "1e-3", "--save-steps", "100",
               "--report-to", "tensorboard", "--quiet", *extra])
    assert rc in (0, None)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    "Every scalar tag of the run's event files as (step, value) pairs, read with TensorBoard's own reader."
    files = sorted(run_dir.glob("runs/*/events.out.tfevents.*"))
    assert files, f"no event file under {run_dir / 'runs'}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0})  # 0: keep every event
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_event_files_hold_the_logged_train_losses(run):
    got, history = scalars(run), list(read_jsonl(run / "log_history.jsonl"))
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    # TensorBoard stores a scalar as float32: equal to the logged value once rounded the same way
    assert got["train/loss"] == [(r["step"], float(np.float32(r["loss"]))) for r in history]
    assert got["train/learning_rate"] == [(r["step"], float(np.float32(r["learning_rate"]))) for r in history]
    assert len({v for _, v in got["train/loss"]}) > 1  # the loss moved: these are real per-step values


def test_event_files_hold_the_eval_losses(run):
    got, evals = scalars(run), list(read_jsonl(run / "eval_history.jsonl"))
    assert [r["step"] for r in evals] == [2, 4]
    assert got["eval/loss"] == [(r["step"], float(np.float32(r["eval_loss"]))) for r in evals]


def test_overwrite_leaves_only_the_new_runs_events(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    train(run.parent, out, "--max-steps", "2", "--overwrite")
    history = list(read_jsonl(out / "log_history.jsonl"))
    assert [r["step"] for r in history] == [1, 2]
    assert len(list(out.glob("runs/*"))) == 1, sorted(p.name for p in out.glob("runs/*"))
    assert scalars(out)["train/loss"] == [(r["step"], float(np.float32(r["loss"]))) for r in history]
