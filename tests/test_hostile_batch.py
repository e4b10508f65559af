"""Hostile input for the self-instruct-at-scale paths: batch result files with malformed, unknown and repeated
lines, results for captions already done, files/batches API errors, a torn or edited batch journal, an
--extra-body that overrides what the client sets, merge inputs with bad lines or other formats, verifier replies
that are no scores. Against the loopback server with the real `openai` client; the key never in any output."""
import json, subprocess, sys, time
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer
from teacher_input import pair_ids, write_teacher_input
from llavamed.batch import journal_path, pending_ids, read_journal, result_rows
from llavamed.cli import main
from llavamed.client import ChatClient, load_checkpoint, parse_extra_body
from llavamed.core import read_jsonl
from llavamed.instruct import sidecar_path
from llavamed.verify import parse_scores

KEY_ENV = "LLAVAMED_TEST_HOSTILE_BATCH_KEY"
SECRET = "sk-hostile-batch-9f8e7d6c5b4a3210"


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    return SECRET


def batch_args(cap, out, srv, *more):
    return ["instruct", "--captions", str(cap), "--out", str(out), "--teacher", "openai", "--model", "any",
            "--api-key-env", KEY_ENV, "--backend", "batch", "--poll-interval", "0.02", "--poll-max", "0.05",
            "--quiet", "--base-url", srv.base_url, *more]


def one_error_line(err: str, command: str, *names: str) -> str:
    "The one stderr line 'llavamed COMMAND: error: ...' of a failed command, naming each of `names`."
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llavamed {command}: error: "), err
    for name in names: assert name in lines[0], (name, lines[0])
    return lines[0]


def no_secret_in(tmp_path, *texts):
    "Assert the key is in none of `texts` and in no file under `tmp_path`."
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p.name for p in files if SECRET[:8].encode() in p.read_bytes()]
    assert not [t for t in texts if SECRET[:8] in t]


# ---------------------------------------------------------------- batch result files
def test_malformed_unknown_and_repeated_result_lines_are_left_out_and_counted(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 4, facts=False)
    first, out = pair_ids(cap)[0], tmp_path / "out.jsonl"
    failed_again = json.dumps({"custom_id": first, "error": None, "response": {"status_code": 500, "body": {}}})
    extra = ["{not json", "[1, 2]", "42", '{"custom_id": null}', '{"custom_id": ["x"]}', failed_again,
             json.dumps({"custom_id": "not-in-this-batch", "response": {"status_code": 200, "body": {}}})]
    with ChatServer(batch_seconds=0.05, batch_output_extra=extra) as srv:
        assert main(["--json", *batch_args(cap, out, srv)]) == 0
        st = srv.stats()
    rep = json.loads(capsys.readouterr().out)
    assert st["batches_created"] == 1  # the repeated failure of an answered id is not retried
    assert rep["records"] == 4
    assert {r["status"] for r in load_checkpoint(sidecar_path(out)).values()} == {"done"}
    assert rep["run"]["ignored_lines"] == {"not a JSON object": 3, "custom_id not in this batch": 3,
                                           "repeated custom_id": 1}


def test_result_line_shapes_that_are_no_response_are_failures_not_crashes():
    lines = ['{"custom_id": "a", "response": "oops"}', '{"custom_id": "b", "error": "text"}',
             '{"custom_id": "c", "response": {"status_code": 200, "body": [1]}}',
             '{"custom_id": "d", "response": {"status_code": 400, "body": "str"}}',
             json.dumps({"custom_id": "e", "response": {"status_code": 200, "body": {
                 "choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": "many"}}}})]
    rows, again = result_rows("\n".join(lines), "", list("abcde"), None)
    assert {k: (r["status"], r["reason"]) for k, r in rows.items()} == {
        "a": ("failed", "batch line without an error or a response status"),
        "b": ("failed", "batch error: text"),
        "c": ("failed", "batch malformed response (no choices)"), "d": ("failed", "batch HTTP 400: "),
        "e": ("done", None)}
    assert rows["e"]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0} and again == {"a", "b", "c"}


def test_a_batch_result_never_replaces_an_answer_the_loop_gave_meanwhile(tmp_path, capsys, caplog):
    cap = write_teacher_input(tmp_path / "captions.json", 4, facts=False)
    first, out = pair_ids(cap)[0], tmp_path / "out.jsonl"
    with ChatServer(batch_seconds=0.5, batch_script={first: ["500"]}) as srv:
        assert main(batch_args(cap, out, srv, "--batch-wait", "0.05")) == 1  # the batch is still running
        assert pending_ids(sidecar_path(out)) == set(pair_ids(cap))
        loop = [a if a != "batch" else "loop" for a in batch_args(cap, out, srv)]
        caplog.clear()
        assert main(loop) == 0 and len(list(read_jsonl(out))) == 4
        assert "4 of these requests are still in unfinished batches (out.raw.batches.jsonl)" in caplog.text
        before = out.read_bytes()
        time.sleep(0.5)
        capsys.readouterr()
        assert main(["--json", *batch_args(cap, out, srv)]) == 0  # collects the batch: its 500 is not saved
        st = srv.stats()
    rep = json.loads(capsys.readouterr().out)
    assert st["batches_created"] == 1 and rep["run"]["already_done"] == 4
    assert {r["status"] for r in load_checkpoint(sidecar_path(out)).values()} == {"done"}
    assert out.read_bytes() == before


# ---------------------------------------------------------------- files and batches API errors
ROUTES = {"files.create": "upload of", "batches.create": "create of", "batches.retrieve": "status of",
          "files.content": "download of"}


def _api_error_run(tmp_path, capsys, route, codes):
    "Run instruct against a server whose `route` answers `codes`; (exit status, stderr); `out` held 'earlier'."
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n")
    (tmp_path / "out.raw.jsonl").write_text("")
    with ChatServer(batch_seconds=0.05, api_faults={route: codes}) as srv:
        rc = main(batch_args(cap, out, srv))
    err = capsys.readouterr()
    no_secret_in(tmp_path, err.out, err.err)
    return rc, err.err, out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("code", [401, 404])
def test_files_and_batches_errors_are_one_line_and_keep_output(tmp_path, capsys, route, code):
    rc, err, out = _api_error_run(tmp_path, capsys, route, [code] * 20)
    assert rc == 2 and out.read_text() == "earlier\n"
    line = one_error_line(err, "instruct", "batch API: " + ROUTES[route], f"HTTP {code}")
    if route == "batches.retrieve": assert "journal out.raw.batches.jsonl" in line


@pytest.mark.parametrize("route", ROUTES)
def test_a_passing_server_error_on_files_and_batches_is_retried(tmp_path, capsys, route):
    rc, err, out = _api_error_run(tmp_path, capsys, route, [500])
    assert rc == 0 and len(list(read_jsonl(out))) == 3, err


@pytest.mark.slow
def test_a_lasting_server_error_on_files_and_batches_stops_in_one_line(tmp_path, capsys):
    rc, err, out = _api_error_run(tmp_path, capsys, "files.content", [500] * 20)  # 5 attempts, backing off
    assert rc == 2 and out.read_text() == "earlier\n"
    one_error_line(err, "instruct", "batch API: download of", "HTTP 500 server error")


def test_a_failing_batch_listing_while_adopting_is_one_line(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    out = tmp_path / "out.jsonl"
    with ChatServer(batch_seconds=0.5) as srv:
        assert main(batch_args(cap, out, srv, "--batch-wait", "0.05")) == 1
        journal = journal_path(sidecar_path(out))
        rows = [r for r in read_jsonl(journal) if r["event"] != "created"]  # as if killed before 'created'
        journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
        srv.configure(api_faults={"batches.list": [401] * 20})
        capsys.readouterr()
        assert main(batch_args(cap, out, srv)) == 2
        assert srv.stats()["batches_created"] == 1
    one_error_line(capsys.readouterr().err, "instruct", "batch API: listing of batches", "HTTP 401")


def test_a_batch_that_stays_in_progress_stops_at_batch_wait_and_exits_1(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    out = tmp_path / "out.jsonl"
    with ChatServer(validate_seconds=1e9) as srv:  # never leaves 'validating'
        t0 = time.monotonic()
        assert main(batch_args(cap, out, srv, "--batch-wait", "0.3")) == 1
        assert time.monotonic() - t0 < 20 and srv.stats()["batches_created"] == 1
    assert "3 requests still in batches (run again to collect them)" in capsys.readouterr().out
    assert not out.exists()


# ---------------------------------------------------------------- the journal
def _pending_run(tmp_path, srv):
    "A run stopped by --batch-wait: its batch is created and journalled, not merged."
    cap = write_teacher_input(tmp_path / "captions.json", 4, facts=False)
    out = tmp_path / "out.jsonl"
    assert main(batch_args(cap, out, srv, "--batch-wait", "0.05")) == 1
    return cap, out, journal_path(sidecar_path(out))


@pytest.mark.parametrize("damage", ["torn", "junk_lines", "not_utf8"])
def test_a_torn_or_junk_journal_line_is_skipped_and_the_batch_collected(tmp_path, capsys, damage):
    with ChatServer(batch_seconds=0.3) as srv:
        cap, out, journal = _pending_run(tmp_path, srv)
        data = journal.read_bytes()
        journal.write_bytes({"torn": data + b'{"event": "merged", "chu',
                             "junk_lines": data + b'garbage\n[1, 2]\n{"chunk": [1]}\n{"event": "x"}\n',
                             "not_utf8": b"\xff\xfe junk\n" + data}[damage])
        time.sleep(0.3)
        assert main(batch_args(cap, out, srv)) == 0
        assert srv.stats()["batches_created"] == 1 and srv.stats()["batch_lines"] == 4
    assert len(list(read_jsonl(out))) == 4


@pytest.mark.parametrize("ids", [None, "abc", [1, 2]])
def test_a_journal_chunk_without_its_ids_is_refused_naming_the_journal(tmp_path, capsys, ids):
    with ChatServer(batch_seconds=0.3) as srv:
        cap, out, journal = _pending_run(tmp_path, srv)
        rows = list(read_jsonl(journal))
        for r in rows:
            if "ids" in r: r.pop("ids") if ids is None else r.update(ids=ids)
        journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        assert main(batch_args(cap, out, srv)) == 2
        assert srv.stats()["batches_created"] == 1
    one_error_line(capsys.readouterr().err, "instruct", str(journal), "has no list of request ids")
    assert not out.exists() and not load_checkpoint(sidecar_path(out))
    with pytest.raises(ValueError, match="has no list of request ids"): read_journal(journal)


def test_a_journalled_batch_the_server_does_not_know_names_the_journal(tmp_path, capsys):
    with ChatServer(batch_seconds=0.3) as srv:
        cap, out, journal = _pending_run(tmp_path, srv)
        rows = [{**r, "batch_id": "batch_999999"} if "batch_id" in r else r for r in read_jsonl(journal)]
        journal.write_text("".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        assert main(batch_args(cap, out, srv)) == 2
    one_error_line(capsys.readouterr().err, "instruct", "status of batch_999999", journal.name, "HTTP 404")


# ---------------------------------------------------------------- --extra-body
@pytest.mark.parametrize("body, says", [
    ('{"model": "other"}', "--extra-body sets model, which llavamed sets itself (use --model)"),
    ('{"messages": []}', "--extra-body sets messages, which llavamed sets itself"),
    ('{"stream": true}', "--extra-body sets stream, which llavamed sets itself; llavamed asks for one reply"),
    ('{"temperature": 2, "top_k": 5}', "sets temperature, which llavamed sets itself (use --temperature)"),
    ("{bad", "--extra-body: not JSON"),
    ("[1]", "--extra-body: want a JSON object, got list"),
])
@pytest.mark.parametrize("backend", ["loop", "batch"])
def test_extra_body_overriding_the_request_is_refused_before_any_request(tmp_path, capsys, body, says, backend):
    cap = write_teacher_input(tmp_path / "captions.json", 2, facts=False)
    with ChatServer(batch_seconds=0.05) as srv:
        args = [a if a != "batch" else backend for a in batch_args(cap, tmp_path / "out.jsonl", srv)]
        assert main([*args, "--extra-body", body]) == 2
        assert srv.stats()["requests"] == 0 and srv.stats()["uploads"] == 0
    one_error_line(capsys.readouterr().err, "instruct", says)


def test_extra_body_fields_the_client_does_not_set_pass_through():
    assert parse_extra_body('{"top_k": 20}') == {"top_k": 20}
    assert ChatClient("m", extra_body={"top_k": 20}).body([])["top_k"] == 20
    with pytest.raises(ValueError, match="ChatClient.extra_body sets model"):
        ChatClient("m", extra_body={"model": "x"})


# ---------------------------------------------------------------- merge
def _rec(i):
    return {"id": str(i), "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat is shown in image {i}?"},
        {"from": "gpt", "value": "A chest X-ray."}]}


def _jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_merge_skips_a_torn_last_line_and_counts_it(tmp_path, capsys):
    a = _jsonl(tmp_path / "a.jsonl", [_rec(i) for i in range(60)])
    b = _jsonl(tmp_path / "b.jsonl", [_rec(i) for i in range(60, 120)], tail=json.dumps(_rec(120))[:25])
    assert main(["--json", "merge", "--inputs", f"{a},{b}", "--out", str(tmp_path / "m.jsonl")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 120 and rep["bad_records"] == {"malformed JSON": 1}
    assert len(list(read_jsonl(tmp_path / "m.jsonl"))) == 120


@pytest.mark.parametrize("bad, says", [
    ({"id": "x", "image": "x.jpg", "messages": []}, "no 'conversations' at line 2"),
    ({"id": "x", "image": "x.jpg", "conversations": "not a list"}, "'conversations' is a str, expected a list"),
    ({"id": "x", "conversations": [{"from": "human"}]}, "turn 0 is not"),
])
def test_merge_stops_on_records_of_another_format_and_keeps_output(tmp_path, capsys, bad, says):
    a = _jsonl(tmp_path / "a.jsonl", [_rec(1)])
    b = _jsonl(tmp_path / "b.jsonl", [_rec(2), bad])
    out = tmp_path / "m.jsonl"
    out.write_text("earlier\n")
    assert main(["merge", "--inputs", f"{a},{b}", "--out", str(out)]) == 2
    one_error_line(capsys.readouterr().err, "merge", str(b), "1 of 2 records are bad", says)
    assert out.read_text() == "earlier\n"


def test_merge_reads_a_json_array_and_a_glob_skips_its_own_output(tmp_path, capsys):
    (tmp_path / "s0.json").write_text(json.dumps([_rec(1), _rec(2)]))
    _jsonl(tmp_path / "s1.json", [_rec(3)])
    args = ["merge", "--inputs", f"{tmp_path}/*.json", "--out", str(tmp_path / "all.json")]
    assert main(args) == 0 and main(args) == 0  # the second run's glob also matches all.json: skipped
    assert [r["id"] for r in read_jsonl(tmp_path / "all.json")] == ["1", "2", "3"]


# ---------------------------------------------------------------- verify replies
@pytest.mark.parametrize("reply, says", [
    ("faithful: five\nanswerable: 5\nplausible: 5", "no score for 'faithful'"),
    ("faithful: 9\nanswerable: 5\nplausible: 5", "faithful=9: off the scale 1-5"),
    ("faithful: 4.5\nanswerable: 5\nplausible: 5", "faithful=4.5: off the scale"),
    ("faithful: 5\nfaithful: 1\nanswerable: 5\nplausible: 5", "faithful: different scores (5, 1)"),
])
def test_verifier_replies_that_are_no_scores_are_refused(reply, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")): parse_scores(reply)


def test_verify_counts_unparseable_replies_as_unrated_through_both_backends(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 6)
    pairs = tmp_path / "pairs.jsonl"
    assert main(["instruct", "--captions", str(cap), "--out", str(pairs), "--quiet"]) == 0
    ids = [r["id"] for r in read_jsonl(pairs)]
    replies = {ids[0]: "faithful: 5\nfaithful: 1\nanswerable: 5\nplausible: 5", ids[1]: "faithful: 9",
               ids[2]: "Faithful = 5, answerable = 4, plausible = 4"}
    for backend in ("loop", "batch"):
        out = tmp_path / f"kept_{backend}.jsonl"
        with ChatServer(reply_text="faithful: 4\nanswerable: 4\nplausible: 4", replies=replies,
                        batch_seconds=0.05) as srv:
            capsys.readouterr()
            assert main(["--json", "verify", "--pairs", str(pairs), "--captions", str(cap), "--out", str(out),
                         "--model", "v", "--api-key-env", KEY_ENV, "--base-url", srv.base_url,
                         "--max-attempts", "1",
                         "--backend", backend, "--poll-interval", "0.02", "--poll-max", "0.05", "--quiet"]) == 0
            sent = srv.stats()["requests"] + srv.stats()["batch_lines"]
        rep = json.loads(capsys.readouterr().out)
        assert (rep["rated"], rep["unrated"], rep["kept"]) == (4, 2, 4) and sent == 6, (backend, rep, sent)
    no_secret_in(tmp_path)


# ---------------------------------------------------------------- a real process
def test_cli_process_with_a_broken_batch_output_has_no_traceback(tmp_path, llavamed_cmd):
    import os
    from chat_server import ChatServerProcess
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    out = tmp_path / "out.jsonl"
    with ChatServerProcess(batch_seconds=0.05, batch_output_extra=["[1]", "{torn"]) as srv:
        p = subprocess.run([llavamed_cmd, *batch_args(cap, out, srv)], capture_output=True, text=True,
                           env={**os.environ, KEY_ENV: SECRET}, timeout=120)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "left out of its results" in p.stderr and len(list(read_jsonl(out))) == 3
    no_secret_in(tmp_path, p.stdout, p.stderr)


# ---------------------------------------------------------------- prompt and rules files
@pytest.mark.parametrize("content, says", [
    (b"", "want a YAML mapping, got NoneType"),
    (b"- a\n- b\n", "want a YAML mapping, got list"),
    (b"a: [unclosed\n", "not a YAML text (ParserError)"),
    (b"\xff\xfe\x00", "not a YAML text (UnicodeDecodeError)"),
])
@pytest.mark.parametrize("command, flag, what", [("instruct", "--rules", "cleaning rules"),
                                                 ("instruct", "--prompt", "prompt template"),
                                                 ("verify", "--prompt", "verifier prompt")])
def test_a_prompt_or_rules_file_that_is_no_yaml_mapping_is_one_line(tmp_path, capsys, content, says, command,
                                                                     flag, what):
    cap = write_teacher_input(tmp_path / "captions.json", 2)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    out = tmp_path / "out.jsonl"
    args = {"instruct": ["instruct", "--captions", str(cap), "--out", str(out), "--quiet"],
            "verify": ["verify", "--pairs", str(cap), "--captions", str(cap), "--out", str(out), "--model", "m",
                       "--api-key-env", "none", "--base-url", "http://127.0.0.1:9/v1"]}[command]
    assert main([*args, flag, str(bad)]) == 2
    one_error_line(capsys.readouterr().err, command, f"{what} {bad}: {says}")
    assert not out.exists()


@pytest.mark.parametrize("rules, says", [("drop: [a, b]\n", "drop: want a mapping of rules"),
                                         ("drop:\n  x: 5\n", "rule drop.x: bad pattern")])
def test_cleaning_rules_of_the_wrong_shape_are_one_line(tmp_path, capsys, rules, says):
    cap = write_teacher_input(tmp_path / "captions.json", 2)
    (tmp_path / "r.yaml").write_text(rules)
    assert main(["instruct", "--captions", str(cap), "--out", str(tmp_path / "o.jsonl"), "--rules",
                 str(tmp_path / "r.yaml")]) == 2
    one_error_line(capsys.readouterr().err, "instruct", says)


def test_a_negative_batch_wait_is_refused_before_anything_is_read(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 2)
    assert main(["instruct", "--captions", str(cap), "--out", str(tmp_path / "o.jsonl"), "--batch-wait", "-1"]) == 2
    one_error_line(capsys.readouterr().err, "instruct", "BatchSettings.wait=-1.0: must be >= 0 seconds")


def test_requests_hold_no_prompt_until_sent():
    "600K figures with 9 KB of few-shot prompt each would hold 5 GB: messages are built when a request is sent."
    from llavamed.instruct import _lazy_messages, build_messages, load_prompt
    rec = {"pair_id": "1_F1", "fig_caption": "Axial CT of the abdomen.", "in_text_mention": "A mass (Figure 1)."}
    lazy = _lazy_messages(rec, load_prompt(), True, None, 768)
    assert callable(lazy) and lazy() == build_messages(rec, load_prompt(), True)
    assert ChatClient("m").body(lazy)["messages"] == build_messages(rec, load_prompt(), True)


@pytest.mark.parametrize("backend", ["loop", "batch"])
def test_an_unreadable_figure_fails_its_request_once_not_the_run(tmp_path, capsys, backend):
    from PIL import Image
    cap = write_teacher_input(tmp_path / "captions.json", 60, facts=False)
    (tmp_path / "images").mkdir()
    ids = pair_ids(cap)
    for i, pid in enumerate(ids):
        if i == 3: (tmp_path / "images" / f"{pid}.jpg").write_text("not an image")
        else: Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / "images" / f"{pid}.jpg")
    out = tmp_path / "out.jsonl"
    with ChatServer(batch_seconds=0.05) as srv:
        args = [a if a != "batch" else backend for a in batch_args(cap, out, srv, "--teacher-sees-image")]
        assert main(args) == 0
        st = srv.stats()
    row = load_checkpoint(sidecar_path(out))[ids[3]]
    assert row["status"] == "failed" and row["attempts"] <= 1
    assert row["reason"].startswith("request not built: ") and "it holds text" in row["reason"]
    assert len(list(read_jsonl(out))) == 59 and st["requests"] + st["batch_lines"] == 59


def test_verify_rates_again_a_record_whose_conversation_changed(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 5)
    pairs = tmp_path / "pairs.jsonl"
    assert main(["instruct", "--captions", str(cap), "--out", str(pairs), "--quiet"]) == 0
    recs = list(read_jsonl(pairs))
    out = tmp_path / "kept.jsonl"
    args = ["--json", "verify", "--pairs", str(pairs), "--captions", str(cap), "--out", str(out), "--model", "v",
            "--api-key-env", "none", "--quiet"]
    with ChatServer(reply_text="faithful: 5\nanswerable: 5\nplausible: 5") as srv:
        assert main([*args, "--base-url", srv.base_url]) == 0 and srv.stats()["requests"] == 5
        assert main([*args, "--base-url", srv.base_url]) == 0 and srv.stats()["requests"] == 5  # nothing changed
        recs[2]["conversations"][1]["value"] = "A different answer the teacher gave on a rerun."
        pairs.write_text("".join(json.dumps(r) + "\n" for r in recs))
        srv.configure(replies={recs[2]["id"]: "faithful: 1\nanswerable: 5\nplausible: 5"})
        capsys.readouterr()
        assert main([*args, "--base-url", srv.base_url]) == 0
        assert srv.stats()["requests"] == 6  # only the changed record is asked again
    rep = json.loads(capsys.readouterr().out)
    assert rep["kept"] == 4 and rep["dropped"] == 1
    assert recs[2]["id"] not in [r["id"] for r in read_jsonl(out)]
