"VQA scoring: official mode against values derived by hand from LLaVA-Med's scorer (`llava/eval/run_eval_batch.py`), strict mode, id alignment, CLI."
import hashlib, json, subprocess
import pytest
from llavamed.cli import main
from llavamed.core import Question, load_questions
from llavamed.eval import (normalize_answer, official_prf, official_exact, official_question, strict_question,
                           sentence_bleu, score, align, group_scores)

@pytest.mark.parametrize("text,expected", [
    ("left - sided", "left sided"),          # mark with a space beside it: deleted
    ("left-sided", "left sided"),            # mark between words: a space
    ("a (b)", "b"),                          # '(' has a space before it (deleted); ')' does not (space); article dropped
    ("(x)", "x"),
    ("and/or, yes", "and or yes"),           # ', ' present: comma deleted; '/' has no space beside it
    ("1,000 cells/mm", "1000 cellsmm"),      # any digit-comma-digit: every mark deleted
    ("what? yes!", "what yes"),
    ("3.5 cm. wide", "3.5 cm wide"),         # a period before a digit survives
    (".5 and 5.", ".5 and 5"),
    ("e.g.x", "egx"),
    ("." * 40 + "x", "." * 8 + "x"),         # at most 32 periods per call
    ("None of the two", "0 of 2"),           # number words, 'none' included
    ("ZERO, one; ten", "0 1 10"),
    ("An MRI, the scan", "mri scan"),        # articles
    ("It isnt, dont", "it isn't don't"),     # contractions
    ("somebody'd", "somebodyd"),             # a quirk of the VQA-v2 list, kept
    ("  multiple\tspaces\n", "multiple spaces"),
    ("", ""),
])
def test_normalisation_rules(text, expected):
    assert normalize_answer(text) == expected

def test_recall_counts_prediction_multiplicity():
    # tp counts the prediction's 3 copies: recall 3/(3+1), precision 3/3
    f1, p, r = official_prf("lung lung lung", "lung mass")
    assert (r, p) == (0.75, 1.0) and f1 == pytest.approx(6 / 7)
    assert official_exact("lung lung lung", "lung mass") == 1 / 3
    s = strict_question("lung lung lung", "lung mass", "OPEN")
    assert (s["recall"], s["precision"]) == (0.5, 1.0)

def test_closed_substring_quirk_and_strict_fix():
    for pred, gt in [("not", "no"), ("normal", "no"), ("a nodule", "no"), ("eyes", "yes")]:
        assert official_question(pred, gt, "CLOSED")["closed_hit"] == 1.0
        assert strict_question(pred, gt, "CLOSED")["closed_hit"] == 0.0
    assert official_question("none", "no", "CLOSED")["closed_hit"] == 0.0  # 'none' -> '0' first
    assert strict_question("Yes. No effusion.", "no", "CLOSED")["closed_hit"] == 0.0  # first yes/no word decides
    assert strict_question("No, it is not.", "no", "CLOSED")["closed_hit"] == 1.0

def test_empty_prediction_scores_zero():
    o = official_question("", "lung", "OPEN")
    assert all(o[k] == 0 for k in ("recall", "precision", "f1", "exact_match", "substring_hit", "bleu1"))
    assert official_question("", "no", "CLOSED")["closed_hit"] == 0.0

def test_double_normalisation():
    # once: '........x' (one word); the second pass inside recall/F1/exact match strips 8 more periods
    once = normalize_answer("." * 40 + "x")
    assert official_prf(once, "x")[2] == 1.0 and official_exact(once, "x") == 1.0
    assert strict_question("." * 40 + "x", "x", "OPEN")["recall"] == 0.0  # strict normalises once

def test_bleu_by_hand():
    ref, hyp = "left lobe".split(), "left lower lobe".split()
    assert sentence_bleu(ref, hyp, (1, 0, 0, 0)) == pytest.approx(2 / 3)   # 2 of 3 unigrams, no brevity penalty
    assert 0 < sentence_bleu(ref, hyp, (0, 1, 0, 0)) < 1e-300             # no bigram: float_info.min, as nltk
    import math
    assert sentence_bleu("a b c d".split(), "a b".split(), (1, 0, 0, 0)) == pytest.approx(math.exp(1 - 4 / 2))

def _vqa(i, a, t, key="conversations"):
    return {"id": i, "image": f"{i}.png", "answer_type": t,
            key: [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": a}]}

GT = [_vqa("q1", "No", "CLOSED"), _vqa("q2", "yes", "CLOSED"), _vqa("q3", "no", "CLOSED"),
      _vqa("q4", "Left lower lobe", "OPEN"), _vqa("q5", "Two", "OPEN"), _vqa("q6", "x-ray", "OPEN"),
      _vqa("q7", "none", "OPEN", key="conversatons"), _vqa("q8", "yes", "CLOSED")]  # q7: a released file's typo
ANSWERS = {"q6": "An X-Ray.", "zz": "an answer to no question", "q4": "the left lobe, left lobe", "q1": "There is a nodule.",
           "q3": "", "q7": "no", "q5": "2 nodules", "q2": "Yes, and no effusion"}  # misordered; q8 missing; zz extra

@pytest.fixture
def files(tmp_path):
    gt, pred = tmp_path / "test.json", tmp_path / "answers.jsonl"
    gt.write_text(json.dumps(GT))
    md = {"decoding": {"do_sample": False, "max_new_tokens": 32}, "image_ablation": "none"}
    pred.write_text("".join(json.dumps({"question_id": k, "prompt": "Q?", "text": v, "answer_id": k, "model_id": "m",
                                        "metadata": md}) + "\n" for k, v in ANSWERS.items()))
    return pred, gt

def test_official_mode_by_hand(files):
    res = score(*files, mode="official")
    out = json.loads(json.dumps(res.to_json()))
    assert set(["open_recall", "closed_accuracy", "open_substring_accuracy", "exact_match", "f1", "precision",
                "n_open", "n_closed"]) <= set(out)
    # open q4..q7: recall .8, 1, 1, 0 | precision 1, .5, 1, 0 | F1 8/9, 2/3, 1, 0 | exact .5, .5, 1, 0 | substring 0, 1, 1, 0
    assert out["open_recall"] == pytest.approx(70.0)
    assert out["precision"] == pytest.approx(62.5)
    assert out["f1"] == pytest.approx((8 / 9 + 2 / 3 + 1) / 4 * 100)
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["open_substring_accuracy"] == pytest.approx(50.0)
    # closed q1 (nodule: hit), q2 (hit), q3 (empty: miss), q8 (missing: scored empty, miss)
    assert out["closed_accuracy"] == pytest.approx(50.0)
    assert (out["n_open"], out["n_closed"], out["n_missing"], out["n_extra"]) == (4, 4, 1, 1)
    assert out["missing_ids"] == ["q8"] and out["extra_ids"] == ["zz"]
    assert out["gt_sha256"] == hashlib.sha256(files[1].read_bytes()).hexdigest()
    assert out["decoding"] == "greedy, max_new_tokens=32" and out["mode"] == "official"
    assert res.metrics["official"]["open_recall"] == out["open_recall"]

def test_strict_mode_by_hand(files):
    out = score(*files, mode="strict").to_json()
    # open: set recall 2/3, 1, 1, 0 | precision 1, .5, 1, 0 | F1 .8, 2/3, 1, 0 | exact 0, 0, 1, 0 | whole-word 0, 1, 1, 0
    assert out["open_recall"] == pytest.approx((2 / 3 + 2) / 4 * 100)
    assert out["f1"] == pytest.approx((0.8 + 2 / 3 + 1) / 4 * 100)
    assert out["exact_match"] == pytest.approx(25.0)
    assert out["open_substring_accuracy"] == pytest.approx(50.0)
    assert out["closed_accuracy"] == pytest.approx(25.0)  # only q2

def test_missing_skip(files):
    out = score(*files, mode="official", missing="skip").to_json()
    assert out["closed_accuracy"] == pytest.approx(200 / 3) and out["n_closed"] == 3

def test_order_does_not_matter(files, tmp_path):
    pred, gt = files
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(reversed(pred.read_text().splitlines(keepends=True))))
    a, b = score(pred, gt, mode="all"), score(rev, gt, mode="all")
    assert a.metrics == b.metrics and set(a.metrics) == {"official", "strict"}

def test_duplicate_answers_keep_last(tmp_path):
    qs = [Question("1", "Q?", answer="yes", answer_type="CLOSED")]
    pairs, info = align(qs, [{"question_id": "1", "text": "no"}, {"question_id": 1, "text": "yes"}])
    assert pairs[0][1] == "yes" and info["n_duplicate"] == 1

def test_score_reads_a_jsonl_vqa_file(files, tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in GT))
    assert score(files[0], p, mode="all").metrics == score(*files, mode="all").metrics
    p.write_text(json.dumps({"id": "q1", "answer_type": "OPEN", "conversations": [{"from": "human", "value": "Q?"}]}))
    with pytest.raises(ValueError, match=r"t.jsonl: 1 of 1 records are bad .*"
                                         r"no answer turn after the question at line 1 \(id q1\)"):
        score(files[0], p)

def test_group_scores_per_domain_and_kind():
    qs = [Question("1", "Q?", answer="yes", answer_type="CLOSED", domain="mri", question_type="side"),
          Question("2", "Q?", answer="no", answer_type="CLOSED", domain="chest_xray", question_type="side"),
          Question("3", "Q?", answer="left lobe", answer_type="OPEN", domain="mri", question_type="where")]
    pairs, _ = align(qs, [{"question_id": "1", "text": "yes"}, {"question_id": "3", "text": "left"}])
    by_domain = group_scores(pairs)
    assert list(by_domain) == ["chest_xray", "mri"]  # the benchmark's domain order
    assert by_domain["mri"] == {"closed_accuracy": 100.0, "open_recall": 50.0, "n_closed": 1, "n_open": 1}
    assert group_scores(pairs, "question_type", "strict")["side"]["closed_accuracy"] == 50.0

def test_cli_json_and_table(files, capsys):
    pred, gt = files
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--mode", "all", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "all" and out["official"]["open_recall"] == pytest.approx(70.0)
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--mode", "all"]) == 0
    table = capsys.readouterr().out
    for s in ("official mode", "strict mode", "sha256 " + hashlib.sha256(gt.read_bytes()).hexdigest(),
              "decoding: greedy, max_new_tokens=32", "missing answers 1"):
        assert s in table, s

def test_console_command(files, llavamed_cmd):
    pred, gt = files
    r = subprocess.run([llavamed_cmd, "score", "--pred", str(pred), "--gt", str(gt), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["closed_accuracy"] == pytest.approx(50.0)

def test_bad_mode_names_it(files):
    with pytest.raises(ValueError, match="mode='loose'"): score(*files, mode="loose")


# ---------------------------------------------------------------- judged conversation benchmark
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer
from llavamed.judge import judge, build_requests, judge_messages, parse_scores

QA = [{"question_id": 1, "image": "a.png", "pair_id": "a", "text": "What does the image show?\n<image>",
       "gpt4_answer": "A right pleural effusion.", "fig_caption": "Chest X-ray with a right pleural effusion.",
       "fig_label": "Figure 1", "in_text_mention": [{"tokens": "Figure 1 shows the effusion.", "entities": ["effusion"]}],
       "domain": {"chest_xray": True, "mri": False, "histology": False, "gross": False, "ct_scan": True}, "type": "conversation"},
      {"question_id": 2, "image": "b.png", "pair_id": "b", "text": "Describe the image.\n<image>",
       "gpt4_answer": "An MRI of the brain with a ring-enhancing lesion.", "fig_caption": "Brain MRI, ring-enhancing lesion.",
       "fig_label": "Figure 2", "in_text_mention": "", "domain": {"mri": True}, "type": "detailed_description"},
      {"question_id": 3, "image": "c.png", "pair_id": "c", "text": "Which stain?\n<image>",
       "gpt4_answer": "H&E stain.", "fig_caption": "Histology, H&E.", "fig_label": "Figure 3", "in_text_mention": None,
       "domain": {"histology": True}, "type": "conversation"}]
MODEL_ANS = {1: "An effusion on the right side.", 2: "A brain scan.", 3: "Unsure."}

def _judge_files(tmp_path, answers=MODEL_ANS):
    q, a = tmp_path / "qa.jsonl", tmp_path / "answers.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in QA))
    a.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in answers.items()))
    return q, a

def _reply(messages, key):
    "Reference first: '8 4'; model first: '6 9' -> reference 8.5, model 5 after averaging both orders."
    user = messages[-1]["content"]
    ref_first = any(f"[Assistant 1]\n{r['gpt4_answer']}" in user for r in QA)
    return "8 4\nThe first answer is better." if ref_first else "6 9\nThe second answer is better."

def test_judge_both_orders_averaged(tmp_path):
    q, a = _judge_files(tmp_path)
    with ChatServer(reply_fn=_reply) as srv:
        s = judge(str(q), str(a), str(tmp_path / "rev.jsonl"), model="judge-x", base_url=srv.base_url, quiet=True)
        assert srv.stats()["requests"] == 6  # 3 questions x 2 orders
    rows = [json.loads(l) for l in (tmp_path / "rev.jsonl").read_text().splitlines()]
    assert [(r["reference_score"], r["model_score"]) for r in rows] == [(8.5, 5.0)] * 3
    g = s.groups
    assert g["overall"]["relative_score"] == pytest.approx(5 / 8.5 * 100)
    assert (g["conversation"]["n"], g["description"]["n"], g["chest_xray"]["n"], g["mri"]["n"], g["histology"]["n"]) == (2, 1, 1, 1, 1)
    assert g["ct_scan"]["n"] == 0  # question 1 is filed under its first true domain (chest X-ray)
    assert json.loads((tmp_path / "rev.summary.json").read_text())["groups"] == g
    # official (ref 8, model 4): model - ref = -4; swapped (model 6, ref 9): -3; effect = -3 - (-4) = +1
    assert s.position_effect == pytest.approx(1.0)
    printed = str(s)
    assert "Conversation benchmark | judge: openai:judge-x" in printed
    assert f"sha256 {hashlib.sha256(q.read_bytes()).hexdigest()}" in printed and "decoding: unknown" in printed

def test_judge_cache_sends_nothing_twice(tmp_path):
    q, a = _judge_files(tmp_path)
    with ChatServer(reply_fn=_reply) as srv:
        judge(str(q), str(a), str(tmp_path / "r.jsonl"), model="m", base_url=srv.base_url, quiet=True)
        judge(str(q), str(a), str(tmp_path / "r.jsonl"), model="m", base_url=srv.base_url, quiet=True)
        assert srv.stats()["requests"] == 6
        _judge_files(tmp_path, {**MODEL_ANS, 3: "Haematoxylin and eosin."})  # one changed answer: 2 new requests
        judge(str(q), str(a), str(tmp_path / "r.jsonl"), model="m", base_url=srv.base_url, quiet=True)
        assert srv.stats()["requests"] == 8

def test_judge_retries_then_records_unparsed(tmp_path):
    q, a = _judge_files(tmp_path)
    qs = load_questions(q, need_answer=True)
    reqs, keys = build_requests(qs, {k: v for k, v in ((str(k), v) for k, v in MODEL_ANS.items())}, "official", "m")
    script = {keys[("1", "official")]: ["garbage", "ok"], keys[("2", "official")]: ["garbage"] * 5}
    with ChatServer(reply_fn=_reply, script=script) as srv:
        s = judge(str(q), str(a), str(tmp_path / "r.jsonl"), model="m", base_url=srv.base_url, order="official",
                  max_attempts=2, backoff=0.01, quiet=True)
        assert srv.stats()["requests"] == 2 + 2 + 1
    rows = {r["question_id"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert rows["1"]["status"] == "done" and rows["1"]["reference_score"] == 8.0
    assert rows["2"]["status"] == "unparsed" and rows["2"]["ratio"] is None
    assert s.n_unparsed == 1 and s.groups["overall"]["n"] == 2 and s.groups["overall"]["unparsed"] == 1

def test_judge_prompt_renders_mentions_as_text(tmp_path):
    q, _ = _judge_files(tmp_path)
    user = judge_messages(load_questions(q)[0], "ref", "model")[1]["content"]
    assert "- Figure 1 shows the effusion." in user and "{'tokens'" not in user and "Chest X-ray with a right" in user
    assert "[Assistant 1]\nref\n" in user and "[Assistant 2]\nmodel\n" in user

def test_parse_scores_formats():
    assert parse_scores("9 7\nexplanation") == (9.0, 7.0)
    assert parse_scores("Assistant 1: 6\nAssistant 2: 8") == (6.0, 8.0)
    for bad in ("no scores", "0 5", "7"):
        with pytest.raises(ValueError): parse_scores(bad)

def test_overlap_proxy_judge_cli(tmp_path, capsys):
    q, a = _judge_files(tmp_path, {1: "A right pleural effusion is visible.", 2: "Nothing."})
    assert main(["judge", "--questions", str(q), "--answers", str(a), "--out", str(tmp_path / "o.jsonl"),
                 "--judge", "overlap", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert "proxy" in s["judge"] and s["n_missing_answers"] == 1 and s["missing_ids"] == ["3"]
    rows = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert all("proxy" in r["judge"] for r in rows)
    assert rows[0]["model_score"] > rows[1]["model_score"]  # the answer that repeats the caption's finding scores higher


# ---------------------------------------------------------------- report
from llavamed.report import report, ablation_deltas, load_inputs

def test_report_from_cli_outputs(files, tmp_path, capsys):
    pred, gt = files
    rad = tmp_path / "vqa_rad"; rad.mkdir()
    (rad / "test.json").write_text(gt.read_text())
    blank = tmp_path / "blank.jsonl"  # the same answers file, relabelled as a blank-image run with every answer 'no'
    blank.write_text("".join(json.dumps({**json.loads(l), "text": "no", "metadata": {"decoding": {"do_sample": False,
                     "max_new_tokens": 32}, "image_ablation": "blank"}}) + "\n" for l in pred.read_text().splitlines()))
    assert main(["score", "--pred", str(pred), "--gt", str(rad / "test.json"), "--mode", "all", "--out", str(tmp_path / "s_none.json")]) == 0
    assert main(["score", "--pred", str(blank), "--gt", str(rad / "test.json"), "--mode", "all", "--out", str(tmp_path / "s_blank.json")]) == 0
    q, a = _judge_files(tmp_path)
    assert main(["judge", "--questions", str(q), "--answers", str(a), "--out", str(tmp_path / "rev.jsonl"), "--judge", "overlap"]) == 0
    assert main(["report", "--inputs", f"{tmp_path}/s_*.json,{tmp_path}/rev.summary.json", "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    for png in ("vqa_metrics.png", "ablation_deltas.png", "chat_relative_scores.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({png})" in text
    # dataset matched by its folder name, protocol by the name scored under ('official' is llava-med)
    assert "| VQA-RAD | llava-med | LLaVA-Med (from LLaVA) | fine-tuned | 61.52 | 84.19 | - | LLaVA-Med paper" in text
    assert "| VQA-RAD | llava-med | this run (greedy, max_new_tokens=32) | unknown | 70.00 | 50.00 | - | llavamed score |" in text
    assert "| VQA-RAD | strict |" not in text and "medevalkit" not in text.split("### Against published numbers")[1]
    assert "proxy" in text and "paper (GPT-4 judge)" not in text  # proxy rows never sit beside the paper's judge
    d = ablation_deltas(load_inputs(f"{tmp_path}/s_*.json")[0])
    # blank answers 'no' everywhere: closed official = q1 (no) + q3 (no) hit of 4 -> 50 (unchanged); strict 25 -> 50
    assert d[0]["official open"] == pytest.approx(-70.0) and d[0]["strict closed"] == pytest.approx(25.0)

def test_report_rejects_unknown_inputs(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a score result"): report(str(tmp_path / "x.json"), out=str(tmp_path / "r"))


# ---------------------------------------------------------------- predict (tiny model on the synthetic corpus)
from llavamed.predict import predict, shuffled_images

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    "A synthetic corpus (8 test questions) and a saved tiny model."
    pytest.importorskip("llavamed.generate")
    from llavamed.synth import make_corpus, corpus_texts
    from llavamed.model import build_model, save_model
    d = tmp_path_factory.mktemp("tiny")
    make_corpus(str(d / "corpus"), n_train=8, n_test=4, size=48, n_chat=2, quiet=True)
    qs = json.loads((d / "corpus" / "vqa_test.json").read_text())[:8]
    (d / "test8.json").write_text(json.dumps(qs))
    m, p = build_model("tiny", tokenizer_texts=corpus_texts(str(d / "corpus")))
    save_model(m, p, d / "model")
    return d

def _rows(p): return [json.loads(l) for l in Path(p).read_text().splitlines()]

def test_predict_refuses_to_mix_settings(tmp_path):
    (tmp_path / "vqa.json").write_text(json.dumps(GT))
    md = {"decoding": {"do_sample": False, "max_new_tokens": 8, "seed": 0}, "image_ablation": "none",
          "prompt_suffix": None, "model": "m"}
    (tmp_path / "a.jsonl").write_text(json.dumps({"question_id": "q1", "text": "no", "metadata": md}) + "\n")
    with pytest.raises(ValueError, match="other settings"):
        predict("m", str(tmp_path / "vqa.json"), str(tmp_path), str(tmp_path / "a.jsonl"), max_new_tokens=8, image_ablation="blank")
    with pytest.raises(ValueError, match="image_ablation='grey'"):
        predict("m", str(tmp_path / "vqa.json"), str(tmp_path), str(tmp_path / "x.jsonl"), image_ablation="grey")

def test_shuffle_never_returns_own_image(tmp_path):
    qs = [Question(str(i), "?", image=f"{i % 5}.png") for i in range(20)]  # 5 images, 4 questions each
    m = shuffled_images(qs, seed=3)
    assert all(m[q.id] != q.image for q in qs) and sorted(m.values()) == sorted(q.image for q in qs)

@pytest.mark.slow
def test_predict_resumes_and_scores(tiny, tmp_path):
    out, kw = tmp_path / "a.jsonl", dict(images=str(tiny / "corpus" / "images"), batch_size=4, max_new_tokens=4, quiet=True)
    r1 = predict(str(tiny / "model"), str(tiny / "test8.json"), out=str(out), limit=3, **kw)
    assert r1.answered == 3 and len(_rows(out)) == 3
    r2 = predict(str(tiny / "model"), str(tiny / "test8.json"), out=str(out), **kw)
    rows = _rows(out)
    assert (r2.skipped, r2.answered) == (3, 5)
    assert sorted(r["question_id"] for r in rows) == sorted(q.id for q in load_questions(tiny / "test8.json"))
    assert set(rows[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rows[0]["metadata"]["decoding"] == {"do_sample": False, "max_new_tokens": 4, "seed": 0}
    res = score(str(out), str(tiny / "test8.json"), mode="all").to_json()
    assert res["n_missing"] == 0 and res["decoding"] == "greedy, max_new_tokens=4"
    # greedy answers do not depend on the batch size
    predict(str(tiny / "model"), str(tiny / "test8.json"), out=str(tmp_path / "b1.jsonl"), **{**kw, "batch_size": 1})
    assert {r["question_id"]: r["text"] for r in _rows(tmp_path / "b1.jsonl")} == {r["question_id"]: r["text"] for r in rows}

@pytest.mark.slow
def test_predict_ablations_change_the_image(tiny, tmp_path):
    kw = dict(images=str(tiny / "corpus" / "images"), batch_size=8, max_new_tokens=2, quiet=True)
    predict(str(tiny / "model"), str(tiny / "test8.json"), out=str(tmp_path / "s.jsonl"), image_ablation="shuffle", **kw)
    own = {q.id: q.image for q in load_questions(tiny / "test8.json")}
    rows = _rows(tmp_path / "s.jsonl")
    assert all(r["metadata"]["image_ablation"] == "shuffle" for r in rows)
    assert len(set(own.values())) > 1 and all(r["metadata"]["image"] != own[r["question_id"]] for r in rows)
    predict(str(tiny / "model"), str(tiny / "test8.json"), out=str(tmp_path / "bl.jsonl"), image_ablation="blank", **kw)
    assert len(_rows(tmp_path / "bl.jsonl")) == 8

@pytest.mark.slow
def test_evaluate_writes_report_with_blank_ablation(tiny, tmp_path):
    from llavamed.report import evaluate
    res = evaluate(str(tiny / "model"), str(tiny / "test8.json"), str(tiny / "corpus" / "images"), str(tmp_path / "ev"),
                   ablations="none,blank", batch_size=8, max_new_tokens=2, chat=str(tiny / "corpus" / "chat_eval.jsonl"),
                   quiet=True)
    text = Path(res.report.report).read_text()
    assert "| none |" in text and "| blank |" in text and "### Image ablations" in text and "proxy" in text
    assert set(res.scores) == {"none", "blank"} and res.scores["none"].pairing["n_missing"] == 0
    for f in ("per_domain_none.json", "per_kind_blank.json", "chat_reviews.summary.json", "scores_blank.txt"):
        assert (tmp_path / "ev" / f).exists(), f
    assert res.chat.n_questions == len(load_questions(tiny / "corpus" / "chat_eval.jsonl"))

def test_details_file_has_every_scored_question(files, tmp_path):
    score(*files, mode="all", details=str(tmp_path / "d.jsonl"))
    rows = [json.loads(l) for l in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(1, 9)]  # the VQA file's order, missing q8 included
    r1 = rows[0]
    assert (r1["pred"], r1["official"]["closed_hit"], r1["strict"]["closed_hit"]) == ("There is a nodule.", 1.0, 0.0)
    assert rows[3]["official"]["recall"] == pytest.approx(0.8) and rows[7]["pred"] == ""

def test_bleu_matches_nltk_when_installed():
    "Bit-for-bit agreement with nltk's sentence_bleu (the official script's) on random word sequences."
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score").sentence_bleu
    import random, warnings
    rng, words = random.Random(0), "a b c d e f".split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2000):
            ref = [rng.choice(words) for _ in range(rng.randint(0, 6))]
            hyp = [rng.choice(words) for _ in range(rng.randint(0, 9))]
            for w in ((0.25, 0.25, 0.25, 0.25), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)):
                assert sentence_bleu(ref, hyp, w) == nltk_bleu([ref], hyp, weights=w), (ref, hyp, w)


# ---------------------------------------------------------------- results and the one orchestrator
def test_score_result_renders_and_writes_its_json(files, tmp_path):
    res = score(*files, mode="all", out=str(tmp_path / "s.json"))
    assert res.to_json() == json.loads((tmp_path / "s.json").read_text())
    assert str(res).splitlines()[0].startswith("VQA scores | ")
    assert "| metric | official mode | strict mode |" in res._repr_markdown_()
    one = score(*files, mode="strict")
    assert "official" not in one.to_json() and one.to_json()["mode"] == "strict" and list(one.metrics) == ["strict"]

def test_judge_summary_is_the_summary_file(tmp_path):
    q, a = _judge_files(tmp_path)
    s = judge(str(q), str(a), str(tmp_path / "r.jsonl"), judge="overlap")
    assert s.to_json() == json.loads((tmp_path / "r.summary.json").read_text())
    assert str(s).startswith("Conversation benchmark | judge: overlap") and "| Overall |" in s._repr_markdown_()

def test_evaluate_scores_answers_already_there_without_a_model(files, tmp_path):
    "Answers present with this call's settings: nothing is generated, every file and the report are written."
    from llavamed.report import evaluate
    pred, gt = files
    out = tmp_path / "ev"; out.mkdir()
    from PIL import Image
    for i in range(1, 9): Image.new("RGB", (4, 4)).save(tmp_path / f"q{i}.png")  # predict checks images first
    md = {"decoding": {"do_sample": False, "max_new_tokens": 8, "seed": 0}, "image_ablation": "none",
          "prompt_suffix": None, "model": "no-such-model"}
    rows = [{"question_id": f"q{i}", "text": "no", "metadata": md} for i in range(1, 9)]
    (out / "answers_none.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate("no-such-model", str(gt), str(tmp_path), str(out), ablations="none", max_new_tokens=8,
                   quiet=True)
    assert res.scores["none"].metrics["official"]["closed_accuracy"] == 50.0  # q1 and q3 are 'no'
    for f in ("scores_none.json", "scores_none.txt", "per_domain_none.json", "per_kind_none.json", "report.md"):
        assert (out / f).exists(), f
    assert res.to_json()["scores"]["none"] == json.loads((out / "scores_none.json").read_text())
    with pytest.raises(ValueError, match=r"\['grey'\]"): evaluate("m", str(gt), ablations="none,grey")

@pytest.mark.slow
def test_evaluate_command_prints_its_result(tiny, tmp_path, llavamed_cmd):
    out = tmp_path / "ev"
    r = subprocess.run([llavamed_cmd, "--json", "evaluate", "--model", str(tiny / "model"), "--data",
                        str(tiny / "test8.json"), "--images", str(tiny / "corpus" / "images"), "--out", str(out),
                        "--ablations", "none", "--max-new-tokens", "2", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["scores"]) == {"none"} and (out / "report.md").exists() and (out / "scores_none.json").exists()
    r = subprocess.run([llavamed_cmd, "evaluate", "--model", str(tiny / "model"), "--data", str(tiny / "test8.json"),
                        "--out", str(tmp_path / "ev2"), "--ablations", "none,grey"], capture_output=True, text=True)
    assert r.returncode == 2 and "grey" in r.stderr and "Traceback" not in r.stderr
