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
    names = [r["image"] for r in recs]  # one file per distinct image, named by its content
    assert names[3] == names[0] and names[4] == names[1] and names[3] != names[4] and names[3].endswith(".jpg") and names[4].endswith(".png")
    assert [r["id"] for r in recs[3:]] == ["pathvqa_train_3", "pathvqa_train_4"]
    assert (tmp_path / "o/images" / names[4]).read_bytes() == png.getvalue()
    assert sorted(p.name for p in (tmp_path / "o/images/train").iterdir()) == sorted({n.split("/")[1] for n in names})
    assert recs[4]["answer_type"] == "CLOSED" and recs[3]["answer_type"] == "OPEN"


# ---------- hub layouts: parquet as `datasets` writes it, hub cache snapshots, ZIP archives, CSV, open-access JSON ----------
import hashlib, io, zipfile
from llavamed.core import TooManyBadRecords, load_questions
from llavamed.vqa import ZipImages, hub_snapshot

HF_META = {b"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"}, "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"}}}}).encode()}


def image_bytes(seed, fmt="JPEG"):
    buf = io.BytesIO(); picture(seed, 32).save(buf, fmt); return buf.getvalue()


def write_hub_parquet(path, rows, image_type=None, row_group_size=100):
    "A parquet file in the layout `datasets` writes: image struct {bytes, path}, question, answer, its metadata."
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    image_type = image_type or pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", image_type), ("question", pa.string()), ("answer", pa.string())], metadata=HF_META)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def hub_cache(root, repo, files, rev="0123456789abcdef0123456789abcdef01234567"):
    "A hub cache folder `datasets--ORG--NAME` with blobs, refs/main and a snapshot of symlinks, as huggingface_hub keeps it."
    repo_dir = root / ("datasets--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True); (repo_dir / "refs").mkdir()
    (repo_dir / "refs/main").write_text(rev)
    for rel, src in files.items():
        data = Path(src).read_bytes(); blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / rev / rel; link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "snapshots" / ("f" * 40)).mkdir()  # an older, empty snapshot: refs/main decides
    return repo_dir


def rad_hub_rows(n, seed=0):
    rows = []
    for i in range(n):
        closed = i % 3 != 0
        rows.append({"image": {"bytes": image_bytes(seed + i % 4), "path": None},
                     "question": f"is there a mass {i}?" if closed else f"where is the lesion {i}?",
                     "answer": ("yes" if i % 2 else "no") if closed else "left lung"})
    return rows


def test_vqa_rad_from_the_hub_cache(tmp_path):
    build = tmp_path / "build"
    train = write_hub_parquet(build / "train.parquet", rad_hub_rows(9))
    test = write_hub_parquet(build / "test.parquet", rad_hub_rows(6, seed=10))
    cache = tmp_path / "hub"
    hub_cache(cache, "flaviagiammarino/vqa-rad", {"data/train-00000-of-00001-d4d6b2e3.parquet": train,
                                                   "data/test-00000-of-00001-799c4ea4.parquet": test,
                                                   "README.md": build / "train.parquet"})
    snap = hub_snapshot(cache, "vqa-rad")
    assert snap.parent.name == "snapshots" and snap.name.startswith("0123")
    assert hub_snapshot(snap) == snap and hub_snapshot(cache / "datasets--flaviagiammarino--vqa-rad") == snap
    c = convert_vqa("vqa-rad", str(cache), str(tmp_path / "o"))  # the cache root: the repository is found by name
    assert c.splits == {"train": {"total": 9, "OPEN": 3, "CLOSED": 6}, "test": {"total": 6, "OPEN": 2, "CLOSED": 4}}
    assert c.layout == "hub parquet (image bytes)" and c.images == str(tmp_path / "o/images") and c.skipped == {}
    recs = load(tmp_path / "o/test.json")
    assert [r["id"] for r in recs[:2]] == ["vqa-rad_test_0", "vqa-rad_test_1"]
    assert recs[1]["answer_type"] == "CLOSED" and recs[0]["answer_type"] == "OPEN"
    assert Sample.from_json(recs[1]).answer == "yes" and recs[1]["conversations"][0]["value"].endswith("\n<image>")
    # the same picture under many questions is one file, named by its bytes
    assert recs[0]["image"] == recs[4]["image"] and len(list((tmp_path / "o/images/test").iterdir())) == 4
    assert (tmp_path / "o/images" / recs[1]["image"]).read_bytes() == image_bytes(11)
    assert not (tmp_path / "o/.incoming").exists()
    # one file of the download: only its split, through the command
    one = snap / "data/test-00000-of-00001-799c4ea4.parquet"
    assert main(["vqa-convert", "--dataset", "vqa-rad", "--src", str(one), "--out", str(tmp_path / "t")]) == 0
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["images", "test.json"]
    with pytest.raises(ValueError, match="no 'freeform' variant"):
        convert_vqa("vqa-rad", str(snap), str(tmp_path / "f"), variant="freeform")
    with pytest.raises(FileNotFoundError, match="a hub cache without datasets--flaviagiammarino--path-vqa "
                                                "\\(it holds datasets--flaviagiammarino--vqa-rad\\)"):
        convert_vqa("pathvqa", str(cache), str(tmp_path / "p"))  # never another dataset's files


def test_hub_snapshot_needs_a_choice_between_snapshots(tmp_path):
    repo = hub_cache(tmp_path, "BoKelvin/SLAKE", {"test.json": write_json_file(tmp_path / "t.json", [])})
    (repo / "refs/main").write_text("../../../etc")  # not a revision: not followed
    (repo / "snapshots" / ("f" * 40) / "x").write_text("")
    with pytest.raises(FileNotFoundError, match="2 snapshots and no usable refs/main"): hub_snapshot(repo)


def write_json_file(path, obj): path.write_text(json.dumps(obj, ensure_ascii=False)); return path


def test_parquet_bad_inputs(tmp_path):
    pa = pytest.importorskip("pyarrow")
    d = tmp_path / "rad/data"
    good = rad_hub_rows(60)
    write_hub_parquet(d / "train-00000-of-00001.parquet", good)
    write_hub_parquet(d / "test-00000-of-00001.parquet", good[:10])
    assert convert_vqa("vqa-rad", str(tmp_path / "rad"), str(tmp_path / "o")).splits["test"]["total"] == 10
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.json")}
    def refused(match):
        with pytest.raises(ValueError, match=match): convert_vqa("vqa-rad", str(tmp_path / "rad"), str(tmp_path / "o"))
        assert {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.json")} == before  # earlier output kept
    # a file without the expected columns
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"img": ["a.jpg"], "question": ["q?"], "answer": ["yes"]}), d / "test-00000-of-00001.parquet")
    refused(r"test-00000-of-00001.parquet: no 'image' column \(it has img, question, answer\)")
    # an image column of paths instead of bytes
    write_hub_parquet(d / "test-00000-of-00001.parquet", [{**r, "image": f"synpic{i}.jpg"} for i, r in enumerate(good[:10])],
                      image_type=pa.string())
    refused(r"column 'image' holds string, not the \{bytes, path\} struct .*paths instead of the images")
    # the struct with a path and no bytes: one such row is a counted skip naming it ...
    rows = [dict(r) for r in good]; rows[7] = {**rows[7], "image": {"bytes": None, "path": "synpic7.jpg"}}
    write_hub_parquet(d / "train-00000-of-00001.parquet", rows)
    write_hub_parquet(d / "test-00000-of-00001.parquet", good[:10])
    c = convert_vqa("vqa-rad", str(tmp_path / "rad"), str(tmp_path / "o2"), max_bad=0.05)
    assert c.skipped == {"image holds a path, not the image bytes": 1} and c.splits["train"]["total"] == 59
    assert c.first_skipped["image holds a path, not the image bytes"] == "record vqa-rad_train_7 (train-00000-of-00001.parquet:row 8)"
    assert "(first: record vqa-rad_train_7 (train-00000-of-00001.parquet:row 8))" in str(c)
    # ... a file of them all is refused, naming the first row
    write_hub_parquet(d / "train-00000-of-00001.parquet", [{**r, "image": {"bytes": None, "path": "x.jpg"}} for r in good])
    with pytest.raises(TooManyBadRecords, match=r"image holds a path, not the image bytes at record vqa-rad_train_0 \(train-00000-of-00001.parquet:row 1\)"):
        convert_vqa("vqa-rad", str(tmp_path / "rad"), str(tmp_path / "o"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.json")} == before


def make_zip(path, members):
    "A ZIP archive from {name: bytes}; a name ending in '@link' becomes a symbolic link to the bytes as target."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            if name.endswith("@link"):
                info = zipfile.ZipInfo(name[:-5]); info.external_attr = (0o120777 << 16)
                z.writestr(info, data)
            else: z.writestr(name, data)
    return path


def test_zip_images_reads_safely(tmp_path):
    z = make_zip(tmp_path / "imgs.zip", {"imgs/xmlab0/source.jpg": image_bytes(0), "imgs/../../escape.jpg": b"x",
                                         "/abs.jpg": b"x", "imgs/xmlab1/source.jpg@link": b"/etc/passwd",
                                         "imgs/bomb.jpg": b"\0" * (3 << 20), "imgs/big.jpg": os.urandom(2 << 20)})
    archive = ZipImages(z, max_member_mb=1.5)
    assert archive.prefix == "" and sorted(archive.members) == ["imgs/xmlab0/source.jpg"]
    assert archive.refused == {"imgs/../../escape.jpg": "its name leaves the archive's folder",
                               "/abs.jpg": "its name leaves the archive's folder",
                               "imgs/xmlab1/source.jpg": "it is a symbolic link",
                               "imgs/bomb.jpg": "3,145,728 bytes, over the 1,572,864-byte limit",
                               "imgs/big.jpg": "2,097,152 bytes, over the 1,572,864-byte limit"}
    assert archive.read("imgs/xmlab0/source.jpg") == image_bytes(0)
    with pytest.raises(ValueError, match="member 'imgs/xmlab1/source.jpg' refused: it is a symbolic link"):
        archive.read("imgs/xmlab1/source.jpg")
    with pytest.raises(KeyError): archive.read("xmlab9/source.jpg")
    assert "unpacks to" in ZipImages(z).refused["imgs/bomb.jpg"]  # within the size limit, but a bomb's ratio
    one_top = ZipImages(make_zip(tmp_path / "b.zip", {"figures/a.jpg": b"1", "figures/b.jpg": b"2"}))
    assert one_top.prefix == "figures/" and one_top.read("b.jpg") == b"2"
    (tmp_path / "bad.zip").write_bytes(b"PK\3\4 not really")
    with pytest.raises(ValueError, match="bad.zip: not a readable ZIP archive"): ZipImages(tmp_path / "bad.zip")


def test_slake_hub_layout_with_imgs_zip(tmp_path):
    src = tmp_path / "SLAKE"; src.mkdir()
    rows = {"train.json": [slake(1, "en", "OPEN", "xmlab0/source.jpg"), slake(2, "zh", "CLOSED", "xmlab0/source.jpg"),
                           slake(3, "en", "CLOSED", "xmlab9/source.jpg")],  # xmlab9 is not in the archive
            "validation.json": [slake(4, "en", "CLOSED", "xmlab1/source.jpg")],
            "test.json": [slake(5, "en", "OPEN", "xmlab2/source.jpg"), slake(6, "en", "CLOSED", "xmlab3/source.jpg")]}
    for name, r in rows.items(): write_json_file(src / name, r)
    make_zip(src / "imgs.zip", {**{f"imgs/xmlab{i}/source.jpg": image_bytes(i) for i in range(3)},
                                "imgs/xmlab3/source.jpg@link": b"../../../../etc/passwd"})
    with pytest.raises(TooManyBadRecords, match=r"image member refused or damaged at record slake_6 \(test.json record 1\)"):
        convert_vqa("slake", str(src), str(tmp_path / "o"))  # a link in the archive is a broken record, past 2%
    assert not (tmp_path / "o").exists()
    c = convert_vqa("slake", str(src), str(tmp_path / "o"), max_bad=0.5)
    assert {k: v["total"] for k, v in c.splits.items()} == {"train": 1, "val": 1, "test": 1}
    assert c.skipped == {"image not in imgs.zip": 1, "image member refused or damaged": 1}
    assert c.first_skipped["image not in imgs.zip"] == "record slake_3 (train.json record 2)"
    assert c.layout == "JSON + imgs.zip" and c.images == str(tmp_path / "o/images")
    assert (tmp_path / "o/images/xmlab2/source.jpg").read_bytes() == image_bytes(2)
    assert sorted(str(p.relative_to(tmp_path / "o")) for p in (tmp_path / "o").rglob("*") if p.is_file()) == [
        "images/xmlab0/source.jpg", "images/xmlab1/source.jpg", "images/xmlab2/source.jpg",
        "test.json", "train.json", "val.json"]
    zh = convert_vqa("slake", str(src), str(tmp_path / "zh"), lang="zh")
    assert zh.splits == {"train": {"total": 1, "CLOSED": 1}}


PMC2_HEADER = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D", "Answer", "split"]
PMC1_HEADER = ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D", "Answer_label"]


def write_csv(path, header, rows):
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f); w.writerow(header); w.writerows(rows)
    return path


def pmc2_row(i, answer="B", choices=("CT", "MRI", "PET", "X-ray")):
    return [i, f"PMC{1000 + i}_F1.jpg", f"Figure {i}: a caption.", f"Which modality is shown {i}?",
            *[f"{l}:{c}" if c else "" for l, c in zip("ABCD", choices)], answer, "test"]


def test_pmc_vqa_v2_with_images_zip_and_v1_with_folder(tmp_path):
    src = tmp_path / "PMC-VQA"; src.mkdir()
    write_csv(src / "train_2.csv", PMC2_HEADER, [pmc2_row(i, "ABCD"[i % 4]) for i in range(4)])
    write_csv(src / "test_2.csv", PMC2_HEADER, [pmc2_row(10), [11, "PMC1011_F1.jpg", "", " What is it? ", " A:Focal uptake ",
                                                              " B: Diffuse uptake", "C:None", "D:Both", "A", "test"]])
    make_zip(src / "images_2.zip", {f"figures/PMC{1000 + i}_F1.jpg": image_bytes(i) for i in (0, 1, 2, 3, 10, 11)})
    c = convert_vqa("pmc-vqa", str(src), str(tmp_path / "o"))
    assert c.splits == {"train": {"total": 4, "CHOICE": 4}, "test": {"total": 2, "CHOICE": 2}}
    assert "pmc-vqa (2) test: 2 questions (0 open, 0 closed, 2 choice)" in str(c) and c.layout == "CSV v2 + images_2.zip"
    rec = load(tmp_path / "o/test.json")[1]
    assert (rec["id"], rec["image"], rec["answer_type"], rec["answer_label"]) == ("pmc-vqa_test_11", "PMC1011_F1.jpg", "CHOICE", "A")
    assert rec["options"] == ["Focal uptake", "Diffuse uptake", "None", "Both"]
    assert rec["conversations"][1]["value"] == "Focal uptake" and rec["conversations"][0]["value"] == "What is it?\n<image>"
    assert (tmp_path / "o/images/PMC1011_F1.jpg").read_bytes() == image_bytes(11)
    q = load_questions(tmp_path / "o/test.json")[1]  # what the scorer and predictor read
    assert (q.kind, q.options, q.answer, q.extra["answer_label"]) == ("choice", rec["options"], "Focal uptake", "A")
    # v1: Answer text and Answer_label, the images in a folder (left where they are)
    v1 = tmp_path / "v1"; (v1 / "images").mkdir(parents=True)
    rows = [[f"PMC{i}_F1.jpg", f"Q{i}?", " B:MRI ", "A:CT", "B:MRI", "C:PET", "D:US", "B"] for i in range(3)]
    write_csv(v1 / "train.csv", PMC1_HEADER, rows); write_csv(v1 / "test.csv", PMC1_HEADER, rows[:2])
    write_csv(v1 / "test_clean.csv", PMC1_HEADER, rows[:1])
    one = convert_vqa("pmc-vqa", str(v1), str(tmp_path / "o1"), release="1")
    assert one.splits["test"]["total"] == 2 and one.images == str(v1 / "images") and one.layout == "CSV v1 + images/"
    assert load(tmp_path / "o1/test.json")[0]["conversations"][1]["value"] == "MRI"
    clean = convert_vqa("pmc-vqa", str(v1), str(tmp_path / "o2"), release="1-clean")
    assert (clean.splits["train"]["total"], clean.splits["test"]["total"]) == (3, 1)
    only = convert_vqa("pmc-vqa", str(v1 / "test_clean.csv"), str(tmp_path / "o3"))
    assert list(only.splits) == ["test"] and only.splits["test"]["total"] == 1


def test_pmc_vqa_bad_inputs(tmp_path, capsys):
    src = tmp_path / "pmc"; src.mkdir()
    header = [h if h != "Figure_path" else "Figure_Path" for h in PMC2_HEADER]
    write_csv(src / "test_2.csv", header, [pmc2_row(1)])
    assert main(["vqa-convert", "--dataset", "pmc-vqa", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "test_2.csv: no column 'Figure_path' (is 'Figure_Path' it, misspelt?)" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    rows = [pmc2_row(i) for i in range(60)]
    rows[3] = pmc2_row(3, "B", ("CT", "", "", ""))  # one option
    rows[5] = pmc2_row(5, "E")  # a letter past D
    rows[6] = pmc2_row(6, "B", ("CT", "", "PET", "US"))  # a hole in the options
    write_csv(src / "test_2.csv", PMC2_HEADER, rows)
    c = convert_vqa("pmc-vqa", str(src), str(tmp_path / "o"), max_bad=0.1)
    assert c.splits["test"]["total"] == 57
    assert c.skipped == {"fewer than two options": 1, "answer letter outside the options": 1, "an empty option": 1}
    assert c.first_skipped == {"fewer than two options": "record pmc-vqa_test_3 (test_2.csv:line 5)",
                               "answer letter outside the options": "record pmc-vqa_test_5 (test_2.csv:line 7)",
                               "an empty option": "record pmc-vqa_test_6 (test_2.csv:line 8)"}
    assert c.images is None and "images: not found" in str(c)
    with open(src / "test_2.csv", "a", newline="") as f: f.write('61,PMC9_F1.jpg,"an extra cell",Q?,A:x,B:y,C:z,D:w,A,test,9\n')
    c = convert_vqa("pmc-vqa", str(src), str(tmp_path / "o"), max_bad=0.1)
    assert c.first_skipped["a row with more or fewer cells than the header"] == "test_2.csv:line 62"


def test_omnimedvqa_open_access_json(tmp_path):
    root = tmp_path / "OmniMedVQA"; qa = root / "QA_information/Open-access"; qa.mkdir(parents=True)
    (root / "QA_information/Restricted-access").mkdir()
    def q(i, ds, opts, gt, **kw):
        r = {"dataset": ds, "question_id": f"{ds}_{i:04d}", "question_type": "Modality Recognition",
             "question": f"What modality is this {i}?", "gt_answer": gt, "image_path": f"Images/{ds}/{i}.png",
             "modality_type": "CT", **{f"option_{l}": o for l, o in zip("ABCD", opts)}}
        return {**r, **kw}
    write_json_file(qa / "ACRIMA.json", [q(0, "ACRIMA", ["CT", "MRI"], "MRI"), q(1, "ACRIMA", ["CT", "MRI", "PET", "US"], "US")])
    write_json_file(qa / "Chest CT Scan.json", [q(2, "Chest CT Scan", ["CT", "MRI", "PET"], "X-ray"),  # not an option
                                                 q(3, "Chest CT Scan", ["CT"], "CT"),  # one option
                                                 {**q(4, "Chest CT Scan", ["CT", "MR"], "CT"), "modality": "CT"}])
    c = convert_vqa("omnimedvqa", str(root), str(tmp_path / "o"), max_bad=0.5)
    assert c.splits == {"test": {"total": 3, "CHOICE": 3}} and c.images == str(root)
    assert c.skipped == {"answer is none of the options": 1, "fewer than two options": 1}
    assert c.first_skipped["answer is none of the options"] == "record omnimedvqa_Chest CT Scan_0002 (Chest CT Scan.json record 0)"
    recs = load(tmp_path / "o/test.json")
    assert [(r["answer_label"], r["options"][-1], r["conversations"][1]["value"]) for r in recs[:2]] == [("B", "MRI", "MRI"), ("D", "US", "US")]
    assert recs[0]["image"] == "Images/ACRIMA/0.png" and recs[0]["modality"] == "CT" and recs[0]["question_type"] == "Modality Recognition"


def test_leakage_across_formats(tmp_path):
    "Training images held in a hub parquet file against a converted multiple-choice test split with an images folder."
    def png(im): buf = io.BytesIO(); im.save(buf, "PNG"); return buf.getvalue()
    rows = [{"image": {"bytes": png(picture(s)), "path": None}, "question": "q?", "answer": "yes"} for s in (0, 1, 1, 2)]
    train = write_hub_parquet(tmp_path / "train-00000-of-00001.parquet", rows)
    src = tmp_path / "pmc"; (src / "figures").mkdir(parents=True)
    (src / "figures/PMC1010_F1.jpg").write_bytes(png(picture(1)))  # the same bytes as two training rows
    picture(2).resize((96, 96)).save(src / "figures/PMC1011_F1.jpg", quality=80)  # a smaller copy
    picture(50).save(src / "figures/PMC1012_F1.jpg")
    write_csv(src / "test_2.csv", PMC2_HEADER, [pmc2_row(i) for i in (10, 11, 12)])
    c = convert_vqa("pmc-vqa", str(src), str(tmp_path / "o"))
    rep = check_leakage(str(train), str(tmp_path / "o/test.json"), test_images=c.images, quiet=True)
    assert (rep.train_images, rep.test_images, rep.test_records) == (3, 3, 3)
    assert [(e["test_image"], e["train_images"]) for e in rep.exact] == [("PMC1010_F1.jpg", ["train-00000-of-00001.parquet:row 2"])]
    assert [(n["test_image"], n["train_image"]) for n in rep.near] == [("PMC1011_F1.jpg", "train-00000-of-00001.parquet:row 4")]
    assert rep.test_records_affected == 2
    # the parquet file as the test side, and a row without bytes reported as broken
    rows.append({"image": {"bytes": None, "path": "x.png"}, "question": "q?", "answer": "no"})
    write_hub_parquet(tmp_path / "test-00000-of-00001.parquet", rows)
    with pytest.raises(TooManyBadRecords, match="image without bytes at line 5"):
        check_leakage(str(tmp_path / "o/test.json"), str(tmp_path / "test-00000-of-00001.parquet"), images=c.images, quiet=True)


# ---------- hostile inputs to the hub layouts (each found by trying them) ----------
def slake_folder(root, test_rows):
    "A SLAKE hub folder with good train and validation splits, `test_rows` as test.json, and imgs.zip."
    root.mkdir()
    write_json_file(root / "train.json", [slake(i, "en", "CLOSED", "xmlab0/source.jpg") for i in range(20)])
    write_json_file(root / "validation.json", [slake(100 + i, "en", "CLOSED", "xmlab0/source.jpg") for i in range(20)])
    write_json_file(root / "test.json", test_rows)
    make_zip(root / "imgs.zip", {"imgs/xmlab0/source.jpg": image_bytes(0)})
    return root


def test_questions_answers_options_and_ids_of_the_wrong_type_are_broken_records(tmp_path, capsys):
    rows = [slake(200 + i, "en", "CLOSED", "xmlab0/source.jpg") for i in range(20)]
    rows[1]["question"], rows[2]["answer"], rows[3]["qid"] = {"text": "is it?"}, ["yes", "no"], {"a": 1}
    src = slake_folder(tmp_path / "SLAKE", rows)
    code = main(["vqa-convert", "--dataset", "slake", "--src", str(src), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not (tmp_path / "o").exists()
    assert "3 of 60 records are bad" in err[0]
    assert "question, answer or option is not text at record slake_201 (test.json record 1) (2)" in err[0]
    assert "id is neither a number nor text at test.json record 3 (1)" in err[0]
    c = convert_vqa("slake", str(src), str(tmp_path / "o"), max_bad=0.1)
    assert c.splits["test"]["total"] == 17
    assert all(r["id"].removeprefix("slake_").isdigit() for r in load(tmp_path / "o/test.json"))
    options = {"question_id": "q1", "image_path": "a.png", "question": "Which?", "option_A": {"x": 1}, "option_B": "b",
               "gt_answer": "b"}
    write_json_file(tmp_path / "omni.json", [options])
    with pytest.raises(TooManyBadRecords, match=r"option is not text at record omnimedvqa_q1"):
        convert_vqa("omnimedvqa", str(tmp_path / "omni.json"), str(tmp_path / "o3"))


def test_a_split_file_of_no_slake_questions_is_refused_not_left_out(tmp_path):
    src = slake_folder(tmp_path / "SLAKE", [slake(200 + i, "en", "CLOSED", "xmlab0/source.jpg") for i in range(20)])
    first = convert_vqa("slake", str(src), str(tmp_path / "o"))
    assert set(first.splits) == {"train", "val", "test"}
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.json")}
    write_json_file(src / "test.json", {"not": "a list"})  # one document, no SLAKE key: not a question
    with pytest.raises(TooManyBadRecords, match=r"not a SLAKE question \(no q_lang\) at test.json record 0"):
        convert_vqa("slake", str(src), str(tmp_path / "o"))
    write_json_file(src / "test.json", [slake(300, "en", "CLOSED", "xmlab7/source.jpg")])  # its image is not there
    with pytest.raises(ValueError, match=r"test.json: no question of the test split could be converted "
                                         r"\(image not in imgs.zip 1\)"):
        convert_vqa("slake", str(src), str(tmp_path / "o"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "o").glob("*.json")} == before  # the earlier set intact


def test_image_bytes_that_are_no_image_and_an_out_that_is_a_file(tmp_path, capsys):
    d = tmp_path / "rad"
    rows = rad_hub_rows(10)
    rows[4] = {**rows[4], "image": {"bytes": b"GIF89a" + bytes(10), "path": None}}  # the magic, then nothing
    write_hub_parquet(d / "test-00000-of-00001.parquet", rows)
    with pytest.raises(TooManyBadRecords, match=r"image bytes not a readable image at record vqa-rad_test_4 "
                                                r"\(test-00000-of-00001.parquet:row 5\)"):
        convert_vqa("vqa-rad", str(d), str(tmp_path / "o"))
    c = convert_vqa("vqa-rad", str(d), str(tmp_path / "o"), max_bad=0.2)
    assert c.splits["test"]["total"] == 9 and c.skipped == {"image bytes not a readable image": 1}
    (tmp_path / "file.json").write_text("{}")
    code = main(["vqa-convert", "--dataset", "vqa-rad", "--src", str(d), "--out", str(tmp_path / "file.json")])
    assert code == 2 and capsys.readouterr().err.strip().endswith("file.json is a file: give the folder for the splits")
    assert (tmp_path / "file.json").read_text() == "{}"
