"Mechanism tests of llavamed.model: composition vs transformers' reference, templates, save/load, stage 0."
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest
from conftest import save_tiny_parts

torch = pytest.importorskip("torch")
from PIL import Image
from llavamed.core import IMAGE_TOKEN, Sample
from llavamed.model import (PRESETS, ModelConfig, TEMPLATES, build_model, load_model, save_model, sample_to_messages,
                            set_template, template_name, pretrain_tower, train_tokenizer)

TEXTS = ["The chest X-ray shows a nodule in the left lung.", "Is there a pleural effusion? No.",
         "Axial CT of the abdomen with a mass on the right side.", "What modality is this? MRI of the brain."] * 5


def _img(colour=(200, 30, 30), size=(80, 60)):
    im = Image.new("RGB", size, colour)
    im.paste((255, 255, 255), (0, 0, size[0] // 2, size[1] // 3))
    return im


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models run fastest on one thread, above all on a shared, oversubscribed CPU."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(one_thread):
    torch.manual_seed(0)
    return build_model("tiny", tokenizer_texts=TEXTS)


def _inputs(proc, img=None, template=None):
    rec = {"id": "1", "image": "1.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is shown?"},
                                                          {"from": "gpt", "value": "A chest X-ray."}]}
    msgs = sample_to_messages(rec, image=img or _img())
    return proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                    return_assistant_tokens_mask=True)


def test_forward_equals_reference(tiny):
    "Our composed model == transformers' Llava on the same weights == a hand-spliced tower/projector/LM forward."
    from transformers import LlavaForConditionalGeneration
    model, proc = tiny
    enc = _inputs(proc)
    ids, pix = enc["input_ids"], enc["pixel_values"]
    ref = LlavaForConditionalGeneration(model.config).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        ours = model(input_ids=ids, pixel_values=pix).logits
        theirs = ref(input_ids=ids, pixel_values=pix).logits
        # by hand: layer -2 of the tower, CLS dropped, MLP projector, spliced at the image tokens
        hs = model.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]  # (1, 64, d_v)
        p = model.model.multi_modal_projector
        feats = p.linear_2(torch.nn.functional.gelu(p.linear_1(hs)))  # (1, 64, d_lm)
        emb = model.model.language_model.embed_tokens(ids).clone()
        pos = (ids[0] == model.config.image_token_id).nonzero()[:, 0]
        assert len(pos) == 64 and bool((pos.diff() == 1).all())
        emb[0, pos] = feats[0]
        manual = model.lm_head(model.model.language_model(inputs_embeds=emb).last_hidden_state)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours, manual, rtol=1e-4, atol=1e-5)


def test_image_token_count_error_names_both_counts(tiny):
    from llavamed.model import check_image_tokens
    model, proc = tiny
    enc = _inputs(proc)
    ids = torch.cat([enc["input_ids"], enc["input_ids"][:, :-5]], 1)[:, : enc["input_ids"].shape[1] + 5]
    check_image_tokens(enc["input_ids"], 1, model.config)
    with pytest.raises(ValueError, match=r"sample 'b': 64 image tokens, expected 128 \(2 image\(s\) x 64 features\)"):
        check_image_tokens(torch.cat([enc["input_ids"]] * 2), [1, 2], model.config, ids=["a", "b"])
    with pytest.raises(ValueError, match=r"sample 0: 61 image tokens, expected 64"):
        check_image_tokens(enc["input_ids"][:, 11:], 1, model.config)
    with pytest.raises(Exception, match=r"tokens: 61"):  # transformers' own check fires too
        model(input_ids=enc["input_ids"][:, 11:], pixel_values=enc["pixel_values"])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_assistant_mask_covers_replies_only(tiny, name):
    model, proc = tiny
    old = proc.chat_template
    try:
        set_template(proc, name)
        rec = Sample.from_json({"id": "2", "image": "2.jpg", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A CT scan."},
            {"from": "human", "value": "Which side?"}, {"from": "gpt", "value": "The left side."}]})
        msgs = sample_to_messages(rec, image=_img())
        if name == "plain": msgs = msgs[:2]
        enc = proc.apply_chat_template(msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                       return_assistant_tokens_mask=True)
        ids, mask = enc["input_ids"][0], enc["assistant_masks"][0].bool()
        text = proc.tokenizer.decode(ids[mask])
        expect = {"plain": "A CT scan.</s>"}.get(name, " A CT scan.</s> The left side.</s>")
        assert text == expect
        assert int((ids == model.config.image_token_id).sum()) == 64
        assert not bool(mask[ids == model.config.image_token_id].any())
    finally: proc.chat_template = old


def test_sample_to_messages_rejects_misplaced_image():
    bad = {"id": "x9", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a <image>"}]}
    with pytest.raises(ValueError, match="record 'x9' turn 1"): sample_to_messages(bad)
    text_only = sample_to_messages({"id": "t", "conversations": [{"from": "human", "value": "q"},
                                                                  {"from": "gpt", "value": "a"}]})
    assert text_only[0]["content"] == [{"type": "text", "text": "q"}]


NO_LLAVAMED = textwrap.dedent("""
    import sys, torch, numpy as np
    from PIL import Image
    from transformers import LlavaForConditionalGeneration, AutoProcessor
    d = sys.argv[1]
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()
    proc = AutoProcessor.from_pretrained(d)
    img = Image.open(d + "/probe.png")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(text=prompt, images=img, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(): logits = model(**enc).logits
    torch.testing.assert_close(logits, torch.from_numpy(np.load(d + "/expected.npy")))
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert not any(m.startswith("llavamed") for m in sys.modules), "llavamed was imported"
    print("OK", type(proc).__name__, proc.image_processor.do_pad, prompt.count("[INST]"))
""")


def test_save_load_without_llavamed(tiny, tmp_path):
    import numpy as np
    model, proc = tiny
    save_model(model, proc, tmp_path)
    img = _img(size=(70, 50)); img.save(tmp_path / "probe.png")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    enc = proc(text=proc.apply_chat_template(msgs, add_generation_prompt=True), images=img, return_tensors="pt",
               add_special_tokens=False)
    with torch.no_grad(): np.save(tmp_path / "expected.npy", model(**enc).logits.numpy())
    assert (tmp_path / "model.safetensors").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["llavamed"] == {"projector": "mlp2x_gelu", "family": "llava", "template": "mistral_instruct",
                               "aspect": "pad"}
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", NO_LLAVAMED, str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK LlavaProcessor True 1" in r.stdout


def test_linear_projector_round_trip(tmp_path):
    torch.manual_seed(1)
    model, proc = build_model("tiny", tokenizer_texts=TEXTS, projector="linear", template="vicuna_v1", aspect="crop")
    assert not hasattr(model.model.multi_modal_projector, "linear_2")
    enc = _inputs(proc)
    enc.pop("assistant_masks")
    with torch.no_grad(): before = model(**enc).logits
    save_model(model, proc, tmp_path)
    m2, p2 = load_model(tmp_path, device="cpu")
    assert type(m2).__name__ == "LlavaLinearForConditionalGeneration"
    assert template_name(p2) == "vicuna_v1" and p2.image_processor.do_pad is False
    with torch.no_grad(): torch.testing.assert_close(m2(**enc).logits, before)


def test_build_from_paths_adds_tokens_with_mean_rows(tmp_path):
    "Real-size presets load parts from paths: a tokenizer without <image>/<pad> gains them, new rows = mean row."
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    # a tokenizer as released LMs ship it: no <image> token, no pad
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=350, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert IMAGE_TOKEN not in tok.get_vocab() and tok.pad_token is None
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    lm.save_pretrained(tmp_path / "lm"); tok.save_pretrained(tmp_path / "lm")
    CLIPVisionModel(CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    n0 = len(tok)
    emb0 = lm.get_input_embeddings().weight.detach().clone()
    cfg = ModelConfig(vision=str(tmp_path / "clip"), lm=str(tmp_path / "lm"), dtype="float32")
    model, proc = build_model(cfg)
    n1 = len(proc.tokenizer)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] == n1 and model.config.image_token_id >= n0
    torch.testing.assert_close(emb[:n0], emb0)
    assert proc.tokenizer.pad_token is not None
    assert model.config.image_seq_length == 4
    # mean-initialised new rows sit at the mean of the old rows (transformers samples around it)
    assert float((emb[n0:] - emb0.mean(0)).norm(dim=-1).max()) < float((emb0 - emb0.mean(0)).norm(dim=-1).mean())


def test_pretrain_tower_learns_and_freezes(tiny, tmp_path):
    model, proc = tiny
    labels = {}
    for i in range(48):
        c, box = i % 2, (i // 2) % 2
        im = Image.new("RGB", (64, 64), (220, 20, 20) if c else (20, 20, 220))
        if box: im.paste((255, 255, 255), (8, 8, 40, 40))
        im.save(tmp_path / f"p{i}.png")
        labels[f"p{i}"] = {"colour": c, "box": box} if i % 7 else {"colour": c}  # a missing head is ignored
    before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    try:
        (tmp_path / "labels.json").write_text(json.dumps(labels))
        h = pretrain_tower(model, tmp_path, str(tmp_path / "labels.json"), steps=40, lr=1e-3, batch_size=16, processor=proc, progress=False)
        assert h["classes"] == {"box": 2, "colour": 2}
        assert h["accuracy"]["colour"] >= 0.95 and h["accuracy"]["box"] >= 0.95, h["accuracy"]
        assert all(not p.requires_grad for p in model.model.vision_tower.parameters())
        assert any(not torch.equal(before[k], v) for k, v in model.model.vision_tower.state_dict().items())
    finally: model.model.vision_tower.load_state_dict(before)


def test_presets_are_valid_and_named():
    assert set(PRESETS) >= {"llava-med-v1.5", "llava-med-v1", "tiny"}
    v15 = PRESETS["llava-med-v1.5"]
    assert (v15.projector, v15.aspect, v15.template) == ("mlp2x_gelu", "pad", "mistral_instruct")
    assert (PRESETS["llava-med-v1"].projector, PRESETS["llava-med-v1"].template) == ("linear", "vicuna_v1")
    with pytest.raises(ValueError, match="ModelConfig.projector='mlp3x'"): ModelConfig(vision={}, lm={}, projector="mlp3x")
    with pytest.raises(ValueError, match="unknown preset 'huge'"): build_model("huge")


def _reference_llava_med(src, pil_image, prompt, ids=None):
    """The release's forward, rebuilt from its files: LLaVA's pad-to-square, CLIP preprocessing, tokens split at
    <image> with index -200, features of layer -2 without CLS through mm_projector, spliced where -200 stood."""
    import numpy as np
    from safetensors.torch import load_file
    from transformers import (AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, MistralConfig, MistralForCausalLM)
    cfg = json.loads((src / "config.json").read_text())
    sd = {}
    for f in sorted(src.glob("*.safetensors")): sd.update(load_file(f))
    pre = "model.vision_tower.vision_tower.vision_model."
    tower_sd = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    tower = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=3, num_attention_heads=2, hidden_act="quick_gelu"))
    tower.load_state_dict(tower_sd, strict=False)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    mlp.load_state_dict({k[len("model.mm_projector."):]: v for k, v in sd.items() if k.startswith("model.mm_projector.")})
    lm_cfg = MistralConfig(**{k: v for k, v in cfg.items() if not k.startswith(("mm_", "model_type", "architectures"))})
    lm = MistralForCausalLM(lm_cfg)
    lm.load_state_dict({k: v for k, v in sd.items() if k.startswith(("model.layers", "model.embed", "model.norm", "lm_head"))})
    lm.eval(); tower.eval()
    # LLaVA's expand2square with the mean colour, then CLIP: shortest edge 32 (bicubic), centre crop, normalise
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    w, h = pil_image.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), tuple(int(x * 255) for x in mean))
    sq.paste(pil_image, ((side - w) // 2, (side - h) // 2))
    arr = np.asarray(sq.resize((32, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    pix = torch.from_numpy(((arr - mean) / std).astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, 32, 32)
    if ids is None:  # tokenizer_image_token with the release's own tokenizer (given: a SentencePiece reference)
        tok = AutoTokenizer.from_pretrained(src)
        chunks = [tok(c, add_special_tokens=False).input_ids for c in prompt.split("<image>")]
        ids = [tok.bos_token_id] + chunks[0] + [-200] + chunks[1]
    with torch.no_grad():
        feats = mlp(tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:])[0]  # (16, 64)
        at = ids.index(-200)
        emb = lm.get_input_embeddings()
        x = torch.cat([emb(torch.tensor(ids[:at])), feats, emb(torch.tensor(ids[at + 1:]))])[None]
        logits = lm(inputs_embeds=x).logits
    return ids, pix, logits


def test_convert_release_checkpoint_matches_reference_forward(tmp_path):
    from llavamed.model import convert_checkpoint, tiny_release_checkpoint
    from llavamed.cli import main
    src = tiny_release_checkpoint(tmp_path / "release", seed=3)
    assert main(["convert", "--src", str(src), "--out", str(tmp_path / "hf")]) == 0
    model, proc = load_model(tmp_path / "hf", device="cpu")
    img = _img(size=(50, 30))
    prompt = "[INST] <image>\nIs there a nodule? [/INST]"
    ref_ids, ref_pix, ref_logits = _reference_llava_med(src, img, prompt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule?"}]}]
    rendered = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert rendered == "<s>" + prompt
    enc = proc(text=rendered, images=img, return_tensors="pt", add_special_tokens=False)
    torch.testing.assert_close(enc["pixel_values"], ref_pix, atol=1e-5, rtol=1e-5)
    at = ref_ids.index(-200)
    n = model.config.image_seq_length
    expect_ids = ref_ids[:at] + [model.config.image_token_id] * n + ref_ids[at + 1:]
    assert enc["input_ids"][0].tolist() == expect_ids  # same tokens as the release's tokenizer_image_token
    with torch.no_grad(): ours = model(input_ids=enc["input_ids"], pixel_values=ref_pix).logits
    vocab = ref_logits.shape[-1]  # the converted vocabulary adds <image> and <pad> at the end
    torch.testing.assert_close(ours[..., :vocab], ref_logits, rtol=1e-4, atol=1e-5)
    assert model.config.llavamed["converted_from"] == "tiny/llava-med-v1.5-layout"
    # and the converted checkpoint is plain transformers
    from transformers import LlavaForConditionalGeneration
    assert type(model) is LlavaForConditionalGeneration


def test_convert_rejects_non_llava(tmp_path):
    from llavamed.model import convert_checkpoint
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not a LLaVA checkpoint"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "out"))


def test_infer_clip_config_vit_l14_336():
    "The release's tower geometry (CLIP ViT-L/14-336) comes back from weight shapes alone (meta tensors: no memory)."
    from llavamed.model import infer_clip_config
    m = torch.device("meta")
    tower = {"embeddings.patch_embedding.weight": torch.empty(1024, 3, 14, 14, device=m),
             "embeddings.position_embedding.weight": torch.empty(577, 1024, device=m),
             "encoder.layers.0.mlp.fc1.weight": torch.empty(4096, 1024, device=m),
             **{f"encoder.layers.{i}.layer_norm1.weight": torch.empty(1024, device=m) for i in range(24)}}
    c = infer_clip_config(tower)
    assert (c["image_size"], c["patch_size"], c["num_attention_heads"], c["num_hidden_layers"], c["intermediate_size"]) \
        == (336, 14, 16, 24, 4096)


def test_start_from_existing_llava_checkpoint(tiny, tmp_path):
    "The paper's best setting starts from a general LLaVA: a checkpoint dir is a valid `build_model` source."
    model, proc = tiny
    save_model(model, proc, tmp_path / "general")
    m2, p2 = build_model(str(tmp_path / "general"), template="plain", aspect="crop")
    assert template_name(p2) == "plain" and p2.image_processor.do_pad is False
    assert m2.config.llavamed["template"] == "plain" and m2.config.llavamed["aspect"] == "crop"
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"only template/aspect overrides, got \['projector'\]"):
        build_model(str(tmp_path / "general"), projector="linear")


def test_saved_metadata_follows_processor_and_configs_are_shared(tiny, tmp_path):
    model, proc = tiny
    old = proc.chat_template
    try:
        save_model(model, set_template(proc, "plain"), tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["llavamed"]["template"] == "plain"
    finally:
        proc.chat_template = old
        model.config.llavamed = {**model.config.llavamed, "template": "mistral_instruct"}
    # one config object per part: an attention switch reaches the LM's layers
    assert model.config.text_config is model.model.language_model.config
    assert model.config.vision_config is model.model.vision_tower.config


def test_convert_release_without_tower_weights_takes_a_tower_path(tmp_path):
    from llavamed.model import convert_checkpoint, tiny_release_checkpoint
    full = tiny_release_checkpoint(tmp_path / "full", seed=5)
    bare = tiny_release_checkpoint(tmp_path / "bare", seed=5, with_tower=False)
    with pytest.raises(ValueError, match="pass --tower DIR, a local copy of openai/clip-vit-large-patch14-336"):
        convert_checkpoint(str(bare), str(tmp_path / "x"))
    convert_checkpoint(str(full), str(tmp_path / "a"))
    convert_checkpoint(str(bare), str(tmp_path / "b"), tower=str(bare / "clip"))
    (ma, pa), (mb, _) = load_model(tmp_path / "a", device="cpu"), load_model(tmp_path / "b", device="cpu")
    enc = _inputs(pa, _img(size=(40, 40)))
    enc.pop("assistant_masks")
    with torch.no_grad(): torch.testing.assert_close(ma(**enc).logits, mb(**enc).logits)


# ---------------------------------------------------------------- SentencePiece releases, servers, composition

def _release_ids_sentencepiece(src, prompt):
    "The release's tokenizer_image_token with the SentencePiece model itself: BOS, each chunk encoded alone, -200."
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    chunks = prompt.split("<image>")
    return [sp.bos_id()] + sp.encode(chunks[0]) + [-200] + sp.encode(chunks[1])


def test_convert_sentencepiece_release_matches_reference_forward(tmp_path, capsys):
    "The v1.5 layout with only a SentencePiece tokenizer.model converts; logits equal the release's own forward."
    from llavamed.cli import main
    from llavamed.model import tiny_release_checkpoint
    src = tiny_release_checkpoint(tmp_path / "release", seed=7, tokenizer="sentencepiece")
    assert (src / "tokenizer.model").is_file() and not (src / "tokenizer.json").exists()
    assert main(["convert", "--src", str(src), "--out", str(tmp_path / "hf")]) == 0
    model, proc = load_model(tmp_path / "hf", device="cpu")
    img = _img(size=(44, 30))
    prompt = "[INST] <image>\nIs there a nodule in the 2 views? [/INST]"
    ref_ids = _release_ids_sentencepiece(src, prompt)
    _, ref_pix, ref_logits = _reference_llava_med(src, img, prompt, ids=ref_ids)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there a nodule in the 2 views?"}]}]
    rendered = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert rendered == "<s>" + prompt
    enc = proc(text=rendered, images=img, return_tensors="pt", add_special_tokens=False)
    at, n = ref_ids.index(-200), model.config.image_seq_length
    assert enc["input_ids"][0].tolist() == ref_ids[:at] + [model.config.image_token_id] * n + ref_ids[at + 1:]
    with torch.no_grad(): ours = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits
    vocab = ref_logits.shape[-1]
    diff = float((ours[..., :vocab] - ref_logits).abs().max())
    with capsys.disabled(): print(f"\nSentencePiece release conversion: max abs logit difference {diff:.3g}")
    torch.testing.assert_close(ours[..., :vocab], ref_logits, rtol=1e-4, atol=1e-5)
    assert proc.tokenizer.pad_token == "<unk>"  # the release pads with <unk>; no new <pad> row


def test_converted_checkpoint_serves_with_vanilla_transformers(tmp_path):
    "No llavamed import: AutoProcessor + AutoModelForImageTextToText load the converted folder and generate."
    from llavamed.model import convert_checkpoint, tiny_release_checkpoint
    src = tiny_release_checkpoint(tmp_path / "release", seed=1, tokenizer="sentencepiece")
    convert_checkpoint(str(src), str(tmp_path / "hf"))
    out = tmp_path / "hf"
    proc_cfg = json.loads((out / "processor_config.json").read_text())
    assert {k: proc_cfg[k] for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")} \
        == {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    assert proc_cfg["image_processor"]["do_pad"] is True
    assert json.loads((out / "preprocessor_config.json").read_text())["do_pad"] is True  # for pre-5 loaders
    assert "[INST]" in (out / "chat_template.jinja").read_text()
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    _img(size=(40, 30)).save(tmp_path / "x.png")
    script = textwrap.dedent(f"""
        import sys, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor
        proc = AutoProcessor.from_pretrained({str(out)!r})
        model = AutoModelForImageTextToText.from_pretrained({str(out)!r})
        msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True)
        enc = proc(text=text, images=Image.open({str(tmp_path / 'x.png')!r}), return_tensors="pt",
                   add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=4, do_sample=False)
        assert "llavamed" not in sys.modules
        print(type(model).__name__, ids.shape[1] - enc["input_ids"].shape[1])
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    name, new = p.stdout.split()[-2:]
    assert name == "LlavaForConditionalGeneration" and 1 <= int(new) <= 4


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    "A tiny CLIP tower, a tiny SigLIP tower and a tiny Llama LM with its tokenizer, saved as downloads are."
    return save_tiny_parts(tmp_path_factory.mktemp("parts"), TEXTS)


@pytest.mark.parametrize("tower, tokens, strategy", [("clip", 64, "default"), ("siglip", 16, "full")])
def test_build_composes_a_llava_that_matches_its_parts(parts, tmp_path, tower, tokens, strategy):
    "`llavamed build`: the saved model's tower and LM are the parts' own weights; one image = grid^2 tokens."
    from transformers import AutoModel, AutoModelForCausalLM
    from llavamed.cli import main
    from llavamed.model import check_image_tokens
    out = tmp_path / "llava"
    assert main(["build", "--vision", str(parts / tower), "--lm", str(parts / "lm"), "--projector", "linear",
                 "--feature-layer", "-1", "--aspect", "crop", "--out", str(out)]) == 0
    model, proc = load_model(out, device="cpu")
    c = model.config
    assert (c.image_seq_length, c.vision_feature_select_strategy, c.vision_feature_layer) == (tokens, strategy, -1)
    assert c.llavamed["projector"] == "linear" and proc.image_processor.do_pad is False
    ref_tower, ref_lm = AutoModel.from_pretrained(parts / tower), AutoModelForCausalLM.from_pretrained(parts / "lm")
    for k, v in ref_tower.state_dict().items(): assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    lm_sd = model.model.language_model.state_dict()
    for k, v in ref_lm.model.state_dict().items():
        if "embed_tokens" not in k: assert torch.equal(lm_sd[k], v), k
    n_old = ref_lm.get_input_embeddings().weight.shape[0]
    assert torch.equal(lm_sd["embed_tokens.weight"][:n_old], ref_lm.get_input_embeddings().weight)
    enc = _inputs(proc)
    check_image_tokens(enc["input_ids"], 1, c)
    enc.pop("assistant_masks")
    with torch.no_grad(): assert model(**enc).logits.isfinite().all()


def test_build_then_train_align_starts_from_it(parts, tmp_path):
    "The paper's 'from Vicuna' setting: stage 1 trains the projector of a built model."
    from llavamed.cli import main
    assert main(["build", "--vision", str(parts / "clip"), "--lm", str(parts / "lm"), "--out", str(tmp_path / "llava")]) == 0
    (tmp_path / "images").mkdir()
    recs = []
    for i in range(4):
        _img(colour=(40 * i, 30, 200 - 40 * i)).save(tmp_path / "images" / f"f{i}.png")
        recs.append({"id": f"f{i}", "image": f"f{i}.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": f"A chest X-ray number {i}."}]})
    (tmp_path / "align.json").write_text(json.dumps(recs))
    rc = main(["train", "--stage", "align", "--model", str(tmp_path / "llava"), "--data", str(tmp_path / "align.json"),
               "--images", str(tmp_path / "images"), "--out", str(tmp_path / "stage1"), "--max-steps", "1",
               "--global-batch-size", "2", "--per-device-batch-size", "2", "--num-workers", "0"])
    assert rc in (0, None)
    assert (tmp_path / "stage1" / "config.json").is_file()


def test_build_with_a_template_file(parts, tmp_path):
    from llavamed.model import build
    good, bad = tmp_path / "chatml.jinja", tmp_path / "silent.jinja"
    good.write_text("{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}"
                    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
                    "{% endif %}{% endfor %}{% endif %}{% endfor %}")
    bad.write_text("{% for m in messages if m['role'] == 'user' %}{{ m['content'][-1]['text'] }}{% endfor %}")
    res = build(vision=str(parts / "clip"), lm=str(parts / "lm"), template=str(good), out=str(tmp_path / "a"))
    assert res.template == "custom"
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == good.read_text()
    with pytest.raises(ValueError, match="renders no assistant text"):
        build(vision=str(parts / "clip"), lm=str(parts / "lm"), template=str(bad), out=str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def _bad_lm(parts, tmp_path):
    "An LM folder whose tokenizer is larger than its embeddings (a tokenizer of another model)."
    import shutil
    d = tmp_path / "lm-mismatch"
    shutil.copytree(parts / "lm", d)
    cfg = json.loads((d / "config.json").read_text())
    from transformers import AutoTokenizer
    n = len(AutoTokenizer.from_pretrained(d))
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": n - 10}))
    return d, n


@pytest.mark.parametrize("case", ["no_config", "tokenizer_vs_embeddings", "not_a_vision_tower", "open_clip",
                                  "open_clip_with_config", "missing_hub_id", "out_not_empty"])
def test_build_bad_input_one_line_exit_2_nothing_written(parts, tmp_path, capsys, monkeypatch, case):
    from llavamed.cli import main
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf")); monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    vision, lm, out = str(parts / "clip"), str(parts / "lm"), tmp_path / "out"
    if case == "no_config":
        (tmp_path / "empty").mkdir(); vision, expect = str(tmp_path / "empty"), "no config.json"
    elif case == "tokenizer_vs_embeddings":
        d, n = _bad_lm(parts, tmp_path)
        lm, expect = str(d), f"the tokenizer has {n} tokens but the embeddings {n - 10} rows"
    elif case == "not_a_vision_tower": vision, expect = lm, "model_type 'llama' is not a vision tower"
    elif case == "open_clip":
        (tmp_path / "biomedclip").mkdir()
        (tmp_path / "biomedclip" / "open_clip_config.json").write_text("{}")
        vision, expect = str(tmp_path / "biomedclip"), "an open_clip model"
    elif case == "open_clip_with_config":  # a config.json too does not make it a transformers model
        (tmp_path / "biomedclip").mkdir()
        (tmp_path / "biomedclip" / "open_clip_config.json").write_text("{}")
        (tmp_path / "biomedclip" / "config.json").write_text(json.dumps({"architectures": ["CustomTextCLIP"]}))
        vision, expect = str(tmp_path / "biomedclip"), "an open_clip model (such as BiomedCLIP"
    elif case == "missing_hub_id": lm, expect = "org/no-such-lm", "hf download org/no-such-lm"
    else:
        out.mkdir(); (out / "keep.txt").write_text("earlier"); expect = "exists and is not empty"
    capsys.readouterr()
    assert main(["build", "--vision", vision, "--lm", lm, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and expect in err, err
    if case == "out_not_empty": assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else: assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left


def test_load_and_convert_refuse_tokenizer_larger_than_embeddings(tiny, tmp_path, capsys):
    from llavamed.cli import main
    from llavamed.model import tiny_release_checkpoint, train_sentencepiece
    model, proc = tiny
    save_model(model, proc, tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = len(proc.tokenizer) - 5
    (tmp_path / "saved" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"the tokenizer has {len(proc.tokenizer)} tokens but the embeddings"):
        load_model(tmp_path / "saved", device="cpu")
    src = tiny_release_checkpoint(tmp_path / "release", tokenizer="sentencepiece")
    train_sentencepiece(src, vocab_size=400)  # a larger tokenizer than the weights' 320 rows
    capsys.readouterr()
    assert main(["convert", "--src", str(src), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the tokenizer has 400 tokens but embed_tokens 320 rows" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "hf").exists()


def test_convert_and_load_name_a_folder_without_config(tmp_path, capsys):
    from llavamed.cli import main
    (tmp_path / "weights").mkdir()
    assert main(["convert", "--src", str(tmp_path / "weights"), "--out", str(tmp_path / "hf")]) == 2
    assert "weights: no config.json" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no config.json"): load_model(tmp_path / "weights", device="cpu")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_build_from_a_full_image_text_model_takes_its_vision_half(parts, tmp_path, family):
    "openai/clip-* and google/siglip-* ship the whole image-text model: build keeps the vision part's weights."
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
    from llavamed.model import build
    small = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=100)
    torch.manual_seed(1)
    full = (CLIPModel(CLIPConfig(vision_config=small, text_config=text, projection_dim=32)) if family == "clip"
            else SiglipModel(SiglipConfig(vision_config=small, text_config=text)))
    full.save_pretrained(tmp_path / family)
    res = build(vision=str(tmp_path / family), lm=str(parts / "lm"), out=str(tmp_path / "llava"))
    assert (res.vision_type, res.image_tokens) == (f"{family}_vision_model", 16)
    model, _ = load_model(tmp_path / "llava", device="cpu")
    ours = model.model.vision_tower.state_dict()
    theirs = full.vision_model.state_dict()  # embeddings.*, encoder.*, ...
    assert len(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
