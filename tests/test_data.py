"LLaVA records (streaming, validation, alignment builder) and the image loader, on real files."
import gzip, io, json, random, struct, subprocess, sys, tracemalloc, zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import llavamed.core as core
import llavamed.data as data
from llavamed.cli import main
from llavamed.core import RecordError, Sample
from llavamed.core import iter_records, iter_samples
from llavamed.data import (align_prompts, build_alignment, validate_file,
                           validate_records)
from llavamed.images import (CorruptImageError, ImageTooLargeError, UnsupportedImageError, image_format,
                             load_image)

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file
from nibabel.testing import data_path as NIB_DATA
import skimage.data

SKD = Path(skimage.data.__file__).parent


def rec(i, q="What is shown?\n<image>", a="A chest radiograph.", **kw):
    r = {"id": f"{i}_F1", "image": f"{i}_F1.jpg",
         "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    r.update(kw)
    return r


def write_array(path, rows, indent=None):
    path.write_text(json.dumps(rows, indent=indent))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- streaming

def test_array_and_jsonl_stream_the_same_records(tmp_path):
    rows = [rec(i, a="é ✓ " * i) for i in range(300)]
    for p in (write_array(tmp_path / "a.json", rows), write_array(tmp_path / "b.json", rows, indent=2),
              write_jsonl(tmp_path / "c.jsonl", rows)):
        got = list(iter_records(p))
        assert [v for _, v in got] == rows, p.name
        assert [s.id for s in iter_samples(p)] == [r["id"] for r in rows]


def test_jsonl_with_a_cut_first_line_loses_only_that_line(tmp_path):
    p = tmp_path / "cut.jsonl"
    p.write_text('{"id": "a", "conversations": [{"from": "hu\n' + json.dumps(rec(2)) + "\n" + json.dumps(rec(3)) + "\n")
    got = list(iter_records(p))
    assert [l for l, _ in got] == [1, 2, 3] and isinstance(got[0][1], RecordError) and got[2][1] == rec(3)
    q = tmp_path / "broken_doc.json"  # a damaged multi-line document is one error, not one per line
    q.write_text('{\n  "mri": [\n    {"pair_id": "1_F1",, }\n  ]\n}\n')
    got = list(iter_records(q))
    assert len(got) == 1 and isinstance(got[0][1], RecordError) and got[0][0] == 3


def test_tiny_chunks_give_identical_results(tmp_path, monkeypatch):
    rows = [{"id": str(i), "n": i * 123457, "f": i / 7, "s": "x\"y\\" * (i % 5), "z": None, "b": [True, {}]}
            for i in range(200)]
    p = write_array(tmp_path / "r.json", rows, indent=1)
    for chunk in (1, 2, 3, 7, 64):
        monkeypatch.setattr(core, "_CHUNK", chunk)
        assert [v for _, v in iter_records(p)] == rows, chunk


def test_array_line_numbers_and_resume_after_bad_element(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"id": "a"},\n  {"id": "b", "x": [1, 2,, 3]},\n  {"id": "c"},\n  {"id": "d" "e"},\n  {"id": "f"}\n]\n')
    got = list(iter_records(p))
    assert [(l, v if isinstance(v, dict) else "ERR") for l, v in got] == \
        [(2, {"id": "a"}), (3, "ERR"), (4, {"id": "c"}), (5, "ERR"), (6, {"id": "f"})]
    assert "bad.json:3: malformed JSON" in str(got[1][1])


def test_streaming_memory_is_bounded(tmp_path):
    "Iterating a ~12 MB array keeps far less in memory than loading it whole."
    rows = [rec(i, a="word " * 60) for i in range(30_000)]
    p = write_array(tmp_path / "big.json", rows)
    del rows
    tracemalloc.start()
    n = sum(1 for _ in iter_records(p))
    stream_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    whole = json.loads(p.read_text())
    load_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == len(whole) == 30_000
    assert stream_peak < 8 * 2**20 < p.stat().st_size < load_peak, (stream_peak, p.stat().st_size, load_peak)


def test_write_records_round_trip_and_atomic(tmp_path):
    from llavamed.data import write_records
    rows = [rec(i, domain={"mri": i % 2 == 0}) for i in range(20)]
    for name in ("o.json", "o.jsonl"):
        assert write_records(tmp_path / name, (Sample.from_json(r) for r in rows)) == 20
        assert [s.to_json() for s in iter_samples(tmp_path / name)] == rows
        assert len((tmp_path / name).read_text().splitlines()) == 20 + 2 * name.endswith(".json")
    def failing():
        yield rows[0]; raise RuntimeError("stop")
    with pytest.raises(RuntimeError):
        write_records(tmp_path / "o.json", failing())
    assert len(list(iter_records(tmp_path / "o.json"))) == 20  # the old file is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_conversatons_misspelling_is_accepted(tmp_path):
    "Released files spell the key 'conversatons' in places: the reader fixes it, so every file-level check passes."
    r = rec(1)
    r["conversatons"] = r.pop("conversations")
    for p in (write_jsonl(tmp_path / "typo.jsonl", [r]), write_array(tmp_path / "typo.json", [r], indent=2)):
        assert [s.answer for s in iter_samples(p)] == ["A chest radiograph."]
        rep = validate_file(str(p))
        assert rep.ok and rep.exit_code == 0 and (rep.n_records, rep.n_invalid) == (1, 0), str(rep)
    assert validate_records([r]).ok  # records built in memory are read the same way


def test_iter_samples_raises_or_yields_bad(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps(rec(1)) + "\n{oops\n[1, 2]\n")
    with pytest.raises(RecordError, match=r"x.jsonl:2"):
        list(iter_samples(p))
    got = list(iter_samples(p, skip_bad=True))
    assert isinstance(got[0], Sample) and all(isinstance(g, RecordError) for g in got[1:])


# ---------------------------------------------------------------- validation

def test_validate_clean_file_exits_0(tmp_path, capsys):
    p = write_array(tmp_path / "clean.json", [rec(i, q="<image>\nDescribe." if i % 3 == 1 else "Describe.\n<image>" if i % 3 else "<image>",
                                                  answer_type="OPEN", domain={"mri": True, "ct_scan": False})
                                              for i in range(50)] + [{"id": "t1", "conversations": [
        {"from": "human", "value": "text only?"}, {"from": "gpt", "value": "yes"}]}])
    assert main(["validate", str(p)]) == 0
    out = capsys.readouterr().out
    assert "51 records, 0 invalid" in out


DEFECTS = {  # id -> (record, reason expected in the report)
    "noconv": ({"id": "noconv", "image": "x.jpg"}, "missing_field"),
    "emptyconv": ({"id": "emptyconv", "conversations": []}, "empty_field"),
    "twotok": (rec("twotok", q="<image> and <image>"), "image_token_count"),
    "notok": (rec("notok", q="What is shown?"), "image_token_count"),
    "tokpos": ({"id": "tokpos", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "<image> now?"}, {"from": "gpt", "value": "ok"}]}, "image_token_position"),
    "gptfirst": ({"id": "gptfirst", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"},
                                                      {"from": "gpt", "value": "c"}]}, "not_alternating"),
    "endhuman": ({"id": "endhuman", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image> q"},
                                                                       {"from": "gpt", "value": "a"},
                                                                       {"from": "human", "value": "more?"}]}, "not_ending_gpt"),
    "emptyans": (rec("emptyans", a="  "), "empty_answer"),
    "emptyq": ({"id": "emptyq", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": " \n"}, {"from": "gpt", "value": "b"}]}, "empty_question"),
    "role": ({"id": "role", "conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]}, "bad_role"),
    "turn": ({"id": "turn", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "bad_turn"),
    "noimgfield": ({"id": "noimgfield", "conversations": [{"from": "human", "value": "<image> q"},
                                                         {"from": "gpt", "value": "a"}]}, "missing_field"),
    "emptyimg": (rec("emptyimg", image=""), "empty_field"),
    "atype": (rec("atype", answer_type="open"), "bad_field"),
}


def test_validate_names_each_defect(tmp_path, capsys):
    rows = [rec(0)] + [r for r, _ in DEFECTS.values()] + [rec(0), {"image": "y.jpg", "conversations": []}, ["list"]]
    rows.insert(5, {"id": "", "conversations": rec(1)["conversations"], "image": "z.jpg"})
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    lines = p.read_text().splitlines()
    lines.insert(3, '{"id": "broken", "conversations": [')  # malformed JSON on line 4
    p.write_text("\n".join(lines) + "\n" + json.dumps(rec("after", a="")) + "\n")
    assert main(["validate", str(p)]) == 1
    out = capsys.readouterr().out
    for rid, (_, reason) in DEFECTS.items():
        assert any(f"(id {rid}" in l and f"[{reason}]" in l for l in out.splitlines()), (rid, reason, out)
    assert "line 4): malformed JSON" in out
    assert "(id 0_F1, line 1)" not in out  # the first, valid record is not reported
    assert "already used by record 0 [duplicate_id]" in out
    assert "'id' is empty [empty_field]" in out and "no 'id' [missing_field]" in out
    assert "a list, expected a JSON object [not_object]" in out
    assert "(id after_F1," in out and "[empty_answer]" in out  # validation went on past the malformed line
    summary = out[out.index(f"{p}: {len(lines) + 1} records"):]
    assert "malformed_json" in summary and "duplicate_id" in summary


def test_validate_report_object(tmp_path):
    rows = [rec(1), rec(1), rec(2, a="")]
    rep = validate_records(rows, source="mem")
    assert (rep.n_records, rep.n_invalid, dict(rep.counts)) == (3, 2, {"duplicate_id": 1, "empty_answer": 1})
    assert [(p.index, p.id) for p in rep.problems] == [(1, "1_F1"), (2, "2_F1")]
    assert "mem: 3 records, 2 invalid" in rep.summary()
    capped = validate_records([rec(i, a="") for i in range(10)], max_problems=3)
    assert len(capped.problems) == 3 and capped.n_unlisted == 7 and capped.counts["empty_answer"] == 10


def test_validate_images(tmp_path, capsys):
    img = tmp_path / "img"; img.mkdir()
    Image.new("RGB", (8, 8), "red").save(img / "1_F1.jpg", "PNG")  # PNG bytes under a .jpg name are fine
    (img / "2_F1.jpg").write_bytes((SKD / "retina.jpg").read_bytes()[:3000])  # truncated
    (img / "4_F1.jpg").write_text("not an image")
    p = write_array(tmp_path / "d.json", [rec(1), rec(2), rec(3), rec(4), rec(5, image="1_F1.jpg")], indent=1)
    assert main(["validate", str(p), "--images", str(img)]) == 1
    out = capsys.readouterr().out
    assert "record 1 (id 2_F1, line 16): image '2_F1.jpg' unreadable" in out and "truncated" in out
    assert "(id 3_F1," in out and "[image_missing]" in out
    assert "(id 4_F1," in out and "not a PNG/JPEG" in out
    assert "(id 1_F1," not in out and "(id 5_F1," not in out
    assert main(["validate", str(p)]) == 0  # without --images only the text is checked


def test_threaded_image_checks_match_serial(tmp_path):
    "Images decoded on a thread pool give the same problems and counts as one thread, each image decoded once."
    img = tmp_path / "img"; img.mkdir()
    jpg = (SKD / "retina.jpg").read_bytes()
    for k in range(40):
        if k % 5 == 0: (img / f"{k}.jpg").write_bytes(jpg[:2000 + k])  # truncated
        elif k % 7 == 0: continue  # missing
        else: Image.new("L", (16 + k, 16), k).save(img / f"{k}.jpg", "PNG" if k % 2 else "JPEG")
    rows = [rec(i, image=f"{i % 40}.jpg", a="" if i % 11 == 0 else "ok") for i in range(200)]
    serial = validate_records(rows, images=img, workers=1)
    threaded = validate_records(rows, images=img, workers=4)
    key = lambda r: sorted((p.index, p.reason, p.message) for p in r.problems)
    assert key(serial) == key(threaded) and serial.counts == threaded.counts
    assert serial.n_invalid == threaded.n_invalid == len({p.index for p in serial.problems})
    assert serial.counts["image_unreadable"] == 40 and serial.counts["image_missing"] == 20  # 8 and 4 images, 5 records each


def test_validate_array_file_structure(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, ')
    res = validate_file(str(p))
    assert res.exit_code == 1
    assert "file ends inside the array" in str(res)
    with pytest.raises(FileNotFoundError, match="no such file: .*missing.json"):
        validate_file(str(tmp_path / "missing.json"))


def test_non_utf8_bytes_are_reported(tmp_path):
    good = json.dumps(rec(1)).encode()
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + json.dumps(rec(2, a="caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9")
                  + b"\n" + json.dumps(rec(3)).encode() + b"\n")
    res = validate_file(str(p))
    out = str(res)
    assert res.exit_code == 1
    assert "record 1 (no id, line 2): not UTF-8 text" in out and "3 records, 1 invalid" in out
    q = tmp_path / "latin1.json"
    q.write_bytes(b"[\n" + good + b",\n" + b'{"id": "caf\xe9"}' + b"\n]\n")
    res = validate_file(str(q))
    out = str(res)
    assert res.exit_code == 1
    assert "record 1 (no id, line 3): not UTF-8 text" in out and "2 records, 1 invalid" in out


def test_validate_command_line(tmp_path, llavamed_cmd):
    good = write_jsonl(tmp_path / "good.jsonl", [rec(i) for i in range(5)])
    bad = write_jsonl(tmp_path / "bad.jsonl", [rec(1), rec(2, q="no token")])
    r = subprocess.run([llavamed_cmd, "validate", str(good)], capture_output=True, text=True)
    assert r.returncode == 0 and "5 records, 0 invalid" in r.stdout, r.stderr
    r = subprocess.run([llavamed_cmd, "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "record 1 (id 2_F1, line 2): 0 <image> tokens, expected 1" in r.stdout


def test_import_stays_light():
    code = "import sys, llavamed.data; print(sorted(m for m in ('torch', 'pydicom', 'nibabel') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stderr


# ---------------------------------------------------------------- alignment builder

def pairs(n):
    return [{"pair_id": f"{1000 + i}_F{i % 3 + 1}", "fig_caption": f"Axial CT {i}: a {i} mm nodule."} for i in range(n)]


def test_align_deterministic_and_order_free(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", pairs(200))
    shuffled = pairs(200); random.Random(1).shuffle(shuffled)
    src2 = write_array(tmp_path / "p2.json", shuffled)
    build_alignment(str(src), str(tmp_path / "a.json"), seed=3)
    build_alignment(str(src), str(tmp_path / "b.json"), seed=3)
    build_alignment(str(src2), str(tmp_path / "c.json"), seed=3)
    build_alignment(str(src), str(tmp_path / "d.json"), seed=4)
    a = (tmp_path / "a.json").read_bytes()
    assert a == (tmp_path / "b.json").read_bytes()
    by_id = lambda f: {r["id"]: r for _, r in iter_records(tmp_path / f)}
    assert by_id("a.json") == by_id("c.json") != by_id("d.json")
    recs = list(by_id("a.json").values())
    prompts = set(align_prompts())
    qs = [r["conversations"][0]["value"] for r in recs]
    assert all(q.replace("<image>", "").strip() in prompts for q in qs)
    before = sum(q.startswith("<image>\n") for q in qs)
    assert 60 < before < 140 and sum(q.endswith("\n<image>") for q in qs) == 200 - before
    assert len({q.replace("<image>", "").strip() for q in qs}) >= 20
    assert recs[0]["image"] == recs[0]["id"] + ".jpg" and recs[0]["conversations"][1]["value"].startswith("Axial CT")
    assert validate_file(str(tmp_path / "a.json"), quiet=True).exit_code == 0


def test_align_prompt_list():
    assert (len(align_prompts("detailed")), len(align_prompts("concise")), len(set(align_prompts()))) == (16, 11, 27)
    with pytest.raises(ValueError, match="style"):
        align_prompts("long")


def test_align_teacher_format_and_skips(tmp_path, capsys):
    teacher = {"mri": [{"pair_id": "1_F1", "pmid": 1, "fig_id": "F1", "fig_label": "Fig 1",
                        "fig_caption": "T2 MRI, hyperintense lesion.", "in_text_mention": "x", "domain": "mri"}],
               "gross": [{"pair_id": "2_F1", "fig_caption": "Resected specimen."}, {"pair_id": "3_F1", "fig_caption": ""},
                         {"pair_id": "1_F1", "fig_caption": "dup"}]}
    src = tmp_path / "t.json"; src.write_text(json.dumps(teacher, indent=2))
    assert main(["align", "--captions", str(src), "--out", str(tmp_path / "al.jsonl"), "--seed", "7"]) == 0
    cap = capsys.readouterr()
    assert "pair 2" in cap.err and "[empty_caption]" in cap.err and "[duplicate_id]" in cap.err
    recs = [v for _, v in iter_records(tmp_path / "al.jsonl")]
    assert [r["id"] for r in recs] == ["1_F1", "2_F1"]
    assert recs[0]["domain"]["mri"] and not recs[0]["domain"]["gross"] and recs[1]["domain"]["gross"]
    flat = write_jsonl(tmp_path / "f.jsonl", [{"id": "9_F9", "caption": "A gel.", "image": "gel.png"}])
    res = build_alignment(str(flat), str(tmp_path / "f_out.json"))
    assert res.to_json() == {"out": str(tmp_path / "f_out.json"), "written": 1, "skipped": {}}
    assert str(res) == f"wrote 1 alignment records to {tmp_path / 'f_out.json'}"
    assert next(iter_records(tmp_path / "f_out.json"))[1]["image"] == "gel.png"


# ---------------------------------------------------------------- images

def arr(im):
    assert im.mode == "RGB"
    return np.asarray(im)


def test_raster_formats(tmp_path):
    ihc = load_image(SKD / "ihc.png"); assert ihc.size == (512, 512)
    assert load_image(SKD / "retina.jpg").size == (1411, 1411)
    assert load_image(SKD / "no_time_for_that_tiny.gif").mode == "RGB"
    assert load_image(SKD / "multipage.tif", frame=1).mode == "RGB"
    g16 = (np.arange(64 * 32, dtype=np.uint16).reshape(32, 64) * 31)
    Image.fromarray(g16).save(tmp_path / "g16.tif")  # 16-bit greyscale is windowed, not clipped to white
    a = arr(load_image(tmp_path / "g16.tif"))
    assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255 and 100 < a[16, 32, 0] < 160
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0)); rgba.save(tmp_path / "t.png")
    assert arr(load_image(tmp_path / "t.png"))[0, 0].tolist() == [255, 255, 255]  # transparency -> white
    Image.new("RGB", (5, 3), (10, 20, 30)).save(tmp_path / "x.bmp")
    assert arr(load_image(tmp_path / "x.bmp"))[0, 0].tolist() == [10, 20, 30]
    assert np.array_equal(arr(load_image((SKD / "ihc.png").read_bytes())), arr(ihc))  # bytes work too


def test_dicom_rescale_and_windows(tmp_path):
    ct = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(ct)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    want = np.clip(np.round((hu - (40 - 200)) * 255 / 400), 0, 255).astype(np.uint8)
    got = arr(load_image(ct, window=(40, 400)))
    assert np.abs(got[..., 0].astype(int) - want).max() <= 1
    assert (got[..., 0] == got[..., 2]).all()
    mr = get_testdata_file("MR_small.dcm")  # the file's own window (600 / 1600)
    ds = pydicom.dcmread(mr)
    want = np.clip(np.round((ds.pixel_array.astype(float) + 200) * 255 / 1600), 0, 255)
    assert np.abs(arr(load_image(mr))[..., 0].astype(int) - want).max() <= 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(arr(load_image(tmp_path / "m1.dcm")), 255 - arr(load_image(mr)))


def test_dicom_frames_colour_and_palette():
    dose = get_testdata_file("rtdose.dcm")  # 15 frames of 10 x 10: the pixel limit applies per decoded frame
    mid, first = arr(load_image(dose, max_pixels=100)), arr(load_image(dose, frame=0))
    with pytest.raises(ImageTooLargeError):
        load_image(dose, max_pixels=99)
    assert np.array_equal(mid, arr(load_image(dose, frame=7))) and not np.array_equal(mid, first)
    with pytest.raises(CorruptImageError, match="no frame 15"):
        load_image(dose, frame=15)
    assert load_image(get_testdata_file("SC_rgb_rle_2frame.dcm")).size == (100, 100)
    ybr = arr(load_image(get_testdata_file("examples_ybr_color.dcm")))
    assert ybr.shape == (240, 320, 3) and not np.array_equal(ybr[..., 0], ybr[..., 1])
    pal = arr(load_image(get_testdata_file("examples_palette.dcm")))
    assert pal.shape == (350, 800, 3) and not np.array_equal(pal[..., 0], pal[..., 2])


def test_dicom_bad_files(tmp_path):
    with pytest.raises(CorruptImageError, match="MR_truncated.dcm"):
        load_image(get_testdata_file("MR_truncated.dcm"))
    with pytest.raises(UnsupportedImageError, match="no pixel data"):
        load_image(get_testdata_file("rtplan.dcm"))
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows = ds.Columns = 60000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ImageTooLargeError, match="3,600,000,000 pixels"):
        load_image(tmp_path / "huge.dcm")


def test_nifti(tmp_path):
    anat = Path(NIB_DATA) / "anatomical.nii"
    img = nib.as_closest_canonical(nib.load(anat))
    vol = np.asanyarray(img.dataobj)
    sl = np.rot90(vol[:, :, vol.shape[2] // 2]).astype(float)
    lo, hi = np.percentile(sl, (1, 99))
    want = np.clip(np.round((sl - lo) * 255 / (hi - lo)), 0, 255)
    assert np.abs(arr(load_image(anat))[..., 0].astype(int) - want).max() <= 1
    assert load_image(Path(NIB_DATA) / "example4d.nii.gz").size == (128, 96)
    assert load_image(Path(NIB_DATA) / "example_nifti2.nii.gz").mode == "RGB"
    # a volume whose slice k holds the value k, written upside down (negative z step): canonical order is restored
    v = np.broadcast_to(np.arange(9, dtype=np.float32), (6, 5, 9)).copy()
    nib.save(nib.Nifti1Image(v[:, :, ::-1].copy(), np.diag([1.0, 1.0, -1.0, 1.0])), tmp_path / "v.nii.gz")
    for k in (0, 2, 8):
        a = arr(load_image(tmp_path / "v.nii.gz", frame=k, percentiles=(0, 100)))
        assert a.shape == (5, 6, 3) and len(np.unique(a)) == 1
    assert arr(load_image(tmp_path / "v.nii.gz")).shape == (5, 6, 3)
    # axes stored in another order and flipped: each slice matches nibabel's canonical reorientation
    from llavamed.images import to_uint8
    vol = np.random.default_rng(0).random((4, 6, 5)).astype(np.float32)
    aff = np.array([[0, 0, -2, 10], [0, 1.5, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(vol, aff), tmp_path / "perm.nii")
    canon = np.asanyarray(nib.as_closest_canonical(nib.load(tmp_path / "perm.nii")).dataobj)
    assert canon.shape == (5, 6, 4)
    for k in range(4):
        want = to_uint8(np.rot90(canon[:, :, k]))
        assert np.array_equal(arr(load_image(tmp_path / "perm.nii", frame=k))[..., 0], want), k


def test_nifti_bad_files(tmp_path):
    raw = (Path(NIB_DATA) / "anatomical.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CorruptImageError, match="cut.nii: truncated NIfTI"):
        load_image(tmp_path / "cut.nii")
    # header claims 4096^3 voxels; the data are never decompressed
    hdr = nib.Nifti1Header(); hdr.set_data_shape((4096, 4096, 4096)); hdr.set_data_dtype(np.uint8)
    buf = io.BytesIO(); hdr.write_to(buf)
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(buf.getvalue() + b"\0" * 4 + b"\0" * 1000))
    with pytest.raises(ImageTooLargeError, match="bomb.nii.gz: 68,719,476,736 voxels"):
        load_image(tmp_path / "bomb.nii.gz")


def png_claiming(w, h):
    "A valid-CRC PNG whose header claims w x h pixels but holds almost no data."
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bombs_truncation_and_mismatched_extensions(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="bomb.png"):
        load_image(tmp_path / "bomb.png")
    (tmp_path / "mid.png").write_bytes(png_claiming(3000, 3000))
    with pytest.raises(ImageTooLargeError, match="9,000,000 pixels exceeds the limit of 1,000,000"):
        load_image(tmp_path / "mid.png", max_pixels=1_000_000)
    for src, cut in (("retina.jpg", 4000), ("ihc.png", 9000)):
        (tmp_path / src).write_bytes((SKD / src).read_bytes()[:cut])
        with pytest.raises(CorruptImageError, match=src):
            load_image(tmp_path / src)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CorruptImageError, match="empty file"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "notes.jpg").write_text("hello, not an image")
    with pytest.raises(UnsupportedImageError, match="notes.jpg: not a PNG"):
        load_image(tmp_path / "notes.jpg")
    # right bytes, wrong names: decided by content
    swaps = {"a.dcm": (SKD / "ihc.png", "png"), "b.png": (Path(get_testdata_file("CT_small.dcm")), "dicom"),
             "c.jpg": (Path(NIB_DATA) / "example4d.nii.gz", "nifti.gz"), "d.tif": (SKD / "retina.jpg", "jpeg")}
    for name, (src, fmt) in swaps.items():
        (tmp_path / name).write_bytes(src.read_bytes())
        assert image_format(tmp_path / name) == fmt
        assert np.array_equal(arr(load_image(tmp_path / name)), arr(load_image(src))), name


def test_quick_path_never_passes_a_bad_record():
    "The allocation-free fast check may only call a record valid when the full check agrees."
    import copy
    base = [rec(1), rec(2, q="<image>\nDescribe.", answer_type="CLOSED", domain={"mri": True}),
            {"id": "t", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                                          {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}]
    values = ["", " ", "<image>", "x <image>", "<image><image> y", "text", None, 3, [], {}, "human", "gpt", True]
    keys = ["id", "image", "conversations", "conversatons", "answer_type", "domain", "from", "value"]
    rng, seen = random.Random(0), {True: 0, False: 0}
    for _ in range(5000):
        r = copy.deepcopy(rng.choice(base))
        for _ in range(rng.randint(1, 2)):
            conv = r.get("conversations")
            target = rng.choice([r, r] + (conv if isinstance(conv, list) and conv else []))
            if not isinstance(target, dict): continue
            op, k = rng.random(), rng.choice(keys)
            if op < 0.3: target.pop(k, None)
            elif op < 0.8: target[k] = rng.choice(values)
            elif isinstance(conv, list) and conv: conv.pop(rng.randrange(len(conv)))
        for req in (False, True):
            quick = data._quick_ok(r, req)
            seen[quick] += 1
            if quick: assert data._full_check(r, req) == [], r
    assert seen[True] > 200 and seen[False] > 2000, seen


def test_synthetic_corpus_validates_clean(tmp_path):
    "Acceptance: every LLaVA file of the synthetic corpus passes `llavamed validate` with its images."
    from llavamed.synth import make_corpus
    make_corpus(str(tmp_path / "c"), n_train=12, n_test=4, n_chat=2, quiet=True)
    for name in ("alignment.json", "vqa_train.json", "vqa_test.json"):
        f = tmp_path / "c" / name
        assert main(["validate", str(f), "--images", str(tmp_path / "c" / "images"), "--require-image", "--quiet"]) == 0, name
    out = tmp_path / "realign.json"
    assert build_alignment(str(tmp_path / "c" / "instruct_captions.json"), str(out), quiet=True).written == 12
    assert main(["validate", str(out), "--images", str(tmp_path / "c" / "images"), "--quiet"]) == 0


def test_image_lists_one_marker_per_image_in_human_turns(tmp_path):
    "A record may carry several images (families that take them): one <image> per image, none in a reply."
    two = "Compare <image> with <image>."
    rows = [rec(1, q=two, image=["a.png", "b.png"]),
            rec(2, q="What is shown?\n<image>", image=["a.png", "b.png"]),
            rec(3, q=two, image=[]),
            rec(4, q=two, image=["a.png", 7]),
            {"id": "5_F1", "image": ["a.png", "b.png"], "conversations": [
                {"from": "human", "value": "Look: <image>"}, {"from": "gpt", "value": "And <image>."}]},
            rec(6, q=two, image=["a.png", "ct.nii.gz"])]
    rep = validate_records(rows)
    by_id = {p.id: (p.reason, p.message) for p in rep.problems}
    assert {p.reason for p in rep.problems if p.id == "3_F1"} == {"empty_field", "image_token_count"}
    assert "1_F1" not in by_id and "6_F1" not in by_id, by_id
    assert by_id["2_F1"] == ("image_token_count", "1 <image> tokens for 2 images, expected 2")
    assert by_id["4_F1"] == ("bad_field", "'image' list holds 7, expected image names")
    assert by_id["5_F1"] == ("image_token_position", "<image> in turn 1, a reply (expected human turns)")
    assert rep.n_invalid == 4


@pytest.mark.parametrize("workers", [1, 4])
def test_each_image_of_a_list_is_checked_and_the_record_counted_once(tmp_path, workers):
    img = tmp_path / "img"; img.mkdir()
    Image.new("RGB", (8, 8), "red").save(img / "a.png")
    (img / "bad.png").write_text("not an image")
    rows = [rec(1, q="<image> vs <image>", image=["a.png", "missing.png"]),
            rec(2, q="<image> vs <image>", image=["bad.png", "missing.png"]),
            rec(3, q="<image> vs <image>", image=["a.png", "a.png"])]
    rep = validate_records(rows, images=img, workers=workers)
    got = sorted((p.id, p.reason) for p in rep.problems)
    assert got == [("1_F1", "image_missing"), ("2_F1", "image_missing"), ("2_F1", "image_unreadable")], got
    assert rep.n_invalid == 2
