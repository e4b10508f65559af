"Loading, saving, generation, predict and chat on every model family's tiny preset (and folders / hub ids of them)."
import json
from pathlib import Path
import pytest

torch = pytest.importorskip("torch")
from PIL import Image
from test_hub import _one_line, to_hub_cache
from llavamed.cli import main
from llavamed.core import IMAGE_TOKEN
from llavamed.families import TINY_PRESETS, family_of
from llavamed.model import load_model, resolve_model, save_model
from families_util import missing as _missing, one_thread, preset_params  # noqa: F401 (a fixture)

TEXTS = ["The chest X-ray shows a nodule in the left lung.", "Is there a pleural effusion? no yes",
         "Which organ is shown? liver spleen kidney", "Describe the figure: axial CT of the abdomen."] * 5
FAMILY_PRESETS = [p for p in TINY_PRESETS if p != "tiny"]




PRESETS = preset_params(FAMILY_PRESETS)




_LOADED = {}

def _tiny(preset):
    "The preset loaded once per module through `load_model` (as every command loads it)."
    if preset not in _LOADED:
        torch.manual_seed(0)
        _LOADED[preset] = load_model(preset, device="cpu", dtype="float32", tokenizer_texts=TEXTS)
    return _LOADED[preset]


def _image(size=(100, 70), colour=(200, 30, 30)):
    im = Image.new("RGB", size, colour)
    im.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 3))
    return im


def _logits(model, processor):
    "Logits of one image question (the same input for a model and its reloaded copy)."
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    enc = processor(text=[text], images=[[_image()]], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(): return model(**enc).logits


# ---------------------------------------------------------------- loading and saving

@pytest.mark.parametrize("preset", PRESETS)
def test_preset_saves_and_loads_back_as_a_folder(preset, tmp_path):
    from transformers import AutoModelForImageTextToText
    model, proc = _tiny(preset)
    assert resolve_model(preset) == preset and family_of(model).name == preset.removeprefix("tiny-")
    save_model(model, proc, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["llavamed"] == {"family": family_of(model).name, "template": family_of(model).name}
    assert resolve_model(tmp_path / "m") == tmp_path / "m"
    back, back_proc = load_model(tmp_path / "m", device="cpu", dtype="float32")
    assert type(back) is type(model) and type(back_proc) is type(proc)
    # one encoding for both: a saved processor may come back with the torchvision image backend
    assert torch.equal(_logits(back, back_proc), _logits(model, back_proc))
    vanilla = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")  # no llavamed needed
    assert torch.equal(_logits(vanilla, back_proc), _logits(model, back_proc))


def test_a_family_preset_loads_in_the_dtype_asked(tmp_path):
    model, _ = load_model("tiny-gemma3", device="cpu", dtype="bfloat16", tokenizer_texts=TEXTS)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
def test_a_family_hub_id_resolves_from_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, proc = _tiny("tiny-qwen2_5_vl")
    save_model(model, proc, tmp_path / "saved")
    snap = to_hub_cache(tmp_path / "saved", "org/tiny-qwen", tmp_path / "hf" / "hub")
    assert resolve_model("org/tiny-qwen") == snap
    back, back_proc = load_model("org/tiny-qwen", device="cpu", dtype="float32")
    assert torch.equal(_logits(back, back_proc), _logits(model, back_proc))


def _folder(tmp_path, model_type, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


@pytest.mark.parametrize("model_type", ["mllama", "made_up_vlm", "llama"])
def test_a_folder_of_an_unknown_family_is_one_line_naming_its_type(tmp_path, capsys, model_type):
    d = _folder(tmp_path, model_type)
    with pytest.raises(ValueError, match=f"model_type '{model_type}' is not a vision-language model family "
                                         f"llavamed knows \\(llava, qwen2_5_vl, qwen3_vl, gemma3, smolvlm, "
                                         f"llava_onevision\\)"):
        resolve_model(d)
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps([{"id": "q1", "conversations": [{"from": "human", "value": "Hi?"},
                                                              {"from": "gpt", "value": "yes"}]}]))
    assert main(["predict", "--model", str(d), "--data", str(vqa), "--out", str(tmp_path / "a.jsonl")]) == 2
    _one_line(capsys, f"model_type '{model_type}'", "llava_onevision")
    assert main(["chat", "--model", str(d), "--image", str(vqa), "--question", "Hi?"]) == 2
    _one_line(capsys, f"model_type '{model_type}'")
    assert not (tmp_path / "a.jsonl").exists()


def test_an_idefics3_folder_is_the_smolvlm_family(tmp_path):
    from llavamed.model import _folder_family
    assert _folder_family({"model_type": "idefics3"}, "x", "model").name == "smolvlm"


def test_a_family_preset_misspelt_lists_every_preset():
    with pytest.raises(ValueError, match="unknown preset 'tiny-gemma'.*'tiny-gemma3'.*'tiny-llava_onevision'"):
        resolve_model("tiny-gemma")


# ---------------------------------------------------------------- generation

def _conv(question, images=1):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}]


@pytest.mark.parametrize("preset", ["tiny", *PRESETS])
def test_batched_left_padded_greedy_answers_equal_one_at_a_time(preset):
    from llavamed.generate import generate_batch
    model, proc = _tiny(preset)
    several = family_of(model).max_images is None
    convs = [_conv("What is shown?"), _conv("Is there a nodule in the left lung of this patient?"),
             [{"role": "user", "content": "Name a lung finding."}]]
    imgs = [_image((100, 70)), _image((64, 96), (30, 140, 200)), None]
    if several:  # two images in one conversation, one image part each
        convs.append(_conv("Compare the two.", 2)); imgs.append([_image((80, 80)), _image((120, 60), (0, 90, 0))])
    batched = generate_batch(model, proc, convs, imgs, max_new_tokens=6, batch_size=len(convs))
    alone = [generate_batch(model, proc, [c], [i], max_new_tokens=6)[0] for c, i in zip(convs, imgs)]
    assert batched == alone and all(isinstance(a, str) for a in batched)


@pytest.mark.parametrize("preset", PRESETS)
def test_generation_stops_at_the_familys_end_of_turn(preset):
    from llavamed.generate import encode_prompts, generation_kwargs
    model, proc = _tiny(preset)
    end = proc.tokenizer.convert_tokens_to_ids(family_of(model).end_of_turn)
    kw = generation_kwargs(model, proc, max_new_tokens=4)
    assert end in kw["eos_token_id"] and proc.tokenizer.eos_token_id in kw["eos_token_id"]
    enc = encode_prompts(model, proc, [_conv("What is shown?")], [_image()])
    assert all(v.dtype == model.dtype for v in enc.values() if v.is_floating_point())
    # a model whose every next token is the end of turn answers nothing and stops after one token
    with torch.no_grad():
        model.lm_head.weight.data, saved = torch.zeros_like(model.lm_head.weight), model.lm_head.weight.data
        bias = torch.full((model.lm_head.weight.shape[0],), -1e4); bias[end] = 1e4
        model.lm_head.bias = torch.nn.Parameter(bias)
    try: ids = model.generate(**enc, **kw)
    finally: model.lm_head.weight.data, model.lm_head.bias = saved, None
    assert ids.shape[1] == enc["input_ids"].shape[1] + 1 and ids[0, -1].item() == end


@pytest.mark.parametrize("preset", PRESETS)
def test_image_parts_and_images_must_agree(preset):
    from llavamed.generate import encode_prompts
    model, proc = _tiny(preset)
    with pytest.raises(ValueError, match="conversation 0: 2 image parts but 1 images given"):
        encode_prompts(model, proc, [_conv("Compare.", 2)], [_image()])
    with pytest.raises(ValueError, match="conversation 7: 1 image parts but 0 images given"):
        encode_prompts(model, proc, [_conv("What?")], [None], ids=[7])


def test_llava_takes_one_image_per_conversation():
    from llavamed.generate import encode_prompts
    model, proc = _tiny("tiny")
    with pytest.raises(ValueError, match="conversation 0: 2 images, but family llava takes at most 1"):
        encode_prompts(model, proc, [_conv("Compare.", 2)], [[_image(), _image()]])


# ---------------------------------------------------------------- predict and chat

def _vqa(tmp_path, sizes=((100, 70), (64, 96), (80, 80))):
    "images/ with a few pictures and vqa.json with questions about them (one per image, one text-only)."
    (tmp_path / "images").mkdir(exist_ok=True)
    for k, size in enumerate(sizes): _image(size, (40 * k, 90, 200 - 30 * k)).save(tmp_path / "images" / f"i{k}.png")
    recs = [{"id": f"q{k}", "image": f"i{k}.png", "answer_type": "CLOSED", "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\nIs the organ enlarged? ({k})"},
        {"from": "gpt", "value": "yes" if k % 2 else "no"}]} for k in range(len(sizes))]
    recs.append({"id": "text", "conversations": [{"from": "human", "value": "Name a lung finding."},
                                                 {"from": "gpt", "value": "a nodule"}]})
    (tmp_path / "vqa.json").write_text(json.dumps(recs))
    return tmp_path / "vqa.json"


def _at(tmp_path):
    return {"images": str(tmp_path / "images")}


def _answers(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("preset", PRESETS)
def test_predict_answers_a_vqa_file_with_every_family(preset, tmp_path):
    from llavamed.predict import predict
    model, proc = _tiny(preset)
    save_model(model, proc, tmp_path / "m")
    data = _vqa(tmp_path)
    res = predict(str(tmp_path / "m"), str(data), **_at(tmp_path),
                  out=str(tmp_path / "a.jsonl"), batch_size=4, max_new_tokens=3,
                  quiet=True, device="cpu", dtype="float32")
    assert (res.answered, res.family, res.exit_code) == (4, family_of(model).name, 0)
    rows = _answers(tmp_path / "a.jsonl")
    assert [r["question_id"] for r in rows] == ["q0", "q1", "q2", "text"]
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["metadata"]["image"] == "i0.png" and rows[3]["metadata"]["image"] is None
    blank = predict(str(tmp_path / "m"), str(data), **_at(tmp_path),
                    out=str(tmp_path / "b.jsonl"), batch_size=4, max_new_tokens=3,
                    quiet=True, device="cpu", dtype="float32", image_ablation="shuffle")
    assert blank.answered == 4
    assert [r["metadata"]["image"] for r in _answers(tmp_path / "b.jsonl")][:3] != ["i0.png", "i1.png", "i2.png"]


def test_predict_takes_a_family_preset_by_name_on_the_command_line(tmp_path, capsys):
    data = _vqa(tmp_path)
    assert main(["predict", "--model", "tiny-gemma3", "--data", str(data),
                 "--images", str(tmp_path / "images"), "--out", str(tmp_path / "a.jsonl"),
                 "--max-new-tokens", "2", "--quiet", "--device", "cpu", "--image-ablation", "noise"]) == 0
    rows = _answers(tmp_path / "a.jsonl")
    assert len(rows) == 4 and rows[0]["model_id"] == "tiny-gemma3"
    assert rows[0]["metadata"]["image_ablation"] == "noise"


@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
def test_a_record_with_an_image_list_is_answered_with_every_image(tmp_path):
    from llavamed.predict import predict
    data = _vqa(tmp_path)
    recs = json.loads(data.read_text())
    recs.append({"id": "pair", "image": ["i0.png", "i2.png"], "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{IMAGE_TOKEN}\nWhich is larger?"},
        {"from": "gpt", "value": "the first"}]})
    data.write_text(json.dumps(recs))
    model, proc = _tiny("tiny-qwen2_5_vl")
    save_model(model, proc, tmp_path / "m")
    kw = dict(batch_size=8, max_new_tokens=3, quiet=True, device="cpu", dtype="float32")
    res = predict(str(tmp_path / "m"), str(data), **_at(tmp_path),
                  out=str(tmp_path / "a.jsonl"), **kw)
    assert res.answered == 5
    pair = _answers(tmp_path / "a.jsonl")[-1]
    assert pair["question_id"] == "pair" and pair["metadata"]["image"] == ["i0.png", "i2.png"]
    from llavamed.generate import generate_batch
    from llavamed.images import load_image
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": "Which is larger?"}]}]
    back, back_proc = load_model(tmp_path / "m", device="cpu", dtype="float32")
    alone = generate_batch(back, back_proc, [msgs], [[load_image(tmp_path / "images" / n) for n in
                                                      ("i0.png", "i2.png")]], max_new_tokens=3)
    assert pair["text"] == alone[0]
    # LLaVA-1.5 takes one image: the pair stops the run before anything loads, naming the question
    with pytest.raises(ValueError, match="question pair: 2 images, but family llava takes at most 1 per question"):
        predict("tiny", str(data), **_at(tmp_path), out=str(tmp_path / "l.jsonl"), **kw)
    assert not (tmp_path / "l.jsonl").exists()


@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
def test_an_image_smaller_than_the_familys_patch_stops_the_run_naming_the_question(tmp_path, capsys):
    data = _vqa(tmp_path, sizes=((100, 70), (20, 90), (80, 80)))
    model, proc = _tiny("tiny-qwen2_5_vl")
    save_model(model, proc, tmp_path / "m")
    (tmp_path / "a.jsonl").write_text('{"question_id": "earlier", "text": "kept"}\n')
    before = (tmp_path / "a.jsonl").read_bytes()
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(data),
                 "--images", str(tmp_path / "images"), "--out", str(tmp_path / "a.jsonl"),
                 "--quiet", "--device", "cpu"]) == 2
    _one_line(capsys, "1 of 3 images are smaller than family qwen2_5_vl's 28 px patch, nothing was answered",
              "question q1 image 1: 20x90 px")
    assert (tmp_path / "a.jsonl").read_bytes() == before


@pytest.mark.parametrize("preset", ["tiny-gemma3", "tiny-smolvlm"])
def test_a_volume_becomes_k_slices_for_a_family_taking_several_images(preset, tmp_path):
    if _missing(preset): pytest.skip(f"{preset}'s processor needs {_missing(preset)}")
    np = pytest.importorskip("numpy"); nib = pytest.importorskip("nibabel")
    from llavamed.predict import predict
    data = _vqa(tmp_path)
    vol = np.stack([np.full((40, 48), 10.0 * z) for z in range(12)], axis=-1)  # 12 axial slices
    vol[5:20, 5:20, :] += 300.0
    nib.save(nib.Nifti1Image(vol.astype("float32"), np.eye(4)), tmp_path / "images" / "ct.nii.gz")
    recs = json.loads(data.read_text()) + [{"id": "ct", "image": "ct.nii.gz", "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\nIs there a lesion?"}, {"from": "gpt", "value": "yes"}]}]
    data.write_text(json.dumps(recs))
    model, proc = _tiny(preset)
    save_model(model, proc, tmp_path / "m")
    res = predict(str(tmp_path / "m"), str(data), **_at(tmp_path),
                  out=str(tmp_path / "a.jsonl"), batch_size=8, max_new_tokens=2,
                  quiet=True, device="cpu", dtype="float32", slices=3)
    assert (res.answered, res.volumes, res.slices) == (5, 1, 3)
    ct = _answers(tmp_path / "a.jsonl")[-1]
    assert ct["metadata"]["image"] == [f"ct.nii.gz#slice={i}/3" for i in (1, 2, 3)] and ct["metadata"]["slices"] == 3
    assert "1 questions show a volume as 3 slices" in str(res)
    # a resumed run may not slice its volumes otherwise
    with pytest.raises(ValueError, match="holds answers made with other settings"):
        predict(str(tmp_path / "m"), str(data), **_at(tmp_path),
                out=str(tmp_path / "a.jsonl"), quiet=True, device="cpu",
                max_new_tokens=2, slices=4)
    with pytest.raises(ValueError, match="ct.nii.gz.*12.*20|20.*12"):  # fewer slices than asked
        predict(str(tmp_path / "m"), str(data), **_at(tmp_path),
                out=str(tmp_path / "c.jsonl"), quiet=True, device="cpu",
                max_new_tokens=2, slices=20)
    assert not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize("preset", PRESETS)
def test_chat_answers_with_a_family_folder(preset, tmp_path, capsys):
    from llavamed.generate import chat, generate_batch
    model, proc = _tiny(preset)
    save_model(model, proc, tmp_path / "m")
    _image().save(tmp_path / "x.png")
    back, back_proc = load_model(tmp_path / "m", device="cpu", dtype="float32")
    expected = generate_batch(back, back_proc, [_conv("What is shown?")], [_image()], max_new_tokens=4)[0]
    capsys.readouterr()
    assert main(["chat", "--model", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--question",
                 "What is shown?", "--max-new-tokens", "4", "--no-stream", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == expected
    two = chat((back, back_proc), str(tmp_path / "x.png"), question="Again?", max_new_tokens=3, no_stream=True)
    assert len(two.answers) == 1


def test_a_family_folder_whose_tokenizer_outgrew_its_embeddings_is_refused(tmp_path):
    from transformers import AutoProcessor
    model, proc = _tiny("tiny-gemma3")
    save_model(model, proc, tmp_path / "m")
    grown = AutoProcessor.from_pretrained(tmp_path / "m")
    rows = model.get_input_embeddings().weight.shape[0]
    grown.tokenizer.add_tokens([f"<extra_{i}>" for i in range(rows - len(grown.tokenizer) + 3)])
    grown.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"the tokenizer has {rows + 3} tokens but the embeddings {rows} rows"):
        load_model(tmp_path / "m", device="cpu")


# ---------------------------------------------------------------- build --preset

@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
def test_build_writes_a_family_preset_as_a_folder_every_command_loads(tmp_path, capsys):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    assert main(["--json", "build", "--preset", "tiny-qwen2_5_vl", "--out", str(tmp_path / "q")]) == 0
    built = json.loads(capsys.readouterr().out)
    assert (built["values"] if "values" in built else built)["template"] == "qwen2_5_vl"
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "q")).__name__ == \
        "Qwen2_5_VLForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(tmp_path / "q")).__name__ == "Qwen2_5_VLProcessor"
    data = _vqa(tmp_path)
    assert main(["predict", "--model", str(tmp_path / "q"), "--data", str(data), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "a.jsonl"), "--max-new-tokens", "2", "--quiet", "--device", "cpu"]) == 0
    assert len(_answers(tmp_path / "a.jsonl")) == 4
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert main(["build", "--preset", "tiny-gemma3", "--out", str(tmp_path / "q")]) == 2  # not a new folder
    _one_line(capsys, "exists and is not empty")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == before


def test_build_preset_refuses_parts_and_unknown_presets_in_one_line(tmp_path, capsys):
    assert main(["build", "--preset", "tiny-gemma3", "--vision", "org/clip", "--out", str(tmp_path / "x")]) == 2
    _one_line(capsys, "build takes --preset NAME or --vision and --lm, not both")
    assert main(["build", "--preset", "tiny-mllama", "--out", str(tmp_path / "x")]) == 2
    _one_line(capsys, "--preset 'tiny-mllama': expected one of tiny, tiny-qwen2_5_vl")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("change, needle", [
    ({"model_class": "Gemma9ForConditionalGeneration"},
     "has no Gemma9ForConditionalGeneration; install a transformers"),
    ({"needs": ("a_package_not_installed",)}, "its processor needs a_package_not_installed, not installed")])
def test_a_family_this_environment_cannot_run_is_one_line(tmp_path, capsys, monkeypatch, change, needle):
    "A row whose class the installed transformers lacks, or whose package is missing: `families.require`'s line."
    import dataclasses
    from llavamed.families import FAMILIES
    monkeypatch.setitem(FAMILIES, "gemma3", dataclasses.replace(FAMILIES["gemma3"], **change))
    d = _folder(tmp_path, "gemma3")
    with pytest.raises(ValueError, match=needle): resolve_model(d)
    _image().save(tmp_path / "x.png")
    assert main(["chat", "--model", str(d), "--image", str(tmp_path / "x.png"), "--question", "Hi?"]) == 2
    _one_line(capsys, "family gemma3", needle)


def _nifti(path, depth=12):
    np = pytest.importorskip("numpy"); nib = pytest.importorskip("nibabel")
    vol = np.stack([np.full((40, 48), 10.0 * z) for z in range(depth)], axis=-1)
    vol[5:20, 5:20, :] += 300.0
    nib.save(nib.Nifti1Image(vol.astype("float32"), np.eye(4)), path)
    return path


def test_chat_shows_a_volume_as_slices_to_a_family_taking_several_images(tmp_path, capsys):
    from llavamed.generate import chat, generate_batch
    from llavamed.images import load_image, volume_slices
    ct = _nifti(tmp_path / "ct.nii.gz")
    gemma = _tiny("tiny-gemma3")
    res = chat(gemma, str(ct), question="Is there a lesion?", max_new_tokens=4, no_stream=True, slices=3)
    assert res.answers == generate_batch(*gemma, [_conv("Is there a lesion?", 3)], [volume_slices(ct, 3)],
                                         max_new_tokens=4)
    llava = _tiny("tiny")  # one image: the volume's middle slice, as before
    one = chat(llava, str(ct), question="Is there a lesion?", max_new_tokens=4, no_stream=True, slices=3)
    assert one.answers == generate_batch(*llava, [_conv("Is there a lesion?")], [load_image(ct)], max_new_tokens=4)
    with pytest.raises(ValueError, match="slices=0: must be >= 1"):
        chat(gemma, str(ct), question="?", slices=0)


def test_an_image_list_without_a_marker_per_image_is_a_counted_skip_naming_the_record(tmp_path):
    from llavamed.predict import predict
    data = _vqa(tmp_path)
    ok = {"from": "gpt", "value": "the first"}
    recs = json.loads(data.read_text()) * 20  # enough good records that one bad one stays under the 2% share
    recs = [dict(r, id=f"{r['id']}-{k}") for k, r in enumerate(recs)]
    recs.append({"id": "short", "image": ["i0.png", "i2.png"], "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\nWhich is larger?"}, ok]})
    data.write_text(json.dumps(recs))
    res = predict("tiny-gemma3", str(data), **_at(tmp_path), out=str(tmp_path / "a.jsonl"), max_new_tokens=1,
                  batch_size=16, quiet=True, device="cpu", limit=2)
    assert res.bad_records == "1 bad: image_markers at record short (2 images but 1 <image> markers) (1)"
    assert res.questions == 80 and "short" not in {r["question_id"] for r in _answers(tmp_path / "a.jsonl")}
    with pytest.raises(ValueError, match="image_markers"):  # past the share: the run stops, nothing written
        data.write_text(json.dumps(recs[:3] + recs[-1:]))
        predict("tiny-gemma3", str(data), **_at(tmp_path), out=str(tmp_path / "b.jsonl"), quiet=True, device="cpu")
    assert not (tmp_path / "b.jsonl").exists()
