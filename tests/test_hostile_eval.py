"""Hostile input for `score` and `judge`: bad records are skipped and counted up to a threshold, empty or
unpaired inputs end in one line and exit 2, earlier outputs stay byte-identical, a killed judge resumes."""
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from llavamed.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer

KEY_ENV = "LLAVAMED_TEST_JUDGE_KEY"


def _vqa(i, a="yes", t="CLOSED"):
    return {"id": f"q{i}", "image": f"q{i}.png", "answer_type": t,
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": a}]}


def _answer(i, text="yes"):
    return json.dumps({"question_id": f"q{i}", "text": text}) + "\n"


@pytest.fixture
def scored(tmp_path):
    "A 100-question VQA file, its answers, and a good earlier score file in --out."
    gt, pred, out = tmp_path / "test.json", tmp_path / "answers.jsonl", tmp_path / "score.json"
    gt.write_text(json.dumps([_vqa(i) for i in range(100)]))
    pred.write_text("".join(_answer(i) for i in range(100)))
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    return gt, pred, out, out.read_bytes()


def _one_error_line(capsys, command: str, *names: str) -> str:
    "The stderr of a failed command: one line 'llavamed COMMAND: error: ...' naming every one of `names`."
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llavamed {command}: error: "), err
    for name in names: assert name in lines[0], (name, lines[0])
    return lines[0]


def _score(pred, gt, out):
    return main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out)])


# ---------------------------------------------------------------- score
@pytest.mark.parametrize("case, content, expected", [
    ("empty", "", "no answers"),
    ("blank_lines", "\n\n\n", "no answers"),
    ("unpaired", "".join(_answer(i + 1000) for i in range(5)), "none of its 5 answers is for a question"),
    ("wrong_top_level", "42\n", "an answer needs 'question_id' and 'text' at line 1"),
    ("missing_keys", '{"question_id": "q1"}\n', "an answer needs 'question_id' and 'text' at line 1"),
    ("truncated", '{"question_id": "q1", "te', "malformed JSON at line 1"),
    ("not_utf8", '{"question_id": "q1", "text": "caf\xe9"}\n', "not UTF-8 text at line 1"),
])
def test_score_bad_answers_exit_2_and_keep_the_old_score(scored, tmp_path, capsys, case, content, expected):
    gt, _, out, before = scored
    pred = tmp_path / f"{case}.jsonl"
    pred.write_bytes(content.encode("latin-1"))
    capsys.readouterr()
    assert _score(pred, gt, out) == 2
    _one_error_line(capsys, "score", str(pred), expected)
    assert out.read_bytes() == before


def test_score_skips_and_counts_one_bad_answer_line(scored, tmp_path, capsys):
    gt, pred, out, _ = scored
    lines = pred.read_text().splitlines(keepends=True)
    lines[56] = '{"question_id": "q56", "te\n'
    pred.write_text("".join(lines))
    capsys.readouterr()
    assert main(["--json", "score", "--pred", str(pred), "--gt", str(gt), "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_bad_answers"] == 1 and "malformed JSON at line 57 (1)" in res["bad_answers"]
    assert res["n_missing"] == 1 and res["missing_ids"] == ["q56"]  # the skipped answer is a missing one
    assert json.loads(out.read_text()) == res


def test_score_stops_past_the_threshold_with_the_counts(scored, tmp_path, capsys):
    gt, pred, out, before = scored
    lines = pred.read_text().splitlines(keepends=True)
    for i in (3, 10, 20): lines[i] = "not json\n"
    lines[40] = '{"question_id": "q40"}\n'
    pred.write_text("".join(lines))
    capsys.readouterr()
    assert _score(pred, gt, out) == 2
    line = _one_error_line(capsys, "score", str(pred), "4 of 100 records are bad")
    assert "malformed JSON at line 4 (3)" in line
    assert "an answer needs 'question_id' and 'text' at line 41 (1)" in line
    assert out.read_bytes() == before


def test_score_skips_a_bad_question_and_stops_on_an_empty_vqa_file(scored, tmp_path, capsys):
    gt, pred, out, before = scored
    records = [_vqa(i) for i in range(100)]
    records[5]["conversations"] = records[5]["conversations"][:1]  # no reference answer
    gt.write_text(json.dumps(records))
    capsys.readouterr()
    assert main(["--json", "score", "--pred", str(pred), "--gt", str(gt)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_bad_questions"] == 1 and "no answer turn after the question" in res["bad_questions"]
    assert res["n_questions"] == 99 and res["n_extra"] == 1
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert _score(pred, empty, out) == 2
    _one_error_line(capsys, "score", str(empty), "no questions")
    assert out.read_bytes() == before


@pytest.mark.parametrize("flag", ["--out", "--details"])
def test_score_refuses_to_write_over_its_inputs(scored, tmp_path, capsys, flag):
    gt, pred, out, _ = scored
    link = tmp_path / "link.json"
    link.symlink_to(gt)
    gt_before = gt.read_bytes()
    capsys.readouterr()
    assert main(["score", "--pred", str(pred), "--gt", str(gt), flag, str(link)]) == 2
    _one_error_line(capsys, "score", f"{flag} {link}", "--gt file")
    assert gt.read_bytes() == gt_before


def test_score_writes_score_and_details_as_one_set(scored, tmp_path, monkeypatch):
    "A kill between the two renames leaves the new score alone, never an old details file beside it."
    gt, pred, out, _ = scored
    details = tmp_path / "details.jsonl"
    args = ["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--details", str(details)]
    assert main(args) == 0
    import llavamed.core as core
    real, calls = os.replace, []
    def killed_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2: raise KeyboardInterrupt  # stands for a kill between the renames
        real(src, dst)
    monkeypatch.setattr(core.os, "replace", killed_after_first)
    pred.write_text("".join(_answer(i, "no") for i in range(100)))
    assert main(args) == 130
    assert json.loads(out.read_text())["closed_accuracy"] == 0.0 and not details.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- judge
QA = [{"question_id": i, "image": f"{i}.png", "text": f"What does image {i} show?\n<image>",
       "gpt4_answer": f"A right pleural effusion, case {i}.", "fig_caption": f"Chest X-ray {i}, effusion.",
       "domain": {"chest_xray": True}, "type": "conversation"} for i in range(12)]


def _judge_files(tmp_path, n=12, answers=None):
    q, a = tmp_path / "qa.jsonl", tmp_path / "answers.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in QA[:n]))
    rows = [json.dumps({"question_id": i, "text": f"An effusion {i}."}) + "\n" for i in range(n)]
    a.write_text("".join(rows) if answers is None else answers)
    return q, a


def _judge_args(q, a, out, *more):
    return ["judge", "--questions", str(q), "--answers", str(a), "--out", str(out), *more]


@pytest.fixture
def judged(tmp_path):
    "Benchmark files and a good earlier judge run (the offline judge) in --out: its reviews and summary."
    q, a = _judge_files(tmp_path)
    out = tmp_path / "reviews.jsonl"
    assert main(_judge_args(q, a, out, "--judge", "overlap")) == 0
    summary = out.with_name("reviews.summary.json")
    return q, a, out, {p: p.read_bytes() for p in (out, summary)}


@pytest.mark.parametrize("case, answers, expected", [
    ("empty", "", "no answers"),
    ("unpaired", '{"question_id": 99, "text": "x"}\n', "none of its 1 answers is for a question"),
    ("missing_keys", '{"question_id": 1}\n', "an answer needs 'question_id' and 'text' at line 1"),
    ("not_utf8", '{"question_id": 1, "text": "caf\xe9"}\n', "not UTF-8 text at line 1"),
])
def test_judge_bad_answers_exit_2_and_keep_the_old_reviews(judged, tmp_path, capsys, case, answers, expected):
    q, _, out, before = judged
    a = tmp_path / f"{case}.jsonl"
    a.write_bytes(answers.encode("latin-1"))
    capsys.readouterr()
    assert main(_judge_args(q, a, out, "--judge", "overlap")) == 2
    _one_error_line(capsys, "judge", str(a), expected)
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize("case, questions, expected", [
    ("empty", "", "no questions"),
    ("truncated", json.dumps(QA[0])[:40], "malformed JSON at line 1"),
    ("no_reference", json.dumps({k: v for k, v in QA[0].items() if k != "gpt4_answer"}) + "\n",
     "no 'gpt4_answer' at line 1 (id 0)"),
])
def test_judge_bad_questions_exit_2_and_keep_the_old_reviews(judged, tmp_path, capsys, case, questions,
                                                             expected):
    _, a, out, before = judged
    q = tmp_path / f"{case}.jsonl"
    q.write_text(questions)
    capsys.readouterr()
    assert main(_judge_args(q, a, out, "--judge", "overlap")) == 2
    _one_error_line(capsys, "judge", str(q), expected)
    assert {p: p.read_bytes() for p in before} == before


def test_judge_skips_and_counts_a_bad_answer_line(tmp_path, capsys):
    rows = [json.dumps({"question_id": i, "text": "effusion"}) + "\n" for i in range(60)]
    rows[30] = "{torn\n"
    qa = [{**QA[0], "question_id": i} for i in range(60)]
    q, a = tmp_path / "qa.jsonl", tmp_path / "answers.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in qa)); a.write_text("".join(rows))
    assert main(["--json", *_judge_args(q, a, tmp_path / "r.jsonl", "--judge", "overlap")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["skipped"] == {"answers": "1 bad: malformed JSON at line 31 (1)"} and s["missing_ids"] == ["30"]


def test_judge_refuses_to_write_over_its_inputs(judged, tmp_path, capsys):
    q, a, out, before = judged
    a_before = a.read_bytes()
    capsys.readouterr()
    assert main(_judge_args(q, a, a, "--judge", "overlap")) == 2
    _one_error_line(capsys, "judge", f"--out {a}", "--answers file")
    assert main(_judge_args(q, a, out, "--cache", str(q))) == 2
    _one_error_line(capsys, "judge", f"--cache {q}", "--questions file")
    assert a.read_bytes() == a_before and {p: p.read_bytes() for p in before} == before


def test_judge_with_every_review_failed_exits_1_and_keeps_the_old_reviews(judged, capsys, monkeypatch):
    q, a, out, before = judged
    monkeypatch.setenv(KEY_ENV, "sk-loopback-test")
    with ChatServer(reply_text="I cannot rate these answers.") as srv:
        rc = main(_judge_args(q, a, out, "--model", "m", "--base-url", srv.base_url, "--api-key-env", KEY_ENV,
                              "--order", "official", "--max-attempts", "1", "--quiet"))
    assert rc == 1
    captured = capsys.readouterr()
    assert "nothing written" in captured.out and "Traceback" not in captured.err
    assert {p: p.read_bytes() for p in before} == before


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines() if path.exists() else []


def test_killed_judge_resumes_with_only_the_missing_requests(judged, tmp_path, llavamed_cmd):
    "SIGKILL of a real `llavamed judge` mid-run, a torn line added to its cache: the rerun sends the rest."
    q, a, out, before = judged
    cache = out.with_name("reviews.cache.jsonl")
    env = {**os.environ, KEY_ENV: "sk-loopback-test"}
    args = _judge_args(q, a, out, "--model", "m", "--api-key-env", KEY_ENV, "--order", "official",
                       "--concurrency", "1", "--quiet")
    with ChatServer(reply_text="8 6\nThe first answer is better.", latency=0.25) as srv:
        p = subprocess.Popen([llavamed_cmd, *args, "--base-url", srv.base_url], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while len(_lines(cache)) < 3 and time.time() < deadline and p.poll() is None: time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL); p.wait()
        saved = {json.loads(line)["id"] for line in _lines(cache)}
        assert 3 <= len(saved) < 12, len(saved)
        assert {p: p.read_bytes() for p in before} == before  # a killed run leaves the earlier set as it was
        with open(cache, "ab") as f: f.write(b'{"id": "torn-by-a-kill", "sta')  # a kill inside an append
        srv.reset()
        r = subprocess.run([llavamed_cmd, *args, "--base-url", srv.base_url], env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        sent = set(srv.stats()["by_key"])
    assert "cut a torn last line" in r.stderr and "Traceback" not in r.stderr
    assert not (sent & saved) and len(sent | saved) == 12  # only the unfinished reviews were requested
    assert all(json.loads(line)["id"] != "torn-by-a-kill" for line in _lines(cache))
    reviews = [json.loads(line) for line in _lines(out)]
    summary = json.loads(out.with_name("reviews.summary.json").read_text())
    assert len(reviews) == 12 and all(r["status"] == "done" and r["reference_score"] == 8.0 for r in reviews)
    assert summary["reviews_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()  # one set


def test_judge_kill_between_the_writes_leaves_no_summary_of_another_run(judged, monkeypatch):
    q, a, out, before = judged
    summary = out.with_name("reviews.summary.json")
    import llavamed.core as core
    real, calls = os.replace, []
    def killed_after_first(src, dst):
        calls.append(dst)
        if len(calls) == 2: raise KeyboardInterrupt  # stands for a kill between the renames
        real(src, dst)
    monkeypatch.setattr(core.os, "replace", killed_after_first)
    a.write_text(json.dumps({"question_id": 0, "text": "Nothing."}) + "\n")
    assert main(_judge_args(q, a, out, "--judge", "overlap")) == 130
    assert out.read_bytes() != before[out] and not summary.exists()


def test_score_and_judge_stop_on_a_huge_answer(scored, judged, tmp_path, capsys):
    "A 20 MB answer is no model's answer: one line naming the file, line and setting; earlier outputs kept."
    gt, _, out, before = scored
    pred = tmp_path / "huge.jsonl"
    pred.write_text(_answer(0, "yes " * 5_000_000) + "".join(_answer(i) for i in range(1, 100)))
    capsys.readouterr()
    assert _score(pred, gt, out) == 2
    _one_error_line(capsys, "score", str(pred), "line 1 (question q0)", "max_answer_chars 100,000")
    assert out.read_bytes() == before
    q, a, reviews, judged_before = judged
    a.write_text(json.dumps({"question_id": 0, "text": "lung " * 5_000_000}) + "\n")
    assert main(_judge_args(q, a, reviews, "--judge", "overlap")) == 2
    _one_error_line(capsys, "judge", str(a), "line 1 (question 0)", "max_answer_chars")
    assert {p: p.read_bytes() for p in judged_before} == judged_before


def test_judge_keeps_base_url_credentials_out_of_its_outputs(tmp_path, capsys, monkeypatch):
    q, a = _judge_files(tmp_path, n=2)
    out = tmp_path / "r.jsonl"
    monkeypatch.setenv(KEY_ENV, "sk-loopback-test")
    with ChatServer(reply_text="8 6\nThe first answer is better.") as srv:
        url = srv.base_url.replace("http://", "http://judge-user:s3cr3t-in-url@")
        assert main(["--json", *_judge_args(q, a, out, "--model", "m", "--base-url", url, "--api-key-env", KEY_ENV,
                                           "--order", "official", "--quiet")]) == 0
    captured = capsys.readouterr()
    files = [p.read_text() for p in tmp_path.iterdir() if p.is_file()]
    for text in [captured.out, captured.err, *files]: assert "s3cr3t-in-url" not in text
    assert json.loads(captured.out)["judge"] == f"openai:m at {srv.base_url}, order=official"


# ---------------------------------------------------------------- multiple choice
def _choice(i, options=("left", "right"), label="B"):
    return {"id": f"q{i}", "image": f"q{i}.png", "answer_type": "CHOICE", "options": list(options),
            "answer_label": label, "conversations": [{"from": "human", "value": "<image>\nWhich side?"},
                                                     {"from": "gpt", "value": "right"}]}


@pytest.mark.parametrize("bad, reason", [
    (dict(options=("left",)), "fewer than two options at id q7 (1)"),
    (dict(options=()), "fewer than two options at id q7 (1)"),
    (dict(label="E"), "answer_label outside the options at id q7 (1)"),
    (dict(label="AB"), "answer_label outside the options at id q7 (1)"),
    (dict(options=(1, 2)), "an option that is no text at id q7 (1)"),
    (dict(options=("left", None)), "an option that is no text at id q7 (1)"),
    (dict(options=("left", "left")), "two options alike at id q7 (1)"),
])
def test_score_counts_an_unusable_choice_record(scored, tmp_path, capsys, bad, reason):
    gt, pred, out, _ = scored
    records = [_choice(i) for i in range(100)]
    records[7] = _choice(7, **bad)
    gt.write_text(json.dumps(records))
    pred.write_text("".join(_answer(i, "B") for i in range(100)))
    capsys.readouterr()
    assert main(["--json", "score", "--pred", str(pred), "--gt", str(gt), "--protocol", "llava-med,lmms-eval"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_bad_questions"] == 1 and reason in res["bad_questions"], res["bad_questions"]
    assert res["n_questions"] == 99 and res["n_choice"] == 99 and res["llava-med"]["choice_accuracy"] == 100.0


def test_score_stops_on_too_many_unusable_choice_records(scored, tmp_path, capsys):
    gt, pred, out, before = scored
    records = [_choice(i) for i in range(100)]
    for i in (2, 3, 4): records[i] = _choice(i, label="Z")
    gt.write_text(json.dumps(records))
    capsys.readouterr()
    assert _score(pred, gt, out) == 2
    _one_error_line(capsys, "score", str(gt), "3 of 100 records are bad", "answer_label outside the options at id q2 (3)")
    assert out.read_bytes() == before


def test_score_choice_letter_outside_the_options_is_unparsed(scored, tmp_path, capsys):
    gt, pred, out, _ = scored
    gt.write_text(json.dumps([_choice(i) for i in range(4)]))
    pred.write_text("".join(_answer(i, t) for i, t in enumerate(["B", "(C)", "Answer: A or B", "right"])))
    capsys.readouterr()
    assert main(["--json", "score", "--pred", str(pred), "--gt", str(gt)]) == 0
    res = json.loads(capsys.readouterr().out)
    # q0 'B' right; q1 'C' is no option (two options): unparsed; q2 two letters: unparsed; q3 the option text: B
    assert (res["choice_accuracy"], res["n_unparsed"], res["n_choice"]) == (50.0, 2, 4)


@pytest.mark.parametrize("content, says", [
    (None, "cand.json: no such file"),
    (b"\xff\xfe{}", "cand.json: not UTF-8 text (byte 0)"),
    (b'{"0": "yes"}', "expected a non-empty candidate list"),
    (b'{"0": [["yes"]]}', "candidate 0 is a list, expected text or an integer"),
])
def test_score_candidates_that_are_no_list_are_one_line_and_keep_the_old_score(scored, tmp_path, capsys,
                                                                                  content, says):
    gt, pred, out, before = scored
    cand = tmp_path / "cand.json"
    if content is not None: cand.write_bytes(content)
    capsys.readouterr()
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--protocol",
                 "llava-med-run-eval", "--candidates", str(cand)]) == 2
    _one_error_line(capsys, "score", says)
    assert out.read_bytes() == before


@pytest.mark.parametrize("edit, says", [
    (lambda d: {**d, "protocols": "llava-med"}, "'protocols' is 'llava-med', expected a list of protocol names"),
    (lambda d: {**d, "protocols": []}, "'protocols' is [], expected a list"),
    (lambda d: {**d, "protocols": ["bogus"]}, "protocol 'bogus': expected one of"),
    (lambda d: {**d, "closed_accuracy": "high"}, "protocol 'llava-med': closed_accuracy='high' is not a number"),
    (lambda d: {k: v for k, v in d.items() if k != "n_missing"}, "missing n_missing"),
])
def test_report_refuses_an_edited_score_result_in_one_line(scored, tmp_path, capsys, edit, says):
    _, _, out, _ = scored
    out.write_text(json.dumps(edit(json.loads(out.read_text()))))
    capsys.readouterr()
    assert main(["report", "--inputs", str(out), "--out", str(tmp_path / "rep")]) == 2
    _one_error_line(capsys, "report", str(out), "not a usable score result", says)
    assert not (tmp_path / "rep" / "report.md").exists()


def test_report_names_a_score_file_that_is_not_utf8(tmp_path, capsys):
    bad = tmp_path / "s.json"
    bad.write_bytes(b"\xff\xfe{}")
    assert main(["report", "--inputs", str(bad), "--out", str(tmp_path / "rep")]) == 2
    _one_error_line(capsys, "report", f"{bad}: not UTF-8 text (byte 0)")


@pytest.mark.slow  # each reply without a verdict is asked again, backing off: about 13 s
def test_score_with_no_judge_verdict_at_all_exits_1_and_keeps_the_old_score(scored, tmp_path, capsys):
    gt, pred, out, before = scored
    gt.write_text(json.dumps([_vqa(i, "left lobe", "OPEN") for i in range(2)]))  # each reply retried: few
    pred.write_text("".join(_answer(i, "the left lobe") for i in range(2)))
    with ChatServer(reply_text="Looks right to me.") as srv:  # never a <judge> verdict
        capsys.readouterr()
        assert main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out), "--protocol", "medevalkit",
                     "--judge-model", "j", "--base-url", srv.base_url, "--api-key-env", "none", "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "nothing written: the judge gave no verdict on any of the 2 open answers" in printed
    assert out.read_bytes() == before
