"The batch backend of `llavamed instruct` against the loopback server's files and batches endpoints, with the real `openai` client."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer, ChatServerProcess
from teacher_input import pair_ids, write_teacher_input
from llavamed.batch import BatchSettings, journal_path, read_journal, run_batch_requests
from llavamed.cli import main
from llavamed.client import ChatClient, load_checkpoint
from llavamed.core import read_jsonl
from llavamed.instruct import merge_instruct, record_problems, self_instruct, sidecar_path

KEY_ENV = "LLAVAMED_TEST_BATCH_KEY"
SECRET = "sk-batch-test-5e4d3c2b1a0f9e8d7c6b"
FAST = dict(poll_interval=0.05, poll_max=0.2)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def run_batch(captions, out, srv, **kw):
    kw = dict(teacher="openai", base_url=srv.base_url, model="any", api_key_env=KEY_ENV, quiet=True,
              backend="batch", **FAST, **kw)
    return self_instruct(str(captions), str(out), **kw)


def lines(p): return list(read_jsonl(p)) if Path(p).exists() else []


def test_full_batch_run_one_request_per_caption(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 20, facts=False)
    out = tmp_path / "out.jsonl"
    with ChatServer(batch_seconds=0.2, batch_max_lines=8, require_key=SECRET) as srv:
        rep = run_batch(cap, out, srv, batch_max_requests=8, price_prompt=2.0, price_completion=8.0)
        st = srv.stats()
    assert st["requests"] == 0 and st["batches_created"] == 3 and st["batch_lines"] == 20
    assert st["batch_by_key"] == {i: 1 for i in pair_ids(cap)}
    assert set(st["batch_status"].values()) == {"completed"}
    recs = lines(out)
    assert rep.records == len(recs) == 20 and [record_problems(r) for r in recs] == [[]] * 20
    assert rep.backend == "batch" and rep.run["batches"] == 3 and rep.run["upload_bytes"] == st["upload_bytes"]
    expected = (rep.run["prompt_tokens"] * 2.0 + rep.run["completion_tokens"] * 8.0) / 1e6 * 0.5
    assert rep.run["cost"] == pytest.approx(expected) and rep.run["cost"] > 0
    raw = load_checkpoint(sidecar_path(out))
    assert all(r["status"] == "done" and r["batch"].startswith("batch_") for r in raw.values())
    assert raw[pair_ids(cap)[0]]["meta"]["prompt"] == "v1"
    journal = read_journal(journal_path(sidecar_path(out)))
    assert [s["state"] for s in journal.values()] == ["merged"] * 3


def test_requests_split_at_the_byte_limit(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 12, facts=False)
    out = tmp_path / "out.jsonl"
    limit = 15_000  # two or three of these few-shot requests
    with ChatServer(batch_seconds=0.1, batch_max_bytes=limit) as srv:  # the server fails a bigger file
        rep = run_batch(cap, out, srv, batch_max_bytes=limit)
        st = srv.stats()
    assert st["batches_created"] >= max(4, -(-st["upload_bytes"] // limit))
    assert set(st["batch_status"].values()) == {"completed"}
    assert rep.records == 12 and st["batch_lines"] == 12


def test_failed_lines_retried_in_a_later_batch_or_recorded(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 10, facts=False)
    ids, out = pair_ids(cap), tmp_path / "out.jsonl"
    script = {ids[0]: ["500"], ids[1]: ["expire"], ids[2]: ["drop"], ids[3]: ["400"], ids[4]: ["garbage"] * 3,
              ids[5]: ["429", "500"]}
    with ChatServer(batch_seconds=0.1, batch_script=script) as srv:
        rep = run_batch(cap, out, srv, batch_rounds=3)
        st = srv.stats()
    assert st["requests"] == 0
    assert st["batch_by_key"] == {**{i: 1 for i in ids}, ids[0]: 2, ids[1]: 2, ids[2]: 2, ids[4]: 3, ids[5]: 3}
    ck = load_checkpoint(sidecar_path(out))
    assert ck[ids[0]]["status"] == "done" and ck[ids[0]]["errors"] == ["batch HTTP 500 server error"]
    assert ck[ids[1]]["errors"][0].startswith("batch batch_expired: This request could not be executed")
    assert ck[ids[2]]["errors"] == ["batch completed: no result for this request"]
    assert ck[ids[3]]["status"] == "failed" and ck[ids[3]]["reason"] == "batch HTTP 400: Invalid request."
    assert ck[ids[4]]["status"] == "unparsed" and ck[ids[4]]["attempts"] == 3
    assert ck[ids[5]]["attempts"] == 3 and ck[ids[5]]["status"] == "done"
    assert rep.run["done"] == 8 and rep.run["failed"] == 1 and rep.run["unparsed"] == 1 and rep.run["rounds"] == 3
    assert sorted(r["id"] for r in lines(out)) == sorted(set(ids) - {ids[3], ids[4]})


def test_failed_lines_retried_by_the_request_loop(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 6, facts=False)
    ids, out = pair_ids(cap), tmp_path / "out.jsonl"
    with ChatServer(batch_seconds=0.1, batch_script={ids[0]: ["500"], ids[1]: ["expire"]}) as srv:
        rep = run_batch(cap, out, srv, batch_retry="loop", price_prompt=1.0, price_completion=1.0)
        st = srv.stats()
    assert st["batches_created"] == 1 and st["by_key"] == {ids[0]: 1, ids[1]: 1}
    assert rep.run["done"] == 6 and rep.run["loop_requests"] == 2 and rep.records == 6


def test_an_expired_batch_keeps_its_answers_and_retries_the_rest(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 8, facts=False)
    out = tmp_path / "out.jsonl"
    with ChatServer(batch_seconds=0.1, expire_batches=[0]) as srv:
        rep = run_batch(cap, out, srv)
        st = srv.stats()
    assert list(st["batch_status"].values()) == ["expired", "completed"]
    assert st["batch_lines"] == 8 + 4 and rep.records == 8


def test_a_failed_batch_exits_1_and_keeps_earlier_output(tmp_path, key, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 4, facts=False)
    out = tmp_path / "out.jsonl"
    out.write_text('{"earlier": "good output"}\n'); sidecar_path(out).write_text("")
    with ChatServer(batch_seconds=0.1, fail_batches=[0]) as srv:
        code = main(["instruct", "--captions", str(cap), "--out", str(out), "--teacher", "openai", "--base-url",
                     srv.base_url, "--model", "any", "--api-key-env", KEY_ENV, "--backend", "batch",
                     "--poll-interval", "0.05", "--poll-max", "0.2", "--quiet"])
        assert srv.stats()["batches_created"] == 1  # a validation failure is not retried
    assert code == 1 and "every request failed" in capsys.readouterr().out
    assert out.read_text() == '{"earlier": "good output"}\n'
    reason = load_checkpoint(sidecar_path(out))[pair_ids(cap)[0]]["reason"]
    assert reason == "batch failed: Invalid input file (simulated validation failure)."


def test_a_batch_created_but_not_journalled_is_found_not_created_again(tmp_path):
    "Killed between batches.create and the journal line: the next run finds the batch by its metadata."
    import openai
    ck = tmp_path / "out.raw.jsonl"
    reqs = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"Caption: CT {i}"}]} for i in range(3)]
    client = ChatClient("any", api_key_env="none")
    with ChatServer(batch_seconds=0.1) as srv:
        client.base_url = srv.base_url
        api = openai.OpenAI(api_key="EMPTY", base_url=srv.base_url)
        from llavamed.batch import batch_line
        data = b"".join(batch_line(client, r) for r in reqs)
        f = api.files.create(file=("c.jsonl", data), purpose="batch")
        api.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                           metadata={"llavamed_chunk": "c00000-test"})
        jp = journal_path(ck)
        jp.write_text(json.dumps({"event": "planned", "chunk": "c00000-test", "round": 1, "ids": ["q0", "q1", "q2"]})
                      + "\n" + json.dumps({"event": "uploaded", "chunk": "c00000-test", "file_id": f.id}) + "\n")
        st = run_batch_requests(client, reqs, ck, BatchSettings(**FAST), progress=False)
        served = srv.stats()
    assert served["batches_created"] == 1 and served["uploads"] == 1
    assert st.done == 3 and st.batches == 0 and st.batch_requests == 0


def cli_batch_args(cap, out, base_url, *extra, verbose=True):
    exe = Path(sys.executable).parent / "llavamed"
    return [str(exe), *(["-v"] if verbose else []), "instruct", "--captions", str(cap), "--out", str(out),
            "--teacher", "openai", "--base-url", base_url, "--model", "any", "--api-key-env", KEY_ENV,
            "--backend", "batch", "--poll-interval", "0.1", "--poll-max", "0.1", "--batch-max-requests", "10",
            "--quiet", *extra]


@pytest.mark.slow
def test_sigkill_while_polling_then_resume_creates_no_second_batch(tmp_path):
    cap = write_teacher_input(tmp_path / "captions.json", 30, facts=False)
    out, env = tmp_path / "out.jsonl", {**os.environ, KEY_ENV: SECRET}
    jp = journal_path(sidecar_path(out))
    with ChatServerProcess(batch_seconds=4.0, require_key=SECRET) as srv:
        proc = subprocess.Popen(cli_batch_args(cap, out, srv.base_url), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while time.time() - t0 < 60:
            created = [s for s in read_journal(jp).values() if s.get("batch_id")] if jp.exists() else []
            if len(created) == 3 and srv.stats()["batches_created"] == 3: break
            time.sleep(0.05)
        time.sleep(0.3)  # polling now
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGKILL); proc.wait()
        assert srv.stats()["batches_created"] == 3 and not out.exists()
        res = subprocess.run(cli_batch_args(cap, out, srv.base_url), env=env, capture_output=True, text=True,
                             timeout=120)
        st = srv.stats()
    assert res.returncode == 0, res.stderr
    assert st["batches_created"] == 3 and st["uploads"] == 3 and st["requests"] == 0
    assert st["batch_by_key"] == {i: 1 for i in pair_ids(cap)}  # no caption paid twice
    assert len(lines(out)) == 30
    for text in (res.stdout, res.stderr, out.read_text(), sidecar_path(out).read_text(), jp.read_text(),
                 out.with_name(out.name + ".report.json").read_text()):
        assert SECRET not in text and SECRET[:8] not in text


def test_the_key_is_never_in_output_or_logs(tmp_path):
    cap = write_teacher_input(tmp_path / "captions.json", 4, facts=False)
    out, env = tmp_path / "out.jsonl", {**os.environ, KEY_ENV: SECRET}
    with ChatServer(require_key="sk-the-right-one-0000000000") as srv:  # a 401 that echoes the key given
        res = subprocess.run(cli_batch_args(cap, out, srv.base_url, verbose=False), env=env, capture_output=True,
                             text=True, timeout=60)
        loud = subprocess.run(cli_batch_args(cap, out, srv.base_url), env=env, capture_output=True, text=True,
                              timeout=60)  # -v: log lines and the traceback
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "batch API: upload of c00000" in res.stderr and "HTTP 401" in res.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    files = [p for p in tmp_path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json")]
    for text in (res.stdout, res.stderr, loud.stdout, loud.stderr, *(p.read_text() for p in files)):
        assert SECRET not in text and SECRET[:8] not in text


def png_figures(folder: Path, ids: list[str], size=(900, 600)):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, pid in enumerate(ids): Image.new("RGB", size, (40 + i, 80, 120)).save(folder / f"{pid}.png")


@pytest.mark.parametrize("backend", ["loop", "batch"])
def test_teacher_sees_the_image(tmp_path, key, backend):
    cap = write_teacher_input(tmp_path / "captions.json", 5, facts=False)
    ids = pair_ids(cap)
    png_figures(tmp_path / "images", ids)
    seen = []
    def reply(messages, key):
        seen.append(messages[-1]["content"])
        return "User: What is shown?\nAssistant: An image.\nUser: Which side?\nAssistant: The left side."
    out = tmp_path / "out.jsonl"
    kw = dict(teacher="openai", base_url=None, model="any", api_key_env=KEY_ENV, quiet=True, backend=backend,
              teacher_sees_image=True, image_size=256, **FAST)
    with ChatServer(batch_seconds=0.1, reply_fn=reply) as srv:
        kw["base_url"] = srv.base_url
        rep = self_instruct(str(cap), str(out), **kw)
        st = srv.stats()
    assert st["image_parts"] == 5 and rep.records == 5 and rep.prompt == "image-v1"
    text, image = seen[0]
    assert text["type"] == "text" and "The figure is attached" in text["text"]
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    from PIL import Image
    import base64, io
    im = Image.open(io.BytesIO(base64.b64decode(image["image_url"]["url"].split(",", 1)[1])))
    assert max(im.size) == 256
    row = load_checkpoint(sidecar_path(out))[ids[0]]
    assert row["meta"] == {"prompt": "image-v1", "inline_mentions": False, "teacher_sees_image": True,
                           "image_size": 256}
    assert {r["image"] for r in lines(out)} == {f"{i}.png" for i in ids}
    (tmp_path / "images" / f"{ids[4]}.png").unlink()  # one figure of five without its image: too many bad
    with pytest.raises(ValueError, match=f"image file not found at pair_id {ids[4]}"):
        self_instruct(str(cap), str(tmp_path / "other.jsonl"), **kw)
    assert not (tmp_path / "other.jsonl").exists()


def test_client_options_reach_the_server(tmp_path, key, monkeypatch):
    monkeypatch.setenv("OPENAI_ORG_ID", "org-test-1")
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-test-2")
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    for backend in ("loop", "batch"):
        with ChatServer(batch_seconds=0.1) as srv:
            code = main(["instruct", "--captions", str(cap), "--out", str(tmp_path / f"{backend}.jsonl"),
                         "--teacher", "openai", "--base-url", srv.base_url, "--model", "o4-mini", "--api-key-env",
                         KEY_ENV, "--backend", backend, "--max-completion-tokens", "--extra-body",
                         '{"reasoning_effort": "low", "top_k": 5}', "--poll-interval", "0.05", "--poll-max", "0.2",
                         "--quiet"])
            st = srv.stats()
        assert code == 0
        assert st["body_keys"].get("max_completion_tokens") == 3 and "max_tokens" not in st["body_keys"], backend
        assert st["body_keys"]["reasoning_effort"] == 3 and st["body_keys"]["top_k"] == 3
        assert st["headers_seen"].get("OpenAI-Organization=org-test-1", 0) >= 1
        assert st["headers_seen"].get("OpenAI-Project=proj-test-2", 0) >= 1


def test_bad_extra_body_is_one_line(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 2, facts=False)
    code = main(["instruct", "--captions", str(cap), "--out", str(tmp_path / "o.jsonl"), "--teacher", "openai",
                 "--model", "m", "--base-url", "http://127.0.0.1:9/v1", "--extra-body", "[1]"])
    assert code == 2 and "--extra-body: want a JSON object, got list" in capsys.readouterr().err


def test_keyless_server_needs_no_key_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cap = write_teacher_input(tmp_path / "captions.json", 2, facts=False)
    with ChatServer() as srv:
        rep = self_instruct(str(cap), str(tmp_path / "o.jsonl"), teacher="openai", model="m", api_key_env="none",
                            base_url=srv.base_url.replace("127.0.0.1", "localhost"), quiet=True)
    assert rep.records == 2


def test_shards_are_disjoint_and_merge_refuses_duplicates(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 40)
    outs = [tmp_path / f"part{k}.jsonl" for k in range(3)]
    for k, o in enumerate(outs):
        assert main(["instruct", "--captions", str(cap), "--out", str(o), "--shard", f"{k}/3", "--quiet"]) == 0
    parts = [[r["id"] for r in lines(o)] for o in outs]
    assert sum(map(len, parts)) == 40 and set().union(*map(set, parts)) == set(pair_ids(cap))
    assert all(len(p) > 5 for p in parts)
    merged = tmp_path / "all.jsonl"
    assert main(["merge", "--inputs", f"{tmp_path}/part*.jsonl", "--out", str(merged)]) == 0
    assert sorted(r["id"] for r in lines(merged)) == sorted(pair_ids(cap))
    capsys.readouterr()
    assert main(["merge", "--inputs", f"{outs[0]},{outs[1]},{outs[0]}", "--out", str(tmp_path / "dup.jsonl")]) == 0
    # the same file named twice is read once; an overlapping shard is refused
    (tmp_path / "overlap.jsonl").write_text(outs[0].read_text().splitlines()[0] + "\n")
    assert main(["merge", "--inputs", f"{outs[0]},{tmp_path / 'overlap.jsonl'}", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "overlap.jsonl:1: record id" in err and f"{outs[0]}:1" in err and not (tmp_path / "x.jsonl").exists()
    assert main(["merge", "--inputs", str(merged), "--out", str(merged)]) == 2


def test_a_request_over_the_byte_limit_is_recorded_failed_not_sent(tmp_path):
    reqs = [{"id": f"q{i}", "messages": [{"role": "user", "content": "Caption: CT. " + "x" * (5000 if i == 1 else 10)}]}
            for i in range(4)]
    with ChatServer(batch_seconds=0.1, batch_max_bytes=2000) as srv:
        st = run_batch_requests(ChatClient("any", base_url=srv.base_url, api_key_env="none"), reqs,
                                tmp_path / "ck.jsonl", BatchSettings(max_bytes=2000, **FAST), progress=False)
        served = srv.stats()
    ck = load_checkpoint(tmp_path / "ck.jsonl")
    assert ck["q1"]["status"] == "failed" and "over the batch file limit (2,000 bytes)" in ck["q1"]["reason"]
    assert "q1" not in served["batch_by_key"] and st.done == 3 and st.failed == 1
    assert set(served["batch_status"].values()) == {"completed"}


def test_polling_stopped_by_batch_wait_is_collected_by_the_next_run(tmp_path, key, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 6, facts=False)
    out = tmp_path / "out.jsonl"
    args = ["instruct", "--captions", str(cap), "--out", str(out), "--teacher", "openai", "--model", "any",
            "--api-key-env", KEY_ENV, "--backend", "batch", "--poll-interval", "0.05", "--poll-max", "0.1", "--quiet"]
    with ChatServer(batch_seconds=1.5) as srv:
        assert main([*args, "--base-url", srv.base_url, "--batch-wait", "0.2"]) == 1
        assert "6 requests still in batches (run again to collect them)" in capsys.readouterr().out
        assert not out.exists() and srv.stats()["batches_created"] == 1
        assert main([*args, "--base-url", srv.base_url]) == 0
        st = srv.stats()
    assert st["batches_created"] == 1 and st["batch_lines"] == 6 and len(lines(out)) == 6


def test_merge_drops_conversations_repeated_across_shards_with_v2_rules(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    conv = lambda q: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A chest X-ray."}]
    a.write_text(json.dumps({"id": "1", "image": "1.jpg", "conversations": conv("What is shown?")}) + "\n")
    b.write_text(json.dumps({"id": "2", "image": "2.jpg", "conversations": conv("what is shown")}) + "\n"
                 + json.dumps({"id": "3", "image": "3.jpg", "conversations": conv("Which side?")}) + "\n")
    assert merge_instruct(f"{a},{b}", str(tmp_path / "ids.jsonl")).records == 3
    rep = merge_instruct(f"{a},{b}", str(tmp_path / "m.jsonl"), rules="v2")
    assert rep.records == 2 and rep.rule_hits == {"record:near_duplicate": 1}
    assert [r["id"] for r in lines(tmp_path / "m.jsonl")] == ["1", "3"]


def test_image_part_renders_dicom_and_nifti_through_the_one_loader():
    import base64, io
    import numpy as np
    from PIL import Image
    from llavamed.client import image_part
    from llavamed.images import load_image
    pydicom_data = pytest.importorskip("pydicom.data")
    nib_testing = pytest.importorskip("nibabel.testing")
    for path in (pydicom_data.get_testdata_file("CT_small.dcm"), Path(nib_testing.data_path) / "anatomical.nii"):
        url = image_part(path, max_side=24)["image_url"]["url"]
        assert url.startswith("data:image/jpeg;base64,")
        sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        want = load_image(path).convert("RGB"); want.thumbnail((24, 24))
        assert sent.size == want.size and max(sent.size) == 24
        assert np.abs(np.asarray(sent, float) - np.asarray(want, float)).mean() < 8  # JPEG, same picture
