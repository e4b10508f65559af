"Training on every model family through llavamed.train's public API: cache, batches, stages, LoRA, checkpoints, CLI."
import json, os, random, tempfile
from pathlib import Path
import pytest

torch = pytest.importorskip("torch")
from PIL import Image, ImageDraw
from llavamed.core import IGNORE_INDEX
from llavamed.families import TINY_PRESETS, build_family, family_of, family_tokens, image_tokens, parts
from llavamed import train as T
from families_util import missing as _missing, one_thread, preset_params, supervised_runs as _runs  # noqa: F401 (a fixture)

CACHE = tempfile.mkdtemp(prefix="llavamed-test-cache-")  # token caches of this module's runs, not the user's
os.environ["LLAVAMED_CACHE"] = CACHE
REPLIES = ["A chest X-ray with a nodule.", "No effusion.", "The left lung."]
SIZES = [(64, 64), (96, 64), (64, 96), (80, 80)]  # Qwen's and SmolVLM's token counts follow the size




PRESETS = preset_params(TINY_PRESETS)




def _conversation(images: int, turns: int = 3) -> list[dict]:
    marks = "\n".join(["<image>"] * images)
    conv = []
    for k in range(turns):
        q = ["What is shown?", "Any effusion?", "Which side?"][k]
        conv += [{"from": "human", "value": f"{marks}\n{q}" if k == 0 and images else q},
                 {"from": "gpt", "value": REPLIES[k]}]
    return conv


def make_data(root: Path, several: bool, n: int = 8) -> Path:
    "Records with one image (sizes vary), a 2-image record where the family takes it, and text-only records."
    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(SIZES):
        im = Image.new("RGB", size, (rng.randint(0, 60),) * 3)
        ImageDraw.Draw(im).ellipse([8, 8, 40, 40], fill=(230, 230, 230))
        im.save(root / "images" / f"fig{i}.png")
    recs = [{"id": f"fig{i}", "image": f"fig{i % len(SIZES)}.png", "conversations": _conversation(1, 1 + i % 3)}
            for i in range(n)]
    if several: recs.append({"id": "pair", "image": ["fig0.png", "fig1.png"], "conversations": _conversation(2)})
    recs += [{"id": f"txt{i}", "conversations": _conversation(0, 2)} for i in range(2)]
    (root / "train.json").write_text(json.dumps(recs))
    return root / "train.json"


_SAVED = {}

def _base(preset, tmp_path_factory):
    "The preset's tiny model saved once per module: `(folder, data file)`."
    if preset not in _SAVED:
        root = tmp_path_factory.mktemp(preset)
        data = make_data(root, several=family_of(preset).max_images is None)
        texts = [t["value"] for r in json.loads(data.read_text()) for t in r["conversations"]]
        model, proc = build_family(preset, tokenizer_texts=texts, vocab_size=400)
        T._end_of_turn_eos(model, proc)
        model.save_pretrained(root / "base"); proc.save_pretrained(root / "base")
        _SAVED[preset] = (root / "base", data)
    return _SAVED[preset]


def _load(folder):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    return AutoModelForImageTextToText.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("preset", PRESETS)
def test_items_equal_the_processors_tokens_and_batches_supervise_the_replies(preset, tmp_path_factory):
    base, data = _base(preset, tmp_path_factory)
    model, proc = _load(base)
    fam, tok = family_of(model), proc.tokenizer
    ds = T.SupervisedDataset(str(data), proc, data.parent / "images", config=model.config)
    records = {r["id"]: r for r in json.loads(data.read_text())}
    ids = ds.tokens.record_ids()
    rid = "pair" if "pair" in records else "fig2"  # 3 turns, 2 images where the family takes them
    i = [ids[int(r)] for r in ds.index].index(rid)
    names = records[rid]["image"] if isinstance(records[rid]["image"], list) else [records[rid]["image"]]
    images = [Image.open(data.parent / "images" / n).convert("RGB") for n in names]
    ref = family_tokens(records[rid], proc, images)
    item = ds[i]
    assert (item["input_ids"], item["labels"]) == (ref["input_ids"], ref["labels"])  # the processor's own ids
    assert ds.lengths[i] == len(ref["input_ids"])  # the sampler's length counts the image tokens
    batch = T.Collator(proc)([ds[j] for j in range(len(ds)) if ds.has_image[j]][:3] + [item])
    assert [r.lstrip() for r in _runs(tok, batch["labels"][-1])] == [r + fam.end_of_turn for r in REPLIES]
    image_id = tok.convert_tokens_to_ids(fam.image_token)
    assert not ((batch["input_ids"] == image_id) & (batch["labels"] != IGNORE_INDEX)).any()
    if fam.token_types: assert torch.equal(batch[fam.token_types], (batch["input_ids"] == image_id).long())
    model.train()
    out = model(**batch)  # the forward takes the batch as collated
    assert torch.isfinite(out.loss)
    text = T.Collator(proc)([ds[j] for j in range(len(ds)) if not ds.has_image[j]])
    assert "pixel_values" not in text and (text["labels"] != IGNORE_INDEX).any()
    loss = model(**text).loss + T._connector_touch(model, T._blank_vision(proc, model.config))  # a text-only step's
    loss.backward()
    assert all(p.grad is not None for p in parts(model)["connector"].values())  # the connector joins the backward


@pytest.mark.parametrize("preset", PRESETS)
def test_stages_freeze_their_parts_and_checkpoints_reload(preset, tmp_path_factory, tmp_path):
    base, data = _base(preset, tmp_path_factory)
    kw = dict(data=str(data), images=str(data.parent / "images"), max_steps=2, num_workers=0, save_steps=100,
              quiet=True)
    small = dict(global_batch_size=4, per_device_batch_size=4)
    before = {n: p.detach().clone() for n, p in _load(base)[0].named_parameters()}
    part = {n: k for k, group in parts(_load(base)[0]).items() for n in group}
    T.train(T.StageConfig.load("align", lr=1e-2, **small), T.RunConfig(model=str(base), out=str(tmp_path / "s1"), **kw))
    s1, proc = _load(tmp_path / "s1")
    moved = {part[n] for n, p in s1.named_parameters() if not torch.equal(before[n], p)}
    assert moved == {"connector"}, moved  # tower and LM bit-identical after the alignment stage
    T.train(T.StageConfig.load("instruct", lr=1e-3, **small),
            T.RunConfig(model=str(tmp_path / "s1"), out=str(tmp_path / "s2"), **kw))
    s2, proc = _load(tmp_path / "s2")
    moved = {part[n] for n, p in s2.named_parameters() if not torch.equal(before[n], p)}
    assert "tower" not in moved and "lm" in moved, moved
    fam = family_of(s2)
    eos = s2.generation_config.eos_token_id
    assert proc.tokenizer.convert_tokens_to_ids(fam.end_of_turn) in (eos if isinstance(eos, list) else [eos])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text], images=[[Image.open(data.parent / "images" / "fig1.png").convert("RGB")]],
                 return_tensors="pt")
    out = s2.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_stage_trains_the_lm_and_connector_only(preset, tmp_path_factory, tmp_path):
    base, data = _base(preset, tmp_path_factory)
    stage = T.StageConfig.load("instruct", global_batch_size=4, per_device_batch_size=4, lr=1e-2, lora_r=4,
                               lora_alpha=8)
    T.train(stage, T.RunConfig(model=str(base), data=str(data), images=str(data.parent / "images"), lora=True,
                               out=str(tmp_path / "lora"), max_steps=2, num_workers=0, save_steps=100, quiet=True))
    start, merged = _load(base)[0], _load(tmp_path / "lora")[0]
    part = {n: k for k, group in parts(start).items() for n in group}
    after = dict(merged.named_parameters())
    assert after.keys() == part.keys()  # a plain checkpoint: no lora_ or modules_to_save names
    moved = {part[n] for n, p in start.named_parameters() if not torch.equal(p, after[n])}
    assert moved == {"connector", "lm"}, moved


def test_multi_image_limits_and_small_images_are_counted_drops(tmp_path_factory, tmp_path):
    base, data = _base("tiny", tmp_path_factory)
    recs = json.loads(data.read_text())
    recs += [{"id": "two", "image": ["fig0.png", "fig1.png"], "conversations": _conversation(2, 1)}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    model, proc = _load(base)
    ds = T.SupervisedDataset(str(tmp_path / "llava.json"), proc, data.parent / "images", max_dropped_share=0.5)
    assert ds.dropped == {"2 images, family llava takes at most 1": 1}
    assert ds.examples["2 images, family llava takes at most 1"].startswith("two: ")
    if _missing("tiny-qwen2_5_vl"): pytest.skip("tiny-qwen2_5_vl's processor needs torchvision")
    qbase, qdata = _base("tiny-qwen2_5_vl", tmp_path_factory)
    Image.new("RGB", (20, 40)).save(qdata.parent / "images" / "small.png")
    Image.new("RGB", (300, 300)).save(qdata.parent / "images" / "big.png")
    recs = json.loads(qdata.read_text())
    recs += [{"id": "few", "image": ["fig0.png", "fig1.png"], "conversations": _conversation(1, 1)},
             {"id": "tiny_img", "image": "small.png", "conversations": _conversation(1, 1)},
             {"id": "big", "image": "big.png", "conversations": _conversation(1, 1)}]
    (tmp_path / "qwen.json").write_text(json.dumps(recs))
    model, proc = _load(qbase)
    ds = T.SupervisedDataset(str(tmp_path / "qwen.json"), proc, qdata.parent / "images", max_dropped_share=0.5,
                             config=model.config)
    assert ds.dropped == {"2 images but 1 <image> markers": 1, "image smaller than the patch": 1}
    assert ds.examples["image smaller than the patch"].endswith(
        "record 'tiny_img' image 1: 20x40 px is smaller than family qwen2_5_vl's 28 px patch")
    rows = [ds.tokens.record_ids()[int(r)] for r in ds.index]
    big, row = rows.index("big"), int(ds.index[rows.index("big")])
    assert ds.lengths[big] - int(ds.tokens.length[row]) == image_tokens(proc, (300, 300)) - 1 > 8
    short = T.SupervisedDataset(str(tmp_path / "qwen.json"), proc, qdata.parent / "images", config=model.config,
                                max_length=ds.lengths[big] - 1, max_dropped_share=1.0)
    assert short.dropped["too long with its image tokens"] == 1 and "big" in short.examples["too long with its image tokens"]
    assert max(short.lengths) < ds.lengths[big]  # never cut: the record is left out whole


@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
def test_cli_trains_a_family_preset(tmp_path_factory, tmp_path):
    from llavamed.cli import main
    _, data = _base("tiny-qwen2_5_vl", tmp_path_factory)
    rc = main(["train", "--stage", "instruct", "--model", "tiny-qwen2_5_vl", "--data", str(data), "--images",
               str(data.parent / "images"), "--out", str(tmp_path / "run"), "--max-steps", "1", "--num-workers", "0",
               "--global-batch-size", "2", "--per-device-batch-size", "2", "--quiet"])
    assert rc in (0, None)
    model, proc = _load(tmp_path / "run")
    assert family_of(model).name == "qwen2_5_vl" and proc.chat_template


def test_a_volume_entry_becomes_k_slices_or_a_counted_drop(tmp_path_factory, tmp_path):
    np = pytest.importorskip("numpy"); nib = pytest.importorskip("nibabel")
    base, data = _base("tiny-gemma3", tmp_path_factory)
    images = data.parent / "images"
    vol = np.random.default_rng(0).integers(0, 1000, (48, 40, 10)).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), images / "ct.nii.gz")
    nib.save(nib.Nifti1Image(vol[:, :, :2], np.eye(4)), images / "thin.nii.gz")
    recs = json.loads(data.read_text())
    recs += [{"id": "ct1", "image": "ct.nii.gz", "conversations": _conversation(1)},
             {"id": "thin1", "image": "thin.nii.gz", "conversations": _conversation(1, 1)}]
    (tmp_path / "vol.json").write_text(json.dumps(recs))
    model, proc = _load(base)
    ds = T.SupervisedDataset(str(tmp_path / "vol.json"), proc, images, config=model.config, volume_slices=3,
                             max_dropped_share=0.5)
    rows = [ds.tokens.record_ids()[int(r)] for r in ds.index]
    item = ds[rows.index("ct1")]
    assert item["vision"]["pixel_values"].shape[0] == 3  # three slices, each an image of its own
    assert item["input_ids"].count(proc.tokenizer.image_token_id) == 3 * 16
    assert [r.lstrip() for r in _runs(proc.tokenizer, item["labels"])] == [r + "<end_of_turn>" for r in REPLIES]
    assert list(ds.dropped) == ["image unreadable"] and "thin1: " in ds.examples["image unreadable"]
    assert "fewer than the k=3" in ds.examples["image unreadable"]  # 2 slices
    lbase, ldata = _base("tiny", tmp_path_factory)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), ldata.parent / "images" / "ct.nii.gz")
    recs = json.loads(ldata.read_text()) + [{"id": "ct1", "image": "ct.nii.gz", "conversations": _conversation(1)}]
    (tmp_path / "llava.json").write_text(json.dumps(recs))
    model, proc = _load(lbase)
    ds = T.SupervisedDataset(str(tmp_path / "llava.json"), proc, ldata.parent / "images", volume_slices=3,
                             max_dropped_share=0.5)
    assert ds.dropped == {"3 images, family llava takes at most 1 (a volume entry is volume_slices images)": 1}
    one = T.SupervisedDataset(str(tmp_path / "llava.json"), proc, ldata.parent / "images", volume_slices=1)
    assert not one.dropped and len(one) == len(recs)  # one slice per volume: LLaVA takes it


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_processes_match_one_on_a_family(zero, tmp_path_factory, tmp_path):
    "Qwen2.5-VL under ZeRO-2/3 on 2 processes: the loss curve of 1 process x 2 accumulation steps, text-only step included."
    import signal, subprocess, sys
    from llavamed.core import read_jsonl
    base, data = _base("tiny-qwen2_5_vl", tmp_path_factory)
    recs = [r for r in json.loads(data.read_text()) if isinstance(r.get("image"), str)][:8]
    recs += [{"id": f"text{i}", "conversations": _conversation(0, 1 + i % 2)} for i in range(8)]  # a text-only step
    (tmp_path / "mix.json").write_text(json.dumps(recs))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = ["train", "--stage", "instruct", "--model", str(base), "--data", str(tmp_path / "mix.json"), "--images",
            str(data.parent / "images"), "--max-steps", "2", "--global-batch-size", "8", "--per-device-batch-size",
            "4", "--num-workers", "0", "--save-steps", "100", "--lr", "1e-3"]
    def run(cmd, out):
        p = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
        try: _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL); _, err = p.communicate(); pytest.fail(f"timed out: {err[-2000:]}")
        assert p.returncode == 0, err[-3000:]
        return [r["loss"] for r in read_jsonl(out / "log_history.jsonl")]
    single = run([str(bin_dir / "llavamed"), *args], tmp_path / "one")
    port = str(29500 + random.randint(401, 800))
    two = run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port, str(bin_dir / "llavamed"),
               *args, "--deepspeed", zero], tmp_path / zero)
    assert len(single) == len(two) == 2 and two == pytest.approx(single, rel=1e-4), (single, two)
    assert family_of(_load(tmp_path / zero)[0]).name == "qwen2_5_vl"
