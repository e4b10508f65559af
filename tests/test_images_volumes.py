"Volumes as k slices: NIfTI files and DICOM series folders on disk, slice references, records expanded."
import copy, os, shutil
from pathlib import Path

import numpy as np
import pytest

from llavamed.core import Question, Sample, Turn
from llavamed.data import image_problem
from llavamed.images import (CorruptImageError, ImageError, ImageOutsideRootError, SliceCountError,
                             UnsupportedImageError, expand_volumes, is_volume, load_image, parse_slice_ref,
                             resolve_image, slice_ref, volume_slices)

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file


def arr(im): return np.asarray(im)


def pixels(images): return [arr(im).tolist() for im in images]


def random_volume(shape=(6, 5, 10), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def write_nifti(path, vol, affine=None):
    nib.save(nib.Nifti1Image(vol, np.eye(4) if affine is None else affine), path)
    return path


def write_series(folder, n, positions=True, numbers=True, names=None, orientation=None, series_uid=None):
    """`n` single-frame CT files in `folder`; slice j (anatomical order) is 10 HU brighter than slice j - 1,
    stored under file names (and instance numbers) that run in another order."""
    folder.mkdir(parents=True)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    stored = template.pixel_array
    for j in range(n):
        ds = copy.deepcopy(template)
        if orientation is None: ds.ImagePositionPatient = [0, 0, 2.5 * j]
        else: ds.ImageOrientationPatient, ds.ImagePositionPatient = orientation, [0, 2.5 * j, 0]
        if not positions: del ds.ImagePositionPatient
        ds.InstanceNumber = n - j  # reversed: positions, when present, must win
        if not numbers: del ds.InstanceNumber
        if series_uid: ds.SeriesInstanceUID = series_uid(j)
        ds.PixelData = (stored + 10 * j).astype(stored.dtype).tobytes()
        ds.save_as(folder / (names(j) if names else f"IM{(7919 * j) % 10007:05d}.dcm"))  # names out of order
    return folder


def brightness(images): return [float(arr(im).mean()) for im in images]


# --- names ---------------------------------------------------------------------------------------------------

def test_naming_rule_reads_the_name_only(tmp_path):
    (tmp_path / "folder").mkdir()
    assert [is_volume(n) for n in ("a/ct.nii", "a/ct.NII.GZ", "series/", "ct.nii.gz#slice=1/8", "ct.nii.gz.png",
                                   str(tmp_path / "folder"), "", None)] == [True, True, True] + [False] * 5
    assert slice_ref("a/ct.nii.gz", 3, 8) == "a/ct.nii.gz#slice=3/8"
    assert parse_slice_ref("a/ct.nii.gz#slice=3/8") == ("a/ct.nii.gz", 3, 8)
    assert parse_slice_ref("s/001/#slice=8/8") == ("s/001/", 8, 8)
    assert parse_slice_ref("fig#slice=3/8.png") is None and parse_slice_ref("fig#1.png") is None
    for bad in ("ct.nii#slice=0/8", "ct.nii#slice=9/8", "ct.nii#slice=03/8", "ct.nii#slice=3", "s/#slice=x/8"):
        with pytest.raises(ImageError, match="malformed slice reference"):
            parse_slice_ref(bad)
    with pytest.raises(ValueError, match="not a volume name"):
        slice_ref("fig.png", 1, 2)
    with pytest.raises(ValueError, match="slice 0 of 8"):
        slice_ref("ct.nii", 0, 8)


# --- NIfTI -----------------------------------------------------------------------------------------------------

def test_nifti_slices_are_the_loaders_evenly_spaced_axial_slices(tmp_path):
    vol = random_volume()
    path = write_nifti(tmp_path / "v.nii.gz", vol)
    got = volume_slices(path, 4)  # 10 slices, 4 runs of 2.5: the middle of each is slice 1, 3, 6, 8
    assert pixels(got) == pixels(load_image(path, frame=i) for i in (1, 3, 6, 8))
    assert pixels(volume_slices(path, 10)) == pixels(load_image(path, frame=i) for i in range(10))
    assert all(im.mode == "RGB" and im.size == (6, 5) for im in got)
    # the same anatomy stored upside down (negative z step): the same slices, in the same order
    flipped = write_nifti(tmp_path / "flipped.nii", vol[:, :, ::-1].copy(), np.diag([1.0, 1.0, -1.0, 1.0]))
    assert pixels(volume_slices(flipped, 4)) == pixels(got)
    # stored with the axial axis first: the loader's axis (from the affine) is used, not the last array axis
    perm = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    moved = write_nifti(tmp_path / "moved.nii", np.moveaxis(vol, 2, 0).copy(), perm)
    assert pixels(volume_slices(moved, 4)) == pixels(got)


def test_nifti_too_few_slices_names_file_count_and_k(tmp_path):
    path = write_nifti(tmp_path / "short.nii.gz", random_volume((6, 5, 5)))
    with pytest.raises(SliceCountError, match=r"short\.nii\.gz: the volume has 5 slices, fewer than the k=8"):
        volume_slices(path, 8)
    with pytest.raises(ValueError, match="k must be a positive number of slices, got 0"):
        volume_slices(path, 0)
    flat = write_nifti(tmp_path / "flat.nii", random_volume((6, 5)))  # a 2-D image is one slice
    assert len(volume_slices(flat, 1)) == 1
    with pytest.raises(SliceCountError, match="has 1 slices"):
        volume_slices(flat, 2)


def test_not_a_volume_and_damaged_volume(tmp_path):
    (tmp_path / "fig.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(UnsupportedImageError, match="not a NIfTI volume or a DICOM series folder .a PNG file"):
        volume_slices(tmp_path / "fig.png", 2)
    raw = write_nifti(tmp_path / "v.nii", random_volume()).read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CorruptImageError, match="cut.nii: truncated NIfTI"):
        volume_slices(tmp_path / "cut.nii", 2)


# --- DICOM series ----------------------------------------------------------------------------------------------

def test_series_in_anatomical_order(tmp_path):
    series = write_series(tmp_path / "by_position", 12)
    got = volume_slices(series, 4, window=(40, 400))
    assert brightness(got) == sorted(brightness(got)) and len(set(brightness(got))) == 4
    files = sorted(series.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    assert pixels(got) == pixels(load_image(files[i], window=(40, 400)) for i in (1, 4, 7, 10))
    assert pixels([load_image(series, window=(40, 400))]) == pixels([load_image(files[6], window=(40, 400))])
    # no positions: InstanceNumber (reversed here, so the order is too); neither: the file names
    by_number = volume_slices(write_series(tmp_path / "by_number", 6, positions=False), 6, window=(40, 400))
    assert brightness(by_number) == sorted(brightness(by_number), reverse=True)
    by_name = volume_slices(write_series(tmp_path / "by_name", 6, positions=False, numbers=False,
                                         names=lambda j: f"{j:02d}.dcm"), 6, window=(40, 400))
    assert brightness(by_name) == sorted(brightness(by_name))
    # coronal slices: positions are compared along the slice normal (here y), not along z
    coronal = write_series(tmp_path / "coronal", 5, orientation=[1, 0, 0, 0, 0, -1])
    coronal_slices = volume_slices(coronal, 5, window=(40, 400))
    assert brightness(coronal_slices) == sorted(brightness(coronal_slices))


def test_series_windowing_is_the_loaders(tmp_path):
    series = write_series(tmp_path / "s", 3)
    files = sorted(series.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    assert pixels(volume_slices(series, 3)) == pixels(load_image(f) for f in files)  # percentile window
    assert pixels(volume_slices(series, 3, window=(40, 400))) == pixels(load_image(f, window=(40, 400))
                                                                         for f in files)


def test_hostile_series_folders(tmp_path):
    series = write_series(tmp_path / "notes", 4)
    (series / "report.txt").write_text("Impression: no acute findings.")
    with pytest.raises(UnsupportedImageError,
                       match=r"notes: series file 'report.txt' is not DICOM \(it holds text\)"):
        volume_slices(series, 2)
    series = write_series(tmp_path / "nested", 4)
    (series / "sub").mkdir()
    with pytest.raises(UnsupportedImageError, match="series folder holds 'sub', not a file"):
        volume_slices(series, 2)
    pngs = write_series(tmp_path / "pngs", 2)
    (pngs / "key.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(UnsupportedImageError, match=r"series file 'key.png' is not DICOM \(a PNG file\)"):
        volume_slices(pngs, 2)
    series = write_series(tmp_path / "plan", 2)
    shutil.copy(get_testdata_file("rtplan.dcm"), series / "plan.dcm")
    with pytest.raises(UnsupportedImageError, match="series file 'plan.dcm' holds no image"):
        volume_slices(series, 2)
    series = write_series(tmp_path / "multi", 2)
    shutil.copy(get_testdata_file("rtdose.dcm"), series / "dose.dcm")
    with pytest.raises(UnsupportedImageError, match="'dose.dcm' holds 15 frames"):
        volume_slices(series, 2)
    mixed = write_series(tmp_path / "mixed", 4, series_uid=lambda j: f"1.2.3.{j % 2}")
    with pytest.raises(UnsupportedImageError, match="mixes 2 series"):
        volume_slices(mixed, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptImageError, match="holds no DICOM files"):
        volume_slices(tmp_path / "empty", 1)
    short = write_series(tmp_path / "short", 3)
    with pytest.raises(SliceCountError, match="short: the volume has 3 slices, fewer than the k=8"):
        volume_slices(short, 8)
    linked = write_series(tmp_path / "linked", 2)
    shutil.copy(sorted(linked.iterdir())[0], tmp_path / "secret.dcm")  # a slice outside the folder
    (linked / "IM99999.dcm").symlink_to(tmp_path / "secret.dcm")
    with pytest.raises(ImageOutsideRootError, match="series file 'IM99999.dcm' is a link out of the series"):
        volume_slices(linked, 2)
    assert image_problem(tmp_path, "linked/#slice=1/2")[0] == "image_outside_root"
    (linked / "IM99999.dcm").unlink(); (linked / "IM99999.dcm").symlink_to(next(linked.iterdir()).name)
    assert len(volume_slices(linked, 3)) == 3  # a link that stays inside the folder is a file like any other
    hidden = write_series(tmp_path / "hidden", 3)
    (hidden / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are not slices
    assert len(volume_slices(hidden, 3)) == 3


# --- slice references through the loader and the path checks ----------------------------------------------------

def test_slice_reference_loads_that_slice(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz", random_volume())
    write_series(tmp_path / "series", 6)
    want = volume_slices(tmp_path / "ct.nii.gz", 4)
    for i in range(1, 5):
        path = resolve_image(tmp_path, slice_ref("ct.nii.gz", i, 4))
        assert str(path) == f"{tmp_path.resolve()}/ct.nii.gz#slice={i}/4"
        assert arr(load_image(path)).tolist() == arr(want[i - 1]).tolist()
    path = resolve_image(tmp_path, "series/#slice=2/3", record="r1")
    assert str(path.relative_to(tmp_path.resolve())) == "series/#slice=2/3"
    assert arr(load_image(path)).tolist() == arr(volume_slices(tmp_path / "series", 3)[1]).tolist()
    with pytest.raises(ImageError, match="record r1: image path 'ct.nii.gz#slice=5/4': malformed slice reference"):
        resolve_image(tmp_path, "ct.nii.gz#slice=5/4", record="r1")
    with pytest.raises(SliceCountError, match="10 slices, fewer than the k=11"):
        load_image(resolve_image(tmp_path, "ct.nii.gz#slice=1/11"))
    (tmp_path / "folder.nii").mkdir()
    with pytest.raises(UnsupportedImageError, match=r"a folder, but not named as a series \(add '/'\)"):
        load_image(tmp_path / "folder.nii#slice=1/2")
    with pytest.raises(UnsupportedImageError, match="named as a DICOM series folder, but it is not a folder"):
        load_image(str(tmp_path / "ct.nii.gz") + "/#slice=1/2")
    with pytest.raises(FileNotFoundError, match="no such volume"):
        load_image(tmp_path / "gone.nii#slice=1/2")


def test_slice_reference_cannot_leave_the_root(tmp_path):
    root = tmp_path / "images"; root.mkdir()
    write_nifti(tmp_path / "outside.nii", random_volume())
    (root / "link.nii").symlink_to(tmp_path / "outside.nii")
    for name in ("../outside.nii#slice=1/2", str(tmp_path / "outside.nii") + "#slice=1/2", "link.nii#slice=1/2",
                 "a/../../outside.nii#slice=1/2"):
        with pytest.raises(ImageOutsideRootError, match="record r9: image path .* is outside the images folder"):
            resolve_image(root, name, record="r9")
        assert image_problem(root, name)[0] == "image_outside_root"


def test_a_rewritten_volume_is_read_again(tmp_path):
    path = write_nifti(tmp_path / "ct.nii", random_volume(seed=1))
    ref = str(path) + "#slice=2/4"
    before = arr(load_image(ref))
    assert arr(load_image(ref)).tolist() == before.tolist()  # served from the rendered slices
    load_image(ref).paste((255, 0, 0), (0, 0, 2, 2))  # callers get copies: changing one changes nothing kept
    assert arr(load_image(ref)).tolist() == before.tolist()
    write_nifti(path, random_volume(seed=2))
    os.utime(path, ns=(1, 10 ** 18))  # a different modification time even on a coarse clock
    assert arr(load_image(ref)).tolist() == arr(volume_slices(path, 4)[1]).tolist() != before.tolist()


def test_image_problem_knows_volumes_and_slices(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz", random_volume())
    write_nifti(tmp_path / "short.nii", random_volume((6, 5, 3)))
    write_series(tmp_path / "series", 4)
    bad = write_series(tmp_path / "bad", 2); (bad / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = {  # name -> (reason, words of the message) or None
        "ct.nii.gz": None, "ct.nii.gz#slice=3/8": None, "series/": None, "series/#slice=4/4": None,
        "series": ("image_unreadable", "is a folder (a DICOM series is named with a trailing '/')"),
        "short.nii#slice=1/8": ("image_unreadable", "'short.nii#slice=1/8' unreadable: the volume has 3 slices, "
                                                    "fewer than the k=8"),
        "bad/#slice=1/2": ("image_unreadable", "series file 'notes.txt' is not DICOM"),
        "empty/": ("image_unreadable", "holds no DICOM files"),
        "ct.nii.gz#slice=9/8": ("image_unreadable", "malformed slice reference"),
        "gone.nii#slice=1/2": ("image_missing", "'gone.nii#slice=1/2' not found"),
        "gone/#slice=1/2": ("image_missing", "DICOM series folder 'gone/#slice=1/2' not found"),
        "ct.nii.gz/#slice=1/2": ("image_missing", "DICOM series folder"),
        "../ct.nii.gz#slice=1/2": ("image_outside_root", "outside the images folder"),
    }
    for name, want in cases.items():
        got = image_problem(tmp_path, name)
        if want is None: assert got is None, (name, got)
        else: assert got[0] == want[0] and want[1] in got[1], (name, got)


# --- records ---------------------------------------------------------------------------------------------------

def record(text, image, *more):
    return Sample("r7", [Turn("human", text), Turn("gpt", "Fine."), *more], image=image)


def test_expand_volumes_on_records_and_questions():
    got = expand_volumes(record("Look: <image>\nWhat changed since <image>?", ["ct.nii.gz", "old.png"]), 3)
    assert got.image == ["ct.nii.gz#slice=1/3", "ct.nii.gz#slice=2/3", "ct.nii.gz#slice=3/3", "old.png"]
    assert got.conversations[0].text == "Look: <image><image><image>\nWhat changed since <image>?"
    assert got.conversations[1].text == "Fine." and got.id == "r7"
    later = expand_volumes(record("Two scans.", ["a.png", "series/"], Turn("human", "<image> and <image>?"),
                                  Turn("gpt", "Same.")), 2)  # markers counted across the turns
    assert later.image == ["a.png", "series/#slice=1/2", "series/#slice=2/2"]
    assert later.conversations[2].text == "<image> and <image><image>?"
    unmarked = expand_volumes(record("Describe it.", "ct.nii"), 2)
    assert unmarked.conversations[0].text == "<image><image>\nDescribe it." and len(unmarked.image) == 2
    assert expand_volumes(got, 3) is got  # slice references are no volumes: expanding twice changes nothing
    plain = record("<image> hi", "a.png")
    assert expand_volumes(plain, 8) is plain
    q = expand_volumes(Question("q1", "Is there a mass?", image="ct.nii.gz", answer="no"), 2)
    assert q.image == ["ct.nii.gz#slice=1/2", "ct.nii.gz#slice=2/2"] and q.question == "Is there a mass?"
    with pytest.raises(ValueError, match=r"record 'r7': 2 images but 1 <image> markers"):
        expand_volumes(record("<image>", ["ct.nii", "b.png"]), 4)
    with pytest.raises(ValueError, match="record 'r7': k must be a positive number of slices, got -1"):
        expand_volumes(record("<image>", "ct.nii"), -1)


def test_expanded_record_reaches_the_families(tmp_path):
    families = pytest.importorskip("llavamed.families")
    write_series(tmp_path / "series", 5)
    sample = expand_volumes(record("<image>\nWhere is the lesion?", "series/"), 4)
    assert [image_problem(tmp_path, n) for n in sample.image] == [None] * 4
    messages = families.record_messages(sample, "qwen2_5_vl")
    assert [part["type"] for part in messages[0]["content"]] == ["image"] * 4 + ["text"]
    with pytest.raises(ValueError, match="record 'r7': 4 images, but family llava takes at most 1"):
        families.record_messages(sample, "llava")


def test_threads_loading_one_volumes_slices_share_one_decode(tmp_path, monkeypatch):
    import threading
    import llavamed.images as images
    path = write_nifti(tmp_path / "ct.nii.gz", random_volume((16, 16, 40)))
    renders, real = [], images.volume_slices
    monkeypatch.setattr(images, "volume_slices", lambda *a, **kw: renders.append(a[0]) or real(*a, **kw))
    refs, got, start = [f"{path}#slice={i}/8" for i in range(1, 9)], {}, threading.Barrier(8)

    def load(ref):
        start.wait(); got[ref] = arr(load_image(ref)).tolist()
    threads = [threading.Thread(target=load, args=(ref,)) for ref in refs]
    for t in threads: t.start()
    for t in threads: t.join()
    assert len(renders) == 1  # eight threads asked at once; one decoded, seven waited for it
    assert [got[ref] for ref in refs] == pixels(real(path, 8))
    for i in range(5):  # the last four volumes are kept: a fifth pushes the oldest out
        write_nifti(tmp_path / f"v{i}.nii", random_volume((4, 4, 8), seed=i))
        load_image(f"{tmp_path}/v{i}.nii#slice=1/2")
    load_image(refs[0])
    assert len(renders) == 1 + 5 + 1
    bad = write_nifti(tmp_path / "short.nii", random_volume((4, 4, 3)))
    for _ in range(2):  # a failed render is not kept: the error comes again, not a stale value
        with pytest.raises(SliceCountError):
            load_image(f"{bad}#slice=1/8")
