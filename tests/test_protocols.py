"""Scoring protocols by name: LLaVA-Med's first run_eval.py (candidate list, closed answers left out), lmms-eval's
SLAKE rules, MedEvalKit's rules and its LLM judge over a loopback server with the real openai client, multiple
choice under every protocol, the JSON every protocol writes, the report's published rows. Expected numbers are
worked by hand from the rules stated in nbs/07_eval.ipynb."""
import json, sys
from pathlib import Path
import pytest
from llavamed.cli import main
from llavamed.core import Question
from llavamed.eval import (PROTOCOLS, CandidateMatcher, choice_letter, lmms_normalize, medevalkit_question,
                           medevalkit_response, run_eval_question, score, score_pairs)

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer


def _vqa(i, a, t, **extra):
    return {"id": i, "image": f"{i}.png", "answer_type": t, **extra,
            "conversations": [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": a}]}


OPTS = ["left lung", "right lung", "heart", "liver"]
GT = [_vqa("c1", "no", "CLOSED"), _vqa("c2", "yes", "CLOSED"), _vqa("c3", "no", "CLOSED"), _vqa("c4", "yes", "CLOSED"),
      _vqa("c5", "left", "CLOSED"),
      _vqa("o1", "left lobe", "OPEN"), _vqa("o2", "X-Ray", "OPEN"), _vqa("o3", "lung mass", "OPEN"),
      _vqa("m1", "right lung", "CHOICE", options=OPTS, answer_label="B"),
      _vqa("m2", "heart", "CHOICE", options=OPTS, answer_label="C"),
      _vqa("m3", "liver", "CHOICE", options=OPTS, answer_label="D"),
      _vqa("m4", "left lung", "CHOICE", options=OPTS, answer_label="A")]
ANSWERS = {"c1": "The scan is normal.", "c2": "No.", "c3": "a mass", "c4": "Yes, and no effusion", "c5": "Left",
           "o1": "the left lobe", "o2": "x ray", "o3": "lung lung lung",
           "m1": "(B)", "m2": "The answer is C.", "m3": "A or D", "m4": "I cannot tell"}
CANDIDATES = {"0": ["lung", "left lobe", "xray", "lung mass", 2]}


@pytest.fixture
def files(tmp_path):
    gt, pred, cand = tmp_path / "vqa_rad" / "test.json", tmp_path / "answers.jsonl", tmp_path / "candidate.json"
    gt.parent.mkdir()
    gt.write_text(json.dumps(GT))
    md = {"decoding": {"do_sample": False, "max_new_tokens": 32},
          "prompt_suffix": "Answer the question using a single word or phrase."}
    pred.write_text("".join(json.dumps({"question_id": k, "text": v, "metadata": md}) + "\n" for k, v in ANSWERS.items()))
    cand.write_text(json.dumps(CANDIDATES))
    return pred, gt, cand


def test_run_eval_leaves_out_closed_answers_and_matches_candidates(files):
    pred, gt, cand = files
    m = score(pred, gt, protocol="llava-med-run-eval,llava-med", candidates=cand).metrics
    run, batch = m["llava-med-run-eval"], m["llava-med"]
    # closed: c1 'normal' contains 'no' -> hit; c2 'no' for yes -> left out; c3 'mass' (no yes/no) -> miss;
    # c4 'yes and no effusion' contains yes, reference 'yes' found -> hit; c5 'left' has no yes/no, 'left' != ... miss?
    # c5: normalised 'left' contains neither 'yes' nor 'no' -> 0 (the script scores it a miss without looking)
    assert run["n_closed"] == 5 and run["n_closed_left_out"] == 1
    assert run["closed_accuracy"] == pytest.approx(2 / 4 * 100)
    # run_eval_batch.py: c1 hit (substring), c2 miss, c3 miss, c4 hit, c5 hit -> 3/5
    assert batch["closed_accuracy"] == pytest.approx(60.0)
    # open, candidates normalised once: lung | left lobe | xray | lung mass | 2
    # o1 'left lobe' -> 'left lobe' (2/2) = gt: hit; o2 'x ray' shares nothing -> first ('lung'): miss;
    # o3 'lung' -> 'lung' (1/1 beats 'lung mass' 1/2): miss
    assert run["open_accuracy"] == pytest.approx(100 / 3)
    for k in ("open_recall", "f1", "precision", "exact_match", "bleu1"):
        assert run[k] == batch[k], k  # the same open metrics as run_eval_batch.py


def test_run_eval_all_left_out_is_zero_as_the_script_reports():
    pairs = [(Question("1", "?", answer="yes", answer_type="CLOSED"), "no")]
    assert score_pairs(pairs, "llava-med-run-eval")["closed_accuracy"] == 0.0
    with pytest.raises(ValueError, match="--candidates"):
        run_eval_question("a", "b", "OPEN")


def test_candidate_matcher_ties_and_no_overlap():
    m = CandidateMatcher(["right lobe", "left lobe", "lobe"])
    assert m.pick("lobe") == "lobe"  # 1/1 beats 1/2
    assert m.pick("left right lobe") == "right lobe"  # 2/2 twice: the first
    assert m.pick("nothing") == "right lobe"  # nothing shared: the first candidate


@pytest.mark.parametrize("text,expected", [
    ("X-Ray", "xray"), ("x ray", "xray"), ("Left lung (upper lobe).", "left lung"), ("  Yes. ", "yes"),
    ("Nope", "no"), ("TRUE", "yes"), ("是的", "yes"), ("不是", "no"), ("left, right", "left right"),
    ("T2-weighted MRI", "t2 weighted mri")])
def test_lmms_normalisation_rules(text, expected):
    assert lmms_normalize(text) == expected


def test_lmms_eval_exact_match(files):
    pred, gt, _ = files
    m = score(pred, gt, protocol="lmms-eval").to_json()
    # closed: only c5 ('Left' = 'left'); open: o2 ('x ray' = 'X-Ray' -> xray) ; choice: m1, m2
    assert m["closed_accuracy"] == pytest.approx(20.0) and m["open_accuracy"] == pytest.approx(100 / 3)
    assert m["overall_accuracy"] == pytest.approx(4 / 12 * 100)
    assert "open_recall" not in m and m["protocol"] == "lmms-eval"


def test_medevalkit_rules(files):
    pred, gt, _ = files
    m = score(pred, gt, protocol="medevalkit").to_json()
    # closed: c1 'the scan is normal' has 'no' only, reference no -> hit; c2 'no' for yes -> miss; c3 -> miss;
    # c4 'yes, and no effusion' has both -> miss; c5 'left' == 'left' -> hit
    assert m["closed_accuracy"] == pytest.approx(40.0)
    # open exact match: o1 'the left lobe' != 'left lobe'; o2 'x ray' != 'x-ray'; o3 no
    assert m["open_accuracy"] == 0.0 and m["exact_match"] == 0.0
    assert m["overall_accuracy"] == pytest.approx((2 + 0 + 2) / 12 * 100)
    assert medevalkit_response("Reasoning...\n\\boxed{Left Lung}") == "left lung"
    assert medevalkit_response("<answer>Yes</answer>") == "yes"
    assert medevalkit_question("The final answer is: No", "no", "CLOSED")["closed_hit"] == 1.0
    assert medevalkit_question("Answer: lung", "lung", "OPEN")["hit"] == 0.0  # the leading space stays


@pytest.mark.parametrize("answer,letter", [
    ("b", "B"), ("B", "B"), ("(b)", "B"), ("B.", "B"), ("B) right lung", "B"), ("Answer: B", "B"),
    ("answer: (c)", "C"), ("The answer is C", "C"), ("The answer is C, the heart.", "C"), ("Option D", "D"),
    ("the right lung", "B"), ("Heart", "C"), ("It is the left lung", "A"),
    ("A or B", None), ("(A) and (B)", None), ("Answer: A. No, B.", None), ("E", None), ("unsure", None),
    ("The answer is a mass", None), ("", None)])
def test_choice_letters(answer, letter):
    assert choice_letter(answer, OPTS) == letter


def test_choice_accuracy_is_the_same_under_every_protocol(files):
    pred, gt, cand = files
    m = score(pred, gt, protocol=",".join(PROTOCOLS), candidates=cand).metrics
    for name, v in m.items():
        # m1 (B) right, m2 (C) right, m3 two letters, m4 none: 2 of 4, 2 unparsed
        assert (v["n_choice"], v["choice_accuracy"], v["n_unparsed"]) == (4, 50.0, 2), name


def test_every_protocol_states_its_keys_and_setting(files, capsys):
    pred, gt, cand = files
    assert main(["--json", "score", "--pred", str(pred), "--gt", str(gt), "--protocol", ",".join(PROTOCOLS),
                 "--candidates", str(cand), "--setting", "zero-shot"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["protocols"] == list(PROTOCOLS) and out["setting"] == "zero-shot"
    assert out["prompt_suffix"] == "Answer the question using a single word or phrase."
    assert out["candidates_sha256"] and out["n_candidates"] == 5 and len(out["gt_sha256"]) == 64
    for name in PROTOCOLS:
        m = out[name]
        assert m["protocol"] == name and (m["n_closed"], m["n_open"], m["n_choice"]) == (5, 3, 4), name
        assert {"closed_accuracy", "choice_accuracy", "n_unparsed"} <= set(m), name
    assert {"open_recall", "exact_match", "f1", "precision", "open_substring_accuracy", "bleu"} <= set(out["llava-med"])
    assert {"overall_accuracy", "open_accuracy"} <= set(out["lmms-eval"]) & set(out["medevalkit"])
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--protocol", "lmms-eval,medevalkit"]) == 0
    table = capsys.readouterr().out
    for s in ("lmms-eval = lmms-eval", "medevalkit = MedEvalKit", "setting: unknown", "choice 4 (2 unparsed)",
              "overall accuracy"):
        assert s in table, s


def test_mode_is_an_alias_of_protocol(files, capsys):
    pred, gt, _ = files
    a = score(pred, gt, mode="official").to_json()
    b = score(pred, gt, protocol="llava-med").to_json()
    assert a["protocol"] == b["protocol"] == "llava-med" and a["closed_accuracy"] == b["closed_accuracy"]
    assert score(pred, gt, mode="all", protocol="official,strict").to_json()["protocols"] == ["official", "strict"]
    with pytest.raises(ValueError, match="disagree"): score(pred, gt, mode="strict", protocol="lmms-eval")


@pytest.mark.parametrize("args,message", [
    (["--protocol", "loose"], "protocol 'loose': expected one of llava-med"),
    (["--protocol", "llava-med-run-eval"], "needs --candidates"),
    (["--candidates", "c.json"], "--candidates is read by the llava-med-run-eval protocol only"),
    (["--judge-model", "gpt"], "--judge-model judges the medevalkit protocol"),
    (["--setting", "few-shot"], "setting='few-shot'"),
])
def test_protocol_options_refused_before_any_output(files, tmp_path, capsys, args, message):
    pred, gt, _ = files
    out = tmp_path / "s.json"
    out.write_text("earlier")
    assert main(["score", "--pred", str(pred), "--gt", str(gt), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llavamed score: error: ") and message in err[0], err
    assert out.read_text() == "earlier"


def _judge_reply(messages, key):
    "Correct when the user's answer contains the standard answer."
    said = dict(l.split(": ", 1) for l in messages[-1]["content"].splitlines() if ": " in l)
    return f"<think>compared</think>\n<judge>{0 if said['Standard answer'] in said[chr(85) + 'ser' + chr(39) + 's answer'] else 1}</judge>"


def test_medevalkit_judge_over_loopback(files, tmp_path, capsys):
    pred, gt, _ = files
    out = tmp_path / "s.json"
    args = ["--json", "score", "--pred", str(pred), "--gt", str(gt), "--protocol", "medevalkit,llava-med",
            "--out", str(out), "--quiet"]
    with ChatServer(reply_fn=_judge_reply) as srv:
        judged = args + ["--judge-model", "judge-x", "--base-url", srv.base_url, "--api-key-env", "none"]
        assert main(judged) == 0
        assert srv.stats()["requests"] == 3  # the open questions only
        res = json.loads(capsys.readouterr().out)
        m = res["medevalkit"]
        # o1 'the left lobe' contains 'left lobe'; o2 'x ray' lacks 'x-ray'; o3 'lung lung lung' lacks 'lung mass'
        assert m["open_accuracy"] == pytest.approx(100 / 3) and m["exact_match"] == 0.0 and m["n_judged"] == 3
        assert m["overall_accuracy"] == pytest.approx((2 + 1 + 2) / 12 * 100)
        assert res["judge"] == f"openai:judge-x at {srv.base_url}" and res["n_judge_failed"] == 0
        assert Path(res["judge_cache"]) == tmp_path / "s.judge.jsonl"
        assert "open_accuracy" in res["llava-med"] and "n_judged" not in res["llava-med"]
        assert main(judged) == 0  # every verdict is in the cache: nothing is sent again
        assert srv.stats()["requests"] == 3
        capsys.readouterr()


def test_medevalkit_judge_failures_fall_back_to_exact_match(files, tmp_path, capsys):
    pred, gt, _ = files
    with ChatServer(reply_text="I think it is right.") as srv:  # never a verdict
        res = score(pred, gt, protocol="medevalkit", judge_model="j", base_url=srv.base_url, api_key_env="none",
                    judge_cache=str(tmp_path / "cache.jsonl"), quiet=True)
    j = res.to_json()
    assert j["n_judge_failed"] == 3 and j["n_judged"] == 0 and j["open_accuracy"] == 0.0  # exact match again
    rows = [json.loads(l) for l in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert {r["status"] for r in rows} == {"unparsed"}


def test_report_compares_only_matching_protocols(files, tmp_path):
    pred, gt, _ = files
    for spec in ("official,strict", "lmms-eval,medevalkit"):
        assert main(["score", "--pred", str(pred), "--gt", str(gt), "--protocol", spec, "--setting", "zero-shot",
                     "--out", str(tmp_path / f"s_{spec.split(',')[0]}.json")]) == 0
    assert main(["report", "--inputs", f"{tmp_path}/s_*.json", "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    table = text.split("### Against published numbers")[1]
    assert "| VQA-RAD | medevalkit | LLaVA-Med-7B | zero-shot | - | - | 53.70 |" in table
    assert "| VQA-RAD | llava-med | LLaVA-Med (BiomedCLIP) | fine-tuned | 64.75 | 83.09 | - |" in table
    assert "| VQA-RAD | llava-med | this run" in table and "| VQA-RAD | medevalkit | this run" in table
    assert "lmms-eval" not in table and "| strict |" not in table  # nothing published under these protocols
    vqa = text.split("## Medical VQA")[1].split("###")[0]
    for key in ("official", "strict", "lmms-eval", "medevalkit"):
        assert f"| vqa_rad/test | none | {key} | zero-shot |" in vqa, key


def test_candidate_matcher_agrees_with_the_rule_written_plainly():
    "The indexed pick against the rule as stated: shares in candidate order, list.index(max(shares))."
    import random
    rng, words = random.Random(0), "a b c d e f g".split()
    cands = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 4))) for _ in range(60)]
    m = CandidateMatcher(cands, norm=lambda s: s)
    for _ in range(2000):
        pred = " ".join(rng.choice(words) for _ in range(rng.randint(0, 6)))
        shares = [len(set(pred.split()) & set(c.split())) / len(set(c.split())) if c.split() else 0.0 for c in cands]
        assert m.pick(pred) == cands[shares.index(max(shares))], pred
