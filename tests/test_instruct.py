"Self-instruct and the chat runner against a real loopback chat-completions server, with injected faults."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer, ChatServerProcess
from teacher_input import pair_ids, write_teacher_input
from llavamed.client import ChatClient, ChatRunError, load_checkpoint, run_chat_requests
from llavamed.instruct import record_problems, self_instruct, sidecar_path, split_turns
from llavamed.core import read_jsonl

KEY_ENV = "LLAVAMED_TEST_TEACHER_KEY"
SECRET = "sk-test-9f8e7d6c5b4a39281706"


def lines(p): return list(read_jsonl(p)) if Path(p).exists() else []


def run_openai(captions, out, srv, **kw):
    kw = dict(teacher="openai", base_url=srv.base_url, model="any", api_key_env=KEY_ENV, quiet=True,
              backoff=0.01, **kw)
    return self_instruct(str(captions), str(out), **kw)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def test_openai_teacher_one_request_per_caption(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 20, facts=False)
    with ChatServer(latency=0.01) as srv:
        rep = run_openai(cap, tmp_path / "out.jsonl", srv, concurrency=4)
        st = srv.stats()
    assert st["requests"] == 20 and set(st["by_key"]) == set(pair_ids(cap))
    assert all(n == 1 for n in st["by_key"].values())
    recs = lines(tmp_path / "out.jsonl")
    assert rep.records == len(recs) == 20 and len({r["id"] for r in recs}) == 20
    assert [record_problems(r) for r in recs] == [[]] * 20
    assert rep.run["prompt_tokens"] > 0 and rep.run["completion_tokens"] > 0
    raw = lines(sidecar_path(tmp_path / "out.jsonl"))
    assert all(r["status"] == "done" and r["usage"]["completion_tokens"] > 0 for r in raw)
    assert raw[0]["meta"] == {"prompt": "v1", "inline_mentions": False} and raw[0]["model"] == "openai:any"


def test_each_fault_is_retried_or_recorded(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 8, facts=False)
    ids = pair_ids(cap)
    script = {ids[0]: ["429", "ok"], ids[1]: ["500", "503", "ok"], ids[2]: ["slow", "ok"], ids[3]: ["drop", "ok"],
              ids[4]: ["garbage"] * 3, ids[5]: ["badjson", "ok"], ids[6]: ["500"] * 3}
    out = tmp_path / "out.jsonl"
    with ChatServer(script=script, retry_after=0.4, slow_seconds=3.0) as srv:
        rep = run_openai(cap, out, srv, concurrency=8, max_attempts=3, timeout=1.0)
        by_key = srv.stats()["by_key"]
    assert by_key == {ids[0]: 2, ids[1]: 3, ids[2]: 2, ids[3]: 2, ids[4]: 3, ids[5]: 2, ids[6]: 3, ids[7]: 1}
    ck = load_checkpoint(sidecar_path(out))
    assert ck[ids[0]]["seconds"] >= 0.4  # Retry-After honoured
    assert ck[ids[0]]["errors"] == ["HTTP 429 rate limited"]
    assert ck[ids[1]]["errors"] == ["HTTP 500 server error", "HTTP 503 server error"]
    assert ck[ids[2]]["errors"] == ["timeout after 1s"]
    assert ck[ids[3]]["errors"][0].startswith("connection error")
    assert ck[ids[4]]["status"] == "unparsed" and ck[ids[4]]["reason"].startswith("unparsed")
    assert ck[ids[4]]["text"].startswith("I'm sorry")
    assert ck[ids[5]]["errors"] == ["malformed response (not a chat completion)"]
    assert ck[ids[6]]["status"] == "failed" and ck[ids[6]]["reason"] == "HTTP 500 server error"
    assert rep.run["done"] == 6 and rep.run["failed"] == 1 and rep.run["unparsed"] == 1
    assert rep.run["retries"] == sum(by_key.values()) - 8
    recs = lines(out)
    assert sorted(r["id"] for r in recs) == sorted(set(ids) - {ids[4], ids[6]})


def test_resume_sends_only_missing_and_failed(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 12, facts=False)
    ids, out = pair_ids(cap), tmp_path / "out.jsonl"
    with ChatServer(script={ids[0]: ["500"] * 2}) as srv:  # counts are cumulative: the 3rd request of ids[0] is ok
        rep1 = run_openai(cap, out, srv, limit=5, max_attempts=2)
        first = dict(srv.stats()["by_key"])
        rep2 = run_openai(cap, out, srv, max_attempts=2)
        second = {k: n - first.get(k, 0) for k, n in srv.stats()["by_key"].items() if n - first.get(k, 0)}
        total = srv.stats()["requests"]
        rep3 = run_openai(cap, out, srv)
        assert srv.stats()["requests"] == total  # nothing left to send
    assert rep1.run["failed"] == 1 and first[ids[0]] == 2 and len(first) == 5
    done_first = set(first) - {ids[0]}
    assert not (done_first & set(second))
    assert second[ids[0]] == 1  # the failed one is tried again on the rerun
    assert set(second) == set(ids) - done_first and all(n == 1 for n in second.values())
    assert rep2.run["skipped"] == 4 and rep2.records == 12
    assert rep3.run["skipped"] == 12 and rep3.records == 12


def test_runner_generic_parse_callback(tmp_path, key):
    "The judge's use: arbitrary ids, a parse callback that rejects replies without two scores."
    reqs = [{"id": f"q{i}", "messages": [{"role": "user", "content": f"rate answer {i}"}]} for i in range(6)]
    def two_scores(t):
        a, b = t.split()[:2]
        return [int(a), int(b)]
    with ChatServer(replies={"q0": "no numbers here"}, reply_text="8 7\nGood answers.") as srv:
        cl = ChatClient("judge", base_url=srv.base_url, api_key_env=KEY_ENV, timeout=5)
        st = run_chat_requests(cl, reqs, tmp_path / "ck.jsonl", concurrency=3, max_attempts=2, parse=two_scores,
                               backoff=0.01, price_prompt=1.0, price_completion=2.0, progress=False)
        assert srv.stats()["by_key"] == {"q0": 2, **{f"q{i}": 1 for i in range(1, 6)}}
    ck = load_checkpoint(tmp_path / "ck.jsonl")
    assert ck["q1"]["parsed"] == [8, 7] and ck["q0"]["status"] == "unparsed"
    assert (st.done, st.unparsed, st.requests) == (5, 1, 7)
    assert st.cost == pytest.approx((st.prompt_tokens * 1.0 + st.completion_tokens * 2.0) / 1e6)


def test_runner_concurrency_is_bounded_and_used(tmp_path, key):
    reqs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"x {i}"}]} for i in range(16)]
    with ChatServer(latency=0.5, reply_text="ok") as srv:
        cl = ChatClient("m", base_url=srv.base_url, api_key_env=KEY_ENV)
        st = run_chat_requests(cl, reqs, tmp_path / "ck.jsonl", concurrency=8, progress=False)
        peak = srv.stats()["max_inflight"]
    assert st.done == 16 and st.requests == 16
    assert 6 <= peak <= 8, peak  # never more than 8 at once, and the pool is really used


def test_fatal_auth_error_stops_run_and_key_is_redacted(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 5, facts=False)
    with ChatServer(require_key="sk-the-right-one-000000") as srv:
        with pytest.raises(ChatRunError) as ei:
            run_openai(cap, tmp_path / "out.jsonl", srv, concurrency=1)
        assert srv.stats()["requests"] == 1  # a bad key is not retried
    assert "HTTP 401" in str(ei.value) and SECRET not in str(ei.value) and SECRET[:8] not in str(ei.value)


def test_cli_key_never_in_logs_outputs_or_errors(tmp_path, llavamed_cmd):
    cap = write_teacher_input(tmp_path / "captions.json", 6, facts=False)
    env = {**os.environ, KEY_ENV: SECRET}
    texts = []
    with ChatServer(require_key=SECRET, script={pair_ids(cap)[1]: ["500", "ok"]}) as srv:
        args = ["-v", "instruct", "--captions", str(cap), "--teacher", "openai", "--base-url", srv.base_url,
                "--model", "any", "--api-key-env", KEY_ENV, "--backoff", "0.01"]
        ok = subprocess.run([llavamed_cmd, *args, "--out", str(tmp_path / "ok.jsonl")], env=env, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        srv.configure(require_key="sk-a-different-key-11111")
        bad = subprocess.run([llavamed_cmd, *args, "--out", str(tmp_path / "bad.jsonl")], env=env, capture_output=True, text=True)
        assert bad.returncode != 0 and "HTTP 401" in bad.stderr
    texts += [ok.stdout, ok.stderr, bad.stdout, bad.stderr]
    texts += [p.read_text() for p in tmp_path.iterdir() if p.is_file() and p.name != "captions.json"]
    assert len(lines(tmp_path / "ok.jsonl")) == 6
    assert not [t for t in texts if SECRET in t or SECRET[:12] in t]


def test_cli_template_output_validates(tmp_path, llavamed_cmd):
    cap = write_teacher_input(tmp_path / "captions.json", 15)
    out = tmp_path / "out.jsonl"
    r = subprocess.run([llavamed_cmd, "instruct", "--captions", str(cap), "--out", str(out), "--teacher", "template"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    recs = lines(out)
    assert len(recs) == 15 and all(len(x["conversations"]) >= 4 for x in recs)
    assert len({x["conversations"][1]["value"] for x in recs}) > 1
    v = subprocess.run([llavamed_cmd, "validate", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr


def test_default_teacher_needs_facts(tmp_path):
    with_facts = write_teacher_input(tmp_path / "a.json", 5)
    assert self_instruct(str(with_facts), str(tmp_path / "a.jsonl"), quiet=True).teacher == "template"
    without = write_teacher_input(tmp_path / "b.json", 5, facts=False)
    with pytest.raises(ValueError, match="--model is required"):
        self_instruct(str(without), str(tmp_path / "b.jsonl"), quiet=True)
    with pytest.raises(ValueError, match="5 record\\(s\\) have no 'facts'"):
        self_instruct(str(without), str(tmp_path / "b.jsonl"), teacher="template", quiet=True)


def test_inline_mentions_reach_the_teacher(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 5, facts=False)
    seen = {}
    def reply(messages, key):
        seen[key] = messages[-1]["content"]
        return "User: What is shown?\nAssistant: A lesion is visible."
    with ChatServer(reply_fn=reply) as srv:
        run_openai(cap, tmp_path / "a.jsonl", srv)
        assert not any("was visible on imaging" in t for t in seen.values())
        seen.clear()
        run_openai(cap, tmp_path / "b.jsonl", srv, inline_mentions=True)
    assert len(seen) == 5 and all("was visible on imaging" in t for t in seen.values())


def test_leaky_turns_are_cleaned_and_counted(tmp_path, key):
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    ids = pair_ids(cap)
    replies = {ids[0]: "User: What is shown?\nAssistant: Based on the caption, a chest X-ray.\n"
                       "User: How old is the patient?\nAssistant: I cannot see the image, so I cannot tell.",
               ids[1]: "User: What does the caption say?\nAssistant: The caption describes an effusion.",
               ids[2]: "User: Where is it?\nAssistant: On the left, as mentioned in the text."}
    with ChatServer(replies=replies) as srv:
        rep = run_openai(cap, tmp_path / "out.jsonl", srv)
    recs = {r["id"]: r for r in lines(tmp_path / "out.jsonl")}
    assert set(recs) == {ids[0], ids[2]}
    assert [t["value"] for t in recs[ids[0]]["conversations"]][1] == "A chest X-ray."
    assert recs[ids[2]]["conversations"][1]["value"] == "On the left."
    assert rep.rule_hits == {"strip:based_on_caption": 1, "drop:cannot_see": 1, "drop:cites_caption": 1, "strip:as_mentioned": 1}
    assert rep.samples_dropped == {"no usable turn after cleaning (dropped by cites_caption)": 1}
    assert rep.pairs_in == 4 and rep.pairs_out == 2


def test_split_turns_formats():
    assert split_turns("1. **Question:** Which organ?\n   **Answer:** The liver.") == [("Which organ?", "The liver.")]
    assert split_turns("Human: A?\nGPT: B\nHuman: C?\nGPT: D") == [("A?", "B"), ("C?", "D")]
    with pytest.raises(ValueError): split_turns("")


@pytest.mark.slow
def test_sigkill_midway_then_resume_pays_nothing_twice(tmp_path, llavamed_cmd):
    cap = write_teacher_input(tmp_path / "captions.json", 60, facts=False)
    out = tmp_path / "out.jsonl"
    raw = sidecar_path(out)
    env = {**os.environ, KEY_ENV: SECRET}
    cmd = [llavamed_cmd, "instruct", "--captions", str(cap), "--out", str(out), "--teacher", "openai", "--model", "any",
           "--api-key-env", KEY_ENV, "--concurrency", "4", "--quiet"]
    with ChatServerProcess(latency=0.1) as srv:
        p = subprocess.Popen([*cmd, "--base-url", srv.base_url], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while len(lines(raw)) < 20 and time.time() < deadline and p.poll() is None: time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL); p.wait()
        saved = set(load_checkpoint(raw))
        assert 20 <= len(saved) < 60, len(saved)
        srv.reset()
        r = subprocess.run([*cmd, "--base-url", srv.base_url], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        by_key = srv.stats()["by_key"]
    assert not (saved & set(by_key)), "already-saved captions were requested again"
    assert set(by_key) | saved == set(pair_ids(cap))
    assert len(lines(out)) == 60 and len({x["id"] for x in lines(out)}) == 60


# ---- the verifier pass ----

def test_verify_keeps_records_at_the_threshold_and_records_every_score(tmp_path, capsys):
    from llavamed.cli import main
    from llavamed.verify import scores_path
    cap = write_teacher_input(tmp_path / "captions.json", 12)
    made = tmp_path / "instruct.jsonl"
    assert main(["instruct", "--captions", str(cap), "--out", str(made), "--quiet"]) == 0
    ids = [r["id"] for r in lines(made)]
    replies = {ids[0]: "faithful: 1\nanswerable: 5\nplausible: 5", ids[1]: "faithful: 4\nanswerable: 3\nplausible: 4",
               ids[2]: "I would rather not rate this."}
    out = tmp_path / "verified.jsonl"
    args = ["--json", "verify", "--pairs", str(made), "--captions", str(cap), "--out", str(out), "--model", "judge",
            "--api-key-env", "none", "--threshold", "4", "--backoff", "0.01", "--max-attempts", "2", "--quiet"]
    with ChatServer(reply_text="faithful: 5\nanswerable: 4\nplausible: 4", replies=replies) as srv:
        capsys.readouterr()
        assert main([*args, "--base-url", srv.base_url]) == 0
        rep = json.loads(capsys.readouterr().out)
        first = srv.stats()
        assert main([*args, "--base-url", srv.base_url]) == 0  # resumed: only the unrated record is asked again
        again = srv.stats()["requests"] - first["requests"]
    assert first["requests"] == 12 + 1 and again == 2
    assert (rep["kept"], rep["dropped"], rep["unrated"], rep["rated"]) == (9, 2, 1, 11)
    assert rep["kept_share"] == pytest.approx(9 / 12) and rep["score_counts"] == {"1": 1, "3": 1, "4": 9}
    assert sorted(r["id"] for r in lines(out)) == sorted(ids[3:])
    scores = load_checkpoint(scores_path(out))
    assert scores[ids[0]]["parsed"] == {"faithful": 1, "answerable": 5, "plausible": 5}
    assert scores[ids[2]]["status"] == "unparsed"


def test_verify_with_nothing_kept_exits_1_and_keeps_earlier_output(tmp_path, capsys):
    from llavamed.cli import main
    cap = write_teacher_input(tmp_path / "captions.json", 4)
    made, out = tmp_path / "instruct.jsonl", tmp_path / "verified.jsonl"
    assert main(["instruct", "--captions", str(cap), "--out", str(made), "--quiet"]) == 0
    out.write_text('{"earlier": "good output"}\n')
    with ChatServer(reply_text="faithful: 2\nanswerable: 2\nplausible: 2") as srv:
        code = main(["verify", "--pairs", str(made), "--captions", str(cap), "--out", str(out), "--model", "judge",
                     "--api-key-env", "none", "--base-url", srv.base_url, "--quiet"])
    assert code == 1 and "no record reached the threshold" in capsys.readouterr().out
    assert out.read_text() == '{"earlier": "good output"}\n'
    assert main(["verify", "--pairs", str(made), "--captions", str(cap), "--out", str(made), "--model", "m"]) == 2
    assert main(["verify", "--pairs", str(made), "--captions", str(cap), "--out", str(out), "--model", "m",
                 "--threshold", "7"]) == 2


def test_verify_through_the_batch_backend(tmp_path):
    from llavamed.verify import verify
    cap = write_teacher_input(tmp_path / "captions.json", 6)
    made = tmp_path / "instruct.jsonl"
    self_instruct(str(cap), str(made), quiet=True)
    ids = [r["id"] for r in lines(made)]
    with ChatServer(reply_text="faithful: 4\nanswerable: 4\nplausible: 5", batch_seconds=0.1,
                    replies={ids[0]: "faithful: 3\nanswerable: 4\nplausible: 5"}) as srv:
        rep = verify(str(made), str(cap), str(tmp_path / "v.jsonl"), model="judge", base_url=srv.base_url,
                     api_key_env="none", backend="batch", poll_interval=0.05, poll_max=0.2, quiet=True)
        st = srv.stats()
    assert st["requests"] == 0 and st["batch_lines"] == 6 and st["batches_created"] == 1
    assert (rep.kept, rep.dropped, rep.run["batches"]) == (5, 1, 1)


def test_verifier_sees_the_image(tmp_path):
    from PIL import Image
    from llavamed.verify import verify
    cap = write_teacher_input(tmp_path / "captions.json", 4)
    made = tmp_path / "instruct.jsonl"
    self_instruct(str(cap), str(made), quiet=True)
    recs = lines(made)
    (tmp_path / "images").mkdir()
    for r in recs: Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "images" / r["image"], "JPEG")
    seen = []
    def reply(messages, key):
        seen.append(messages[-1]["content"])
        return "faithful: 5\nanswerable: 5\nplausible: 5"
    with ChatServer(reply_fn=reply) as srv:
        rep = verify(str(made), str(cap), str(tmp_path / "v.jsonl"), model="judge", base_url=srv.base_url,
                     api_key_env="none", sees_image=True, image_size=128, quiet=True)
        st = srv.stats()
    assert st["image_parts"] == 4 and rep.kept == 4 and rep.prompt == "image-v1"
    assert seen[0][0]["text"].startswith("The figure is attached.") and seen[0][1]["type"] == "image_url"
    (tmp_path / "images" / recs[0]["image"]).unlink()
    with pytest.raises(ValueError, match="image file not found"):
        verify(str(made), str(cap), str(tmp_path / "v2.jsonl"), model="judge", base_url="http://127.0.0.1:9/v1",
               api_key_env="none", sees_image=True, quiet=True)
