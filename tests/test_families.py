"Mechanism tests of llavamed.families: the family table, tiny presets, label masks, stage freezing, bad input."
import dataclasses
import pytest

torch = pytest.importorskip("torch")
from PIL import Image
from llavamed.core import IGNORE_INDEX, Sample
from llavamed.families import (FAMILIES, PART_NAMES, TINY_PRESETS, build_family, check_images, family_of, part_of,
                               family_tokens, image_tokens, lora_targets, parts, record_messages, require,
                               set_stage)
from families_util import missing as _missing, one_thread, preset_params, supervised_runs as _runs  # noqa: F401 (a fixture)

TEXTS = ["The chest X-ray shows a nodule in the left lung.", "Is there a pleural effusion? No.",
         "Axial CT of the abdomen with a mass on the right side.", "What modality is this? MRI of the brain."] * 5
REPLIES = ["A chest X-ray.", "No effusion.", "The left lung."]
RECORD = {"id": "r1", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": REPLIES[0]},
    {"from": "human", "value": "Any effusion?"}, {"from": "gpt", "value": REPLIES[1]},
    {"from": "human", "value": "Which side?"}, {"from": "gpt", "value": REPLIES[2]}]}




PRESETS = preset_params(TINY_PRESETS)




_BUILT = {}

def _tiny(preset):
    "The preset built once per test module (a fresh copy of the weights for tests that train)."
    if preset not in _BUILT: _BUILT[preset] = build_family(preset, tokenizer_texts=TEXTS, vocab_size=400)
    return _BUILT[preset]


def _image(size=(100, 70)):
    im = Image.new("RGB", size, (200, 30, 30))
    im.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 3))
    return im


def test_table_rows_name_installed_classes():
    import transformers
    for fam in FAMILIES.values():
        assert hasattr(transformers, fam.model_class) and hasattr(transformers, fam.processor_class), fam.name
        assert set(PART_NAMES) <= set(dataclasses.asdict(fam))
    assert family_of("idefics3").name == "smolvlm" and family_of({"model_type": "qwen2_5_vl"}).name == "qwen2_5_vl"
    assert [family_of(p).name for p in TINY_PRESETS] == ["llava", "qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm",
                                                         "llava_onevision"]


@pytest.mark.parametrize("preset", PRESETS)
def test_parts_cover_every_parameter(preset):
    model, _ = _tiny(preset)
    groups = parts(model)
    names = [n for g in groups.values() for n in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each in exactly one part
    assert all(groups[p] for p in PART_NAMES), {p: len(g) for p, g in groups.items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_saved_preset_loads_in_vanilla_transformers_and_generates(preset, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model, proc = _tiny(preset)
    model.save_pretrained(tmp_path); proc.save_pretrained(tmp_path)
    back = AutoModelForImageTextToText.from_pretrained(tmp_path)
    back_proc = AutoProcessor.from_pretrained(tmp_path)
    assert type(back) is type(model) and type(back_proc) is type(proc)
    assert back_proc.chat_template == proc.chat_template
    msgs = record_messages(dict(RECORD, conversations=RECORD["conversations"][:1]), family_of(model))
    text = back_proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    back_proc.tokenizer.padding_side = "left"
    batch = back_proc(text=[text, text], images=[[_image()], [_image((70, 100))]], return_tensors="pt",
                      padding=True)
    out = back.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)
    ref = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)  # the same weights came back


@pytest.mark.parametrize("preset", PRESETS)
def test_supervised_tokens_are_the_replies_with_images_present(preset):
    model, proc = _tiny(preset)
    fam, tok, im = family_of(model), proc.tokenizer, _image()
    got = family_tokens(RECORD, proc, [im])
    msgs = record_messages(RECORD, fam)
    ref = proc(text=[proc.apply_chat_template(msgs, tokenize=False)], images=[im])["input_ids"][0]
    assert got["input_ids"] == list(ref)  # exactly the processor's own tokens, images expanded
    runs = _runs(tok, got["labels"])
    # SmolVLM's and LLaVA's templates put the space before a reply inside the reply's first token
    assert [r.lstrip() for r in runs] == [r + fam.end_of_turn for r in REPLIES]
    image_id = tok.convert_tokens_to_ids(fam.image_token)
    n_image = got["input_ids"].count(image_id)
    assert n_image == image_tokens(proc, im.size) > 0
    assert all(l == IGNORE_INDEX for t, l in zip(got["input_ids"], got["labels"]) if t == image_id)


@pytest.mark.parametrize("preset", PRESETS)
def test_stage1_step_leaves_tower_and_lm_bit_identical(preset):
    model, proc = build_family(preset, tokenizer_texts=TEXTS, vocab_size=400)  # fresh: this test trains it
    counts = set_stage(model, "align")
    assert set(counts) == {"connector"} and counts["connector"] > 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    toks = family_tokens(RECORD, proc, [_image()])
    inputs = proc(text=[proc.apply_chat_template(record_messages(RECORD, family_of(model)), tokenize=False)],
                  images=[_image()], return_tensors="pt")
    for _ in range(2):
        model(**inputs, labels=torch.tensor([toks["labels"]])).loss.backward()
        opt.step(); opt.zero_grad()
    groups = parts(model)
    for part in ("tower", "lm"):
        assert all(torch.equal(before[n], p) for n, p in groups[part].items()), f"{preset}: {part} moved"
    assert any(not torch.equal(before[n], p) for n, p in groups["connector"].items()), f"{preset}: connector still"
    counts = set_stage(model, "instruct")
    assert set(counts) == {"connector", "lm"}
    assert not any(p.requires_grad for p in groups["tower"].values())


def test_llava_masks_match_the_training_tokenizer():
    "For LLaVA the family path and llavamed.train's tokenize_sample give the same ids and labels."
    from llavamed.train import image_token_count, tokenize_sample
    model, proc = _tiny("tiny")
    got = family_tokens(RECORD, proc, [_image()])
    ref, why = tokenize_sample(Sample.from_json(RECORD), proc, n_image_tokens=image_token_count(proc))
    assert why is None and (got["input_ids"], got["labels"]) == (ref["input_ids"], ref["labels"])


def test_several_images_in_marker_order():
    rec = {"id": "ct_1", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "Before: <image> After: <image> What changed?"},
        {"from": "gpt", "value": "The mass shrank."}]}
    content = record_messages(rec, "gemma3")[0]["content"]
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    _, proc = _tiny("tiny-gemma3")
    got = family_tokens(rec, proc, [_image(), _image((64, 64))])
    assert got["input_ids"].count(proc.tokenizer.image_token_id) == 2 * 16
    assert _runs(proc.tokenizer, got["labels"]) == ["The mass shrank.<end_of_turn>"]


def test_bad_input_errors_name_the_record_or_family():
    with pytest.raises(ValueError, match="model type 'mllama' is not a known family"): family_of("mllama")
    with pytest.raises(ValueError, match="preset 'tiny-mllama'"): build_family("tiny-mllama")
    lacking = dataclasses.replace(FAMILIES["qwen2_5_vl"], name="qwen9_vl",
                                  model_class="Qwen9VLForConditionalGeneration")
    with pytest.raises(ValueError, match=r"family qwen9_vl: transformers [\d.]+ has no Qwen9VLForCondition"):
        require(lacking)
    three = {"id": "p7", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "A CT."}]}
    with pytest.raises(ValueError, match="record 'p7': 2 images but 1 <image> markers"):
        record_messages(three, "gemma3")
    with pytest.raises(ValueError, match="record 'p7': 2 images, but family llava takes at most 1"):
        record_messages(three, "llava")
    model, proc = _tiny("tiny-gemma3")
    with pytest.raises(ValueError, match="record 'r1' image 1: 7x30 px is smaller than family gemma3's 8 px"):
        check_images(Sample.from_json(RECORD), [_image((7, 30))], model.config)
    with pytest.raises(ValueError, match="record 'r1': 1 images named, 2 given"):
        family_tokens(RECORD, proc, [_image(), _image()])


@pytest.mark.parametrize("preset,merged", [("tiny-qwen2_5_vl", 28), ("tiny-qwen3_vl", 32)])
def test_qwen_image_tokens_follow_image_size_and_small_images_are_refused(preset, merged):
    if _missing(preset): pytest.skip(f"{preset}'s processor needs torchvision (not installed)")
    model, proc = _tiny(preset)
    assert image_tokens(proc, (2 * merged, 2 * merged)) == 4 and image_tokens(proc, (4 * merged, 2 * merged)) == 8
    assert image_tokens(proc, (336, 336)) <= 64  # the preset's pixel cap
    small = merged - 4
    with pytest.raises(ValueError, match=f"{small}x{small} px is smaller than family {family_of(preset).name}'s "
                                         f"{merged} px patch"):
        check_images(Sample.from_json(RECORD), [_image((small, small))], model.config)


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_wraps_only_the_language_models_linear_layers(preset):
    from peft import LoraConfig, get_peft_model
    model, _ = build_family(preset, tokenizer_texts=TEXTS, vocab_size=400)
    targets = lora_targets(model)
    assert targets and all(part_of(family_of(model), t + ".") == "lm" for t in targets)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    wrapped = {n.split(".lora_A")[0].removeprefix("base_model.model.")
               for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert wrapped == set(targets)


def test_tokenizer_learns_the_synthetic_corpus(tmp_path):
    from llavamed.synth import corpus_texts, make_corpus
    make_corpus(str(tmp_path / "corpus"), n_train=8, n_test=4, n_chat=2, size=64, quiet=True)
    texts = corpus_texts(tmp_path / "corpus")
    model, proc = build_family("tiny-gemma3", tokenizer_texts=texts, vocab_size=500)
    tok = proc.tokenizer
    assert len(tok) == 500 and model.config.text_config.vocab_size == len(tok)
    fallback = build_family("tiny-gemma3", vocab_size=500)[1].tokenizer
    # the corpus' own words take fewer tokens with the tokenizer trained on them
    assert sum(len(tok(t).input_ids) for t in texts) < sum(len(fallback(t).input_ids) for t in texts)


@pytest.mark.skipif(bool(_missing("tiny-qwen2_5_vl")), reason="tiny-qwen2_5_vl's processor needs torchvision")
def test_processor_refusal_of_an_image_names_the_record():
    _, proc = _tiny("tiny-qwen2_5_vl")
    with pytest.raises(ValueError, match="record 'r1' image 1: family qwen2_5_vl's processor refused it"):
        family_tokens(RECORD, proc, [_image((6000, 28))])  # aspect ratio over 200: Qwen's resize refuses it
