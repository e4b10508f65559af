"Mechanism tests of llavamed.generate: batching invariance, stopping, seeded sampling, the chat CLI."
import io, sys
import pytest

torch = pytest.importorskip("torch")
from PIL import Image
from llavamed.model import build_model, save_model
from llavamed.generate import encode_prompts, generate_batch, chat

TEXTS = ["The chest X-ray shows a nodule in the left lung.", "Is there a pleural effusion? No.",
         "Axial CT of the abdomen with a mass on the right side.", "What modality is this? MRI of the brain."] * 5


@pytest.fixture(scope="module")
def tiny():
    n = torch.get_num_threads(); torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared CPU
    torch.manual_seed(0)
    yield build_model("tiny", tokenizer_texts=TEXTS)
    torch.set_num_threads(n)


def _conv(q, image=True):
    return [{"role": "user", "content": ([{"type": "image"}] if image else []) + [{"type": "text", "text": q}]}]


QS = ["What is this?", "Is there a nodule in the left lung? Answer yes or no.", "Describe the image.",
      "Which side is the mass on, and how large is it compared with the heart?", "Modality?", "Any effusion?",
      "Name the organ shown in this axial slice of the abdomen."]


def _imgs():
    return [Image.new("RGB", (40 + 9 * i, 64 - 3 * i), (30 * i, 200 - 20 * i, 90)) for i in range(len(QS))]


def test_batched_equals_alone_mixed_text_only(tiny):
    model, proc = tiny
    imgs = _imgs()
    imgs[2] = imgs[5] = None  # text-only conversations in the same call
    convs = [_conv(q, image=im is not None) for q, im in zip(QS, imgs)]
    batched = generate_batch(model, proc, convs, imgs, max_new_tokens=10, batch_size=4)
    alone = [generate_batch(model, proc, [c], [im], max_new_tokens=10)[0] for c, im in zip(convs, imgs)]
    assert batched == alone
    assert len(set(batched)) > 1  # different inputs, different outputs: the test can tell rows apart


def test_stops_at_template_end_and_returns_only_new_text(tiny):
    "Make the end token tie with a token the model emits later: greedy then stops there, returning the text before."
    model, proc = tiny
    tok = proc.tokenizer
    conv, img = _conv(QS[1]), _imgs()[1]
    enc = encode_prompts(model, proc, [conv], [img])
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:]
    ids = ids.tolist()
    k = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i] and ids[i] > tok.eos_token_id)
    head = model.lm_head.weight
    saved = head[tok.eos_token_id].detach().clone()
    try:
        with torch.no_grad(): head[tok.eos_token_id] = head[ids[k]]  # tie: argmax takes the lower id, the end token
        out = generate_batch(model, proc, [conv, _conv(QS[3])], [img, _imgs()[3]], max_new_tokens=12)
    finally:
        with torch.no_grad(): head[tok.eos_token_id] = saved
    assert out[0] == tok.decode(ids[:k], skip_special_tokens=True).strip()
    assert "[INST]" not in out[0] and QS[1] not in out[0]


def test_seeded_sampling_is_reproducible(tiny):
    model, proc = tiny
    convs, imgs = [_conv(q) for q in QS[:3]], _imgs()[:3]
    a = generate_batch(model, proc, convs, imgs, max_new_tokens=8, do_sample=True, temperature=1.0, seed=3)
    b = generate_batch(model, proc, convs, imgs, max_new_tokens=8, do_sample=True, temperature=1.0, seed=3)
    c = generate_batch(model, proc, convs, imgs, max_new_tokens=8, do_sample=True, temperature=1.0, seed=4)
    assert a == b and a != c


def test_bad_conversations_are_named(tiny):
    model, proc = tiny
    with pytest.raises(ValueError, match="conversation 1: ends with a 'assistant' turn"):
        generate_batch(model, proc, [_conv("a"), _conv("b") + [{"role": "assistant", "content": "x"}]],
                       [_imgs()[0], _imgs()[1]])
    with pytest.raises(ValueError, match="2 conversations but 1 images"):
        generate_batch(model, proc, [_conv("a"), _conv("b")], [None])


def test_chat_cli_answers_a_dicom_question(tiny, tmp_path, capsys):
    "`llavamed chat --question` on a DICOM file prints the same answer generate_batch gives, and exits 0."
    pydicom = pytest.importorskip("pydicom")
    from llavamed.cli import main
    from llavamed.images import load_image
    dcm = pydicom.data.get_testdata_file("CT_small.dcm")
    model, proc = tiny
    save_model(model, proc, tmp_path / "m")
    expected = generate_batch(model, proc, [_conv("What does the CT show?")], [load_image(dcm)], max_new_tokens=8)[0]
    capsys.readouterr()
    rc = main(["chat", "--model", str(tmp_path / "m"), "--image", dcm, "--question", "What does the CT show?",
               "--max-new-tokens", "8", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.strip() == expected
    assert main(["chat", "--model", str(tmp_path / "m"), "--image", dcm, "--question", "What does the CT show?",
                 "--max-new-tokens", "8", "--device", "cpu", "--no-stream"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_chat_interactive_multi_turn(tiny, tmp_path, monkeypatch, capsys):
    model, proc = tiny
    img = _imgs()[0]; img.save(tmp_path / "x.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\nAnd the side?\nexit\n"))
    res = chat((model, proc), str(tmp_path / "x.png"), max_new_tokens=5)
    answers = res.answers
    assert len(answers) == 2 and res.shown and str(res) == ""  # streamed: nothing left to print
    out = capsys.readouterr().out
    assert out.count("you> ") == 3 and out.count("assistant> ") == 2
    # the second turn is answered in the context of the first
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
             {"role": "user", "content": [{"type": "text", "text": "And the side?"}]}]
    assert answers[1] == generate_batch(model, proc, [first], [img], max_new_tokens=5)[0]


def test_cpu_float32_and_never_fp16_on_cpu(tiny, tmp_path):
    from llavamed.model import load_model
    model, proc = tiny
    save_model(model, proc, tmp_path)
    m, _ = load_model(tmp_path, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="float16 on CPU"): load_model(tmp_path, device="cpu", dtype="float16")


@pytest.mark.cuda
def test_cuda_bf16_generation(tiny, tmp_path):
    from llavamed.model import load_model
    model, proc = tiny
    save_model(model, proc, tmp_path)
    m, p = load_model(tmp_path, device="cuda")
    assert {q.dtype for q in m.parameters()} == {torch.bfloat16} and m.device.type == "cuda"
    convs, imgs = [_conv(q) for q in QS[:4]], _imgs()[:4]
    out = generate_batch(m, p, convs, imgs, max_new_tokens=8)
    assert len(out) == 4 and all(isinstance(t, str) for t in out)
