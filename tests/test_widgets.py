"""Mechanism tests of llavamed.widgets, headless: the views are driven through their state and through the
ipywidgets callbacks (button clicks, box values) that a browser would trigger, on real files and PNG images."""
import io, json, subprocess, sys, threading, time
from pathlib import Path
import pytest
from PIL import Image, ImageDraw
from llavamed.core import DOMAINS, RecordError, append_jsonl, write_json, write_jsonl
from llavamed.widgets import (ConversationBrowser, PredictionViewer, TrainingCurves, image_png, load_rows,
                              raw_sidecar, read_raw_replies)

COLORS = {"fig0.png": (255, 0, 0), "fig1.png": (0, 255, 0), "fig2.png": (0, 0, 255), "fig3.png": (255, 255, 0)}


def _center(png: bytes) -> tuple:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    return image.getpixel((image.width // 2, image.height // 2))


def _flags(domain):
    return {name: name == domain for name in DOMAINS}


def _conv(question, answer, first=True):
    return [{"from": "human", "value": f"<image>\n{question}" if first else question},
            {"from": "gpt", "value": answer}]


@pytest.fixture
def corpus(tmp_path):
    "Images (a coloured square per figure) in images/, alignment, instruction, VQA and qa50 files beside."
    (tmp_path / "images").mkdir()
    for name, color in COLORS.items():
        image = Image.new("RGB", (64, 48), (0, 0, 0))
        ImageDraw.Draw(image).rectangle((16, 12, 48, 36), fill=color)
        image.save(tmp_path / "images" / name)
    captions = ["Chest radiograph, right effusion.", "Axial T2 MRI.", "H&E section.", "Gross specimen."]
    write_json(tmp_path / "alignment.json", [
        {"id": f"A{k}", "image": f"fig{k}.png", "conversations": _conv("Describe the image.", caption)}
        for k, caption in enumerate(captions)])
    write_json(tmp_path / "instruct.json", [
        {"id": "p0_F1", "image": "fig0.png", "domain": _flags("chest_xray"),
         "conversations": _conv("Is there an effusion?", "Yes, on the right.")
                          + _conv("How large?", "Small.", False)},
        {"id": "p1_F1", "image": "fig1.png", "domain": _flags("mri"),
         "conversations": _conv("Which sequence?", "T2-weighted.")},
        {"id": "p2_F1", "image": "fig2.png", "domain": {**_flags("histology"), "gross": True},
         "conversations": _conv("Stain?", "H&E.")},
        {"id": "p3_F1", "image": "missing.png", "domain": _flags("ct_scan"),
         "conversatons": _conv("Contrast?", "Yes, iodinated.")}])  # the misspelling of a released file
    response = {"choices": [{"message": {"content": "Q: Stain? A: H&E, haematoxylin"}}]}
    write_jsonl(tmp_path / "instruct.raw.jsonl", [
        {"pair_id": "p1_F1", "raw": "User: Which sequence?\nGPT: T2-weighted. Also FLAIR hyperintensity."},
        {"pair_id": "p2_F1", "response": response}])
    with open(tmp_path / "instruct.raw.jsonl", "a") as log:
        log.write('{"pair_id": "p0_F1", "raw": "torn')  # an interrupted run
    write_jsonl(tmp_path / "qa50.jsonl", [
        {"question_id": k, "image": f"fig{k % 4}.png", "pair_id": f"p{k}", "text": f"Question {k}?\n<image>",
         "gpt4_answer": f"Reference {k}.", "fig_caption": f"Caption {k}.", "domain": _flags(DOMAINS[k % 5]),
         "type": "conversation" if k % 3 else "detailed_description"} for k in range(6)])
    return tmp_path


# ---------------------------------------------------------------- ConversationBrowser: state

def test_alignment_browse_and_move(corpus):
    b = ConversationBrowser(corpus / "alignment.json")
    assert [it.id for it in b.items] == ["A0", "A1", "A2", "A3"] and b.current_id == "A0"
    assert b.image_path() == corpus / "images" / "fig0.png"  # found in images/ beside the file
    assert b.prev().current_id == "A0"  # no wrap at the start
    assert [b.next().current_id for _ in range(4)] == ["A1", "A2", "A3", "A3"]  # none at the end
    assert b.prev().current_id == "A2" and b.position() == "3/4"
    assert "Describe the image." in b.turns_html() and "&lt;image&gt;" not in b.turns_html()
    assert repr(b) == "ConversationBrowser(4 records; no filter; A2 · fig2.png · 3/4)"


def test_instruct_domains_search_jump(corpus):
    b = ConversationBrowser(corpus / "instruct.json", images_dir=corpus / "images")
    assert b.domains == {"chest_xray": 1, "mri": 1, "histology": 1, "gross": 1, "ct_scan": 1}
    assert b.items[3].turns[1] == ("gpt", "Yes, iodinated.")  # the misspelled key is read (the shared reader)
    assert [b.items[i].id for i in b.filter(domain="gross").view] == ["p2_F1"]
    assert b.current_id == "p2_F1"
    b.filter(domain=None, query="EFFUSION")
    assert [b.items[i].id for i in b.view] == ["p0_F1"] and b.position() == "1/1 (of 4)"
    assert "<mark>effusion</mark>" in b.turns_html()
    assert repr(b) == ("ConversationBrowser(4 records; query='EFFUSION'; "
                       "p0_F1 · fig0.png · Chest X-ray · 1/1 (of 4))")
    b.filter(query="zebra")
    assert b.current is None and b.current_id is None and "no match" in b.header()
    assert b.next().current is None  # moving in an empty view is harmless
    assert b.jump("p1_F1").current_id == "p1_F1" and b.query == "" and len(b.view) == 4  # filters cleared
    with pytest.raises(KeyError, match="no record with id 'p9' among 4 records"): b.jump("p9")
    b.filter(domain="mri")
    assert b.jump("p1_F1").domain == "mri"  # visible already: filters kept


def test_raw_sidecar_beside_cleaned_record(corpus):
    assert raw_sidecar(corpus / "instruct.json") == corpus / "instruct.raw.jsonl"
    replies = read_raw_replies(corpus / "instruct.raw.jsonl")
    assert replies == {"p1_F1": "User: Which sequence?\nGPT: T2-weighted. Also FLAIR hyperintensity.",
                       "p2_F1": "Q: Stain? A: H&E, haematoxylin"}  # the torn last line is skipped
    b = ConversationBrowser(corpus / "instruct.json")
    assert b.n_raw == 2 and b.items[1].raw.endswith("FLAIR hyperintensity.")
    b.search("flair")  # the raw reply is searched too: what the cleaning dropped can be found
    assert b.current_id == "p1_F1" and "Teacher's raw reply" in b.turns_html()
    none = ConversationBrowser(corpus / "instruct.json", raw=False)
    assert none.n_raw == 0 and all(it.raw is None for it in none.items)
    # the other sidecar spelling, and a mapping given directly
    (corpus / "instruct.raw.jsonl").rename(corpus / "instruct.json.raw.jsonl")
    assert ConversationBrowser(corpus / "instruct.json").n_raw == 2
    records = json.loads((corpus / "instruct.json").read_text())  # raw rows, the misspelled key among them
    b = ConversationBrowser(records, raw={"p3_F1": "raw ct"})
    assert b.n_raw == 1 and b.items[3].raw == "raw ct"


def test_benchmark_types_and_domains(corpus):
    b = ConversationBrowser(corpus / "qa50.jsonl")
    assert b.kinds == {"conversation": 4, "detailed_description": 2}
    assert b.items[0].turns == [("human", "Question 0?\n<image>"), ("gpt", "Reference 0.")]
    assert [b.items[i].id for i in b.filter(kind="detailed_description").view] == ["0", "3"]
    assert [b.items[i].id for i in b.filter(kind="conversation", domain="mri").view] == ["1"]
    assert "Caption 1." in b.turns_html() and "MRI" in b.header() and "conversation" in b.header()
    assert b.jump(5).current_id == "5"  # integer question ids work


def test_teacher_input_and_bad_records(corpus):
    mention = {"tokens": "as shown in Fig 1", "entities": []}
    captions = {"chest_xray": [{"pair_id": "p0_F1", "pmid": "1", "fig_id": "F1", "fig_label": "Fig 1",
                                "fig_caption": "A CXR.", "in_text_mention": mention, "domain": "chest_xray"}],
                "mri": [{"pair_id": "p1_F1", "fig_caption": "An MRI.", "in_text_mention": "", "domain": "mri"}]}
    write_json(corpus / "captions.json", captions)
    assert len(load_rows(corpus / "captions.json")) == 2
    b = ConversationBrowser(corpus / "captions.json", images_dir=corpus / "images")
    assert b.items[0].turns == [("caption", "A CXR."), ("mention", "as shown in Fig 1")]
    assert b.items[0].image == "p0_F1.jpg"
    assert b.domains == {"chest_xray": 1, "mri": 1}
    with pytest.raises(RecordError, match=r"<records>:1: unknown record layout, keys \['question'\]"):
        ConversationBrowser([{"id": "ok", "conversations": []}, {"question": "?"}])


def test_records_through_the_shared_reader(corpus):
    "JSONL with the misspelled key, parquet, the teacher's input without domains, and bad records named."
    rows = [row for _, row in load_rows(corpus / "instruct.json")]
    write_jsonl(corpus / "instruct.jsonl", json.loads((corpus / "instruct.json").read_text()))  # misspelled
    assert [it.turns for it in ConversationBrowser(corpus / "instruct.jsonl").items] == \
        [it.turns for it in ConversationBrowser(rows).items]
    pq = pytest.importorskip("pyarrow.parquet"); pa = pytest.importorskip("pyarrow")
    flat = [{"id": r["id"], "image": r["image"], "conversations": r["conversations"]} for r in rows]
    pq.write_table(pa.Table.from_pylist(flat), corpus / "instruct.parquet")
    b = ConversationBrowser(corpus / "instruct.parquet", images_dir=corpus / "images")
    assert [it.id for it in b.items] == ["p0_F1", "p1_F1", "p2_F1", "p3_F1"]
    assert b.image_path().name == "fig0.png"
    write_json(corpus / "keyed.json", {"ct_scan": [{"pair_id": "p5_F1", "fig_caption": "A CT."}], "mri": []})
    assert ConversationBrowser(corpus / "keyed.json").domains == {"ct_scan": 1}  # the key is the domain
    (corpus / "bad.json").write_text('[\n{"id": "a", "conversations": []},\n{"id": "b", "conversations": [}\n]')
    with pytest.raises(RecordError, match=r"bad\.json:3: malformed JSON"):
        ConversationBrowser(corpus / "bad.json")
    write_jsonl(corpus / "turnless.jsonl", [{"id": "a", "conversations": [{"value": "no speaker"}]}])
    with pytest.raises(RecordError, match=r"turnless\.jsonl:1: not a LLaVA conversation record \('from'\)"):
        ConversationBrowser(corpus / "turnless.jsonl")


# ---------------------------------------------------------------- ConversationBrowser: the widget

def test_widget_buttons_and_boxes_drive_the_state(corpus):
    b = ConversationBrowser(corpus / "instruct.json", max_image=128)
    w = b.widget
    assert w is b.widget  # built once
    assert "p0_F1" in b.w_id.value and b.w_prev.disabled and not b.w_next.disabled
    assert _center(b.w_image.value) == COLORS["fig0.png"]
    b.w_next.click()
    assert b.current_id == "p1_F1" and "p1_F1" in b.w_id.value
    assert _center(b.w_image.value) == COLORS["fig1.png"]
    assert "T2-weighted" in b.w_turns.value and "FLAIR" in b.w_turns.value
    b.w_domain.value = "histology"
    assert b.current_id == "p2_F1" and "H&amp;E" in b.w_turns.value and b.w_next.disabled and b.w_prev.disabled
    b.w_domain.value = ""
    b.w_search.value = "iodinated"
    assert b.current_id == "p3_F1" and "image not found: missing.png" in b.w_msg.value
    assert b.w_image.value == b""
    b.w_jump.value = "nope"
    assert "no record with id" in b.w_msg.value and b.current_id == "p3_F1"
    b.w_jump.value = "p0_F1"
    assert b.current_id == "p0_F1" and b.w_msg.value == "" and b.query == "" and len(b.view) == 4
    assert b.w_search.value == "" and b.w_jump.value == ""  # the controls show the cleared filters
    b.filter(domain="mri")  # state changed from code: the controls follow
    assert b.w_domain.value == "mri" and b.current_id == "p1_F1" and "p1_F1" in b.w_id.value
    opts = dict((v, k) for k, v in b.w_domain.options)
    assert opts["mri"] == "MRI (1)" and opts[""] == "all"


def test_unreadable_image_is_reported_not_fatal(corpus):
    (corpus / "images" / "fig1.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    b = ConversationBrowser(corpus / "alignment.json")
    b.widget
    b.w_next.click()
    assert b.current_id == "A1" and "cannot show image fig1.png" in b.w_msg.value and b.w_image.value == b""
    b.w_next.click()
    assert b.current_id == "A2" and b.w_msg.value == "" and _center(b.w_image.value) == COLORS["fig2.png"]


def test_images_shrunk_and_medical_formats(tmp_path, corpus):
    png = image_png(corpus / "images" / "fig0.png", max_size=32)
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and max(im.size) == 32
    nib = pytest.importorskip("nibabel"); np = pytest.importorskip("numpy")
    vol = np.zeros((40, 30, 5), dtype=np.int16); vol[10:30, 5:25, :] = 1000
    nib.Nifti1Image(vol, np.eye(4)).to_filename(tmp_path / "vol.nii.gz")
    try: import llavamed.images  # noqa: F401  (the project's loader reads NIfTI; PIL alone cannot)
    except ImportError: pytest.skip("llavamed.images (the shared image loader) is not installed")
    im = Image.open(io.BytesIO(image_png(tmp_path / "vol.nii.gz", 256)))
    assert im.size[0] * im.size[1] > 0 and im.convert("L").getextrema()[1] > 0
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    ct = get_testdata_file("CT_small.dcm")
    im = Image.open(io.BytesIO(image_png(ct, 64)))
    assert max(im.size) == 64 and im.convert("L").getextrema()[1] > 0
    # a browser over a DICOM record shows it
    write_json(tmp_path / "dcm.json", [{"id": "ct", "image": Path(ct).name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A CT slice."}]}])
    b = ConversationBrowser(tmp_path / "dcm.json", images_dir=Path(ct).parent, max_image=64)
    assert Image.open(io.BytesIO(b.widget.children[-1].children[0].value)).size == im.size


# ---------------------------------------------------------------- PredictionViewer

def _answers(texts, model="m"):
    return [{"question_id": qid, "prompt": "p", "text": text, "answer_id": f"a{qid}", "model_id": model,
             "metadata": {}} for qid, text in texts.items()]


@pytest.fixture
def vqa(corpus):
    questions = [("c0", "CLOSED", "Is there an effusion?", "yes"),
                 ("c1", "CLOSED", "Is the heart enlarged?", "no"),
                 ("o0", "OPEN", "Which side?", "right"), ("o1", "OPEN", "What organ?", "left lung"),
                 ("o2", "OPEN", "Modality?", "ct")]
    write_json(corpus / "vqa_test.json", [
        {"id": qid, "image": f"fig{k % 4}.png", "answer_type": answer_type,
         "conversations": _conv(question, answer)}
        for k, (qid, answer_type, question, answer) in enumerate(questions)])
    write_jsonl(corpus / "ans_image.jsonl",
                _answers({"c0": "yes", "c1": "not enlarged", "o0": "the right side", "o1": "the lung"}))
    write_jsonl(corpus / "ans_blank.jsonl",
                _answers({"c0": "no", "c1": "no", "o0": "left", "o1": "left lung", "o2": "mri"}))
    return corpus


def test_prediction_scores_official_and_strict(vqa):
    pv = PredictionViewer(vqa / "vqa_test.json", vqa / "ans_image.jsonl")
    assert pv.metric_name == "official" and pv.names == ["model"]
    assert [p.id for p in pv.unanswered] == ["o2"] and len(pv.items) == 4
    got = {p.id: p.scores["model"] for p in pv.items}
    assert got == {"c0": 1.0, "c1": 1.0, "o0": 1.0, "o1": 0.5}  # official: "no" is in "not enlarged"
    strict = PredictionViewer(vqa / "vqa_test.json", vqa / "ans_image.jsonl", mode="strict")
    assert {p.id: p.scores["model"] for p in strict.items}["c1"] == 0.0 and strict.metric_name == "strict"
    with pytest.raises(ValueError, match="mode must be 'official' or 'strict', got 'fuzzy'"):
        PredictionViewer(vqa / "vqa_test.json", vqa / "ans_image.jsonl", mode="fuzzy")


def test_prediction_filters_and_ablations(vqa):
    sets = {"image": vqa / "ans_image.jsonl", "blank": vqa / "ans_blank.jsonl"}
    pv = PredictionViewer(vqa / "vqa_test.json", sets, images_dir=vqa / "images", right_at=0.75)
    assert pv.summary() == {"image": 87.5, "blank": 50.0}
    ids = lambda: [pv.items[i].id for i in pv.view]
    pv.filter(verdict="wrong"); assert ids() == ["o1"]
    assert pv.ablations() == [{"set": "image", "answer": "the lung", "score": 0.5, "right": False},
                              {"set": "blank", "answer": "left lung", "score": 1.0, "right": True}]
    pv.filter(verdict="right", kind="CLOSED"); assert ids() == ["c0", "c1"]
    assert pv.summary() == {"image": 100.0, "blank": 50.0}
    assert repr(pv) == ("PredictionViewer(4 answered questions; verdict='right', kind='CLOSED'; "
                        "c0 · CLOSED · 1/2 (of 4) · image 100.0, blank 50.0)")
    pv.filter(verdict="all", kind=None, query="LUNG"); assert ids() == ["o1"]
    pv.filter(query=None)
    assert pv.jump("o0").current_id == "o0" and pv.next().current_id == "o1" and pv.next().current_id == "o1"
    pv.filter(verdict="wrong")
    assert pv.jump("c0").verdict == "all"  # hidden by the filter: cleared
    with pytest.raises(KeyError, match="no answered question with id 'o2'"): pv.jump("o2")
    with pytest.raises(ValueError, match="verdict must be"): pv.filter(verdict="maybe")
    # the widget: toggles and buttons call the same filters
    pv.widget
    pv.w_verdict.value = "wrong"
    assert pv.current_id == "o1" and "the lung" in pv.w_body.value and "left lung" in pv.w_body.value
    assert _center(pv.w_image.value) == COLORS["fig3.png"]
    pv.w_verdict.value = "all"; pv.w_kind.value = "OPEN"
    assert pv.current_id == "o1" and pv.w_next.disabled and not pv.w_prev.disabled
    pv.w_prev.click()
    assert pv.current_id == "o0" and "score (official)" in pv.w_body.value and "o0" in pv.w_id.value
    pv.w_jump.value = "o2"
    assert "no answered question with id 'o2'" in pv.w_msg.value and pv.current_id == "o0"
    pv.w_jump.value = "c1"  # hidden by the type filter: cleared, and the controls say so
    assert pv.current_id == "c1" and pv.w_kind.value == "" and pv.w_verdict.value == "all"
    assert pv.w_msg.value == ""


def test_answer_files_named_by_their_image_ablation(vqa):
    for ablation, texts in (("none", {"c0": "yes", "c1": "no"}), ("blank", {"c0": "no", "c1": "no"}),
                            ("noise", {"c0": "no"})):
        rows = _answers(texts)
        for r in rows: r["metadata"] = {"image_ablation": ablation, "decoding": {"do_sample": False}}
        write_jsonl(vqa / f"answers_{ablation}.jsonl", rows)
    files = [vqa / f"answers_{ablation}.jsonl" for ablation in ("none", "blank", "noise")]
    pv = PredictionViewer(vqa / "vqa_test.json", files)
    assert pv.names == ["image", "blank", "noise"] and [p.id for p in pv.items] == ["c0", "c1"]
    assert pv.summary() == {"image": 100.0, "blank": 50.0, "noise": 0.0}
    assert [(a["set"], a["answer"]) for a in pv.jump("c1").ablations()] == [
        ("image", "no"), ("blank", "no"), ("noise", None)]
    assert PredictionViewer(vqa / "vqa_test.json", vqa / "answers_blank.jsonl").names == ["blank"]
    assert PredictionViewer(vqa / "vqa_test.json", vqa / "ans_image.jsonl").names == ["model"]  # none recorded


def test_answers_being_written_and_bad_question_files(vqa):
    "A torn last answer line (predict still running) is skipped and counted; a bad question file is named."
    with open(vqa / "ans_image.jsonl", "a") as log: log.write('{"question_id": "o2", "text": "m')
    pv = PredictionViewer(vqa / "vqa_test.json", vqa / "ans_image.jsonl")
    assert len(pv.items) == 4 and [p.id for p in pv.unanswered] == ["o2"]
    assert [(Path(err.path).name, err.line) for err in pv.bad_lines] == [("ans_image.jsonl", 5)]
    records = json.loads((vqa / "vqa_test.json").read_text())
    write_json(vqa / "twice.json", records + records[:1])
    with pytest.raises(ValueError, match=r"twice\.json: record 5 \(id c0\): duplicate id 'c0'"):
        PredictionViewer(vqa / "twice.json", vqa / "ans_image.jsonl")
    with pytest.raises(ValueError, match=r"<questions>: duplicate ids \['c0'\]"):
        PredictionViewer(records + records[:1], vqa / "ans_image.jsonl")
    with pytest.raises(ValueError, match=r"<questions>: record 1: neither a LLaVA record"):
        PredictionViewer([records[0], {"question": "?"}], vqa / "ans_image.jsonl")


def test_prediction_given_scores_and_judge_reviews(corpus):
    qa = corpus / "qa50.jsonl"
    ans = _answers({k: f"Answer {k}." for k in range(5)})
    pv = PredictionViewer(qa, ans, scores={0: 1.0, 1: 0.0, "2": 0.5})  # ids as ints or strings
    assert pv.metric_name == "given" and [p.scores["model"] for p in pv.items] == [1.0, 0.0, 0.5, None, None]
    assert [p.id for p in pv.unanswered] == ["5"]
    write_jsonl(corpus / "reviews.jsonl", [
        {"question_id": 0, "category": "conversation", "tuple": [8, 4]},
        {"question_id": 1, "content": "7 7\nBoth fine."}, {"question_id": 2, "scores": [5, 10]},
        {"question_id": 3, "content": "The first assistant..."}])  # unparsable: no scores, not a crash
    pv = PredictionViewer(qa, ans, reviews=corpus / "reviews.jsonl", scores={})
    assert [p.relative for p in pv.items] == [50.0, 100.0, 200.0, None, None]
    assert pv.summary() == {"model": None, "judge_relative": 116.67}
    assert [pv.items[i].id for i in pv.filter(verdict="right").view] == ["1", "2"]
    assert [pv.items[i].id for i in pv.filter(verdict="all", kind="detailed_description").view] == ["0", "3"]
    assert [pv.items[i].id for i in pv.filter(kind=None, domain="mri").view] == ["1"]
    pv.widget
    assert "relative 100.0" in pv.w_body.value and pv.w_domain.value == "mri"
    write_jsonl(corpus / "judged.jsonl", [  # as `llavamed judge` writes its reviews
        {"question_id": 0, "type": "detailed_description", "domain": "chest_xray", "status": "done",
         "reference_score": 8.0, "model_score": 6.0, "ratio": 0.75}])
    pv = PredictionViewer(qa, ans, reviews=corpus / "judged.jsonl", scores={})
    assert [p.relative for p in pv.items] == [75.0, None, None, None, None]


# ---------------------------------------------------------------- TrainingCurves

def _log(path, *steps, loss0=4.0):
    for step in steps:
        append_jsonl(path, {"step": step, "epoch": step / 10, "loss": loss0 / step, "learning_rate": 1e-3})


def test_curves_single_run_and_stages(tmp_path):
    _log(tmp_path / "one" / "log_history.jsonl", 1, 2, 3)
    tc = TrainingCurves(tmp_path / "one")
    assert list(tc.history) == ["one"] and tc.steps("one") == [1, 2, 3]
    assert tc.losses("one")[-1] == pytest.approx(4 / 3)
    run = tmp_path / "run"
    _log(run / "stage2_instruct" / "log_history.jsonl", 1, 2)
    _log(run / "stage1_align" / "log_history.jsonl", 1, 2, 3, 4)
    (run / "notes").mkdir()
    tc = TrainingCurves(run)
    assert list(tc.history) == ["stage1_align", "stage2_instruct"]
    assert {s: r["step"] for s, r in tc.last().items()} == {"stage1_align": 4, "stage2_instruct": 2}
    png = tc.png()
    assert Image.open(io.BytesIO(png)).format == "PNG" and tc.png() is png  # cached until new points
    assert "stage1_align: 4 points, step 4" in tc.status()
    titles = [ax.get_title() for ax in tc.figure().axes if ax.get_title()]  # the project's one loss plot
    assert titles == ["stage1_align (loss 1 at step 4)", "stage2_instruct (loss 2 at step 2)"]
    empty = TrainingCurves(tmp_path / "nothing")
    assert empty.history == {} and "no log_history.jsonl" in empty.status() and empty.png()[:4] == b"\x89PNG"


def test_curves_refresh_reads_only_appended_lines(tmp_path):
    log = tmp_path / "s1" / "log_history.jsonl"
    _log(log, 1, 2)
    tc = TrainingCurves(tmp_path)
    png0 = tc.png()
    assert tc.refresh() == 0 and tc.png() is png0
    _log(log, 3)
    with open(log, "a") as f: f.write('{"step": 4, "epoch": 0.4, "loss": 0.')  # a write in progress
    assert tc.refresh() == 1 and tc.steps("s1") == [1, 2, 3] and tc.png() != png0
    with open(log, "a") as f: f.write('9, "learning_rate": 0.001}\nnot json\n{"eval_loss": 1.0, "step": 4}\n')
    assert tc.refresh() == 1 and tc.losses("s1")[-1] == 0.9 and tc.bad_lines == 1  # eval lines hold no loss
    _log(tmp_path / "s2" / "log_history.jsonl", 1)  # the next stage starts
    assert tc.refresh() == 1 and list(tc.history) == ["s1", "s2"]
    restarted = {"step": 1, "epoch": 0, "loss": 5.0, "learning_rate": 0}
    log.write_text(json.dumps(restarted) + "\n")  # a restarted run rewrites its log
    assert tc.refresh() == 1 and tc.steps("s1") == [1] and tc.losses("s1") == [5.0]


def test_curves_live_thread_updates_widget(tmp_path):
    log = tmp_path / "log_history.jsonl"
    _log(log, 1)
    tc = TrainingCurves(tmp_path)
    w = tc.widget
    png0, status0 = tc.w_image.value, tc.w_status.value
    assert "1 points" in status0
    tc.w_live.value = True  # the toggle starts the polling thread
    assert tc.live
    for step in range(2, 6): _log(log, step); time.sleep(0.05)
    deadline = time.time() + 15
    while time.time() < deadline and len(tc.steps(tmp_path.name)) < 5: time.sleep(0.1)
    tc.w_live.value = False
    assert not tc.live and not any(t.name == "llavamed-curves" for t in threading.enumerate())
    assert tc.steps(tmp_path.name) == [1, 2, 3, 4, 5]
    assert tc.w_image.value != png0 and "5 points, step 5" in tc.w_status.value
    _log(log, 6); time.sleep(0.3)
    assert len(tc.steps(tmp_path.name)) == 5  # stopped: nothing read until refresh
    tc.w_refresh.click()
    assert len(tc.steps(tmp_path.name)) == 6
    assert w is tc.widget


def test_curves_start_interval(tmp_path):
    _log(tmp_path / "log_history.jsonl", 1)
    tc = TrainingCurves(tmp_path)
    tc.widget
    tc.start(interval=0.05)
    assert tc.w_live.value  # started from code: the toggle shows it
    try:
        assert tc.start() is tc and tc.live  # a second start does not start a second thread
        _log(tmp_path / "log_history.jsonl", 2)
        deadline = time.time() + 10
        while time.time() < deadline and len(tc.steps(tmp_path.name)) < 2: time.sleep(0.05)
        assert tc.steps(tmp_path.name) == [1, 2]
    finally: tc.stop()
    assert not tc.live and not tc.w_live.value


def test_import_is_light():
    code = ("import sys, llavamed.widgets; "
            "print([m for m in ('ipywidgets', 'matplotlib', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    out = out.stdout.strip()
    assert out == "[]", out


def test_checkpoint_rows_of_the_request_runner(tmp_path):
    write_jsonl(tmp_path / "x.raw.jsonl", [
        {"id": "a", "status": "failed", "text": None, "reason": "HTTP 503", "attempts": 1},
        {"id": "a", "status": "done", "text": "User: Q?\nGPT: A.", "parsed": [["Q?", "A."]], "reason": None},
        {"id": "b", "status": "failed", "text": None, "reason": "timeout after 60 s"},
        {"id": "c", "status": "unparsed", "text": "Sorry, I cannot see the image.", "reason": "no turns"}])
    assert read_raw_replies(tmp_path / "x.raw.jsonl") == {
        "a": "User: Q?\nGPT: A.", "b": "[failed: timeout after 60 s]",
        "c": "[unparsed: no turns]\nSorry, I cannot see the image."}


def test_on_the_synthetic_corpus_and_self_instruct_output(tmp_path):
    "The real files of the pipeline: synthetic corpus, template-teacher self-instruct output with its sidecar."
    synth = pytest.importorskip("llavamed.synth"); instruct = pytest.importorskip("llavamed.instruct")
    d = tmp_path / "corpus"
    synth.make_corpus(str(d), n_train=6, n_test=3, size=32, n_chat=2, quiet=True)
    instruct.self_instruct(str(d / "instruct_captions.json"), str(d / "instruct.jsonl"), quiet=True)
    files = ("alignment.json", "instruct.jsonl", "vqa_test.json", "chat_eval.jsonl", "instruct_captions.json")
    for name in files:
        b = ConversationBrowser(d / name)
        assert b.items and all(b.image_path(it) is not None for it in b.items), name  # every image found
        b.widget
        assert b.w_image.value[:4] == b"\x89PNG" and b.w_msg.value == "" and b.items[0].id in b.w_id.value
        assert b.next().current_id == b.items[min(1, len(b.items) - 1)].id
    b = ConversationBrowser(d / "instruct.jsonl")
    assert b.n_raw == len(b.items) > 0  # each cleaned record beside the teacher's reply it came from
    assert ConversationBrowser(d / "vqa_test.json").kinds.keys() == {"OPEN", "CLOSED"}
