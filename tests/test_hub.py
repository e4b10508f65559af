"Hub ids, raw releases and composition: resolved from a real hub cache layout on disk, with the network off."
import hashlib, json, logging, os
from pathlib import Path
import pytest
from conftest import save_tiny_parts

torch = pytest.importorskip("torch")
from PIL import Image
from llavamed.cli import main
from llavamed.model import (TINY_LM, TINY_VISION, build_model, load_model, resolve_model, resolve_source, save_model,
                            tiny_release_checkpoint, train_tokenizer)

COMMIT = "3f2a9c1d" * 5  # a 40-hex commit, as the hub names snapshots


def to_hub_cache(folder: Path, repo: str, cache: Path, commit: str = COMMIT, tag: str | None = None) -> Path:
    """Copy `folder` into `cache` exactly as huggingface_hub lays a download out: `models--org--name/blobs/<sha256>`,
    `refs/main` (and a tag) holding the commit, `snapshots/<commit>/<file>` relative symlinks to the blobs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    if tag: (root / "refs" / tag).write_text(commit)
    return root / "snapshots" / commit


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "An empty HF_HOME with the network off, and a converted-release cache of the test's own."
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path / "llavamed-cache"))
    return tmp_path / "hf" / "hub"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    "A tiny CLIP tower, a tiny SigLIP tower and a tiny Llama LM with its tokenizer, saved as downloads are."
    return save_tiny_parts(tmp_path_factory.mktemp("parts"), None)


def _img():
    im = Image.new("RGB", (48, 40), (200, 30, 30))
    im.paste((255, 255, 255), (0, 0, 20, 12))
    return im


def _one_line(capsys, *parts):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for p in parts: assert p in err, err
    return err


def test_hub_ids_resolve_from_the_cache_offline(hub, parts):
    snap = to_hub_cache(parts / "clip", "org/tiny-clip", hub, tag="v1")
    from huggingface_hub import scan_cache_dir
    assert [r.repo_id for r in scan_cache_dir(hub).repos] == ["org/tiny-clip"]  # huggingface_hub reads our layout
    assert resolve_source("org/tiny-clip") == snap
    assert resolve_source(f"org/tiny-clip@{COMMIT}") == snap
    assert resolve_source("org/tiny-clip@v1") == snap
    assert (snap / "config.json").is_symlink() and json.loads((snap / "config.json").read_text())["model_type"]
    assert resolve_source("tiny") == "tiny"
    assert resolve_source(str(parts / "clip")) == parts / "clip"


def test_hub_cache_env_wins_over_hf_home(hub, parts, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    snap = to_hub_cache(parts / "clip", "org/tiny-clip", other)
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    assert resolve_source("org/tiny-clip") == snap


def test_not_cached_offline_names_the_id_and_the_fetch_command(hub, parts, tmp_path, capsys):
    to_hub_cache(parts / "clip", "org/tiny-clip", hub)
    with pytest.raises(FileNotFoundError) as e: resolve_source("org/missing-model")
    msg = str(e.value)
    assert "org/missing-model" in msg and "HF_HUB_OFFLINE is set" in msg and "`hf download org/missing-model`" in msg
    with pytest.raises(FileNotFoundError, match=r"`hf download org/tiny-clip --revision v9`"):
        resolve_source("org/tiny-clip@v9")
    _img().save(tmp_path / "x.png")
    assert main(["chat", "--model", "org/missing-model", "--image", str(tmp_path / "x.png"), "--question", "q"]) == 2
    _one_line(capsys, "llavamed chat: error:", "org/missing-model", "hf download org/missing-model")
    out = tmp_path / "built"
    assert main(["build", "--vision", "org/no-tower", "--lm", str(parts / "lm"), "--out", str(out)]) == 2
    _one_line(capsys, "org/no-tower", "hf download org/no-tower")
    assert not out.exists()


def test_load_model_from_a_hub_id(hub, parts, tmp_path):
    torch.manual_seed(0)
    model, proc = build_model("tiny")
    save_model(model, proc, tmp_path / "saved")
    to_hub_cache(tmp_path / "saved", "org/tiny-llava", hub)
    m2, p2 = load_model("org/tiny-llava", device="cpu")
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    assert p2.chat_template == proc.chat_template


def test_raw_release_by_hub_id_converts_once_into_the_cache(hub, tmp_path, caplog):
    rel = tiny_release_checkpoint(tmp_path / "release", seed=2, tokenizer="sentencepiece")
    snap = to_hub_cache(rel, "microsoft/llava-med-v1.5-mistral-7b", hub)
    with caplog.at_level(logging.WARNING, logger="llavamed.model"):
        m, p = load_model("microsoft/llava-med-v1.5-mistral-7b", device="cpu")
    said = [r.getMessage() for r in caplog.records if "raw llava_mistral release" in r.getMessage()]
    assert len(said) == 1 and "llavamed convert --src microsoft/llava-med-v1.5-mistral-7b --out DIR" in said[0], said
    converted = resolve_model("microsoft/llava-med-v1.5-mistral-7b")
    assert converted.parent == tmp_path / "llavamed-cache" / "converted"
    assert converted.name.startswith("microsoft--llava-med-v1.5-mistral-7b-")  # named by repo, not by commit
    assert type(m).__name__ == "LlavaForConditionalGeneration" and m.config.llavamed["template"] == "mistral_instruct"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llavamed.model"): resolve_model(snap)
    assert not [r for r in caplog.records if "raw" in r.getMessage()]  # the second time: the cached copy


def test_chat_on_a_raw_release_directory(hub, tmp_path, capsys):
    rel = tiny_release_checkpoint(tmp_path / "release", seed=4, tokenizer="sentencepiece")
    _img().save(tmp_path / "x.png")
    rc = main(["chat", "--model", str(rel), "--image", str(tmp_path / "x.png"), "--question", "Is there a nodule?",
               "--max-new-tokens", "3", "--no-stream", "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    assert list((tmp_path / "llavamed-cache" / "converted").iterdir())


def test_v1_release_without_tower_stops_with_the_convert_command(hub, tmp_path, capsys):
    bare = tiny_release_checkpoint(tmp_path / "v1", with_tower=False)
    _img().save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["chat", "--model", str(bare), "--image", str(tmp_path / "x.png"), "--question", "q"]) == 2
    err = _one_line(capsys, f"llavamed convert --src {bare} --out DIR --tower openai/clip-vit-large-patch14-336")
    assert "unknown model type" not in err.lower()
    assert not (tmp_path / "llavamed-cache" / "converted").exists() or \
        not list((tmp_path / "llavamed-cache" / "converted").iterdir())
    # the command it names works, with the tower given by hub id
    to_hub_cache(bare / "clip", "openai/clip-vit-large-patch14-336", hub)
    assert main(["convert", "--src", str(bare), "--out", str(tmp_path / "v1-hf"),
                 "--tower", "openai/clip-vit-large-patch14-336"]) == 0
    assert (tmp_path / "v1-hf" / "config.json").is_file()


def test_build_from_hub_ids(hub, parts, tmp_path):
    to_hub_cache(parts / "clip", "openai/tiny-clip", hub)
    to_hub_cache(parts / "lm", "lmsys/tiny-vicuna", hub)
    rc = main(["build", "--vision", "openai/tiny-clip", "--lm", "lmsys/tiny-vicuna", "--template", "vicuna_v1",
               "--out", str(tmp_path / "llava")])
    assert rc == 0
    model, proc = load_model(tmp_path / "llava", device="cpu")
    assert model.config.llavamed["template"] == "vicuna_v1" and model.config.image_seq_length == 64


def test_train_starts_from_a_raw_release_directory(hub, tmp_path):
    "`train --model RELEASE`: the release converts once into the cache and training goes on from the copy."
    rel = tiny_release_checkpoint(tmp_path / "release", seed=6, tokenizer="sentencepiece")
    (tmp_path / "images").mkdir()
    recs = []
    for i in range(4):
        _img().save(tmp_path / "images" / f"f{i}.png")
        recs.append({"id": f"f{i}", "image": f"f{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"A chest X-ray, view {i}."}]})
    (tmp_path / "train.json").write_text(json.dumps(recs))
    rc = main(["train", "--stage", "finetune", "--model", str(rel), "--data", str(tmp_path / "train.json"),
               "--images", str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--max-steps", "1",
               "--global-batch-size", "2", "--per-device-batch-size", "2", "--num-workers", "0"])
    assert rc in (0, None)
    assert list((tmp_path / "llavamed-cache" / "converted").iterdir())
    model, _ = load_model(tmp_path / "run", device="cpu")
    assert type(model).__name__ == "LlavaForConditionalGeneration"



def test_train_and_predict_take_a_hub_id(hub, tmp_path, capsys):
    "`train --model org/name` and `predict --model org/name` load from the hub cache, offline, like every command."
    torch.manual_seed(0)
    save_model(*build_model("tiny"), tmp_path / "saved")
    to_hub_cache(tmp_path / "saved", "org/tiny-llava", hub)
    (tmp_path / "images").mkdir()
    _img().save(tmp_path / "images" / "f0.png")
    recs = [{"id": f"q{i}", "image": "f0.png", "conversations": [
        {"from": "human", "value": "<image>\nIs there a lesion?"}, {"from": "gpt", "value": "yes"}]} for i in range(2)]
    (tmp_path / "train.json").write_text(json.dumps(recs))
    common = ["--data", str(tmp_path / "train.json"), "--images", str(tmp_path / "images")]
    assert main(["train", "--stage", "finetune", "--model", "org/tiny-llava", *common, "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--global-batch-size", "2", "--per-device-batch-size", "2",
                 "--num-workers", "0"]) in (0, None)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_type"] == "llava"
    assert main(["predict", "--model", "org/tiny-llava", *common, "--out", str(tmp_path / "a.jsonl"),
                 "--max-new-tokens", "2", "--quiet"]) == 0
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(["train", "--model", "org/not-cached", *common, "--out", str(tmp_path / "r2")]) == 2
    _one_line(capsys, "org/not-cached", "hf download org/not-cached")
    assert not (tmp_path / "r2").exists()

def test_v1_llava_config_is_a_release_and_converts_like_v1_5(hub, tmp_path):
    "A v1.0-style `llava` config (LLaVA's mm_* keys, a Llama LM, no text_config) converts automatically too."
    from llavamed.model import is_release
    v15 = tiny_release_checkpoint(tmp_path / "v15", seed=8)
    v1 = tiny_release_checkpoint(tmp_path / "v1", seed=8)
    cfg = json.loads((v1 / "config.json").read_text())
    cfg.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"])  # Mistral without a window = Llama
    cfg.pop("sliding_window", None)
    (v1 / "config.json").write_text(json.dumps(cfg))
    assert is_release(cfg)
    (ma, pa), (mb, pb) = load_model(v15, device="cpu"), load_model(v1, device="cpu")
    assert mb.config.text_config.model_type == "llama" and pb.chat_template != pa.chat_template  # vicuna_v1
    ids = torch.tensor([[1, 5, 9, 30, 200, 7]])
    with torch.no_grad(): torch.testing.assert_close(ma(input_ids=ids).logits, mb(input_ids=ids).logits)


@pytest.mark.slow
def test_two_processes_convert_a_release_once(hub, tmp_path):
    "Two ranks loading the same raw release at once: one converts under the lock, the other reuses its copy."
    import subprocess, sys
    rel = tiny_release_checkpoint(tmp_path / "release", seed=9, tokenizer="sentencepiece")
    code = ("import logging, sys; from llavamed.model import resolve_model; logging.basicConfig(level=logging.WARNING);"
            "print(resolve_model(sys.argv[1]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(rel)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    assert outs[0][0].split()[-1] == outs[1][0].split()[-1]
    assert sum("converting it once" in e for _, e in outs) == 1, [e[-600:] for _, e in outs]
    copies = [p for p in (tmp_path / "llavamed-cache" / "converted").iterdir() if not p.name.endswith(".lock")]
    assert len(copies) == 1  # and no staging folder left (the lock file is hidden, and stays)
