"VQA converters on fixtures in each official format, the restricted unpickler, and the leakage check."
import json, os, pickle, shutil
from pathlib import Path
import numpy as np
import pytest
from PIL import Image
from llavamed.cli import main
from llavamed.core import Sample
from llavamed.vqa import check_leakage, convert_vqa, safe_load_pickle


def load(path): return json.loads(Path(path).read_text())


# ---------- VQA-RAD: one public JSON, test = phrase_type test_* ----------
def rad(qid, phrase, ans, atype, img="synpic100.jpg", q="Is there an abnormality?"):
    return {"qid": qid, "image_name": img, "image_case_url": "https://medpix.example/x", "image_organ": "HEAD",
            "answer": ans, "answer_type": atype, "question_type": "ABN", "question": q, "phrase_type": phrase,
            "qid_linked_id": f"L{qid}", "evaluation": "not evaluated", "question_rephrase": "NULL"}


@pytest.fixture
def vqa_rad(tmp_path):
    rows = ([rad(i, "freeform", "yes", "CLOSED") for i in range(6)] + [rad(10 + i, "para", "left", "OPEN") for i in range(4)]
            + [rad(20 + i, "test_freeform", "no", "CLOSED", "synpic200.jpg") for i in range(3)]
            + [rad(30 + i, "test_freeform", 3, "OPEN", "synpic201.jpg") for i in range(2)]
            + [rad(40 + i, "test_para", "yes", "OPEN", "synpic200.jpg") for i in range(2)])  # a yes/no labelled OPEN
    d = tmp_path / "VQA_RAD"; d.mkdir()
    (d / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    return d


def test_vqa_rad_variants_and_counts(vqa_rad, tmp_path):
    c = convert_vqa("vqa-rad", str(vqa_rad), str(tmp_path / "o"))
    assert (c.splits["train"], c.splits["test"]) == ({"total": 10, "CLOSED": 6, "OPEN": 4}, {"total": 7, "CLOSED": 3, "OPEN": 4})
    assert "vqa-rad (official) test: 7 questions (4 open, 3 closed)" in str(c)
    test = load(tmp_path / "o/test.json")
    assert [r["id"] for r in test[:3]] == ["vqa-rad_20", "vqa-rad_21", "vqa-rad_22"]
    s = Sample.from_json(test[3])
    assert (s.image, s.answer, s.answer_type, s.question_type) == ("synpic201.jpg", "3", "OPEN", "ABN")
    assert s.conversations[0].text.count("<image>") == 1 and s.question == "Is there an abnormality?"
    ff = convert_vqa("vqa-rad", str(vqa_rad), str(tmp_path / "f"), variant="freeform")
    assert ff.splits["test"]["total"] == 5 and ff.skipped == {"paraphrased test question (freeform variant)": 2}
    yn = convert_vqa("vqa-rad", str(vqa_rad), str(tmp_path / "y"), variant="yesno")
    assert yn.splits["test"] == {"total": 7, "CLOSED": 5, "OPEN": 2}
    with pytest.raises(ValueError, match="variant 'llava'"): convert_vqa("vqa-rad", str(vqa_rad), str(tmp_path / "z"), variant="llava")


def test_vqa_rad_output_is_stable_and_bad_records_are_counted(vqa_rad, tmp_path):
    p = vqa_rad / "VQA_RAD Dataset Public.json"
    rows = load(p); rows.append(rad(99, "freeform", "", "OPEN")); rows.append(rad(98, "freeform", "x", "MAYBE"))
    rows.append(rad(5, "freeform", "yes", "CLOSED"))  # a repeated qid
    p.write_text(json.dumps(rows))
    a = convert_vqa("vqa-rad", str(p), str(tmp_path / "a"))
    convert_vqa("vqa-rad", str(vqa_rad), str(tmp_path / "b"))
    assert (tmp_path / "a/train.json").read_bytes() == (tmp_path / "b/train.json").read_bytes()
    assert a.skipped == {"empty answer": 1, "answer_type": 1, "repeated id (suffixed)": 1}
    assert load(tmp_path / "a/train.json")[-1]["id"] == "vqa-rad_5_2"


# ---------- SLAKE 1.0: train/validate/test JSON, en + zh ----------
def slake(qid, lang, atype, img="xmlab1/source.jpg", ans="Yes"):
    return {"img_id": 1, "img_name": img, "question": "Does the picture contain lung?" if lang == "en" else "图片中有肺吗?",
            "answer": ans, "q_lang": lang, "location": "Chest", "modality": "X-Ray", "answer_type": atype,
            "base_type": "vqa", "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}


def test_slake_splits_language_and_cli(tmp_path):
    src = tmp_path / "Slake1.0"; src.mkdir()
    n = 0
    for name, (n_en, n_zh) in {"train.json": (5, 3), "validate.json": (2, 2), "test.json": (3, 1)}.items():
        rows = []
        for lang, k in (("en", n_en), ("zh", n_zh)):
            for i in range(k):
                rows.append(slake(n, lang, "CLOSED" if i % 2 else "OPEN")); n += 1
        (src / name).write_text(json.dumps(rows, ensure_ascii=False))
    assert main(["vqa-convert", "--dataset", "slake", "--src", str(src), "--out", str(tmp_path / "o")]) == 0
    assert {p.name: len(load(p)) for p in (tmp_path / "o").iterdir()} == {"train.json": 5, "val.json": 2, "test.json": 3}
    rec = load(tmp_path / "o/test.json")[0]
    assert rec["id"].startswith("slake_") and rec["image"] == "xmlab1/source.jpg" and rec["question_type"] == "Organ"
    assert rec["modality"] == "X-Ray" and rec["q_lang"] == "en"
    c = convert_vqa("slake", str(src), str(tmp_path / "all"), lang="all")
    assert (c.splits["train"]["total"], c.splits["val"]["total"], c.splits["test"]["total"]) == (8, 4, 4)
    with pytest.raises(FileNotFoundError, match="no SLAKE test.json"):
        (src / "test.json").unlink(); convert_vqa("slake", str(src), str(tmp_path / "x"))


# ---------- PathVQA: qas/{split}/{split}_qa.pkl, loaded without running code ----------
def write_pathvqa(root, counts, protocol=4):
    for split, n in counts.items():
        d = root / "qas" / split; d.mkdir(parents=True)
        rows = [{"image": f"{split}_{i:04d}", "question": f"What is shown {i}?", "answer": "yes" if i % 3 == 0 else "granuloma"}
                for i in range(n)]
        (d / f"{split}_qa.pkl").write_bytes(pickle.dumps(rows, protocol=protocol))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_pathvqa_round_trip(tmp_path, protocol):
    write_pathvqa(tmp_path / "pvqa", {"train": 7, "val": 4, "test": 6}, protocol)
    c = convert_vqa("pathvqa", str(tmp_path / "pvqa"), str(tmp_path / "o"))
    assert {k: v["total"] for k, v in c.splits.items()} == {"train": 7, "val": 4, "test": 6}
    assert c.splits["test"] == {"total": 6, "CLOSED": 2, "OPEN": 4}
    r = load(tmp_path / "o/test.json")[3]
    assert (r["id"], r["image"], r["answer_type"]) == ("pathvqa_test_3", "test/test_0003.jpg", "CLOSED")


class RunsShell:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {self.marker}",))


class CallsEval:
    def __reduce__(self): return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_restricted_unpickler_refuses_code(tmp_path, protocol):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([{"image": "x", "question": RunsShell(marker), "answer": "yes"}], protocol=protocol))
    assert pickle.loads(evil.read_bytes()) is not None and marker.exists()  # plain pickle would run it ...
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError, match=r"evil.pkl: refusing to load global '(posix|nt)\.system'"):
        safe_load_pickle(evil)
    assert not marker.exists()  # ... ours never calls it
    evil.write_bytes(pickle.dumps(CallsEval(), protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match=r"'(__builtin__|builtins)\.eval'"): safe_load_pickle(evil)
    from collections import OrderedDict
    evil.write_bytes(pickle.dumps(OrderedDict(a=1), protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="collections.OrderedDict"): safe_load_pickle(evil)


def test_pathvqa_with_a_malicious_split_fails_clearly(tmp_path):
    write_pathvqa(tmp_path / "p", {"train": 2, "val": 1, "test": 1})
    marker = tmp_path / "pwned"
    (tmp_path / "p/qas/val/val_qa.pkl").write_bytes(pickle.dumps([RunsShell(marker)]))
    with pytest.raises(pickle.UnpicklingError, match="val_qa.pkl: refusing"):
        convert_vqa("pathvqa", str(tmp_path / "p"), str(tmp_path / "o"))
    assert not marker.exists()


# ---------- leakage ----------
def picture(seed, size=192):
    "A smooth random RGB picture (sums of Gaussian blobs), different for each seed."
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    img = sum(rng.uniform(-1, 1) * np.exp(-((x - rng.uniform()) ** 2 + (y - rng.uniform()) ** 2) / rng.uniform(.005, .05))
              for _ in range(12))
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(np.stack([img, img[::-1] * .7, img.T * .5], -1).astype(np.uint8))


def records(*images): return [{"id": f"r{i}", "image": im, "conversations": [
    {"from": "human", "value": "Q?\n<image>"}, {"from": "gpt", "value": "A"}], "answer_type": "OPEN"} for i, im in enumerate(images)]


def test_leakage_exact_near_and_clean(tmp_path, llavamed_cmd):
    im = tmp_path / "img"; im.mkdir()
    for s in range(6): picture(s).save(im / f"train{s}.png")
    shutil.copy(im / "train2.png", im / "test_copy.png")
    picture(4).resize((96, 96)).save(im / "test_small.jpg", quality=75)
    picture(100).save(im / "test_other.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(im / "flat_train.png"); Image.new("RGB", (80, 80), (255, 255, 255)).save(im / "flat_test.png")
    (tmp_path / "train.json").write_text(json.dumps(records(*[f"train{s}.png" for s in range(6)], "flat_train.png")))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(
        "test_copy.png", "test_small.jpg", "test_other.png", "test_other.png", "flat_test.png", "gone.png")))
    rep = check_leakage(str(tmp_path / "train.json"), str(tmp_path / "test.jsonl"), images=str(im), quiet=True)
    assert [(e["test_image"], e["train_images"]) for e in rep.exact] == [("test_copy.png", ["train2.png"])]
    assert [(n["test_image"], n["train_image"]) for n in rep.near] == [("test_small.jpg", "train4.png")]
    assert rep.test_records_affected == 2 and rep.flat_images == 2
    assert list(rep.unreadable["test"]) == ["gone.png"] and "FileNotFoundError" in rep.unreadable["test"]["gone.png"]
    # the resized copy is caught only while the threshold allows its few flipped bits; a different picture never
    d = rep.near[0]
    assert max(d["dhash_bits"], d["phash_bits"]) <= 6
    strict = check_leakage(str(tmp_path / "train.json"), str(tmp_path / "test.jsonl"), images=str(im), threshold=20, quiet=True)
    assert "test_other.png" not in {n["test_image"] for n in strict.near}
    # the command writes the same report
    import subprocess
    r = subprocess.run([llavamed_cmd, "leakage", "--train", str(tmp_path / "train.json"), "--test", str(tmp_path / "test.jsonl"),
                        "--images", str(im), "--out", str(tmp_path / "rep.json"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 exact copies, 1 near-duplicates" in r.stdout
    assert load(tmp_path / "rep.json")["near"] == json.loads(json.dumps(rep.near))


def test_pathvqa_parquet_release(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    import io
    d = tmp_path / "path-vqa/data"; d.mkdir(parents=True)
    png = io.BytesIO(); picture(1, 32).save(png, "PNG")
    jpg = io.BytesIO(); picture(2, 32).save(jpg, "JPEG")
    for name, n in (("train-00000-of-00002", 3), ("train-00001-of-00002", 2), ("validation-00000-of-00001", 1),
                    ("test-00000-of-00001", 2)):
        rows = [{"image": {"bytes": (png if i % 2 else jpg).getvalue(), "path": None}, "question": f"Q{i}?",
                 "answer": "no" if i % 2 else "fibrin"} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows), d / f"{name}.parquet")
    c = convert_vqa("pathvqa", str(tmp_path / "path-vqa"), str(tmp_path / "o"))
    assert {k: v["total"] for k, v in c.splits.items()} == {"train": 5, "val": 1, "test": 2}
    recs = load(tmp_path / "o/train.json")
    assert [r["image"] for r in recs[3:]] == ["train/pathvqa_train_3.jpg", "train/pathvqa_train_4.png"]
    assert (tmp_path / "o/images/train/pathvqa_train_4.png").read_bytes() == png.getvalue()
    assert recs[4]["answer_type"] == "CLOSED" and recs[3]["answer_type"] == "OPEN"
