"""Hostile input for the data commands (validate, align, vqa-convert, leakage): exit codes, one-line errors naming
the input, no traceback, no file contents echoed, and earlier good output left byte-identical."""
import json, pickle, struct, time, zlib
from pathlib import Path
import pytest
from PIL import Image
from llavamed.cli import main
from llavamed.images import ImageTooLargeError, load_image

SECRET = "root:x:0:0:hunter2-not-an-image"  # the bytes of a file outside the images folder: never shown


def run(capsys, *args):
    "(exit code, stdout, stderr) of `llavamed ARGS`; a traceback is always a failure."
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    assert SECRET not in out and SECRET not in err
    return rc, out, err


def one_error_line(err, cmd):
    "The message of the one `llavamed CMD: error: ...` line on stderr."
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"llavamed {cmd}: error: "), err
    return lines[0]


def png_claiming(w, h):
    "A valid-CRC PNG whose header claims w x h pixels but holds almost no data."
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def conv(q="What is shown?"):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "A chest X-ray."}]


@pytest.fixture
def images(tmp_path):
    "An images folder with one good figure and every kind of bad one; a secret file beside it."
    from pydicom.data import get_testdata_file
    root = tmp_path / "imgs"; root.mkdir()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(root / "good.png")
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    (root / "link.png").symlink_to(tmp_path / "secret.txt")
    (root / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (root / "zero.png").write_bytes(b"")
    (root / "fake.png").write_text(SECRET)
    (root / "plan.dcm").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes())
    return root


# ---------------------------------------------------------------- validate
VALIDATE_IMAGES = [  # image field, reason, words the message holds
    ("link.png", "image_outside_root", "is outside the images folder"),
    ("../secret.txt", "image_outside_root", "is outside the images folder"),
    ("ABSOLUTE", "image_outside_root", "is outside the images folder"),
    ("bomb.png", "image_too_large", "10,000,000,000 pixels exceeds the limit"),
    ("zero.png", "image_unreadable", "empty file"),
    ("fake.png", "image_unreadable", "(it holds text)"),
    ("plan.dcm", "image_unreadable", "no pixel data"),
    ("missing.png", "image_missing", "not found"),
]


@pytest.mark.parametrize("image,reason,words", VALIDATE_IMAGES, ids=[c[0] for c in VALIDATE_IMAGES])
def test_validate_bad_images(tmp_path, images, capsys, image, reason, words):
    image = str(tmp_path / "secret.txt") if image == "ABSOLUTE" else image
    recs = [{"id": "ok_1", "image": "good.png", "conversations": conv()},
            {"id": "bad_7", "image": image, "conversations": conv()}]
    (tmp_path / "d.json").write_text(json.dumps(recs, indent=1))
    rc, out, err = run(capsys, "validate", tmp_path / "d.json", "--images", images)
    assert rc == 1
    bad = [l for l in out.splitlines() if "(id bad_7" in l]
    assert len(bad) == 1 and bad[0].endswith(f"[{reason}]") and words in bad[0], out
    assert "ok_1" not in out


def test_validate_refuses_a_claimed_huge_png_from_its_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="10,000,000,000 pixels exceeds the limit of 33,554,432"):
        load_image(tmp_path / "bomb.png")
    assert time.perf_counter() - start < 1  # no 10-gigapixel buffer was ever allocated


def test_validate_pixel_limit_is_a_setting(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("1", (3000, 2000)).save(tmp_path / "imgs" / "wide.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "w1", "image": "wide.png", "conversations": conv()}) + "\n")
    assert run(capsys, "validate", tmp_path / "d.jsonl", "--images", tmp_path / "imgs")[0] == 0
    rc, out, _ = run(capsys, "validate", tmp_path / "d.jsonl", "--images", tmp_path / "imgs", "--max-pixels", 10**6)
    assert rc == 1 and "6,000,000 pixels exceeds the limit of 1,000,000" in out and "[image_too_large]" in out


VALIDATE_FILES = [  # name, bytes, exit code, words in stdout (1) or stderr (2)
    ("empty.jsonl", b"", 1, "the file holds no records [empty_file]"),
    ("blank.json", b"\n\n  \n", 1, "[empty_file]"),
    ("latin1.jsonl", json.dumps({"id": "a", "conversations": conv()}).encode() + b"\n{\"id\": \"caf\xe9\"}\n", 1,
     "record 1 (no id, line 2): not UTF-8 text"),
    ("truncated.json", b'[{"id": "a", "conversations": []},\n{"id": "b", "conv', 1,
     "line 2: cannot resume after the malformed record; the rest of the file was not read"),
    ("wrong_top.json", b'"just a string"', 1, "[not_object]"),
    ("missing_keys.jsonl", b'{"id": "a"}\n', 1, "no 'conversations' [missing_field]"),
]


@pytest.mark.parametrize("name,data,code,words", VALIDATE_FILES, ids=[c[0] for c in VALIDATE_FILES])
def test_validate_bad_files(tmp_path, capsys, name, data, code, words):
    (tmp_path / name).write_bytes(data)
    rc, out, err = run(capsys, "validate", tmp_path / name)
    assert rc == code and words in out, out


def test_validate_huge_record_is_reported_not_buffered(tmp_path, capsys):
    big = {"id": "big", "conversations": conv("x" * 3_000_000)}
    (tmp_path / "big.json").write_text(json.dumps([{"id": "a", "conversations": conv()}, big], indent=1))
    rc, out, _ = run(capsys, "validate", tmp_path / "big.json", "--max-record-chars", 100_000)
    assert rc == 1 and "record 1 (no id, line " in out and "2 records, 2 invalid" in out


def test_validate_missing_paths(tmp_path, capsys):
    rc, _, err = run(capsys, "validate", tmp_path / "nope.json")
    assert rc == 2 and "no such file" in one_error_line(err, "validate") and "nope.json" in err
    (tmp_path / "d.json").write_text("[]")
    rc, _, err = run(capsys, "validate", tmp_path / "d.json", "--images", tmp_path / "nowhere")
    assert rc == 2 and "no such images folder" in one_error_line(err, "validate")


# ---------------------------------------------------------------- align
def pairs(n, start=0):
    return [{"pair_id": f"{i}_F1", "fig_caption": f"Axial CT {i}."} for i in range(start, start + n)]


@pytest.fixture
def aligned(tmp_path, capsys):
    "A good alignment set already in --out, and its bytes."
    (tmp_path / "good.json").write_text(json.dumps(pairs(20)))
    out = tmp_path / "align.json"
    assert run(capsys, "align", "--captions", tmp_path / "good.json", "--out", out, "--quiet")[0] == 0
    return out, out.read_bytes()


ALIGN_BAD = [  # name, bytes of the captions file, words of the one-line error
    ("empty.json", b"", "no pair made an alignment record (the file holds none)"),
    ("no_captions.json", json.dumps([{"pair_id": "1_F1", "fig_caption": ""}] * 3).encode(),
     "no pair made an alignment record (empty_caption 3)"),
    ("one_bad_line.jsonl", b"".join(json.dumps(p).encode() + b"\n" for p in pairs(3)) + b"{torn\n",
     "1 of 4 records are bad (more than 2%); 1 bad: malformed_json at pair 3 (line 4)"),
    ("latin1.jsonl", json.dumps(pairs(1)[0]).encode() + b"\n{\"pair_id\": \"caf\xe9\"}\n",
     "malformed_json at pair 1 (line 2)"),
    ("wrong_top.json", b"42", "not_object at pair 0 (line 1)"),
    ("missing_keys.jsonl", b'{"caption": "no id"}\n', "missing_id at pair 0"),
    ("escape.json", json.dumps([{"pair_id": "9_F1", "fig_caption": "x", "image": "../../etc/passwd"}]).encode(),
     "image_outside_root at pair 0"),
]


@pytest.mark.parametrize("name,data,words", ALIGN_BAD, ids=[c[0] for c in ALIGN_BAD])
def test_align_bad_input_leaves_the_good_output(tmp_path, capsys, aligned, name, data, words):
    out, before = aligned
    (tmp_path / name).write_bytes(data)
    rc, _, err = run(capsys, "align", "--captions", tmp_path / name, "--out", out, "--quiet")
    line = one_error_line(err, "align")
    assert rc == 2 and words in line and name in line, line
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_align_few_bad_lines_are_skipped_and_counted(tmp_path, capsys):
    lines = [json.dumps(p).encode() for p in pairs(100)]
    lines.insert(50, b'{"pair_id": "caf\xe9"}')
    (tmp_path / "c.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rc, out, err = run(capsys, "align", "--captions", tmp_path / "c.jsonl", "--out", tmp_path / "a.json")
    assert rc == 0 and "wrote 100 alignment records" in out and "'malformed_json': 1" in out
    assert "pair 50 (line 51): skipped, not UTF-8 text" in err


def test_align_refuses_out_equal_to_captions_and_missing_input(tmp_path, capsys):
    src = tmp_path / "c.json"; src.write_text(json.dumps(pairs(3))); before = src.read_bytes()
    rc, _, err = run(capsys, "align", "--captions", src, "--out", src)
    assert rc == 2 and "is the captions file itself" in one_error_line(err, "align") and src.read_bytes() == before
    rc, _, err = run(capsys, "align", "--captions", tmp_path / "nope.json", "--out", tmp_path / "a.json")
    assert rc == 2 and "captions file not found" in one_error_line(err, "align")
    assert not (tmp_path / "a.json").exists()


# ---------------------------------------------------------------- vqa-convert
def slake(qid, lang="en", img="xmlab1/source.jpg", ans="Yes"):
    return {"img_id": 1, "img_name": img, "question": "Does the picture contain lung?", "answer": ans,
            "q_lang": lang, "location": "Chest", "modality": "X-Ray", "answer_type": "CLOSED",
            "base_type": "vqa", "content_type": "Organ", "qid": qid}


def write_slake(src, train, val, test):
    src.mkdir(exist_ok=True)
    for name, rows in (("train", train), ("validate", val), ("test", test)):
        (src / f"{name}.json").write_text(json.dumps(rows))


@pytest.fixture
def converted(tmp_path, capsys):
    "A SLAKE conversion already in --out (train, val, test), and the bytes of its files."
    src, out = tmp_path / "Slake1.0", tmp_path / "out"
    qs = lambda lo, hi: [slake(i) for i in range(lo, hi)]
    write_slake(src, qs(0, 10), qs(10, 14), qs(20, 25))
    assert run(capsys, "vqa-convert", "--dataset", "slake", "--src", src, "--out", out)[0] == 0
    return src, out, {p.name: p.read_bytes() for p in out.iterdir()}


def test_vqa_convert_writes_splits_as_one_set(tmp_path, capsys, converted):
    src, out, before = converted
    assert sorted(before) == ["test.json", "train.json", "val.json"]
    write_slake(src, [slake(i) for i in range(30, 40)], [slake(i, "zh") for i in range(10, 14)],
                [slake(i) for i in range(20, 25)])
    rc, text, _ = run(capsys, "vqa-convert", "--dataset", "slake", "--src", src, "--out", out)
    assert rc == 0 and "slake (en) val" not in text
    assert sorted(p.name for p in out.iterdir()) == ["test.json", "train.json"]  # no stale val.json beside them
    assert out.joinpath("train.json").read_bytes() != before["train.json"]


VQA_BAD = [  # what the train split holds, words of the one-line error
    ("escape_absolute", [slake(1, img="/etc/passwd")] + [slake(i) for i in range(2, 5)],
     "image path outside the images folder at record slake_1"),
    ("escape_dotdot", [slake(1, img="xmlab1/../../../secret.txt")] + [slake(i) for i in range(2, 5)],
     "image path outside the images folder at record slake_1"),
    ("not_objects", ["a question", 7] + [slake(i) for i in range(2, 5)], "not a question object at train.json:1"),
    ("empty", [], "no question could be converted"),
]


@pytest.mark.parametrize("case,train,words", VQA_BAD, ids=[c[0] for c in VQA_BAD])
def test_vqa_convert_bad_input_leaves_the_good_output(tmp_path, capsys, converted, case, train, words):
    src, out, before = converted
    write_slake(src, train, [] if case == "empty" else [slake(10)], [] if case == "empty" else [slake(20)])
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "slake", "--src", src, "--out", out)
    assert rc == 2 and words in one_error_line(err, "vqa-convert")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_vqa_convert_non_utf8_and_truncated_files(tmp_path, capsys, converted):
    src, out, before = converted
    good = json.dumps([slake(i) for i in range(3)])[1:-1]
    (src / "train.json").write_bytes(b'[' + good.encode() + b',\n {"qid": 99, "question": "caf\xe9"}\n]')
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "slake", "--src", src, "--out", out)
    assert rc == 2 and "malformed record at train.json:2" in one_error_line(err, "vqa-convert")
    (src / "train.json").write_text(json.dumps([slake(i) for i in range(3)])[:-40])
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "slake", "--src", src, "--out", out)
    assert rc == 2 and "train.json" in one_error_line(err, "vqa-convert")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_vqa_convert_refuses_to_overwrite_its_source(tmp_path, capsys, converted):
    src, _, _ = converted
    inputs = {p.name: p.read_bytes() for p in src.iterdir()}
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "slake", "--src", src, "--out", src)
    assert rc == 2 and "would overwrite the dataset's file" in one_error_line(err, "vqa-convert")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == inputs


def test_vqa_convert_damaged_pickle_is_one_line(tmp_path, capsys):
    d = tmp_path / "pvqa" / "qas"
    for split in ("train", "val", "test"):
        (d / split).mkdir(parents=True)
        rows = [{"image": f"{split}_{i}", "question": "Is it?", "answer": "yes"} for i in range(3)]
        (d / split / f"{split}_qa.pkl").write_bytes(pickle.dumps(rows))
    (d / "val" / "val_qa.pkl").write_bytes(pickle.dumps(rows)[:20])
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "pathvqa", "--src", tmp_path / "pvqa", "--out", tmp_path / "o")
    line = one_error_line(err, "vqa-convert")
    assert rc == 2 and "val_qa.pkl: pickle data was truncated" in line
    assert not (tmp_path / "o").exists()
    rows[1]["image"] = "../../../etc/passwd"
    (d / "val" / "val_qa.pkl").write_bytes(pickle.dumps(rows))
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "pathvqa", "--src", tmp_path / "pvqa", "--out", tmp_path / "o")
    line = one_error_line(err, "vqa-convert")
    assert rc == 2 and "image path outside the images folder at record pathvqa_val_1" in line


# ---------------------------------------------------------------- leakage
def leak_records(*images):
    return [{"id": f"r{i}", "image": im, "conversations": conv()} for i, im in enumerate(images)]


@pytest.mark.parametrize("image", ["link.png", "../secret.txt", "ABSOLUTE"])
def test_leakage_refuses_escaping_paths(tmp_path, images, capsys, image):
    image = str(tmp_path / "secret.txt") if image == "ABSOLUTE" else image
    (tmp_path / "train.json").write_text(json.dumps(leak_records("good.png")))
    (tmp_path / "test.json").write_text(json.dumps(leak_records("good.png")))
    report = tmp_path / "leak.json"
    args = ("leakage", "--train", tmp_path / "train.json", "--test", tmp_path / "test.json", "--images", images,
            "--quiet", "--out", report)
    assert run(capsys, *args)[0] == 0
    before = report.read_bytes()
    (tmp_path / "test.json").write_text(json.dumps(leak_records("good.png", image)))
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "image path outside the images folder at record r1" in one_error_line(err, "leakage")
    assert report.read_bytes() == before


def test_leakage_empty_test_file_and_out_over_input(tmp_path, images, capsys):
    (tmp_path / "train.json").write_text(json.dumps(leak_records("good.png")))
    (tmp_path / "test.json").write_text("")
    rc, _, err = run(capsys, "leakage", "--train", tmp_path / "train.json", "--test", tmp_path / "test.json",
                     "--images", images, "--quiet")
    assert rc == 2 and "test.json: the file holds no records" in one_error_line(err, "leakage")
    (tmp_path / "test.json").write_text(json.dumps(leak_records("good.png")))
    before = (tmp_path / "test.json").read_bytes()
    rc, _, err = run(capsys, "leakage", "--train", tmp_path / "train.json", "--test", tmp_path / "test.json",
                     "--images", images, "--quiet", "--out", tmp_path / "test.json")
    assert rc == 2 and "one of the input files" in one_error_line(err, "leakage")
    assert (tmp_path / "test.json").read_bytes() == before


def test_leakage_bomb_and_fake_images_are_unreadable_not_fatal(tmp_path, images, capsys):
    (tmp_path / "train.json").write_text(json.dumps(leak_records("good.png", "bomb.png")))
    (tmp_path / "test.json").write_text(json.dumps(leak_records("fake.png", "zero.png")))
    rc, out, _ = run(capsys, "--json", "leakage", "--train", tmp_path / "train.json", "--test", tmp_path / "test.json",
                     "--images", images, "--quiet")
    rep = json.loads(out)
    assert rc == 0 and "exceeds the limit" in rep["unreadable"]["train"]["bomb.png"]
    assert "it holds text" in rep["unreadable"]["test"]["fake.png"]


def test_vqa_convert_parquet_images_arrive_only_with_their_splits(tmp_path, capsys):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    import io
    png = io.BytesIO(); Image.new("RGB", (8, 8)).save(png, "PNG")
    d = tmp_path / "path-vqa" / "data"; d.mkdir(parents=True)
    for name in ("train-00000-of-00001", "validation-00000-of-00001", "test-00000-of-00001"):
        rows = [{"image": {"bytes": png.getvalue(), "path": None}, "question": "", "answer": "no"}] * 2
        pq.write_table(pa.Table.from_pylist(rows), d / f"{name}.parquet")
    rc, _, err = run(capsys, "vqa-convert", "--dataset", "pathvqa", "--src", tmp_path / "path-vqa",
                     "--out", tmp_path / "o")
    err = "\n".join(l for l in err.splitlines() if " WARNING llavamed.vqa: " not in l)  # the first skips, logged
    assert rc == 2 and "no question could be converted (empty question 6" in one_error_line(err, "vqa-convert")
    assert not (tmp_path / "o").exists()  # no images written ahead of splits that never came
