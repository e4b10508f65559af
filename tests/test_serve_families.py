"""`llavamed serve` on every model family: a folder saved from each tiny preset, served by a real process on
loopback, asked through the real `openai` client, its greedy answers equal to the model's own in process."""
import json, secrets
from pathlib import Path
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import openai
from PIL import Image
from llavamed.client import ChatClient
from llavamed.families import FAMILIES, require
from llavamed.serve import api_messages, chat_answers, servable_problems
from test_serve import KEY_ENV, assert_key_refused, free_port, http, start, stop

KEY = secrets.token_hex(12)
FAST = "gemma3"  # the family of the fast set; the others run with the slow tests
OTHERS = [f for f in FAMILIES if f not in ("llava", FAST)]  # LLaVA's own tests are in test_serve.py
QUESTIONS = ["Is there an effusion?", "Which organ is shown?", "Describe the figure.", "Is the lesion benign?"]


def images() -> list[Image.Image]:
    "Four pictures of different sizes and colours (not square: resizing and padding rules matter)."
    sizes = [(60, 44), (48, 64), (72, 72), (40, 56)]
    return [Image.new("RGB", s, (50 * i + 20, 200 - 40 * i, 90 + 30 * i)) for i, s in enumerate(sizes)]


def conversation(text: str, n_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def local_answers(folder: Path, convs: list, imgs: list, max_new_tokens: int) -> list[str]:
    """Greedy answers of the saved model in this process: `generate` on its processor's inputs, one at a time,
    stopping where the checkpoint's generation config says (as every server does). `generate_batch` also stops
    at the tokenizer's end of text, which the tiny presets' generation configs do not list, so a random model
    that writes it mid-answer ends earlier there."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(folder)
    out = []
    for conv, im in zip(convs, imgs):
        prompt = proc.apply_chat_template(conv, add_generation_prompt=True)
        inputs = proc(text=[prompt], images=[im if isinstance(im, list) else [im]], return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(proc.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return out


@pytest.fixture(scope="module", params=[FAST, *(pytest.param(f, marks=pytest.mark.slow) for f in OTHERS)])
def family_dir(request, tmp_path_factory) -> tuple[str, Path]:
    "A folder saved from the family's tiny preset (seeded random weights), as `save_pretrained` writes it."
    from llavamed.families import build_family
    try: require(request.param)
    except ValueError as e: pytest.skip(str(e))
    model, proc = build_family(f"tiny-{request.param}")
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder); proc.save_pretrained(folder)
    return request.param, folder


@pytest.fixture(scope="module")
def server(llavamed_cmd, family_dir, tmp_path_factory):
    "`llavamed serve --model DIR --api-key-env VAR` on the family's folder: (family, base_url, name, folder)."
    family, folder = family_dir
    port, log = free_port(), tmp_path_factory.mktemp("log") / f"serve-{family}.log"
    proc = start(llavamed_cmd, folder, port, log, key=KEY)
    yield family, f"http://127.0.0.1:{port}/v1", str(folder.resolve()), folder
    assert stop(proc) == 0, log.read_text()[-3000:]


@pytest.fixture(autouse=True)
def key_in_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def api(server):
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0)


def test_the_saved_folder_is_servable_and_the_server_lists_it(server, api):
    family, base, name, folder = server
    assert servable_problems(folder) == []
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    assert [m.id for m in api.models.list().data] == [name]


def test_a_reply_to_an_image_sent_as_a_base64_data_url(server, api):
    family, base, name, folder = server
    msgs = api_messages(conversation(QUESTIONS[0]), images()[0])
    assert msgs[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    with_image = api.chat.completions.create(model=name, messages=msgs, max_tokens=6, temperature=0)
    text_only = api.chat.completions.create(model=name, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                            max_tokens=6, temperature=0)
    assert with_image.choices[0].finish_reason in ("stop", "length")
    assert isinstance(with_image.choices[0].message.content, str) and with_image.usage.completion_tokens >= 1
    assert with_image.usage.prompt_tokens >= text_only.usage.prompt_tokens + 4  # the image's tokens went in


def test_a_streamed_reply_is_the_same_text(server, api):
    family, base, name, folder = server
    msgs = api_messages(conversation(QUESTIONS[2]), images()[1])
    whole = api.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0)
    chunks = list(api.chat.completions.create(model=name, messages=msgs, max_tokens=8, temperature=0,
                                              stream=True))
    assert len(chunks) > 2  # several deltas, not one body
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    text = whole.choices[0].message.content.strip()
    # a stream holds back a last token that is half a UTF-8 character; the whole reply shows it as U+FFFD
    assert streamed == text or (text.startswith(streamed) and set(text[len(streamed):]) == {"\ufffd"}), \
        (streamed, text)
    assert len(streamed) >= 1


def test_greedy_answers_equal_the_models_own_in_process(server):
    "Four questions, four images, four requests in flight: each answer is what `generate` writes in process."
    family, base, name, folder = server
    convs, imgs = [conversation(q) for q in QUESTIONS], images()
    client = ChatClient(model=name, base_url=base, api_key_env=KEY_ENV, temperature=0.0, max_tokens=8)
    remote = chat_answers(convs, imgs, client, concurrency=4)
    local = local_answers(folder, convs, imgs, max_new_tokens=8)
    assert any(local)  # a model answering nothing would prove nothing
    assert remote == local


def test_several_images_in_one_question(server):
    "The families that take several images per record get them through the API, in placeholder order."
    family, base, name, folder = server
    if FAMILIES[family].max_images == 1: pytest.skip(f"{family} takes one image per record")
    imgs = images()
    conv = conversation("Compare the two figures.", n_images=2)
    client = ChatClient(model=name, base_url=base, api_key_env=KEY_ENV, temperature=0.0, max_tokens=8)
    both, swapped = chat_answers([conv, conv], [[imgs[0], imgs[1]], [imgs[1], imgs[0]]], client)
    assert [both, swapped] == local_answers(folder, [conv, conv], [[imgs[0], imgs[1]], [imgs[1], imgs[0]]], 8)


def test_a_request_without_the_key_is_refused(server):
    family, base, name, folder = server
    assert_key_refused(base, name, KEY)


def test_a_malformed_request_is_an_error_and_the_server_stays_up(server, api):
    family, base, name, folder = server
    with pytest.raises(openai.BadRequestError, match="malformed request"):
        api.chat.completions.create(model=name, messages="not a list", max_tokens=2)
    no_picture = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    bad_image = [{"role": "user", "content": [no_picture, {"type": "text", "text": "hi"}]}]
    for body in (b"{not json", b'{"messages": [{"content": "no role"}]}', json.dumps({"model": name,
                 "messages": bad_image, "max_tokens": 2}).encode()):
        status, reply = http(f"{base}/chat/completions", body, KEY)
        assert 400 <= status < 500, (body[:60], status, reply)
    r = api.chat.completions.create(model=name, messages=api_messages(conversation("hi"), images()[3]),
                                    max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_answers_through_the_api_equal_llavamed_predict(family_dir, tmp_path):
    """A VQA file answered by `llavamed predict` in process and through the family's server: the same rows
    (prompt, text, image). The checkpoint's generation config lists every token `llavamed.generate` stops at
    (released Gemma 3 and Qwen checkpoints list end of turn and end of text; the tiny presets only the former)."""
    import shutil
    from llavamed.core import IMAGE_TOKEN
    from llavamed.generate import generation_kwargs
    from llavamed.model import load_model
    from llavamed.predict import predict
    from llavamed.serve import ModelServer, answer_with_api
    family, folder = family_dir
    ckpt = shutil.copytree(folder, tmp_path / "model")
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = generation_kwargs(*load_model(ckpt, device="cpu", dtype="float32"))["eos_token_id"]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    (tmp_path / "images").mkdir()
    recs = []
    for k, (q, im) in enumerate(zip(QUESTIONS, images())):
        im.save(tmp_path / "images" / f"i{k}.png")
        recs.append({"id": f"q{k}", "image": f"images/i{k}.png", "answer_type": "OPEN",
                     "conversations": [{"from": "human", "value": f"{q}\n{IMAGE_TOKEN}"},
                                       {"from": "gpt", "value": "yes"}]})
    (tmp_path / "vqa.json").write_text(json.dumps(recs))
    predict(model=str(ckpt), data=str(tmp_path / "vqa.json"), out=str(tmp_path / "local.jsonl"), batch_size=4,
            max_new_tokens=8, device="cpu", dtype="float32", quiet=True)
    with ModelServer(str(ckpt), port=0, log_level="warning", device="cpu") as srv:
        res = answer_with_api(str(tmp_path / "vqa.json"), str(tmp_path / "api.jsonl"), srv.base_url,
                              max_new_tokens=8, concurrency=4, quiet=True)
    assert res.answered == 4
    rows = lambda p: {r["question_id"]: (r["prompt"], r["text"], r["metadata"]["image"])
                      for r in map(json.loads, p.read_text().splitlines())}
    local, remote = rows(tmp_path / "local.jsonl"), rows(tmp_path / "api.jsonl")
    assert any(text for _, text, _ in local.values())  # a model answering nothing would prove nothing
    assert remote == local


# ---------------------------------------------------------------- checks without a server


def test_a_generation_config_that_would_not_end_the_turn_is_named(family_dir, tmp_path):
    import shutil
    from transformers import AutoTokenizer
    family, folder = family_dir
    copy = shutil.copytree(folder, tmp_path / "copy")
    tok = AutoTokenizer.from_pretrained(copy)
    end = tok.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    gen = json.loads((copy / "generation_config.json").read_text())
    assert end in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    other = next(i for i in (tok.eos_token_id, tok.pad_token_id, 0, 1) if i is not None and i != end)
    (copy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": other}))
    problems = servable_problems(copy)
    assert len(problems) == 1 and f"holds no {FAMILIES[family].end_of_turn} (id {end})" in problems[0]
    (copy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [other, end]}))
    assert servable_problems(copy) == []
    (copy / "chat_template.jinja").unlink()
    assert servable_problems(copy) == [f"{copy}: no chat template (chat_template.jinja or chat_template.json)"]


@pytest.mark.slow
def test_a_family_preset_is_built_and_served(llavamed_cmd, tmp_path):
    "`--model tiny-gemma3`: built (seeded) into a temporary folder, served, removed when SIGTERM stops it."
    port = free_port()
    proc = start(llavamed_cmd, f"tiny-{FAST}", port, tmp_path / "log", key=None, extra=["--json"])
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    name = api.models.list().data[0].id
    assert f"llavamed-serve-tiny-{FAST}-" in name and servable_problems(name) == []
    r = api.chat.completions.create(model=name, messages=api_messages(conversation("hi"), images()[0]),
                                    max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert stop(proc) == 0, (tmp_path / "log").read_text()[-2000:]
    assert json.loads(proc.stdout.read())["stopped_by"] == "SIGTERM" and not Path(name).exists()
