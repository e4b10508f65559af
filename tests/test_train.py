"Mechanism tests of llavamed.train: label masks, truncation, batching, frozen parts, LoRA, CLI, DeepSpeed, resume."
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import copy
import pytest

torch = pytest.importorskip("torch")
import numpy as np
from PIL import Image, ImageDraw
from llavamed.core import IGNORE_INDEX, IMAGE_TOKEN, Sample, Turn, read_jsonl
from llavamed.model import build_model, save_model, TEMPLATES, sample_to_messages
from llavamed import train as T

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
import tempfile
CACHE = tempfile.mkdtemp(prefix="llavamed-test-cache-")  # token caches of this module's runs, not the user's
os.environ["LLAVAMED_CACHE"] = CACHE
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
torch.set_num_threads(1)  # 2 shared cores: one thread per process is faster than two contending


def make_data(root: Path, n_img: int = 24, n_text: int = 8, seed: int = 0) -> Path:
    "Small LLaVA instruction file with 64 px figures (a bright disc on the left or right) and text-only records."
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n_img):
        side = rng.choice(["left", "right"])
        im = Image.new("RGB", (80, 64), (rng.randint(0, 60),) * 3)
        x = 12 if side == "left" else 52
        ImageDraw.Draw(im).ellipse([x, 24, x + 16, 40], fill=(230, 230, 230))
        im.save(root / "images" / f"fig{i}.png")
        conv = [{"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the figure."},
                {"from": "gpt", "value": f"A chest X-ray with a nodule in the {side} lung."}]
        for _ in range(i % 3):
            conv += [{"from": "human", "value": "Which side is the nodule on?"}, {"from": "gpt", "value": f"The {side} side."}]
        recs.append({"id": f"fig{i}", "image": f"fig{i}.png", "conversations": conv})
    for i in range(n_text):
        recs.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": "What is a pulmonary nodule?"},
                                                        {"from": "gpt", "value": "A small round opacity in the lung. " * (1 + i % 3)}]})
    rng.shuffle(recs)
    (root / "train.json").write_text(json.dumps(recs))
    return root / "train.json"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny(data):
    texts = [t["value"] for r in json.loads(data.read_text()) for t in r["conversations"]]
    torch.manual_seed(0)
    return build_model("tiny", tokenizer_texts=texts)


@pytest.fixture(scope="module")
def base_dir(tiny, tmp_path_factory):
    "The tiny model saved once, so every run (single and multi-process) starts from identical weights."
    return str(save_model(*tiny, tmp_path_factory.mktemp("base")))


def _sd(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- label masks and truncation

def test_tokens_equal_processor_and_labels_are_assistant_text(tiny, data):
    "Our ids equal the processor's own chat-template tokenisation with the image; labels are exactly the replies."
    model, proc = tiny
    recs = T.load_records(data)
    r = next(r for r in recs if r.image and len(r.conversations) == 4)
    item, why = T.tokenize_sample(r, proc, 2048)
    assert why is None
    img = Image.open(data.parent / "images" / r.image).convert("RGB")
    ref = proc.apply_chat_template(sample_to_messages(r, image=img), tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
    assert item["input_ids"] == list(ref["input_ids"][0])
    sup = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert sup == [t for t, m in zip(ref["input_ids"][0], ref["assistant_masks"][0]) if m]
    eos = proc.tokenizer.eos_token
    assert proc.tokenizer.decode(sup) == "".join(f" {t.text}{eos}" for t in r.conversations[1::2])
    n_img = sum(t == proc.image_token_id for t in item["input_ids"])
    assert n_img == model.config.image_seq_length
    assert all(l == IGNORE_INDEX for t, l in zip(item["input_ids"], item["labels"]) if t == proc.image_token_id)


def test_plain_template_supervises_caption_only(tiny, data):
    _, proc = tiny
    r = next(r for r in T.load_records(data) if r.image)
    item, _ = T.tokenize_sample(r, proc, 2048, template="plain")
    sup = [t for t in item["labels"] if t != IGNORE_INDEX]
    assert proc.tokenizer.decode(sup) == r.conversations[1].text + proc.tokenizer.eos_token
    assert "Describe" not in proc.tokenizer.decode(item["input_ids"])  # plain: image then caption


def test_truncation_drops_later_turns_never_image_tokens(tiny, data):
    _, proc = tiny
    r = next(r for r in T.load_records(data) if r.image and len(r.conversations) == 6)
    full, _ = T.tokenize_sample(r, proc, 2048)
    first, _ = T.tokenize_sample(Sample(r.id, r.conversations[:2], r.image), proc, 2048)
    cut, why = T.tokenize_sample(r, proc, len(full["input_ids"]) - 1)
    assert why is None and cut["n_turns"] == 4 and len(cut["input_ids"]) < len(full["input_ids"])
    assert cut["input_ids"] == full["input_ids"][:len(cut["input_ids"])]  # a prefix made of whole exchanges
    none, why = T.tokenize_sample(r, proc, len(first["input_ids"]) - 1)
    assert none is None and why.startswith("too long") and str(len(first["input_ids"])) in why
    n_img = sum(t == proc.image_token_id for t in cut["input_ids"])
    assert n_img == sum(t == proc.image_token_id for t in full["input_ids"])


def test_vanished_supervision_is_counted_and_stops_the_run(tiny, data):
    _, proc = tiny
    recs = T.load_records(data)
    bad = Sample("two_images", [Turn("human", f"{IMAGE_TOKEN} {IMAGE_TOKEN} hi"), Turn("gpt", "ok")], image="fig0.png")
    ds = T.SupervisedDataset(recs + [bad], proc, data.parent / "images", max_dropped_share=0.5)
    assert len(ds) == len(recs) and ds.dropped == {"2 <image> tokens with image='fig0.png'": 1}
    with pytest.raises(T.DroppedError, match="1 of 33 records dropped"):
        T.SupervisedDataset(recs + [bad], proc, data.parent / "images", max_dropped_share=0.0)
    mute = TEMPLATES["mistral_instruct"].replace("' ' + reply_text(m) + eos_token", "''")
    with pytest.raises(T.TemplateError, match="chat template renders no assistant text"):
        T.SupervisedDataset(recs, proc, data.parent / "images", template=mute)
    short = T.SupervisedDataset(recs, proc, data.parent / "images", max_length=40, max_dropped_share=1.0)
    assert short.dropped["too long"] >= sum(r.image is not None for r in recs)  # 64 image tokens are never cut
    assert not any(short.has_image)


# ---------------------------------------------------------------- batching

def test_collator_batch_runs_through_model(tiny, data):
    model, proc = tiny
    ds = T.SupervisedDataset(data, proc, data.parent / "images")
    items = [ds[i] for i in range(6)]
    b = T.Collator(proc)(items)
    n_img = sum(it["image"] is not None for it in items)
    assert b["pixel_values"].shape == (n_img, 3, 64, 64)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert b["attention_mask"].sum().item() == sum(len(it["input_ids"]) for it in items)
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert torch.isfinite(model(**b).loss)
    assert "pixel_values" not in T.Collator(proc)([it for it in items if it["image"] is None][:2])


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_collator_pixels_equal_the_processor_that_serves_the_model(tiny, aspect):
    "Training pixels (fast path) must be the numbers the processor gives at inference, for any image shape."
    from llavamed.model import make_image_processor
    ip = make_image_processor(48, aspect)
    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(m)
            for (w, h), m in zip([(70, 50), (50, 70), (48, 48), (200, 9), (13, 31)], ["RGB", "L", "RGBA", "RGB", "P"])]
    ref = ip(imgs, return_tensors="pt")["pixel_values"]
    proc = copy.copy(tiny[1]); proc.image_processor = ip  # the tiny model's processor with a 48 px image processor
    items = [{"input_ids": [1, 2], "labels": [1, 2], "image": im} for im in imgs]
    got = T.Collator(proc)(items)["pixel_values"]
    assert got.shape == ref.shape == (5, 3, 48, 48)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_grouped_order_is_a_deterministic_permutation_with_less_padding():
    rng = random.Random(1)
    lens = [rng.randint(10, 500) for _ in range(1000)]; img = [rng.random() < 0.7 for _ in lens]
    a = T.grouped_order(lens, img, 16, world_size=2, seed=3)
    assert sorted(a) == list(range(1000)) and a == T.grouped_order(lens, img, 16, world_size=2, seed=3)
    assert a != T.grouped_order(lens, img, 16, world_size=2, seed=4)
    pure = [len({img[i] for i in a[s:s + 32]}) == 1 for s in range(0, 1000, 32)]
    assert sum(not p for p in pure) <= 1  # only the leftovers' batch may mix modalities
    rand = list(range(1000)); rng.shuffle(rand)
    assert T.padding_share(a, lens, 16) < 0.25 * T.padding_share(rand, lens, 16)
    s = T.GroupedSampler(lens, img, 16, seed=3); s.set_epoch(1)
    assert list(s) == T.grouped_order(lens, img, 16, seed=4)


# ---------------------------------------------------------------- stages, frozen parts, outputs

def test_stage_config_validation_names_fields(tmp_path):
    with pytest.raises(ValueError, match="StageConfig.lr"): T.StageConfig(lr=0)
    with pytest.raises(ValueError, match="StageConfig.warmup_ratio"): T.StageConfig(warmup_ratio=1.5)
    with pytest.raises(ValueError, match="per_device_batch_size 16 x 3 processes"): T.StageConfig().accumulation(3)
    with pytest.raises(ValueError, match="RunConfig.grad_ckpt"): T.RunConfig(grad_ckpt="maybe")
    with pytest.raises(ValueError, match="RunConfig.max_steps: expected int"): T.RunConfig(max_steps=2.5)
    for n, stage, lr, epochs in ((1, "align", 2e-3, 1), (2, "instruct", 2e-5, 3), (3, "finetune", 2e-5, 3)):
        rec = next((ROOT / "configs").glob(f"stage{n}_*.yaml"))
        c = T.StageConfig.load(rec)
        assert (c.name, c.lr, c.epochs, c.global_batch_size, c.warmup_ratio, c.weight_decay) == (stage, lr, epochs, 128, 0.03, 0)
        assert os.access(ROOT / "configs" / f"launch_stage{n}.sh", os.X_OK)
    for name, cfg in T.DEEPSPEED_CONFIGS.items():  # the shipped JSON files are these dicts
        assert json.loads((ROOT / "configs" / f"{name}.json").read_text()) == cfg


def test_configs_are_written_from_the_presets():
    "configs/ holds what scripts/write_configs.py writes; each recipe reads back as its preset stage."
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "write_configs.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    for r in T.RECIPES:
        assert T.StageConfig.load(ROOT / "configs" / f"{r.file}.yaml") == r.stage
        launch = (ROOT / "configs" / f"launch_stage{r.file[5]}.sh").read_text()  # defaults: the recipe's run
        for var, value in (("MODEL", r.run.model), ("DATA", r.run.data), ("IMAGES", r.run.images),
                           ("OUT", r.run.out), ("DS", r.run.deepspeed)):
            assert f"{var}=${{{var}:-{value}}}" in launch, (r.file, var)
        shared = (ROOT / "configs" / "launch.sh").read_text()  # what every stage script sources
        assert f"RECIPE=configs/{r.file}.yaml" in launch and '--stage "$RECIPE"' in shared
        assert f'--num-workers "${{NUM_WORKERS:-{r.run.num_workers}}}"' in shared


def test_projector_gets_its_own_learning_rate(tiny, data, tmp_path):
    from transformers import TrainingArguments
    model, proc = tiny
    cfg = T.StageConfig.load("instruct", projector_lr=1e-3, per_device_batch_size=4, global_batch_size=4)
    T.set_trainable(model, cfg.train)
    args = TrainingArguments(str(tmp_path), learning_rate=cfg.lr, weight_decay=0.0, report_to=[], use_cpu=True)
    tr = T._trainer_class()(model=model, args=args, stage=cfg, train_dataset=T.SupervisedDataset(data, proc, data.parent / "images"),
                            data_collator=T.Collator(proc))
    opt = tr.create_optimizer()
    groups = {g["lr"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    n_proj = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    assert groups[1e-3] == n_proj and groups[2e-5] == sum(p.numel() for p in model.parameters() if p.requires_grad) - n_proj
    assert isinstance(tr._get_train_sampler(), T.GroupedSampler)


def test_align_then_instruct_frozen_parts_bit_identical(base_dir, data, tmp_path):
    from transformers import LlavaForConditionalGeneration
    base = LlavaForConditionalGeneration.from_pretrained(base_dir)
    kw = dict(data=str(data), images=str(data.parent / "images"), max_steps=3, num_workers=0, save_steps=100)
    small = dict(global_batch_size=4, per_device_batch_size=4)
    stage1, stage2 = T.StageConfig.load("align", **small), T.StageConfig.load("instruct", **small)
    r1 = T.train(stage1, T.RunConfig(model=base_dir, out=str(tmp_path / "s1"), **kw))
    s1 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "s1")
    r2 = T.train(stage2, T.RunConfig(model=str(tmp_path / "s1"), out=str(tmp_path / "s2"), **kw))
    s2 = LlavaForConditionalGeneration.from_pretrained(tmp_path / "s2")
    b, a1, a2 = _sd(base), _sd(s1), _sd(s2)
    for k in b:
        part = T.part_of(k)
        if part == "projector": assert not torch.equal(b[k], a1[k]), k  # stage 1 trains the projector
        else: assert torch.equal(b[k], a1[k]), k  # vision + LLM bit-identical after stage 1
        if part == "vision": assert torch.equal(a1[k], a2[k]), k
    assert any(not torch.equal(a1[k], a2[k]) for k in a1 if T.part_of(k) == "llm")
    rows = list(read_jsonl(tmp_path / "s2" / "log_history.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and set(rows[0]) == {"step", "epoch", "loss", "learning_rate"}
    assert (tmp_path / "s2" / "loss.png").stat().st_size > 1000
    sc = json.loads((tmp_path / "s1" / "stage_config.json").read_text())
    assert sc["train"] == ["projector"] and sc["template"] == "plain" and sc["trainable"].keys() == {"projector"}
    assert (tmp_path / "s2" / "chat_template.jinja").read_text() == TEMPLATES["mistral_instruct"]  # stage 1 kept the model's template
    assert isinstance(r2, T.TrainResult) and r1.steps == r2.steps == 3 and r2.final_loss == rows[-1]["loss"]
    assert r2.to_json()["dataset"]["kept"] == r2.dataset["kept"] == len(T.load_records(data))
    with pytest.raises(ValueError, match="already holds checkpoint-3"):
        T.train(stage2, T.RunConfig(model=str(tmp_path / "s1"), out=str(tmp_path / "s2"), **kw))


def test_lora_stage_merges_into_plain_checkpoint(base_dir, data, tmp_path):
    from transformers import LlavaForConditionalGeneration
    stage = T.StageConfig.load("instruct", global_batch_size=4, per_device_batch_size=4, lr=1e-3,
                               projector_lr=1e-3)
    T.train(stage, T.RunConfig(model=base_dir, data=str(data), images=str(data.parent / "images"),
                               out=str(tmp_path / "lora"), lora=True, max_steps=2, num_workers=0, save_steps=100))
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    base, merged = (_sd(LlavaForConditionalGeneration.from_pretrained(p)) for p in (base_dir, tmp_path / "lora"))
    assert base.keys() == merged.keys()  # a plain checkpoint: no lora_ or modules_to_save keys
    changed = {T.part_of(k) for k in base if not torch.equal(base[k], merged[k])}
    assert changed == {"projector", "llm"}
    assert all(torch.equal(base[k], merged[k]) for k in base if "embed_tokens" in k or "norm" in k)  # LoRA: linear layers only


def test_cli_train_runs_stage(base_dir, data, tmp_path):
    from llavamed.cli import main
    rc = main(["train", "--stage", "finetune", "--model", base_dir, "--data", str(data), "--images", str(data.parent / "images"),
               "--out", str(tmp_path / "cli"), "--max-steps", "1", "--global-batch-size", "2", "--per-device-batch-size", "2",
               "--num-workers", "0"])
    assert rc in (0, None)
    assert json.loads((tmp_path / "cli" / "stage_config.json").read_text())["name"] == "finetune"


# ---------------------------------------------------------------- multi-process (real processes, CPU, gloo)

def _run(args, out, nproc=1, timeout=170):
    exe = [str(BIN / "llavamed")] if nproc == 1 else [str(BIN / "torchrun"), "--nproc_per_node", str(nproc),
                                                      "--master_port", str(29500 + random.randint(0, 400)), str(BIN / "llavamed")]
    p = _run_group(exe + ["train", *args, "--out", str(out)], ENV, timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return [r["loss"] for r in read_jsonl(Path(out) / "log_history.jsonl")]


def _run_group(cmd, env, timeout):
    "Run `cmd` in its own process group and kill the whole group on timeout (torchrun's workers included)."
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try: out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); out, err = p.communicate()
        # a stale torch-extensions lock (a DeepSpeed op build that was killed) makes every later run wait forever
        pytest.fail(f"timed out after {timeout} s (stale ~/.cache/torch_extensions/*/lock?): {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


DIST_ARGS = ["--stage", "instruct", "--max-steps", "4", "--global-batch-size", "8", "--per-device-batch-size", "4",
             "--num-workers", "0", "--save-steps", "100", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def single_curve(base_dir, data, tmp_path_factory):
    "Loss curve of one process with 2 accumulation steps (global batch 8)."
    args = DIST_ARGS + ["--model", base_dir, "--data", str(data), "--images", str(data.parent / "images")]
    return args, _run(args, tmp_path_factory.mktemp("single") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_two_processes_match_single_process(single_curve, zero, tiny, data, tmp_path):
    """Same global batch (8) and seed: 1 process x 2 accumulation steps vs 2 processes x 1 under ZeRO-2/ZeRO-3.
    Both see the same records per step (the grouped order's unit is the optimiser step's batch; rank r takes
    micro-batch r) and the loss is a token-weighted mean over micro-batches and ranks. The first step runs at
    lr 0 (warm-up), steps 2 and 3 move the weights, and step 2's batch is text-only, so the projector gets no
    gradient there: the curves agree only because the trainer gives such parameters a zero gradient as
    DeepSpeed does (without that rule the third loss differed by 0.35%). What remains is float summation
    order; regrouping the same batch in one process (1x8, 2x4, 4x2) moves these losses by < 1e-7 relative, so
    1e-5 leaves room for the all-reduce without hiding a wrong order, normalisation or update (each of those
    moves a loss by > 1e-3)."""
    ds = T.SupervisedDataset(data, tiny[1], data.parent / "images")  # the steps' records, as the trainer orders them
    order = T.grouped_order(ds.lengths, ds.has_image, 4, 2, seed=T.StageConfig.load("instruct").seed)
    text_only = [not any(ds.has_image[i] for i in order[8 * k:8 * k + 8]) for k in range(4)]
    assert text_only[1] and not text_only[0] and not text_only[2], text_only  # the case the zero-gradient rule settles
    args, single = single_curve
    curve = _run(args + ["--deepspeed", zero], tmp_path / zero, nproc=2)
    assert len(single) == len(curve) == 4 and single[0] != single[-1]
    assert curve == pytest.approx(single, rel=1e-5), (single, curve)
    ranks = [json.loads((tmp_path / zero / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = ranks[0]["params_total"]
    if zero == "zero3":
        for r in ranks: assert 0.45 < r["params_held"] / total < 0.55, ranks  # about half the parameters per rank
    else: assert all(r["params_held"] == total for r in ranks)  # ZeRO-2 keeps whole parameters
    from transformers import LlavaForConditionalGeneration
    m = LlavaForConditionalGeneration.from_pretrained(tmp_path / zero)  # ZeRO-3 gathers on save: a whole checkpoint
    assert sum(p.numel() for p in m.parameters()) == total


@pytest.mark.slow
def test_resume_after_sigkill_ends_at_same_loss(base_dir, data, tmp_path):
    """Kill -9 after the step-4 checkpoint, resume, and compare with an uninterrupted run. The checkpoint holds
    weights, optimizer, scheduler, RNG states and the data position, and the grouped order depends only on seed and
    epoch, so the resumed run replays the same batches: losses agree to float noise (rel 1e-4)."""
    args = ["--stage", "instruct", "--model", base_dir, "--data", str(data), "--images", str(data.parent / "images"),
            "--max-steps", "10", "--global-batch-size", "4", "--per-device-batch-size", "4", "--num-workers", "0",
            "--save-steps", "4", "--lr", "1e-3"]
    full = _run(args, tmp_path / "full")
    out = tmp_path / "killed"
    p = subprocess.Popen([str(BIN / "llavamed"), "train", *args, "--out", str(out)], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert p.poll() is None and time.time() - t0 < 120, "run ended or stalled before its first checkpoint"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert not (out / "checkpoint-8" / "trainer_state.json").exists(), "killed too late to test resume"
    resumed = _run(args + ["--resume"], out)
    assert len(resumed) == 10 and resumed[-1] == pytest.approx(full[-1], rel=1e-4), (full, resumed)
    assert resumed == pytest.approx(full, rel=1e-4)


# ---------------------------------------------------------------- benchmark scripts run at tiny size

@pytest.mark.slow
def test_launch_script_runs_recipe_with_two_processes(base_dir, data, tmp_path):
    "configs/launch_stage2.sh end to end with torchrun on CPU (the deepspeed launcher needs GPUs), recipe + ZeRO-2."
    env = {**ENV, "PATH": f"{BIN}:{os.environ['PATH']}", "NGPU": "2", "LAUNCHER": "torchrun", "DS": "zero2",
           "MODEL": base_dir, "DATA": str(data), "IMAGES": str(data.parent / "images"), "OUT": str(tmp_path / "s2")}
    p = _run_group(["bash", str(ROOT / "configs" / "launch_stage2.sh"), "--max-steps", "1", "--global-batch-size", "8",
                    "--num-workers", "0"], env, 170)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    sc = json.loads((tmp_path / "s2" / "stage_config.json").read_text())
    assert (sc["lr"], sc["epochs"], sc["world_size"], sc["gradient_accumulation_steps"]) == (2e-5, 3, 2, 1)


def test_recipe_named_after_a_preset_starts_from_it(tmp_path):
    "A recipe whose `name` is a preset (and no `stage` key) starts from that preset, as before `stage` existed."
    (tmp_path / "r.yaml").write_text("name: align\nepochs: 2\n")
    s = T.StageConfig.load(str(tmp_path / "r.yaml"))
    assert (s.name, s.lr, s.train, s.epochs) == ("align", T.STAGES["align"].lr, T.STAGES["align"].train, 2.0)
    (tmp_path / "q.yaml").write_text("name: my-stage\nlr: 1.0e-4\n")  # not a preset: the default stage's fields
    assert T.StageConfig.load(str(tmp_path / "q.yaml")).lr == 1e-4


# ---------------------------------------------------------------- any chat template (no generation markers)

# llava-hf/llava-1.5-7b-hf's chat template (chat_template.json) without its {% generation %} markers
LLAVA_HF = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
            "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
            "{{ '<image>\\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', "
            "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# a Vicuna v1 style template as hub repos write it: system line, 'USER: ... ASSISTANT: ...</s>', no markers
VICUNA_STYLE = ("{{ bos_token }}{{ 'A chat between a curious user and an artificial intelligence assistant. ' }}"
                "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' }}"
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
                "{% else %}{{ 'ASSISTANT: ' + m['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _runs(labels):
    "The runs of consecutive supervised labels."
    runs, cur = [], []
    for l in labels:
        if l != IGNORE_INDEX: cur.append(l)
        elif cur: runs.append(cur); cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("template", [LLAVA_HF, VICUNA_STYLE])
@pytest.mark.parametrize("where", ["before", "after"])
def test_template_without_markers_supervises_replies_and_end_token(tiny, template, where):
    "Multi-turn, image before or after the question: each supervised run decodes to one reply plus the end token."
    _, proc = tiny
    q = "What is shown?"
    first = f"{IMAGE_TOKEN}\n{q}" if where == "before" else f"{q}\n{IMAGE_TOKEN}"
    replies = ["A chest X-ray.", "Yes, in the left lung.", "No effusion."]
    conv = [Turn("human", first), Turn("gpt", replies[0]), Turn("human", "Any nodule?"), Turn("gpt", replies[1]),
            Turn("human", "Effusion?"), Turn("gpt", replies[2])]
    item, why = T.tokenize_sample(Sample("r", conv, image="x.png"), proc, 2048, template=template)
    assert why is None
    eos, tok = proc.tokenizer.eos_token, proc.tokenizer
    assert [tok.decode(r).strip() for r in _runs(item["labels"])] == [r + eos for r in replies]
    assert tok.decode([t for t in item["labels"] if t != IGNORE_INDEX]).count(eos) == 3
    n_img = [i for i, t in enumerate(item["input_ids"]) if t == proc.image_token_id]
    assert len(n_img) == T.image_token_count(proc) and n_img == list(range(n_img[0], n_img[-1] + 1))
    assert "What is shown?" in tok.decode(item["input_ids"]) and "Effusion?" in tok.decode(item["input_ids"])


def test_marker_path_and_render_difference_agree_on_the_library_templates(tiny, data):
    "With the {% generation %} markers transformers computes the mask; the render difference gives the same labels."
    _, proc = tiny
    for name in ("mistral_instruct", "vicuna_v1", "plain"):
        for r in T.load_records(data):
            item, _ = T.tokenize_sample(r, proc, 2048, template=name)
            out = proc.tokenizer.apply_chat_template(sample_to_messages(r), chat_template=TEMPLATES[name],
                                                     tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
            if ids[0] != proc.tokenizer.bos_token_id:  # what the processor adds to a prompt without BOS
                pre, post = T._special_affixes(proc.tokenizer)
                ids, mask = pre + ids + post, [0] * len(pre) + mask + [0] * len(post)
            ids, labels = T._expand(ids, mask, proc.image_token_id, T.image_token_count(proc))
            assert (item["input_ids"], item["labels"]) == (ids, labels), (name, r.id)


def test_template_that_renders_no_reply_is_one_clear_error(base_dir, data, tmp_path):
    mute = LLAVA_HF.replace("{{ content['text'] + ' '}}", "{% if message['role'] == 'user' %}{{ content['text'] }}{% endif %}")
    (tmp_path / "mute.jinja").write_text(mute)
    p = subprocess.run([str(BIN / "llavamed"), "train", "--stage", "instruct", "--model", base_dir, "--data", str(data),
                        "--images", str(data.parent / "images"), "--out", str(tmp_path / "out"), "--template", mute,
                        "--max-steps", "1", "--num-workers", "0"], env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()  # (model loading may draw progress bars before it)
    assert "Traceback" not in p.stderr and [l for l in lines if "error" in l] == lines[-1:], p.stderr[-2000:]
    assert lines[-1].startswith("llavamed train: error: chat template renders no assistant text"), lines[-1]
    assert not (tmp_path / "out").exists()


def test_template_that_rewrites_earlier_turns_is_refused(tiny):
    _, proc = tiny
    last_only = "{{ messages[-1]['content'][0]['text'] }}{% if add_generation_prompt %}:{% endif %}"
    r = Sample("r", [Turn("human", "Hi"), Turn("gpt", "Hello.")])
    with pytest.raises(T.TemplateError, match="does not start with the text rendered before it"):
        T.tokenize_sample(r, proc, 2048, template=last_only)


# ---------------------------------------------------------------- the token cache

def test_cache_is_reused_and_invalidated_by_file_tokenizer_template_and_length(tiny, data, tmp_path, monkeypatch):
    _, proc = tiny
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path / "c"))
    f = tmp_path / "train.json"; f.write_text(data.read_text())
    a = T.SupervisedDataset(f, proc, data.parent / "images")
    b = T.SupervisedDataset(f, proc, data.parent / "images")
    assert (a.warm, b.warm) == (False, True) and a.tokens.folder == b.tokens.folder
    assert a.tokens.folder.parent == tmp_path / "c" / "tokens"
    assert [a[i]["input_ids"] for i in range(len(a))] == [b[i]["input_ids"] for i in range(len(b))]
    assert not T.SupervisedDataset(f, proc, data.parent / "images", template="vicuna_v1").warm
    assert not T.SupervisedDataset(f, proc, data.parent / "images", max_length=1000).warm
    recs = json.loads(f.read_text()); recs[0]["conversations"][1]["value"] += " More."
    f.write_text(json.dumps(recs))
    changed = T.SupervisedDataset(f, proc, data.parent / "images")
    assert not changed.warm and changed.summary()["supervised_tokens"] > a.summary()["supervised_tokens"]
    other = copy.deepcopy(proc); other.tokenizer.add_tokens(["nodule"])
    assert not T.SupervisedDataset(f, other, data.parent / "images").warm
    assert len(list((tmp_path / "c" / "tokens").glob("*/meta.json"))) == 5


def test_cache_equals_the_old_list_path_item_by_item(tiny, data, tmp_path, monkeypatch):
    "Each item is the processor's own chat-template tokenisation with its assistant mask (marker path), expanded."
    _, proc = tiny
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path / "c"))
    recs = [r for r in T.load_records(data)]
    ds = T.SupervisedDataset(data, proc, data.parent / "images", tokenize_workers=2)
    mem = T.SupervisedDataset(recs, proc, data.parent / "images")
    assert len(ds) == len(mem) == len(recs) and ds.lengths == mem.lengths and ds.has_image == mem.has_image
    n_img = T.image_token_count(proc)
    for i, r in enumerate(recs):
        out = proc.tokenizer.apply_chat_template(sample_to_messages(r), chat_template=T.resolve_template(proc),
                                                 tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, labels = T._expand(list(out["input_ids"]), list(out["assistant_masks"]), proc.image_token_id, n_img)
        got = ds[i]
        assert (got["input_ids"], got["labels"]) == (ids, labels) == (mem[i]["input_ids"], mem[i]["labels"])
        assert ds.lengths[i] == len(ids) and (got["image"] is None) == (r.image is None)


def test_two_processes_share_one_build(tiny, data, tmp_path):
    "Two processes open the same file at once: one tokenises, the other waits on the lock and maps its result."
    cache = tmp_path / "c"
    code = ("import sys, json; from llavamed.train import SupervisedDataset; from llavamed.model import load_model;"
            "m, p = load_model(sys.argv[1], dtype='float32', device='cpu');"
            "ds = SupervisedDataset(sys.argv[2], p, sys.argv[3]);"
            "print(json.dumps({'warm': ds.warm, 'folder': str(ds.tokens.folder), 'n': len(ds)}))")
    d = tmp_path / "m"; save_model(*tiny, d)
    env = {**ENV, "LLAVAMED_CACHE": str(cache)}
    ps = [subprocess.Popen([sys.executable, "-c", code, str(d), str(data), str(data.parent / "images")], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in ps]
    assert all(p.returncode == 0 for p in ps), [o[1][-1500:] for o in outs]
    res = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sorted(r["warm"] for r in res) == [False, True] and res[0]["folder"] == res[1]["folder"]
    assert res[0]["n"] == res[1]["n"] == 32 and len(list((cache / "tokens").iterdir())) == 2  # entry + lock


def test_resume_and_a_second_run_use_the_cache(base_dir, data, tmp_path, monkeypatch):
    "Only a cache miss takes the build lock (creating its lock file): after the first run none appears."
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path / "c"))
    stage = T.StageConfig.load("instruct", global_batch_size=4, per_device_batch_size=4)
    kw = dict(model=base_dir, data=str(data), images=str(data.parent / "images"), num_workers=0, save_steps=1)
    T.train(stage, T.RunConfig(out=str(tmp_path / "a"), max_steps=1, **kw))
    tokens = tmp_path / "c" / "tokens"
    entry, = [p for p in tokens.iterdir() if p.is_dir()]
    (lock,) = tokens.glob("*.lock"); lock.unlink()
    stamp = (entry / "ids.bin").stat().st_mtime_ns
    assert T.train(stage, T.RunConfig(out=str(tmp_path / "a"), max_steps=2, resume=True, **kw)).steps == 2
    T.train(stage, T.RunConfig(out=str(tmp_path / "b"), max_steps=1, **kw))
    assert list(tokens.iterdir()) == [entry] and (entry / "ids.bin").stat().st_mtime_ns == stamp
    T.train(T.StageConfig.load(stage, template="vicuna_v1"), T.RunConfig(out=str(tmp_path / "v"), max_steps=1, **kw))
    assert len(list(tokens.glob("*.lock"))) == 1 and len([p for p in tokens.iterdir() if p.is_dir()]) == 2


# ---------------------------------------------------------------- mixtures, evaluation during training, logging

def test_data_mixture_through_the_cli_counts_each_source(base_dir, data, tmp_path):
    from llavamed.cli import main
    second = tmp_path / "second.json"
    recs = json.loads(data.read_text())[:10]
    second.write_text(json.dumps([{**r, "id": "b" + r["id"]} for r in recs]))
    rc = main(["train", "--stage", "finetune", "--model", base_dir, "--data", str(data), f"{second}:1.5",
               "--images", str(data.parent / "images"), "--out", str(tmp_path / "mix"), "--max-steps", "1",
               "--global-batch-size", "2", "--per-device-batch-size", "2", "--num-workers", "0", "--quiet"])
    assert rc in (0, None)
    sc = json.loads((tmp_path / "mix" / "stage_config.json").read_text())
    src = sc["dataset"]["sources"]
    assert (src[str(data)]["items"], src[str(second)]["items"], src[str(second)]["weight"]) == (32, 15, 1.5)
    assert sc["dataset"]["kept"] == 47 and sc["data"] == [str(data), f"{second}:1.5"]


def test_eval_every_n_steps_keeps_the_best_checkpoint(base_dir, data, tmp_path):
    stage = T.StageConfig.load("instruct", global_batch_size=4, per_device_batch_size=4, lr=1e-3)
    r = T.train(stage, T.RunConfig(model=base_dir, data=str(data), images=str(data.parent / "images"),
                                   eval_data=str(data), eval_steps=2, save_steps=2, keep_best=True,
                                   out=str(tmp_path / "ev"), max_steps=4, num_workers=0, quiet=True))
    rows = list(read_jsonl(tmp_path / "ev" / "eval_history.jsonl"))
    assert [row["step"] for row in rows] == [2, 4] and r.eval_loss == min(row["eval_loss"] for row in rows)
    best = min(rows, key=lambda row: row["eval_loss"])["step"]
    assert Path(r.best_checkpoint).name == f"checkpoint-{best}"
    with pytest.raises(ValueError, match="save_steps 3 must be a multiple of eval_steps 2"):
        T.RunConfig(eval_data="x.json", eval_steps=2, save_steps=3, keep_best=True)
    with pytest.raises(ValueError, match="keep_best: needs eval_data"): T.RunConfig(keep_best=True)


def test_report_to_is_checked_before_anything_is_written(base_dir, data, tmp_path):
    import importlib.util
    with pytest.raises(ValueError, match="RunConfig.report_to: expected one of"): T.RunConfig(report_to="mlflow")
    # a logger whose package this install lacks (the train extra brings tensorboard; wandb is the user's to add)
    missing = [m for m, mods in (("tensorboard", ("tensorboard", "tensorboardX")), ("wandb", ("wandb",)))
               if not any(importlib.util.find_spec(x) for x in mods)]
    if not missing: pytest.skip("tensorboard and wandb are both installed: no missing logger to refuse")
    with pytest.raises(ImportError, match=f"report_to {missing[0]}: the {missing[0]} package is not installed"):
        T.train("instruct", T.RunConfig(model=base_dir, data=str(data), images=str(data.parent / "images"),
                                        out=str(tmp_path / "tb"), report_to=missing[0], max_steps=1))
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------- trainer options and the dry run

def test_dry_run_plans_without_writing(base_dir, data, tmp_path, capsys):
    from llavamed.cli import main
    out = tmp_path / "earlier"; out.mkdir(); (out / "stage_config.json").write_text("{}")
    rc = main(["--json", "train", "--stage", "instruct", "--model", base_dir, "--data", str(data), "--images",
               str(data.parent / "images"), "--out", str(out), "--dry-run", "--deepspeed", "zero3",
               "--global-batch-size", "8", "--per-device-batch-size", "4", "--epochs", "2"])
    assert rc in (0, None)
    res = json.loads(capsys.readouterr().out)
    assert (res["steps"], res["gradient_accumulation_steps"], res["dataset"]["kept"]) == (8, 2, 32)  # 32 x 2 / 8
    ds = T.SupervisedDataset(data, T.load_model(base_dir, dtype="float32", device="cpu")[1], data.parent / "images")
    assert res["tokens"] == sum(ds.lengths) and res["longest"] == max(ds.lengths)
    mem = res["memory_gib"]
    assert mem["total_checkpointed"] < mem["total"] and mem["optimizer"] > 0
    assert [p.name for p in out.iterdir()] == ["stage_config.json"] and (out / "stage_config.json").read_text() == "{}"


def test_memory_estimate_partitions_as_zero_does():
    kw = dict(params=1000 * 2 ** 20, trainable=500 * 2 ** 20, batch=1, seq=1, hidden=1, layers=1, vocab=1)
    z2, z3 = T.memory_estimate(zero=2, world=4, **kw), T.memory_estimate(zero=3, world=4, **kw)
    assert (z2["weights"], z3["weights"]) == pytest.approx((2000 / 1024, 500 / 1024), rel=1e-3)  # ZeRO-3 splits weights
    assert z2["gradients"] == z3["gradients"] == pytest.approx(250 / 1024, rel=1e-3)
    assert z2["optimizer"] == pytest.approx(1500 / 1024, rel=1e-3)  # 12 bytes per trainable parameter, over 4
    off = T.memory_estimate(zero=3, world=4, offload=True, **kw)
    assert off["weights"] == off["optimizer"] == 0


def test_trainer_options_reach_the_run(base_dir, data, tmp_path):
    stage = T.StageConfig.load("instruct", global_batch_size=4, per_device_batch_size=4, scheduler="linear",
                               lora_targets="q_proj,v_proj", lora_r=4, lora_alpha=8)
    r = T.train(stage, T.RunConfig(model=base_dir, data=str(data), images=str(data.parent / "images"), lora=True,
                                   out=str(tmp_path / "o"), attention="eager", precision="fp32", max_steps=2,
                                   num_workers=0, save_steps=100, quiet=True))
    sc = json.loads((tmp_path / "o" / "stage_config.json").read_text())
    assert (sc["attention"], sc["scheduler"], sc["lora_targets"], sc["precision"]) == ("eager", "linear", ["q_proj", "v_proj"], "fp32")
    ad = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert "(q_proj|v_proj)" in ad["target_modules"] and r.steps == 2
    with pytest.raises(ValueError, match="StageConfig.scheduler: expected one of"): T.StageConfig(scheduler="step")
    with pytest.raises(ValueError, match="RunConfig.precision: expected one of"): T.RunConfig(precision="fp8")


def test_tokenize_command_fills_the_cache_a_run_then_maps(base_dir, data, tmp_path, monkeypatch, capsys):
    from llavamed.cli import main
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path / "c"))
    assert main(["--json", "tokenize", "--data", str(data), "--model", base_dir, "--stage", "align"]) in (0, None)
    res = json.loads(capsys.readouterr().out)
    assert (res["warm"], res["records"], res["dropped"]) == (False, 32, {})
    tokens = tmp_path / "c" / "tokens"
    (lock,) = tokens.glob("*.lock"); lock.unlink()  # only a cache miss takes the build lock again
    T.train("align", T.RunConfig(model=base_dir, data=str(data), images=str(data.parent / "images"), max_steps=1,
                                 out=str(tmp_path / "o"), num_workers=0, quiet=True))
    assert not list(tokens.glob("*.lock")) and [p.name for p in tokens.iterdir()] == [Path(res["folder"]).name]
    assert main(["tokenize", "--data", str(tmp_path / "none.json"), "--model", base_dir]) == 2


def test_tokenize_refuses_an_empty_or_broken_file(tmp_path, capsys):
    "`llavamed tokenize` gives train's verdict: a file with nothing to train on is one line and exit 2, not a success."
    from llavamed.cli import main
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "broken.json").write_text('[{"id": "x", "conversations": [')
    for name, said in (("empty.json", "no trainable records among 0"), ("broken.json", "malformed record x2")):
        capsys.readouterr()
        assert main(["tokenize", "--data", str(tmp_path / name), "--model", "tiny", "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("llavamed tokenize: error:") and said in err and "\n" not in err, err


def test_token_cache_files_are_the_same_from_one_process_or_a_pool(tiny, data, tmp_path):
    "The pool sends rows as tuples and gets one blob per chunk back: the files equal the in-process build's."
    from llavamed.core import Sample, Turn
    _, proc = tiny
    recs = T.load_records(data) + [Sample("bad", [Turn("human", "<image> <image> two?"), Turn("gpt", "No.")], "a.png"),
                                   Sample("text", [Turn("human", "Define nodule."), Turn("gpt", "A small lesion.")])]
    tpl = T.resolve_template(proc)
    built = {}
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"; folder.mkdir()
        cache = T.build_token_cache(recs * 3, proc, tpl, 2048, folder, workers=workers)  # > one pool chunk
        built[workers] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        assert len(cache) == 3 * (len(recs) - 1) and cache.meta["drops"][0]["count"] == 3
    assert built[1] == built[2]
