"Mechanism tests of llavamed.synth: determinism, split hygiene, balance, schemas, labels, visibility of findings."
import hashlib, json, re, subprocess, sys
from collections import Counter, defaultdict
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from llavamed.core import DOMAINS, IMAGE_TOKEN, Sample, read_json, read_jsonl
from llavamed.synth import (FINDINGS, LABEL_HEADS, corpus_texts, describe, finding_mask, labels_of, make_corpus,
                            render_figure, sample_findings)

FILES = ("instruct_captions.json", "alignment.json", "vqa_train.json", "vqa_test.json", "chat_eval.jsonl",
         "labels.json", "labels_test.json", "meta.json")

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    "A corpus big enough for balance statistics, small enough to render in a few seconds."
    out = tmp_path_factory.mktemp("synth") / "c"
    make_corpus(out, n_train=300, n_test=100, seed=3, size=48, n_chat=20, quiet=True)
    return out

def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}

def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        make_corpus(tmp_path / name, n_train=12, n_test=6, seed=seed, size=40, n_chat=3, quiet=True)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert a == b
    assert set(a) >= {f for f in FILES} and len([k for k in a if k.startswith("images/")]) == 18
    assert a["vqa_test.json"] != c["vqa_test.json"]
    assert {k: v for k, v in a.items() if k.startswith("images/")} != {k: v for k, v in c.items() if k.startswith("images/")}

def test_rerun_into_same_folder_replaces_the_figures(tmp_path):
    make_corpus(tmp_path, n_train=10, n_test=5, seed=0, size=32, n_chat=2, quiet=True)
    make_corpus(tmp_path, n_train=4, n_test=2, seed=0, size=32, n_chat=2, quiet=True)
    assert len(list((tmp_path / "images").iterdir())) == 6

def test_train_and_test_never_share_a_figure(corpus):
    train_ids = set(read_json(corpus / "labels.json"))
    test_ids = set(read_json(corpus / "labels_test.json"))
    assert len(train_ids) == 300 and len(test_ids) == 100 and not train_ids & test_ids
    caps = read_json(corpus / "instruct_captions.json")
    assert {r["pair_id"] for recs in caps.values() for r in recs} == train_ids
    assert {r["id"] for r in read_json(corpus / "alignment.json")} == train_ids
    img = lambda name: {Path(r["image"]).stem for r in read_json(corpus / name)}
    assert img("vqa_train.json") == train_ids and img("vqa_test.json") == test_ids
    assert {r["pair_id"] for r in read_jsonl(corpus / "chat_eval.jsonl")} <= test_ids
    # and no two figures are pixel-identical across the splits
    h = lambda ids: {hashlib.sha256(np.asarray(Image.open(corpus / "images" / f"{i}.jpg")).tobytes()).hexdigest() for i in ids}
    assert not h(train_ids) & h(test_ids)

def test_figures_are_balanced(corpus):
    for name in ("labels.json", "labels_test.json"):
        lab = list(read_json(corpus / name).values())
        n = len(lab)
        assert Counter(x["domain"] for x in lab) == Counter({d: n // 5 for d in range(5)})
        assert sum(x["present"] for x in lab) == n // 2
        sides = Counter(x["side"] for x in lab if x["present"])
        assert abs(sides[1] - sides[2]) <= 1 and abs(sum(x["region"] == 1 for x in lab) - sum(x["region"] == 2 for x in lab)) <= 1

def _closed(corpus, name):
    return [Sample.from_json(r) for r in read_json(corpus / name) if r["answer_type"] == "CLOSED"]

def test_yes_no_balanced_per_question_kind(corpus):
    for name in ("vqa_train.json", "vqa_test.json"):
        by = defaultdict(Counter)
        for s in _closed(corpus, name): by[s.question_type][s.answer] += 1
        assert set(by) == {"presence", "modality", "finding", "side", "region", "size"}
        for kind, c in by.items():
            assert set(c) == {"yes", "no"}
            tol = 0.15 if kind == "presence" else 0.06  # presence: a random template inverts the question
            assert abs(c["yes"] / sum(c.values()) - 0.5) <= tol, (name, kind, c)
        opens = Counter(s.answer for s in map(Sample.from_json, read_json(corpus / name)) if s.question_type == "side" and s.answer_type == "OPEN")
        assert abs(opens["left"] - opens["right"]) <= max(3, 0.3 * sum(opens.values())), opens

def test_text_only_guessing_stays_near_chance(corpus):
    "Answer each test question with the majority training answer of the same question text (a text-only model's best)."
    prior = defaultdict(Counter)
    for s in _closed(corpus, "vqa_train.json"): prior[s.question][s.answer] += 1
    test = _closed(corpus, "vqa_test.json")
    hits = sum((prior[s.question].most_common(1)[0][0] if prior[s.question] else "yes") == s.answer for s in test)
    assert hits / len(test) <= 0.6, hits / len(test)

def test_every_record_passes_the_schema(corpus):
    from llavamed.data import validate_records, validate_file
    for name in ("alignment.json", "vqa_train.json", "vqa_test.json"):
        recs = read_json(corpus / name)
        for r in recs:
            s = Sample.from_json(r)
            assert sum(t.text.count(IMAGE_TOKEN) for t in s.conversations) == 1 and IMAGE_TOKEN in s.conversations[0].text
            assert [t.role for t in s.conversations] == ["human", "gpt"] and s.answer.strip()
            assert sum(s.domain.values()) == 1
        rep = validate_records(recs, images=corpus / "images", require_image=True)
        assert rep.ok, rep.summary()
    assert validate_file(str(corpus / "vqa_test.json"), images=str(corpus / "images"), quiet=True).exit_code == 0
    caps = read_json(corpus / "instruct_captions.json")
    assert list(caps) == list(DOMAINS)
    for d, recs in caps.items():
        for r in recs:
            assert {"pair_id", "pmid", "fig_id", "fig_label", "fig_caption", "in_text_mention", "domain", "findings", "facts"} <= set(r)
            assert r["pair_id"] == f"{r['pmid']}_{r['fig_id']}" and r["domain"][d] and r["findings"]["domain"] == d
            assert len(r["facts"]) >= 5 and all(set(x) == {"question", "answer", "kind"} and x["answer"] for x in r["facts"])
    chat = list(read_jsonl(corpus / "chat_eval.jsonl"))
    assert [c["question_id"] for c in chat] == list(range(len(chat))) and len(chat) == 80
    assert Counter(c["type"] for c in chat) == {"detailed_description": 20, "conversation": 60}
    for c in chat:
        assert c["text"].endswith("\n" + IMAGE_TOKEN) and c["gpt4_answer"] and c["image"] == f"{c['pair_id']}.jpg"
        assert {"fig_caption", "fig_label", "in_text_mention"} <= set(c) and sum(c["domain"].values()) == 1
    assert {next(d for d in DOMAINS if c["domain"][d]) for c in chat} == set(DOMAINS)

def test_labels_agree_with_findings_and_answers(corpus):
    labels = read_json(corpus / "labels.json")
    meta = read_json(corpus / "meta.json")
    assert meta["heads"] == LABEL_HEADS
    findings = {r["pair_id"]: r["findings"] for recs in read_json(corpus / "instruct_captions.json").values() for r in recs}
    for pid, lab in labels.items():
        f = findings[pid]
        assert lab == labels_of(f)
        name = {h: LABEL_HEADS[h][c] for h, c in lab.items()}
        assert name["domain"] == f["domain"] and name["present"] == ("yes" if f["present"] else "no")
        assert name["finding"] == (f"{f['domain']}:{f['finding']}" if f["present"] else "none")
        assert name["side"] == (f["side"] or "none") and name["region"] == (f["region"] or "none")
        assert name["size"] == (f["size"] or "none") and int(name["count"]) == f["count"] == len(f["lesions"])
        if f["present"]: assert f["count"] in (1, 2) and (f["size"] == "small" or f["count"] == 1)
    # the closed answers follow from the ground truth and the words of the question
    for r in read_json(corpus / "vqa_train.json"):
        s, f = Sample.from_json(r), findings[Path(r["image"]).stem]
        q, yes = s.question.lower(), s.answer == "yes"
        if s.answer_type != "CLOSED": continue
        if s.question_type == "side": assert yes == (f" {f['side']} " in q)
        if s.question_type == "region": assert yes == (f" {f['region']} " in q)
        if s.question_type == "size": assert yes == bool(re.search(rf"\b{f['size']}\?", q))
        if s.question_type == "finding": assert yes == (FINDINGS[f["domain"]][f["finding"]][1] in q)
        if s.question_type == "presence": assert yes == (f["present"] != bool(re.search(r"\bnormal\b", q)))
        if s.question_type == "modality": assert yes == (describe(f)["short"].lower() in q)

def test_image_files_have_the_requested_size(corpus, tmp_path):
    names = sorted((corpus / "images").iterdir())
    assert len(names) == 400
    for p in names[::37]:
        with Image.open(p) as im: assert im.size == (48, 48) and im.mode == "RGB" and im.format == "JPEG"
    make_corpus(tmp_path, n_train=3, n_test=2, size=70, fmt="png", n_chat=1, quiet=True)
    for p in (tmp_path / "images").iterdir():
        with Image.open(p) as im: assert im.size == (70, 70) and im.format == "PNG" and p.suffix == ".png"

@pytest.mark.parametrize("domain", DOMAINS)
def test_findings_are_visible_and_on_their_side(domain):
    "Each finding changes the pixels strongly inside its mask (at 64 px), nothing outside, and stays in its quadrant."
    figs = [f for f in sample_findings(120, seed=5) if f["domain"] == domain and f["present"]]
    assert {f["finding"] for f in figs} == set(FINDINGS[domain])
    for f in figs:
        a = render_figure(f, 64, f["seed"]).astype(float)
        b = render_figure({**f, "present": False}, 64, f["seed"]).astype(float)
        m = finding_mask(f, 64, f["seed"])
        diff = np.abs(a - b).mean(-1)
        assert diff[m == 0].max() == 0
        assert diff[m > 0.5].mean() > 30, (f["finding"], diff[m > 0.5].mean())
        ys, xs = np.nonzero(m > 0)
        assert (xs < 32).all() if f["side"] == "left" else (xs >= 32).all()
        assert (ys < 32).all() if f["region"] == "upper" else (ys >= 32).all()

def test_corpus_texts(corpus):
    texts = corpus_texts(corpus)
    caps = [r["fig_caption"] for recs in read_json(corpus / "instruct_captions.json").values() for r in recs]
    assert set(caps) <= set(texts) and all(IMAGE_TOKEN not in t for t in texts)
    test_q = {Sample.from_json(r).question for r in read_json(corpus / "vqa_test.json")}
    assert len(corpus_texts(corpus, include_test=True)) > len(texts)
    assert test_q <= set(corpus_texts(corpus, include_test=True))

def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="n_train=0"): make_corpus(tmp_path, n_train=0, quiet=True)
    with pytest.raises(ValueError, match="size=8"): make_corpus(tmp_path, size=8, quiet=True)
    with pytest.raises(ValueError, match="fmt='gif'"): make_corpus(tmp_path, fmt="gif", quiet=True)
    with pytest.raises(ValueError, match="domain 'xray'"): render_figure({"domain": "xray", "present": False})

def test_cli_writes_the_corpus(tmp_path, llavamed_cmd):
    out = tmp_path / "cli"
    r = subprocess.run([llavamed_cmd, "synth", "--out", str(out), "--n-train", "5", "--n-test", "5", "--size", "32",
                        "--n-chat", "2", "--seed", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "vqa_test" in r.stdout and all((out / f).is_file() for f in FILES)
    assert read_json(out / "meta.json")["seed"] == 4

def test_import_is_light():
    code = "import sys, llavamed.synth; print([m for m in ('torch', 'transformers', 'matplotlib', 'pydicom') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
