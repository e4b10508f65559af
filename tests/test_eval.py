"VQA scoring: official mode against hand-derived values (REFERENCE.md section 5), strict mode, id alignment, CLI."
import hashlib, json, subprocess
import pytest
from llavamed.cli import main
from llavamed.eval import (normalize_answer, official_prf, official_exact, official_question, strict_question,
                           sentence_bleu, score, align, load_vqa)

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
      _vqa("q7", "none", "OPEN", key="conversatons"), _vqa("q8", "yes", "CLOSED")]
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

def test_official_mode_by_hand(files, capsys):
    res = score(*files, mode="official", json=True)
    out = json.loads(capsys.readouterr().out)
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
    assert res["open_recall"] == out["open_recall"]

def test_strict_mode_by_hand(files, capsys):
    out = score(*files, mode="strict", json=True)
    # open: set recall 2/3, 1, 1, 0 | precision 1, .5, 1, 0 | F1 .8, 2/3, 1, 0 | exact 0, 0, 1, 0 | whole-word 0, 1, 1, 0
    assert out["open_recall"] == pytest.approx((2 / 3 + 2) / 4 * 100)
    assert out["f1"] == pytest.approx((0.8 + 2 / 3 + 1) / 4 * 100)
    assert out["exact_match"] == pytest.approx(25.0)
    assert out["open_substring_accuracy"] == pytest.approx(50.0)
    assert out["closed_accuracy"] == pytest.approx(25.0)  # only q2

def test_missing_skip(files):
    out = score(*files, mode="official", missing="skip", json=True)
    assert out["closed_accuracy"] == pytest.approx(200 / 3) and out["n_closed"] == 3

def test_order_does_not_matter(files, tmp_path, capsys):
    pred, gt = files
    rev = tmp_path / "rev.jsonl"
    rev.write_text("".join(reversed(pred.read_text().splitlines(keepends=True))))
    a, b = score(pred, gt, mode="all", json=True), score(rev, gt, mode="all", json=True)
    assert a["official"] == b["official"] and a["strict"] == b["strict"]

def test_duplicate_answers_keep_last(tmp_path):
    qs = [{"id": "1", "gt": "yes", "answer_type": "CLOSED"}]
    pairs, info = align(qs, [{"question_id": "1", "text": "no"}, {"question_id": 1, "text": "yes"}])
    assert pairs[0][1] == "yes" and info["n_duplicate"] == 1

def test_load_vqa_jsonl_and_misspelled_key(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in GT[5:7]))
    assert [q["gt"] for q in load_vqa(p)] == ["x-ray", "none"]

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
