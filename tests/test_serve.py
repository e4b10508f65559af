"`llavamed serve`: transformers' server in a real process on loopback, asked through the real `openai` client."
import json, os, secrets, signal, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path
import pytest

pytest.importorskip("torch")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import numpy as np
import openai
from PIL import Image
from llavamed.cli import main
from llavamed.core import IMAGE_TOKEN
from llavamed.serve import ModelServer, answer_with_api, api_messages, servable_problems

KEY_ENV = "LLAVAMED_TEST_SERVE_KEY"
KEY = secrets.token_hex(12)
TEXTS = ["Is there an effusion? no yes", "Which organ is shown? liver spleen kidney", "Describe the figure."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try: s.bind(("127.0.0.1", port)); return True
        except OSError: return False


def http(url: str, body: bytes | None = None, key: str | None = None) -> tuple[int, dict]:
    "Status and JSON body of one raw HTTP request (no client library in between)."
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r: return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        text = e.read()
        try: return e.code, json.loads(text)
        except ValueError: return e.code, {"raw": text.decode(errors="replace")}


def start(llavamed_cmd, model, port: int, log: Path, key: str | None = KEY, extra=()) -> subprocess.Popen:
    "`llavamed serve` in a child process; returns once /health answers (or fails with the server's log)."
    env = {**os.environ, KEY_ENV: key or "", "DS_ACCELERATOR": "cpu"}
    args = [llavamed_cmd, *extra, "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
            "--log-level", "warning"] + (["--api-key-env", KEY_ENV] if key else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=open(log, "w"), env=env, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None: pytest.fail(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http(f"http://127.0.0.1:{port}/health", key=key)[0] == 200: return proc
        except OSError: pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"server not up after 240 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try: proc.wait(timeout)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
    return proc.returncode


def question(qid: str, image: str, text: str, answer: str, kind: str = "CLOSED") -> dict:
    return {"id": qid, "image": image, "answer_type": kind,
            "conversations": [{"from": "human", "value": f"{text}\n{IMAGE_TOKEN}"}, {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    "A saved tiny model (random weights, seeded): the server and `predict` load the same weights."
    import torch
    from llavamed.model import build_model, save_model
    torch.manual_seed(0)
    return save_model(*build_model("tiny", tokenizer_texts=TEXTS * 20), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> Path:
    "images/ with 4 pictures (one a DICOM slice) and vqa.json with 8 questions about them."
    from pydicom.data import get_testdata_file
    d = tmp_path_factory.mktemp("vqa")
    (d / "images").mkdir()
    for i in range(3): Image.new("RGB", (48, 40), (60 * i, 90, 200 - 50 * i)).save(d / "images" / f"i{i}.png")
    (d / "images" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    names = ["images/i0.png", "images/i1.png", "images/i2.png", "images/ct.dcm"]
    recs = [question(f"q{k}", names[k % 4], f"Question {k}: is the organ enlarged?", "yes" if k % 2 else "no")
            for k in range(6)]
    recs += [question("open6", "images/ct.dcm", "What organ is shown?", "liver", "OPEN"),
             question("open7", "images/i1.png", "Describe the figure.", "a chest film", "OPEN")]
    (d / "vqa.json").write_text(json.dumps(recs))
    return d / "vqa.json"


@pytest.fixture(scope="module")
def server(llavamed_cmd, model_dir, tmp_path_factory):
    "`llavamed serve --model DIR --api-key-env VAR` on a free loopback port: (base_url, model name)."
    port, log = free_port(), tmp_path_factory.mktemp("log") / "serve.log"
    proc = start(llavamed_cmd, model_dir, port, log)
    yield f"http://127.0.0.1:{port}/v1", str(Path(model_dir).resolve())
    stop(proc)


@pytest.fixture(autouse=True)
def key_in_env(monkeypatch):
    "The key where `--api-key-env` points, for the clients in this process too."
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def api(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0)


def ask(image: str | Path, text: str = "Is there an effusion?") -> list[dict]:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    return api_messages(conv, image)


# ---------------------------------------------------------------- replies


def test_the_server_lists_its_one_model(api, server):
    assert [m.id for m in api.models.list().data] == [server[1]]


def test_a_reply_to_an_image_sent_as_a_base64_data_url(api, server, vqa):
    msgs = ask(vqa.parent / "images" / "i0.png")
    assert msgs[0]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    r = api.chat.completions.create(model=server[1], messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 64  # 64 image tokens plus the question


def test_a_streamed_reply_is_the_same_text(api, server, vqa):
    msgs = ask(vqa.parent / "images" / "ct.dcm", "What organ is shown?")
    whole = api.chat.completions.create(model=server[1], messages=msgs, max_tokens=8, temperature=0)
    chunks = list(api.chat.completions.create(model=server[1], messages=msgs, max_tokens=8, temperature=0,
                                              stream=True))
    assert len(chunks) > 2  # several deltas, not one body
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip() == whole.choices[0].message.content.strip()


def test_greedy_answers_equal_llavamed_predict(server, model_dir, vqa, tmp_path):
    "Same questions, same answer rows: prompt, text and image alike; only the model's name differs."
    from llavamed.predict import predict
    predict(model=str(model_dir), data=str(vqa), out=str(tmp_path / "local.jsonl"), batch_size=4,
            max_new_tokens=8, device="cpu", dtype="float32", quiet=True)
    res = answer_with_api(str(vqa), str(tmp_path / "api.jsonl"), server[0], api_key_env=KEY_ENV, max_new_tokens=8,
                          concurrency=4, quiet=True)
    assert res.answered == 8 and res.images_checked == 4
    local = {r["question_id"]: r for r in map(json.loads, (tmp_path / "local.jsonl").read_text().splitlines())}
    remote = {r["question_id"]: r for r in map(json.loads, (tmp_path / "api.jsonl").read_text().splitlines())}
    assert sorted(local) == sorted(remote)
    assert any(r["text"] for r in local.values())  # a model answering nothing would prove nothing
    for qid, row in local.items():
        got = remote[qid]
        assert set(got) == set(row)
        assert (got["prompt"], got["text"], got["metadata"]["image"]) == (row["prompt"], row["text"],
                                                                          row["metadata"]["image"]), qid
        assert got["metadata"]["decoding"] == row["metadata"]["decoding"]
        assert got["metadata"]["model"] == server[1] and got["metadata"]["backend"] == "openai"


def test_predict_backend_openai_answers_through_the_server(server, vqa, tmp_path, capsys):
    "`llavamed predict --backend openai --base-url URL` is `answer_with_api`: the same rows, from the command."
    out = tmp_path / "cli.jsonl"
    assert main(["predict", "--backend", "openai", "--base-url", server[0], "--api-key-env", KEY_ENV,
                 "--data", str(vqa), "--out", str(out), "--max-new-tokens", "8", "--quiet"]) == 0
    answer_with_api(str(vqa), str(tmp_path / "api.jsonl"), server[0], api_key_env=KEY_ENV, max_new_tokens=8,
                    quiet=True)
    rows = lambda p: {r["question_id"]: (r["prompt"], r["text"]) for r in map(json.loads, p.read_text().splitlines())}
    assert rows(out) == rows(tmp_path / "api.jsonl") and len(rows(out)) == 8
    assert all(json.loads(l)["metadata"]["backend"] == "openai" for l in out.read_text().splitlines())
    capsys.readouterr()
    assert main(["predict", "--backend", "openai", "--data", str(vqa), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--backend openai needs --base-url" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()

def test_an_interrupted_run_resumes_without_asking_twice(server, vqa, tmp_path):
    out = tmp_path / "a.jsonl"
    first = answer_with_api(str(vqa), str(out), server[0], api_key_env=KEY_ENV, max_new_tokens=4, limit=3,
                            batch_size=2, quiet=True)
    torn = '{"question_id": "q7", "te'  # a killed run's torn last line
    with open(out, "a") as f: f.write(torn)
    rest = answer_with_api(str(vqa), str(out), server[0], api_key_env=KEY_ENV, max_new_tokens=4, quiet=True)
    ids = [json.loads(line)["question_id"] for line in out.read_text().splitlines()]
    assert (first.answered, rest.skipped, rest.answered, rest.repaired_bytes) == (3, 3, 5, len(torn))
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 8
    with pytest.raises(ValueError, match="other settings"):
        answer_with_api(str(vqa), str(out), server[0], api_key_env=KEY_ENV, max_new_tokens=5, quiet=True)


def test_an_empty_reply_is_an_empty_answer_asked_once(tmp_path):
    "A server that answers with nothing answered: one request each, '' the answer; a parse callback still retries."
    from chat_server import ChatServer
    from llavamed.client import ChatClient, run_chat_requests
    from llavamed.serve import chat_answers
    conv = [{"role": "user", "content": [{"type": "text", "text": "Is there an effusion?"}]}]
    def parse(text):
        if not text.strip(): raise ValueError("no answer in an empty reply")
        return text
    with ChatServer(reply_text="") as srv:
        client = ChatClient(model="m", base_url=srv.base_url, api_key_env="none", temperature=0.0, max_tokens=4)
        assert chat_answers([conv, conv], [None, None], client, max_attempts=3) == ["", ""]
        assert srv.stats()["requests"] == 2
        srv.reset()
        stats = run_chat_requests(client, [{"id": "a", "messages": conv}], tmp_path / "c.jsonl", max_attempts=3,
                                  backoff=0.01, parse=parse, progress=False)
        assert (stats.unparsed, stats.requests, srv.stats()["requests"]) == (1, 3, 3)
    row = json.loads((tmp_path / "c.jsonl").read_text())
    assert row["status"] == "unparsed" and row["text"] == "" and "no answer in an empty reply" in row["reason"]


# ---------------------------------------------------------------- refusals


def assert_key_refused(base: str, name: str, key: str = KEY) -> None:
    "Without the key, with a wrong one or a prefix of it: 401 (raw HTTP and the openai client); with it: 200."
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    for bad in (None, "wrong", key[:-1]):
        status, reply = http(f"{base}/chat/completions", body, bad)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key", (bad, status, reply)
    assert http(f"{base}/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
    assert http(f"{base}/chat/completions", body, key)[0] == 200


def test_a_request_without_the_key_is_refused(server):
    assert_key_refused(*server)


def test_a_malformed_request_is_an_error_and_the_server_stays_up(api, server):
    base, name = server
    with pytest.raises(openai.BadRequestError, match="malformed request"):
        api.chat.completions.create(model=name, messages="not a list", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as refused:  # another model's name: transformers' own refusal
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert "pinned" in refused.value.response.json()["detail"]
    for body in (b"{not json", b'{"messages": [{"content": "no role"}]}', b'{"messages": [], "bogus": 1}'):
        status, reply = http(f"{base}/chat/completions", body, KEY)
        assert 400 <= status < 500, (body, status, reply)
    for url in ("data:image/png;base64,AAAA", "data:text/plain;base64,aGk="):  # no picture in it: not a 500
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": parts}], "max_tokens": 2})
        status, reply = http(f"{base}/chat/completions", body.encode(), KEY)
        assert status == 400 and "malformed request" in reply["error"]["message"], (url, status, reply)
    r = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_bad_serve_arguments_are_one_line_errors(capsys, model_dir, monkeypatch, tmp_path):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["serve", "--model", str(model_dir), "--api-key-env", KEY_ENV]) == 2
    assert f"--api-key-env {KEY_ENV}: the variable is not set" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0)); busy.listen()
        assert main(["serve", "--model", str(model_dir), "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen there" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--log-level", "loud"]) == 2
    assert "--log-level loud: expected one of debug, info" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


# ---------------------------------------------------------------- checkpoints and images


def test_api_messages_send_dicom_and_nifti_pixels_losslessly():
    "The one image part (`llavamed.client.image_part`), as serving calls it: PNG, its own size, the very pixels."
    import base64, io
    from pydicom.data import get_testdata_file
    nib_testing = pytest.importorskip("nibabel.testing")
    from llavamed.images import load_image
    import llavamed.serve
    assert not hasattr(llavamed.serve, "image_part")  # one function, in the client
    for path in (get_testdata_file("CT_small.dcm"), Path(nib_testing.data_path) / "anatomical.nii"):
        url = ask(path)[0]["content"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert np.array_equal(np.asarray(sent), np.asarray(load_image(path)))


def test_checkpoints_the_project_writes_carry_what_servers_need(model_dir, vqa, tmp_path):
    "save_model, convert, build and train outputs: chat template, processor and generation config; v1.0 refused."
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    from llavamed import train as T
    from llavamed.model import TINY_LM, TINY_VISION, build, convert_checkpoint, tiny_release_checkpoint, \
        train_tokenizer
    convert_checkpoint(str(tiny_release_checkpoint(tmp_path / "release", seed=3)), str(tmp_path / "converted"))
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path / "clip")
    tok = train_tokenizer(TEXTS, vocab_size=400)
    LlamaForCausalLM(LlamaConfig(**TINY_LM, vocab_size=len(tok))).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    build(vision=str(tmp_path / "clip"), lm=str(tmp_path / "lm"), out=str(tmp_path / "built"))
    build(vision=str(tmp_path / "clip"), lm=str(tmp_path / "lm"), out=str(tmp_path / "v1"), projector="linear")
    stage = T.StageConfig.load("instruct", global_batch_size=2, per_device_batch_size=2)
    T.train(stage, T.RunConfig(model=str(model_dir), data=str(vqa), images=str(vqa.parent),
                               out=str(tmp_path / "trained"), max_steps=1, num_workers=0, save_steps=100))
    for name in ("converted", "built", "trained"):
        assert servable_problems(tmp_path / name) == [], name
    assert servable_problems(model_dir) == []
    assert "linear layer" in " ".join(servable_problems(tmp_path / "v1"))
    assert json.loads((tmp_path / "converted" / "processor_config.json").read_text())["image_processor"]["do_pad"]
    with pytest.raises(ValueError, match="linear layer"): ModelServer(str(tmp_path / "v1"), port=free_port())


def test_a_raw_release_is_converted_and_served_with_predicts_answers(tmp_path, monkeypatch):
    "`--model RAW_RELEASE`: converted once into the cache, which transformers' server loads as it is."
    from llavamed.generate import generate_batch
    from llavamed.model import load_model, tiny_release_checkpoint
    monkeypatch.setenv("LLAVAMED_CACHE", str(tmp_path / "cache"))
    raw = tiny_release_checkpoint(tmp_path / "release", seed=5)
    img = Image.new("RGB", (60, 30), (200, 30, 90))  # not square: pad-to-square matters
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the figure."}]}]
    with ModelServer(str(raw), port=0, log_level="warning", device="cpu") as srv:
        assert Path(srv.name).is_relative_to(tmp_path / "cache") and servable_problems(srv.name) == []
        api = openai.OpenAI(base_url=srv.base_url, api_key="none", max_retries=0)
        r = api.chat.completions.create(model=srv.name, messages=api_messages(conv, img), max_tokens=8,
                                        temperature=0)
    model, proc = load_model(srv.name, device="cpu", dtype="float32")
    assert proc.image_processor.do_pad
    local = generate_batch(model, proc, [conv], [img], max_new_tokens=8)[0]
    assert r.choices[0].message.content.strip() == local and r.usage.completion_tokens >= 1


# ---------------------------------------------------------------- stopping


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_served_preset_cleanly(llavamed_cmd, tmp_path, sig):
    "`--model tiny` is built into a temporary folder and answers; SIGTERM or Ctrl-C ends it: status 0, port free."
    port = free_port()
    proc = start(llavamed_cmd, "tiny", port, tmp_path / "log", key=None, extra=["--json"])
    base = f"http://127.0.0.1:{port}/v1"
    api = openai.OpenAI(base_url=base, api_key="none", max_retries=0)
    name = api.models.list().data[0].id
    assert Path(name).is_dir() and "llavamed-serve-tiny-" in name
    api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert stop(proc, sig) == 0, (tmp_path / "log").read_text()[-2000:]
    served = json.loads(proc.stdout.read())
    assert served["stopped_by"] == sig.name and served["name"] == name and not served["api_key"]
    assert port_is_free(port) and not Path(name).exists()


@pytest.mark.slow
def test_a_signal_while_a_preset_loads_leaves_no_folder_behind(llavamed_cmd, tmp_path):
    "SIGTERM before the port opens: the command ends at once (130, 'interrupted') and the preset's folder goes."
    log = tmp_path / "log"
    env = {**os.environ, "TMPDIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.Popen([llavamed_cmd, "serve", "--model", "tiny", "--port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    deadline = time.monotonic() + 120
    while "a preset, built now" not in log.read_text() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    code = stop(proc, signal.SIGTERM)
    assert code in (130, 0), log.read_text()[-2000:]  # 0: the server was up already, and stopped cleanly
    assert not list(tmp_path.glob("llavamed-serve-tiny-*"))
