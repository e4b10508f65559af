"""Bad-input table: every command fed the hostile-but-fair inputs of issue 19, each run as a real `llavamed`.

For validate, align, instruct, train, predict, score, judge, vqa-convert and pmc-pairs, each case builds its inputs in a
temporary folder (an empty file, a truncated one, one bad line, the wrong top-level type, missing keys,
non-UTF-8 bytes, a huge line, image paths that escape the image folder (absolute, `..`, a symlink), a PNG
header claiming 100000x100000 pixels, zero-byte and fake images, DICOM without pixel data, a missing image,
`--out` equal to `--data`, an empty result over a good earlier output, ...), places a good earlier output in
`--out` where that makes sense, runs the command and classifies the run:

  clear      the target: exit 2 with one line `llavamed CMD: error: ...` naming the input (FILE, line N or
             record id), or the documented outcome of the case (validate's report, a repaired resume)
  ok         a case whose target is success (a resume, a rerun) met it
  unclear    failed without a traceback, but the message is not one line naming the input
  traceback  a Python traceback on stderr
  silent     exit 0 on bad input (or a secret or a file's contents echoed)
  clobbered  an earlier good output changed (or the command wrote a corrupt output)
  killed     over the memory cap or the time limit

Peak memory (`ru_maxrss` of the child, from `os.wait4`) is measured for every run and shown for the
oversized inputs (a 50 MB question; PNGs whose header claims a huge size). Tiny models only: a tiny
model built on the synthetic corpus, the offline teachers and judges, and the loopback chat server of
`tests/chat_server.py` for the OpenAI-compatible client.

    nice .venv/bin/python bench/bad_inputs.py [--only CMD ...] [--json FILE] [--mem-cap-gb 6]
"""
from __future__ import annotations
import argparse, collections, json, os, shutil, struct, subprocess, sys, tempfile, threading, time, zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
EXE = Path(sys.executable).parent / "llavamed"
CLASSES = ("clear", "ok", "unclear", "traceback", "silent", "clobbered", "killed")
SECRET = "SEKRIT-9f3c"  # a credential placed in --base-url; must appear in no output
SHORT_KEY = "k3y9"  # a key shorter than 6 characters; the 401 server echoes it
PASSWD_MARK = "root:"  # the first bytes of /etc/passwd: never echoed


# ---------------------------------------------------------------- file makers
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(path: Path, width: int = 100_000, height: int = 100_000):
    "A PNG whose header claims `width` x `height` pixels and whose data is a few bytes (a decompression bomb)."
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


def png_black(path: Path, width: int, height: int):
    "A real, fully decodable grey PNG of `width` x `height` black pixels, written in streamed chunks."
    comp, row = zlib.compressobj(9), b"\0" * (width + 1)  # filter byte + one byte per pixel
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        block = row * 256
        for start in range(0, height, 256):
            data = comp.compress(block if height - start >= 256 else row * (height - start))
            if data: f.write(png_chunk(b"IDAT", data))
        f.write(png_chunk(b"IDAT", comp.flush()) + png_chunk(b"IEND", b""))


def dicom_without_pixels(path: Path):
    "A valid DICOM file (preamble, meta header, patient and modality) that has no PixelData element."
    try:
        from pydicom.dataset import Dataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    except ImportError:  # a DICOM magic with nothing after it still exercises the reader
        path.write_bytes(b"\0" * 128 + b"DICM"); return
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset(); ds.file_meta = meta
    ds.PatientName, ds.Modality, ds.SOPInstanceUID = "Anon", "CT", meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)); return path


def load_json(path: Path): return json.loads(Path(path).read_text())


# ---------------------------------------------------------------- shared fixtures (built once per bench run)
BUILD_MODEL = """
import sys
from llavamed.synth import corpus_texts
from llavamed.model import build_model, save_model
m, p = build_model("tiny", tokenizer_texts=corpus_texts(sys.argv[1]))
save_model(m, p, sys.argv[2])
"""

class Fixtures:
    "The synthetic corpus, and (lazily) a saved tiny model, good earlier outputs and chat servers."
    def __init__(self, root: Path):
        from llavamed.synth import make_corpus
        self.root = root
        self.corpus = root / "corpus"
        make_corpus(str(self.corpus), n_train=8, n_test=4, size=48, n_chat=2, quiet=True)
        self.images = self.corpus / "images"
        self.align_recs = load_json(self.corpus / "alignment.json")  # 8 records
        self.vqa = load_json(self.corpus / "vqa_test.json")  # 16 questions
        self.pairs = [p for ps in load_json(self.corpus / "instruct_captions.json").values() for p in ps]
        self.bench = [json.loads(l) for l in (self.corpus / "chat_eval.jsonl").read_text().splitlines()]
        self._cache, self.servers = {}, []

    def once(self, name: str, make: Callable[[Path], None]) -> Path:
        "A folder made by `make` the first time it is asked for."
        if name not in self._cache:
            d = self.root / name; d.mkdir()
            try: make(d); self._cache[name] = d
            except Exception as e: self._cache[name] = e
        if isinstance(self._cache[name], Exception): raise self._cache[name]
        return self._cache[name]

    def model(self) -> Path:
        "A saved tiny model, built in a child process: a forked child's ru_maxrss starts at its parent's size."
        def make(d):
            subprocess.run([sys.executable, "-c", BUILD_MODEL, str(self.corpus), str(d / "m")], check=True,
                           capture_output=True)
        return self.once("model", make) / "m"

    def server(self, **config) -> str:
        from chat_server import ChatServerProcess
        srv = ChatServerProcess(**config).start(); self.servers.append(srv); return srv.base_url

    def close(self):
        for s in self.servers: s.stop()


def must(argv: list, **kw):
    "Run a llavamed command that builds a fixture; it has to succeed."
    r = subprocess.run([str(EXE), *map(str, argv)], capture_output=True, text=True, **kw)
    if r.returncode: raise RuntimeError(f"fixture llavamed {argv[0]} failed ({r.returncode}): {r.stderr[-800:]}")


def predict_argv(fx, data, out, images=None, model=None):
    return ["predict", "--model", model or fx.model(), "--data", data, "--images", images or fx.images,
            "--out", out, "--max-new-tokens", "4", "--batch-size", "8", "--device", "cpu", "--quiet"]


def train_argv(fx, data, out, images=None):
    return ["train", "--model", fx.model(), "--data", data, "--images", images or fx.images, "--out", out,
            "--max-steps", "1", "--num-workers", "0", "--save-steps", "1", "--quiet"]


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    command: str  # the llavamed command
    name: str  # the bad-input kind
    build: Callable  # (folder, fixtures) -> argv after `llavamed`
    names: tuple = ()  # the message must name every one of these (file name, 'line 3', record id); a tuple: any of
    append_only: bool = False  # the earlier output may grow (an answers file) but must keep its bytes
    guard: tuple = ("out",)  # paths (files or folders) of the earlier good output, relative to the folder
    codes: tuple = (2,)  # the exit statuses the target allows
    where: str = "stderr"  # where the naming message goes: 'stderr' (errors) or 'stdout' (a report)
    check: Callable | None = None  # (folder, proc) -> (class, note) or None, after the standard checks
    model: bool = False  # needs the tiny model (predict, train)
    memory: bool = False  # an oversized input: its peak memory is the point
    env: dict = field(default_factory=dict)

    @property
    def id(self) -> str: return f"{self.command}:{self.name}"


def bad_file_kinds(good_rows: list, jsonl: bool, missing_key: Callable[[dict], dict], huge: Callable[[dict], dict]):
    "The data-file kinds every reader faces (non-UTF-8 aside): {kind: (bytes of the file, names)}."
    lines = [json.dumps(r) for r in good_rows]
    body = ("\n".join(lines) + "\n") if jsonl else json.dumps(good_rows, indent=1)
    bad_line = lines[:2] + ['{"id": "broken", "conversations": [ {"from": '] + lines[2:]
    return {
        "empty file": (b"", ()),
        "truncated": (body[: len(body) // 2].encode(), ()),
        "one bad line": (("\n".join(bad_line) + "\n").encode(), ("line 3",)),
        "wrong top-level type": (b'"just a string"\n' if jsonl else b'{"not": "a list"}', ()),
        "missing keys": (("\n".join(json.dumps(missing_key(r)) for r in good_rows) + "\n").encode(), ()),
        "huge line": (("\n".join([json.dumps(huge(good_rows[0]))] + lines[1:]) + "\n").encode(), ()),
    }


def latin1_line(rows: list, i: int) -> bytes:
    "JSON Lines of `rows` whose line `i + 1` holds bytes that are not UTF-8."
    out = []
    for k, r in enumerate(rows):
        s = json.dumps(r).encode()
        out.append(s[:-1] + b', "note": "\xff\xfe"}' if k == i else s)
    return b"\n".join(out) + b"\n"


def file_cases(command: str, fname: str, rows: Callable, argv: Callable, missing_key, huge, jsonl=True,
               guard=("out",), model=False, setup=None, names_extra=()):
    "The data-file kinds for one command: `argv(d, fx, path)` is its command line, `setup(d, fx)` its earlier output."
    cases = []
    kinds = ["empty file", "truncated", "one bad line", "wrong top-level type", "missing keys", "non-UTF-8",
             "huge line", "does not exist"]
    for kind in kinds:
        def build(d, fx, kind=kind):
            good = rows(fx)
            path = d / fname
            if kind == "does not exist": pass
            elif kind == "non-UTF-8": path.write_bytes(latin1_line(good, 1))
            else: path.write_bytes(bad_file_kinds(good, jsonl, missing_key, huge)[kind][0])
            if setup: setup(d, fx)
            return argv(d, fx, path)
        lines = {"one bad line": (("line 3", f"{fname}:3"),), "non-UTF-8": (("line 2", f"{fname}:2"),)}
        names = (fname,) + lines.get(kind, ()) + names_extra
        if kind == "missing keys": names = (fname,)
        cases.append(Case(command, kind, build, names=names, guard=guard, model=model))
    return cases


# ----- earlier good outputs
def good_align(d, fx):
    write_jsonl(d / "pairs.jsonl", fx.pairs)
    must(["align", "--captions", d / "pairs.jsonl", "--out", d / "out" / "align.json", "--quiet"])


def good_instruct(d, fx):
    write_jsonl(d / "pairs.jsonl", fx.pairs)
    must(["instruct", "--captions", d / "pairs.jsonl", "--out", d / "out" / "instruct.jsonl", "--teacher",
          "template", "--quiet"])


def gold_answers(fx) -> list:
    return [{"question_id": q["id"], "text": q["conversations"][1]["value"]} for q in fx.vqa]


def good_score(d, fx):
    (d / "gt.json").write_text(json.dumps(fx.vqa))
    write_jsonl(d / "good_pred.jsonl", gold_answers(fx))
    (d / "out").mkdir()
    must(["score", "--pred", d / "good_pred.jsonl", "--gt", d / "gt.json", "--out", d / "out" / "score.json"])


def bench_answers(fx) -> list:
    return [{"question_id": q["question_id"], "text": q["gpt4_answer"]} for q in fx.bench]


def good_judge(d, fx):
    write_jsonl(d / "questions.jsonl", fx.bench)
    write_jsonl(d / "good_answers.jsonl", bench_answers(fx))
    must(["judge", "--questions", d / "questions.jsonl", "--answers", d / "good_answers.jsonl", "--out",
          d / "out" / "reviews.jsonl", "--judge", "overlap", "--quiet"])


def rad(qid, phrase="freeform", img="synpic100.jpg", answer="yes", atype="CLOSED"):
    return {"qid": qid, "image_name": img, "answer": answer, "answer_type": atype, "question_type": "ABN",
            "question": "Is there an abnormality?", "phrase_type": phrase, "image_organ": "HEAD"}


def rad_rows() -> list:
    return [rad(i) for i in range(12)] + [rad(20 + i, "test_freeform", "synpic200.jpg", "no") for i in range(6)]


def good_vqa(d, fx):
    (d / "rad.json").write_text(json.dumps(rad_rows()))
    must(["vqa-convert", "--dataset", "vqa-rad", "--src", d / "rad.json", "--out", d / "out"])


def good_predict(d, fx):
    (d / "vqa.json").write_text(json.dumps(fx.vqa))
    must(predict_argv(fx, d / "vqa.json", d / "out" / "answers.jsonl") + ["--limit", "2"])


def good_train(d, fx):
    (d / "align.json").write_text(json.dumps(fx.align_recs))
    must(train_argv(fx, d / "align.json", d / "out"))


def earlier(name: str, make: Callable) -> Callable:
    "A setup that copies the earlier good output `make` built once (its `out` folder) into the case's folder."
    def setup(d, fx):
        src = fx.once(f"good_{name}", lambda g: make(g, fx))
        shutil.copytree(src / "out", d / "out", symlinks=True)
    return setup


# ----- image cases (validate, train, predict): the first record's image is replaced
LAST_QUESTION = "SYN90000003_F6_q3"  # the synthetic corpus's last test question (never in the earlier answers)
IMAGE_KINDS = ("absolute path", "../ path", "symlink out", "PNG header 100000x100000", "zero-byte image",
               "fake image", "DICOM without pixels", "missing image")


def bad_image(d: Path, kind: str) -> str:
    "Make a copy of the corpus images under d/images with one bad image; return the record's image field."
    images = d / "images"
    if kind == "absolute path": return "/etc/passwd"
    if kind == "../ path":
        shutil.copy(next(images.iterdir()), d / "outside.jpg"); return "../outside.jpg"
    if kind == "symlink out":
        (images / "link.jpg").symlink_to("/etc/passwd"); return "link.jpg"
    if kind == "PNG header 100000x100000": png_header_only(images / "bomb.png"); return "bomb.png"
    if kind == "zero-byte image": (images / "empty.jpg").write_bytes(b""); return "empty.jpg"
    if kind == "fake image": (images / "fake.jpg").write_text("this is not a JPEG\n"); return "fake.jpg"
    if kind == "DICOM without pixels": dicom_without_pixels(images / "scan.dcm"); return "scan.dcm"
    if kind == "missing image": return "not_there.jpg"
    raise ValueError(kind)


def no_passwd(d, proc):
    if PASSWD_MARK in proc.stdout + proc.stderr: return "silent", "echoed the contents of /etc/passwd"


ESCAPES = ("absolute path", "../ path", "symlink out")
ESCAPE_WORDS = ("outside", "absolute", "climbs out", "escape")


def refused_escape(then: Callable) -> Callable:
    "A check that the message says the path leaves the images folder (not that the file it reached is bad)."
    def check(d, proc):
        found = then(d, proc)
        if found or proc.returncode == 0: return found
        said = [l for l in (proc.stdout + proc.stderr).splitlines() if "SYN" in l]
        if not any(w in l for l in said for w in ESCAPE_WORDS):
            return "unclear", "followed the path out of the images folder (no 'outside' in the message)"
    return check


def image_cases(command: str) -> list:
    cases = []
    for kind in IMAGE_KINDS:
        def build(d, fx, kind=kind):
            shutil.copytree(fx.images, d / "images")
            recs = json.loads(json.dumps(fx.vqa if command == "predict" else fx.align_recs))
            recs[-1 if command == "predict" else 0]["image"] = bad_image(d, kind)
            (d / "data.json").write_text(json.dumps(recs))
            if command == "validate": return ["validate", d / "data.json", "--images", d / "images", "--workers", "2"]
            if command == "train": return train_argv(fx, d / "data.json", d / "out", d / "images")
            earlier("predict", good_predict)(d, fx)
            return predict_argv(fx, d / "data.json", d / "out" / "answers.jsonl", d / "images")
        rid = LAST_QUESTION if command == "predict" else "SYN00000000_F6"
        check = no_out_written if command == "train" else no_passwd
        check = refused_escape(check) if kind in ESCAPES else check
        if command == "validate":
            cases.append(Case(command, kind, build, names=(rid,), guard=(), codes=(1,), where="stdout", check=check,
                              memory=kind.startswith("PNG")))
        else:
            cases.append(Case(command, kind, build, names=(rid,), guard=("out",) if command == "predict" else (),
                              check=check, model=True, memory=kind.startswith("PNG"), append_only=True))
    return cases


def no_out_written(d, proc):
    if PASSWD_MARK in proc.stdout + proc.stderr: return "silent", "echoed the contents of /etc/passwd"
    if proc.returncode and (d / "out").exists() and any((d / "out").iterdir()):
        return "clobbered", "a failed run left files in --out"


def huge_pngs(command: str, n: int, width=12_000, height=11_000) -> Case:
    "Real, decodable PNGs of `width` x `height` (a few hundred KB each): the pixel limit must refuse them."
    def build(d, fx):
        shutil.copytree(fx.images, d / "images")
        recs = json.loads(json.dumps(fx.vqa if command == "predict" else fx.align_recs))
        big = fx.once("bigpng", lambda g: png_black(g / "big.png", width, height)) / "big.png"
        for i in range(n):
            k = len(recs) - 1 - i if command == "predict" else i
            shutil.copy(big, d / "images" / f"big{i}.png"); recs[k]["image"] = f"big{i}.png"
        (d / "data.json").write_text(json.dumps(recs))
        if command == "validate": return ["validate", d / "data.json", "--images", d / "images", "--workers", "2"]
        earlier("predict", good_predict)(d, fx)
        return predict_argv(fx, d / "data.json", d / "out" / "answers.jsonl", d / "images")
    rid = LAST_QUESTION if command == "predict" else "SYN00000000_F6"
    name = f"{n} PNGs of {width}x{height}"
    if command == "validate":
        return Case(command, name, build, names=(rid,), guard=(), codes=(1,), where="stdout", memory=True)
    return Case(command, name, build, names=(rid,), model=True, memory=True, append_only=True)


# ----- per command
def validate_cases() -> list:
    def argv(d, fx, path): return ["validate", path]
    cases = file_cases("validate", "data.jsonl", lambda fx: fx.align_recs, argv, guard=(),
                       missing_key=lambda r: {k: v for k, v in r.items() if k != "conversations"},
                       huge=lambda r: {**r, "conversations": [r["conversations"][0],
                                                               {"from": "gpt", "value": "x " * 10_000_000}]})
    for c in cases:  # validate reports a bad file or record (exit 1) or gives the error line (exit 2)
        if c.name != "does not exist": c.codes, c.where = (1, 2), "stdout+stderr"
        if c.name == "missing keys": c.names = ("SYN00000000_F6",)
    return cases + image_cases("validate") + [huge_pngs("validate", 4)]


def align_cases() -> list:
    def argv(d, fx, path): return ["align", "--captions", path, "--out", d / "out" / "align.json", "--quiet"]
    setup = earlier("align", good_align)
    cases = file_cases("align", "pairs.jsonl", lambda fx: fx.pairs, argv, setup=setup,
                       missing_key=lambda r: {k: v for k, v in r.items() if k not in ("fig_caption", "caption")},
                       huge=lambda r: {**r, "fig_caption": "word " * 5_000_000})

    def empty_result(d, fx):
        setup(d, fx)
        write_jsonl(d / "pairs.jsonl", [{**p, "fig_caption": " "} for p in fx.pairs])
        return argv(d, fx, d / "pairs.jsonl")

    def out_is_input(d, fx):
        write_jsonl(d / "pairs.jsonl", fx.pairs)
        return ["align", "--captions", d / "pairs.jsonl", "--out", d / "pairs.jsonl", "--quiet"]
    return cases + [Case("align", "empty result over good output", empty_result, names=("pairs.jsonl",), codes=(1, 2),
                         where="stdout+stderr"),
                    Case("align", "--out equal to --captions", out_is_input, names=("pairs.jsonl",),
                         guard=("pairs.jsonl",))]


INSTRUCT_OUT = ("out/instruct.jsonl", "out/instruct.raw.jsonl")  # the records and the raw replies


def instruct_cases() -> list:
    def argv(d, fx, path):
        return ["instruct", "--captions", path, "--out", d / "out" / "instruct.jsonl", "--teacher", "template",
                "--quiet"]
    setup = earlier("instruct", good_instruct)
    cases = file_cases("instruct", "pairs.jsonl", lambda fx: fx.pairs, argv, setup=setup, guard=INSTRUCT_OUT,
                       missing_key=lambda r: {k: v for k, v in r.items() if k not in ("fig_caption", "caption")},
                       huge=lambda r: {**r, "pair_id": "HUGE_F1", "fig_caption": "word " * 5_000_000})

    def limit_rerun(d, fx):
        setup(d, fx)
        write_jsonl(d / "pairs.jsonl", fx.pairs)
        return argv(d, fx, d / "pairs.jsonl") + ["--limit", "3"]

    def all_failed(d, fx):
        setup(d, fx)
        write_jsonl(d / "pairs.jsonl", [{**p, "pair_id": "NEW" + p["pair_id"]} for p in fx.pairs])
        url = fx.once("srv500", lambda g: (g / "url").write_text(fx.server(fault_rate=1.0, faults=["500"])))
        return ["instruct", "--captions", d / "pairs.jsonl", "--out", d / "out" / "instruct.jsonl",
                "--teacher", "openai", "--base-url", (url / "url").read_text(), "--model", "m",
                "--max-attempts", "1", "--backoff", "0", "--quiet"]

    def out_is_input(d, fx):
        write_jsonl(d / "pairs.jsonl", fx.pairs)
        return ["instruct", "--captions", d / "pairs.jsonl", "--out", d / "pairs.jsonl", "--teacher", "template",
                "--quiet"]
    return cases + [
        Case("instruct", "--limit 3 rerun over 8 done", limit_rerun, codes=(0,), guard=INSTRUCT_OUT),
        Case("instruct", "every request failed", all_failed, names=(), codes=(1, 2), guard=("out/instruct.jsonl",),
             where="stdout+stderr", env={"OPENAI_API_KEY": "sk-test-0000000000"}),
        Case("instruct", "--out equal to --captions", out_is_input, names=("pairs.jsonl",), guard=("pairs.jsonl",))]


def train_cases() -> list:
    def argv(d, fx, path): return train_argv(fx, path, d / "out")
    cases = file_cases("train", "data.jsonl", lambda fx: fx.align_recs, argv, guard=(), model=True,
                       missing_key=lambda r: {k: v for k, v in r.items() if k != "conversations"},
                       huge=lambda r: {**r, "conversations": [r["conversations"][0],
                                                              {"from": "gpt", "value": "x " * 10_000_000}]})
    for c in cases: c.check = no_out_written
    setup = earlier("train", good_train)

    def finished(d, fx):
        setup(d, fx); (d / "align.json").write_text(json.dumps(fx.align_recs))
        return train_argv(fx, d / "align.json", d / "out")

    def resume_bad_image(d, fx):
        setup(d, fx); shutil.copytree(fx.images, d / "images")
        recs = json.loads(json.dumps(fx.align_recs)); recs[0]["image"] = "not_there.jpg"
        (d / "data.json").write_text(json.dumps(recs))
        return train_argv(fx, d / "data.json", d / "out", d / "images") + ["--resume"]
    return cases + image_cases("train") + [
        Case("train", "finished run in --out, no --overwrite", finished, names=("out",), model=True),
        Case("train", "--resume over a run, missing image", resume_bad_image, names=("SYN00000000_F6",), model=True)]


def predict_cases() -> list:
    setup = earlier("predict", good_predict)
    def argv(d, fx, path): return predict_argv(fx, path, d / "out" / "answers.jsonl")
    cases = file_cases("predict", "data.jsonl", lambda fx: fx.vqa, argv, setup=setup, model=True,
                       missing_key=lambda r: {k: v for k, v in r.items() if k != "conversations"},
                       huge=lambda r: {**r, "conversations": [
                           {"from": "human", "value": "<image>\n" + "why " * 12_500_000}, r["conversations"][1]]})
    for c in cases:
        c.append_only = True
        if c.name == "huge line": c.name, c.memory, c.names = "50 MB question", True, ("SYN90000000_F1_q0",)

    def model_missing(d, fx):
        (d / "vqa.json").write_text(json.dumps(fx.vqa))
        return predict_argv(fx, d / "vqa.json", d / "out" / "answers.jsonl", model="/nope/model")

    def out_is_data(d, fx):
        (d / "vqa.json").write_text(json.dumps(fx.vqa))
        return predict_argv(fx, d / "vqa.json", d / "vqa.json")

    def torn(d, fx):
        setup(d, fx); (d / "vqa.json").write_text(json.dumps(fx.vqa))
        p = d / "out" / "answers.jsonl"; raw = p.read_bytes(); p.write_bytes(raw[: len(raw) - 40])
        (d / "first_line").write_bytes(raw.split(b"\n")[0])
        return predict_argv(fx, d / "vqa.json", p) + ["--limit", "3"]

    def torn_check(d, proc):
        p = d / "out" / "answers.jsonl"
        try: rows = [json.loads(l) for l in p.read_text().splitlines()]
        except ValueError as e: return "clobbered", f"the resumed answers file has a corrupt line: {str(e)[:60]}"
        if p.read_bytes().split(b"\n")[0] != (d / "first_line").read_bytes():
            return "clobbered", "the first answer changed"
        if proc.returncode == 0: return "ok", f"{len(rows)} answers, every line parses"
    return cases + image_cases("predict") + [huge_pngs("predict", 1)] + [
        Case("predict", "--model does not exist", model_missing, names=("/nope/model", ("does not exist", "no such")),
             guard=(),
             model=True),
        Case("predict", "--out equal to --data", out_is_data, names=("vqa.json",), guard=("vqa.json",), model=True),
        Case("predict", "torn last answer, resume", torn, guard=(), codes=(0,), check=torn_check, model=True)]


def score_cases() -> list:
    setup = earlier("score", good_score)
    def gt(d, fx): (d / "gt.json").write_text(json.dumps(fx.vqa))
    def argv(d, fx, path):
        gt(d, fx); return ["score", "--pred", path, "--gt", d / "gt.json", "--out", d / "out" / "score.json"]
    cases = file_cases("score", "pred.jsonl", gold_answers, argv, setup=setup,
                       missing_key=lambda r: {"answer": r["text"]},
                       huge=lambda r: {**r, "text": "yes " * 5_000_000})

    def empty_pred(d, fx):
        setup(d, fx); (d / "pred.jsonl").write_bytes(b"")
        return argv(d, fx, d / "pred.jsonl")

    def bad_gt(d, fx):
        setup(d, fx); write_jsonl(d / "pred.jsonl", gold_answers(fx)); (d / "gt.json").write_text('{"not": "a list"}')
        return ["score", "--pred", d / "pred.jsonl", "--gt", d / "gt.json", "--out", d / "out" / "score.json"]

    def gt_no_answers(d, fx):
        setup(d, fx); write_jsonl(d / "pred.jsonl", gold_answers(fx))
        (d / "gt.json").write_text(json.dumps([{**q, "conversations": q["conversations"][:1]} for q in fx.vqa]))
        return ["score", "--pred", d / "pred.jsonl", "--gt", d / "gt.json", "--out", d / "out" / "score.json"]
    for c in cases:
        if c.name == "empty file": c.name = "empty predictions over good score.json"
    return [c for c in cases] + [
        Case("score", "--gt wrong top-level type", bad_gt, names=("gt.json",)),
        Case("score", "--gt without reference answers", gt_no_answers, names=("gt.json",))]


def judge_cases() -> list:
    setup = earlier("judge", good_judge)
    def argv(d, fx, path):
        write_jsonl(d / "questions.jsonl", fx.bench)
        return ["judge", "--questions", d / "questions.jsonl", "--answers", path, "--out",
                d / "out" / "reviews.jsonl", "--judge", "overlap", "--quiet"]
    cases = file_cases("judge", "answers.jsonl", bench_answers, argv, setup=setup,
                       missing_key=lambda r: {"answer": r["text"]},
                       huge=lambda r: {**r, "text": "lung " * 5_000_000})
    for c in cases:
        if c.name == "empty file": c.name = "empty answers over good reviews"

    def bad_questions(d, fx):
        setup(d, fx); write_jsonl(d / "answers.jsonl", bench_answers(fx))
        write_jsonl(d / "questions.jsonl", [{k: v for k, v in q.items() if k != "gpt4_answer"} for q in fx.bench])
        return ["judge", "--questions", d / "questions.jsonl", "--answers", d / "answers.jsonl", "--out",
                d / "out" / "reviews.jsonl", "--judge", "overlap", "--quiet"]

    def openai(d, fx, url, cache="out"):
        write_jsonl(d / "questions.jsonl", fx.bench[:2]); write_jsonl(d / "answers.jsonl", bench_answers(fx)[:2])
        return ["judge", "--questions", d / "questions.jsonl", "--answers", d / "answers.jsonl", "--out",
                d / cache / "reviews.jsonl", "--judge", "openai", "--model", "m", "--base-url", url,
                "--max-attempts", "1", "--backoff", "0", "--quiet"]

    def url_credentials(d, fx):
        url = fx.once("srvok", lambda g: (g / "url").write_text(fx.server(reply_text="8 7\nBoth fine.")))
        url = (url / "url").read_text()
        return openai(d, fx, url.replace("http://", f"http://user:{SECRET}@"), cache="new")

    def short_key_401(d, fx):
        url = (fx.once("srv401", lambda g: (g / "url").write_text(fx.server(fault_rate=1.0, faults=["401"]))) / "url")
        return openai(d, fx, url.read_text(), cache="new")

    def leak(secret):
        def check(d, proc):
            files = [p for p in d.rglob("*") if p.is_file() and not p.is_symlink()]
            hits = [p.name for p in files if secret.encode() in p.read_bytes()]
            if secret in proc.stdout + proc.stderr or hits:
                return "silent", f"the credential is echoed ({'stdout/stderr' if not hits else ', '.join(hits)})"
            if proc.returncode == 0: return "ok", "no credential in any output"
        return check
    return cases + [
        Case("judge", "questions without gpt4_answer", bad_questions, names=("questions.jsonl",)),
        Case("judge", "credentials in --base-url", url_credentials, guard=(), codes=(0,), check=leak(SECRET),
             env={"OPENAI_API_KEY": "sk-test-0000000000"}),
        Case("judge", "5-character key, 401", short_key_401, guard=(), codes=(1, 2), check=leak(SHORT_KEY),
             where="stdout+stderr",
             env={"OPENAI_API_KEY": SHORT_KEY})]


def same_as_pristine(d: Path) -> bool:
    "Whether d/out holds exactly the files of d/pristine (the earlier output, copied before the run)."
    old = {k.replace("/pristine/", "/out/"): v for k, v in snapshot([d / "pristine"]).items()}
    return snapshot([d / "out"]) == old


def vqa_cases() -> list:
    setup = earlier("vqa", good_vqa)
    def argv(d, fx, path): return ["vqa-convert", "--dataset", "vqa-rad", "--src", path, "--out", d / "out"]
    cases = file_cases("vqa-convert", "rad.json", lambda fx: rad_rows(), argv, jsonl=False, setup=setup,
                       missing_key=lambda r: {k: v for k, v in r.items() if k != "question"},
                       huge=lambda r: {**r, "question": "why " * 5_000_000})
    for c in cases:
        if c.name in ("one bad line", "non-UTF-8"): c.names = ("rad.json",)  # a JSON array: no lines to name

    def image_path(bad):
        def build(d, fx):
            setup(d, fx); shutil.copytree(d / "out", d / "pristine"); rows = rad_rows(); rows[0]["image_name"] = bad
            (d / "rad.json").write_text(json.dumps(rows)); return argv(d, fx, d / "rad.json")
        def check(d, proc):
            if proc.returncode and not same_as_pristine(d):
                return "clobbered", "a failed run changed the earlier output"
            if proc.returncode == 0:
                passed = [p.name for p in (d / "out").glob("*.json") if bad in p.read_text()]
                return ("silent", f"{bad} passed through into {', '.join(passed)}") if passed else \
                    ("ok", "the record was refused") if "vqa-rad_0" in proc.stdout + proc.stderr else \
                    ("unclear", "dropped without naming the record")
        return build, check

    def stale(d, fx):
        setup(d, fx); shutil.copytree(d / "out", d / "pristine")
        (d / "rad.json").write_text(json.dumps([rad(i) for i in range(12)]))
        return argv(d, fx, d / "rad.json")

    def stale_check(d, proc):
        "A new set without a test split: refused with the earlier set intact, or written without the stale test.json."
        old = d / "pristine" / "test.json"
        if proc.returncode == 0:
            if (d / "out" / "test.json").exists() and (d / "out" / "test.json").read_bytes() == old.read_bytes():
                return "clobbered", "the earlier test.json is left beside the new train.json"
            return "ok", "the splits were written as one set"
        if not same_as_pristine(d): return "clobbered", "a failed run changed the earlier output"
    return cases + [Case("vqa-convert", f"image {bad}", image_path(bad)[0], names=("vqa-rad_0",),
                         guard=(), check=image_path(bad)[1]) for bad in ("/etc/passwd", "../../outside.jpg")] + [
        Case("vqa-convert", "no test split over earlier set", stale, names=("rad.json",), guard=(), codes=(0, 2),
             check=stale_check)]


# ----- pmc-pairs: the package list, the packages (served from a file:// mirror), the output folder
def pmc_tar(members: dict, symlinks: dict | None = None) -> bytes:
    from tar_server import make_tar
    return make_tar(members, symlinks=symlinks)


def pmc_article(pmcid: str, pmid: str, href: str = "g1", caption: str = "<p>Axial CT of the chest.</p>") -> bytes:
    from tar_server import jats_article
    fig = {"id": "F1", "label": "Figure 1", "caption": caption, "href": href}
    return jats_article(pmid, pmcid, [fig], ["The CT (Figure 1) shows a mass."])


def pmc_package_path(pmcid: str) -> str: return f"oa_package/{pmcid[-2:]}/{pmcid[-4:-2]}/{pmcid}.tar.gz"


def pmc_mirror(d: Path, packages: dict[str, bytes]) -> str:
    "Write {pmcid: .tar.gz bytes} below d/mirror as the list's paths name them; the mirror's file:// URL."
    for pmcid, data in packages.items():
        p = d / "mirror" / pmc_package_path(pmcid); p.parent.mkdir(parents=True, exist_ok=True); p.write_bytes(data)
    return (d / "mirror").as_uri()


def pmc_good_packages(n: int = 6, first: int = 5000) -> dict[str, bytes]:
    from tar_server import image_bytes
    jpg = image_bytes(fmt="JPEG")
    return {f"PMC{first + k}": pmc_tar({f"PMC{first + k}/a.nxml": pmc_article(f"PMC{first + k}", str(first + k)),
                                        f"PMC{first + k}/g1.jpg": jpg}) for k in range(n)}


def pmc_list(rows: list[dict]) -> str:
    from tar_server import oa_file_list
    return oa_file_list(rows)


def pmc_rows(packages: dict) -> list[dict]: return [{"pmcid": p, "pmid": p[3:]} for p in packages]


def pairs_argv(d: Path, file_list, mirror: str, *extra) -> list:
    return ["pmc-pairs", "--file-list", file_list, "--out", d / "out", "--mirror", mirror, "--workers", "2",
            "--retries", "0", "--quiet", *extra]


PAIRS_OUT = ("out/fig_captions.json", "out/manifest.jsonl", "out/images")  # a good earlier output


def good_pairs(d, fx):
    mirror = pmc_mirror(d, pmc_good_packages())
    (d / "oa.csv").write_text(pmc_list(pmc_rows(pmc_good_packages())))
    must(pairs_argv(d, d / "oa.csv", mirror))


def nothing_outside(d, proc):
    "A check that no file was written beside the case's inputs and its --out."
    strays = [p.name for p in d.rglob("*") if p.is_file() and not p.is_relative_to(d / "out")
              and not p.is_relative_to(d / "mirror") and p.suffix not in (".csv", ".txt")]
    if strays: return "clobbered", "wrote outside --out: " + ", ".join(strays[:3])


def pmc_pairs_cases() -> list:
    setup = earlier("pmc_pairs", good_pairs)
    packages = pmc_good_packages()

    def list_case(make_list: Callable[[str], bytes]):
        "A case whose package list is `make_list(good list text)`, over an earlier good output."
        def build(d, fx):
            setup(d, fx); mirror = pmc_mirror(d, packages)
            (d / "oa.csv").write_bytes(make_list(pmc_list(pmc_rows(packages))))
            return pairs_argv(d, d / "oa.csv", mirror, "--max-bad", "0")
        return build

    def line(text: str, i: int, change: Callable[[str], str]) -> bytes:
        lines = text.splitlines(keepends=True); lines[i] = change(lines[i]); return "".join(lines).encode()

    def package_case(make: Callable[[Path], dict], extra=()):
        "A case whose one article's package is `make(d)` ({pmcid: tar bytes}); nothing may land outside --out."
        def build(d, fx):
            pkgs = make(d); mirror = pmc_mirror(d, pkgs)
            (d / "oa.csv").write_text(pmc_list(pmc_rows(pkgs)))
            return pairs_argv(d, d / "oa.csv", mirror, *extra)
        return build

    def escaping_members(d):
        from tar_server import image_bytes
        art = pmc_article("PMC7001", "7001", href="../../../escaped")
        return {"PMC7001": pmc_tar({"PMC7001/a.nxml": art, "../../escaped.jpg": image_bytes(fmt="JPEG"),
                                    str(d / "absolute.jpg"): image_bytes(fmt="JPEG")},
                                   symlinks={"PMC7001/g1.jpg": "/etc/passwd"})}

    laughs = ('<?xml version="1.0"?><!DOCTYPE article [<!ENTITY a "lol"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">'
              '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]><article><front/><body><p>&c;</p></body></article>').encode()
    external = ('<?xml version="1.0"?><!DOCTYPE article [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                '<article><front/><body><p>&x;</p></body></article>').encode()

    def xml_package(xml: bytes):
        return lambda d: {"PMC7002": pmc_tar({"PMC7002/a.nxml": xml})}

    def skipped(reason: str):
        "A check that the run counted the package under `reason` and exited 1 (no pair), echoing no file."
        def check(d, proc):
            if PASSWD_MARK in proc.stdout + proc.stderr: return "silent", "echoed the contents of /etc/passwd"
            if found := nothing_outside(d, proc): return found
            if proc.returncode == 1 and reason in proc.stdout: return "clear", ""
            return "unclear", f"exit {proc.returncode}; no '{reason}' in the summary"
        return check

    def all_missing(d, fx):
        setup(d, fx)
        (d / "oa.csv").write_text(pmc_list([{"pmcid": "PMC9901", "pmid": "9901"}]))
        return pairs_argv(d, d / "oa.csv", (d / "empty_mirror").as_uri())

    def out_is_list(d, fx):
        (d / "oa.csv").write_text(pmc_list(pmc_rows(packages)))
        return ["pmc-pairs", "--file-list", d / "oa.csv", "--out", d / "oa.csv", "--quiet"]

    def pmids_latin(d, fx):
        (d / "oa.csv").write_text(pmc_list(pmc_rows(packages))); (d / "pmids.txt").write_bytes(b"5000\n\xff5001\n")
        return pairs_argv(d, d / "oa.csv", pmc_mirror(d, packages), "--pmids", d / "pmids.txt")

    def shard(text):
        def build(d, fx):
            (d / "oa.csv").write_text(pmc_list(pmc_rows(packages)))
            return pairs_argv(d, d / "oa.csv", pmc_mirror(d, packages), f"--shard={text}")
        return build

    def killed_then_rerun(d, fx):
        "A run SIGKILLed after its first package, then the rerun measured here (its output: as an uninterrupted run)."
        import signal
        many = pmc_good_packages(40, 6000); mirror = pmc_mirror(d, many)
        (d / "oa.csv").write_text(pmc_list(pmc_rows(many)))
        argv = pairs_argv(d, d / "oa.csv", mirror)
        argv[argv.index("--workers") + 1] = "1"
        proc = subprocess.Popen([str(EXE), *map(str, argv)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.monotonic()
        while time.monotonic() - t < 60 and proc.poll() is None:
            if (d / "out" / "articles.jsonl").exists() and (d / "out" / "articles.jsonl").stat().st_size: break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL); proc.wait()
        whole = pairs_argv(d, d / "oa.csv", mirror); whole[whole.index("--out") + 1] = d / "whole"
        must(whole)
        return argv

    def same_as_whole(d, proc):
        if proc.returncode: return None
        a, b = (json.loads((d / o / "fig_captions.json").read_text()) for o in ("out", "whole"))
        files = lambda o: sorted(p.name for p in (d / o / "images").iterdir())
        return ("ok", "the same pairs as an uninterrupted run") if a == b and files("out") == files("whole") else \
            ("clobbered", "the resumed output differs from an uninterrupted run")

    return [
        Case("pmc-pairs", "empty list", list_case(lambda t: b""), names=("oa.csv",), guard=PAIRS_OUT),
        Case("pmc-pairs", "header only", list_case(lambda t: t.splitlines(keepends=True)[0].encode()),
             names=("oa.csv",), guard=PAIRS_OUT),
        Case("pmc-pairs", "truncated list", list_case(lambda t: t[: len(t) // 2].encode()), names=("oa.csv", "line"),
             guard=PAIRS_OUT),
        Case("pmc-pairs", "non-UTF-8 row", list_case(lambda t: t.encode().replace(b"J Test", b"J \xffT", 1)),
             names=("oa.csv", "line 2"), guard=PAIRS_OUT),
        Case("pmc-pairs", "huge field", list_case(lambda t: line(t, 3, lambda s: s.replace("J Test", "J" + "x" * 300_000))),
             names=("oa.csv", "line 4"), guard=PAIRS_OUT),
        Case("pmc-pairs", "path escapes in list", list_case(
            lambda t: line(t, 1, lambda s: s.replace("oa_package/00/50/PMC5000.tar.gz", "../../../etc/x.tar.gz"))),
             names=("oa.csv", "line 2"), guard=PAIRS_OUT),
        Case("pmc-pairs", "duplicate ids", list_case(lambda t: (t + "".join(t.splitlines(keepends=True)[1:3])).encode()),
             names=("oa.csv", "repeated article"), guard=PAIRS_OUT),
        Case("pmc-pairs", "wrong columns", list_case(lambda t: b"pmcid,url\nPMC1,x\n"), names=("oa.csv",),
             guard=PAIRS_OUT),
        Case("pmc-pairs", "--shard 4/4", shard("4/4"), names=("4/4",), guard=("out",)),
        Case("pmc-pairs", "--shard 1/0", shard("1/0"), names=("1/0",), guard=("out",)),
        Case("pmc-pairs", "--out equal to --file-list", out_is_list, names=("oa.csv",), guard=("oa.csv",)),
        Case("pmc-pairs", "--pmids not UTF-8", pmids_latin, names=("pmids.txt", "line 2"), guard=("out",)),
        Case("pmc-pairs", "every package missing over earlier output", all_missing, codes=(1,), where="stdout",
             names=("not_found",), guard=PAIRS_OUT),
        Case("pmc-pairs", "tar members escaping, symlink", package_case(escaping_members), codes=(1,), where="stdout",
             guard=(), check=skipped("graphic member refused")),
        Case("pmc-pairs", "billion laughs XML", package_case(xml_package(laughs)), codes=(1,), where="stdout",
             guard=(), check=skipped("XML declares entities")),
        Case("pmc-pairs", "external entity XML", package_case(xml_package(external)), codes=(1,), where="stdout",
             guard=(), check=skipped("XML declares entities")),
        Case("pmc-pairs", "SIGKILL then rerun", killed_then_rerun, codes=(0,), guard=(), check=same_as_whole),
    ]


# ----- vqa-convert: the hub layouts (parquet with image bytes, SLAKE json + imgs.zip, PMC-VQA csv, OmniMedVQA json)
def hub_image(seed: int = 0) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO(); Image.new("RGB", (16, 16), (seed * 40 % 256, 90, 30)).save(buf, "JPEG"); return buf.getvalue()


def hub_parquet(path: Path, rows: list[dict], image_type=None, columns=("image", "question", "answer")):
    import pyarrow as pa, pyarrow.parquet as pq
    image_type = image_type or pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    types = {"image": image_type, "question": pa.string(), "answer": pa.string()}
    schema = pa.schema([(c, types.get(c, pa.string())) for c in columns])
    path.parent.mkdir(parents=True, exist_ok=True); pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def hub_rows(n: int, **change) -> list[dict]:
    return [{"image": {"bytes": hub_image(i % 3), "path": None}, "question": f"is there a mass {i}?",
             "answer": "yes" if i % 2 else "no", **change} for i in range(n)]


def slake_rows(n: int, first: int = 0, img: str = "xmlab0/source.jpg") -> list[dict]:
    return [{"qid": first + i, "img_name": img, "question": "Is this a CT?", "answer": "Yes", "q_lang": "en",
             "answer_type": "CLOSED", "content_type": "Modality"} for i in range(n)]


def zip_file(path: Path, members: dict, links: dict | None = None):
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items(): z.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name); info.external_attr = 0o120777 << 16; z.writestr(info, target)


def slake_src(d: Path, test: list | dict | None = None, zip_members: dict | None = None, links=None) -> Path:
    src = d / "SLAKE"; src.mkdir()
    for name, rows in (("train.json", slake_rows(20)), ("validation.json", slake_rows(10, 100)),
                       ("test.json", slake_rows(10, 200) if test is None else test)):
        (src / name).write_text(json.dumps(rows))
    zip_file(src / "imgs.zip", {"imgs/xmlab0/source.jpg": hub_image()} if zip_members is None else zip_members, links)
    return src


PMC_VQA_HEADER = ["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
                  "Answer", "split"]


def pmc_vqa_row(i: int, figure: str | None = None, answer: str = "B", choices=("CT", "MRI", "PET", "X-ray")) -> list:
    return [i, figure or f"PMC{i}_F1.jpg", "a caption", f"Which modality {i}?",
            *[f"{l}:{c}" if c else "" for l, c in zip("ABCD", choices)], answer, "test"]


def pmc_vqa_src(d: Path, rows: list, header=PMC_VQA_HEADER) -> Path:
    import csv
    src = d / "PMC-VQA"; (src / "figures").mkdir(parents=True)
    for i in range(60): (src / "figures" / f"PMC{i}_F1.jpg").write_bytes(hub_image(i))
    with open(src / "test_2.csv", "w", newline="") as f: w = csv.writer(f); w.writerow(header); w.writerows(rows)
    return src


def omni_src(d: Path, rows: list) -> Path:
    qa = d / "Omni" / "QA_information" / "Open-access"; qa.mkdir(parents=True)
    (qa / "Set.json").write_text(json.dumps(rows))
    return d / "Omni"


def omni_rows(n: int, **change) -> list[dict]:
    return [{"question_id": f"q{i}", "image_path": "Images/Set/a.png", "question": "Which organ?", "option_A": "liver",
             "option_B": "lung", "gt_answer": "lung", "modality_type": "CT", "dataset": "Set", **change}
            for i in range(n)]


def vqa_hub_cases() -> list:
    setup = earlier("vqa", good_vqa)  # an earlier good conversion in out/

    def convert(dataset: str, make_src: Callable[[Path], Path], *extra):
        "A case converting `make_src(d)` as `dataset` over the earlier good output."
        def build(d, fx):
            setup(d, fx)
            return ["vqa-convert", "--dataset", dataset, "--src", make_src(d), "--out", d / "out", *extra]
        return build

    def parquet(rows, **kw):
        def make(d): hub_parquet(d / "rad" / "test-00000-of-00001.parquet", rows, **kw); return d / "rad"
        return make

    def truncated(d):
        parquet(hub_rows(10))(d); p = d / "rad" / "test-00000-of-00001.parquet"; p.write_bytes(p.read_bytes()[:300])
        return d / "rad"

    def path_column():
        import pyarrow as pa
        return parquet([{**r, "image": f"../../synpic{i}.jpg"} for i, r in enumerate(hub_rows(10))], image_type=pa.string())

    def wrong_columns():
        return parquet([{"img": "a.jpg", "q": "is it?"}], columns=("img", "q"))

    rows = hub_rows(20); rows[3] = {**rows[3], "image": {"bytes": b"GIF89a" + bytes(20), "path": None}}
    struct_paths = hub_rows(20); struct_paths[5] = {**struct_paths[5], "image": {"bytes": None, "path": "/etc/passwd"}}
    escape = slake_rows(10, 200); escape[0]["img_name"] = "../../../../etc/passwd"
    bomb = {"imgs/xmlab0/source.jpg": bytes(120 * 2**20)}  # 120 MB of zeros: over the member limit, 1000x ratio
    pmc_escape = [pmc_vqa_row(0, "/etc/passwd"), pmc_vqa_row(1, "../../x.jpg")] + [pmc_vqa_row(i) for i in range(2, 40)]
    pmc_letter = [pmc_vqa_row(i, answer="F") for i in range(5)]
    pmc_one = [pmc_vqa_row(i, choices=("CT", "", "", "")) for i in range(5)]
    misspelt = [h.replace("Figure_path", "Figure_pth") for h in PMC_VQA_HEADER]
    omni_escape = omni_rows(10); omni_escape[0]["image_path"] = "/etc/passwd"
    omni_types = omni_rows(10); omni_types[2]["option_A"] = {"text": "liver"}

    def out_is_src(d, fx):
        src = slake_src(d)
        return ["vqa-convert", "--dataset", "slake", "--src", src, "--out", src]

    def out_is_file(d, fx):
        src = slake_src(d); (d / "out.json").write_text("{}")
        return ["vqa-convert", "--dataset", "slake", "--src", src, "--out", d / "out.json"]

    return [
        Case("vqa-convert", "parquet without the hub columns", convert("vqa-rad", wrong_columns()),
             names=("test-00000-of-00001.parquet",)),
        Case("vqa-convert", "parquet image column of paths", convert("vqa-rad", path_column()),
             names=("test-00000-of-00001.parquet", "paths")),
        Case("vqa-convert", "parquet image struct with a path only", convert("pathvqa", parquet(struct_paths)),
             names=("pathvqa_test_5", "row 6")),
        Case("vqa-convert", "parquet truncated", convert("vqa-rad", truncated), names=("test-00000-of-00001.parquet",)),
        Case("vqa-convert", "parquet fake image bytes", convert("vqa-rad", parquet(rows)),
             names=("vqa-rad_test_3", "row 4")),
        Case("vqa-convert", "SLAKE question of a list type", convert("slake", lambda d: slake_src(
            d, [{**r, "question": ["is", "it"]} for r in slake_rows(10, 200)])), names=("slake_200", "test.json")),
        Case("vqa-convert", "SLAKE img_name escapes", convert("slake", lambda d: slake_src(d, escape)),
             names=("slake_200", "test.json")),
        Case("vqa-convert", "SLAKE imgs.zip bomb", convert("slake", lambda d: slake_src(d, zip_members=bomb)),
             names=("slake_0", "image member refused"), memory=True),
        Case("vqa-convert", "SLAKE imgs.zip symlink member", convert("slake", lambda d: slake_src(
            d, zip_members={}, links={"imgs/xmlab0/source.jpg": "../../../../etc/passwd"})), names=("slake_",),
             check=no_passwd),
        Case("vqa-convert", "SLAKE test.json wrong top-level type", convert("slake", lambda d: slake_src(d, {"a": 1})),
             names=("test.json",)),
        Case("vqa-convert", "PMC-VQA misspelt header", convert("pmc-vqa", lambda d: pmc_vqa_src(
            d, [pmc_vqa_row(i) for i in range(5)], misspelt)), names=("test_2.csv", "Figure_pth")),
        Case("vqa-convert", "PMC-VQA Figure_path escapes", convert("pmc-vqa", lambda d: pmc_vqa_src(d, pmc_escape)),
             names=("pmc-vqa_test_0", "test_2.csv")),
        Case("vqa-convert", "PMC-VQA answer letter outside options", convert("pmc-vqa", lambda d: pmc_vqa_src(
            d, pmc_letter)), names=("pmc-vqa_test_0", "test_2.csv:line 2", "answer letter outside the options")),
        Case("vqa-convert", "PMC-VQA fewer than two options", convert("pmc-vqa", lambda d: pmc_vqa_src(d, pmc_one)),
             names=("pmc-vqa_test_0", "test_2.csv:line 2", "fewer than two options")),
        Case("vqa-convert", "OmniMedVQA absolute image_path", convert("omnimedvqa", lambda d: omni_src(d, omni_escape)),
             names=("omnimedvqa_q0",)),
        Case("vqa-convert", "OmniMedVQA option of a dict type", convert("omnimedvqa", lambda d: omni_src(d, omni_types)),
             names=("omnimedvqa_q2",)),
        Case("vqa-convert", "--out equal to SLAKE --src", out_is_src, names=("train.json",), guard=("SLAKE",)),
        Case("vqa-convert", "--out is a file", out_is_file, names=("out.json",), guard=("out.json",)),
    ]


# ----- predict: --protocol, choice questions, ranks of a data-parallel run
def predict_protocol_cases() -> list:
    setup = earlier("predict", good_predict)

    def with_choice(options):
        def build(d, fx):
            setup(d, fx); recs = json.loads(json.dumps(fx.vqa))
            recs[-1].update(answer_type="CHOICE", options=options)
            (d / "data.json").write_text(json.dumps(recs))
            return predict_argv(fx, d / "data.json", d / "out" / "answers.jsonl")
        return build

    def argv_with(*extra):
        def build(d, fx):
            setup(d, fx); (d / "data.json").write_text(json.dumps(fx.vqa))
            return predict_argv(fx, d / "data.json", d / "out" / "answers.jsonl") + list(extra)
        return build

    def out_folder(d, fx):
        setup(d, fx); (d / "data.json").write_text(json.dumps(fx.vqa))
        return predict_argv(fx, d / "data.json", d / "out")

    def other_settings_part(d, fx):
        (d / "data.json").write_text(json.dumps(fx.vqa))
        part = d / "out" / "answers.jsonl.parts" / "rank1-of-2.jsonl"; part.parent.mkdir(parents=True)
        md = {"decoding": {"do_sample": True, "max_new_tokens": 4, "seed": 0, "temperature": 0.7}, "model": "m",
              "image_ablation": "none", "prompt_suffix": None, "protocol": "llava-med"}
        part.write_text(json.dumps({"question_id": fx.vqa[1]["id"], "text": "no", "metadata": md}) + "\n")
        return predict_argv(fx, d / "data.json", d / "out" / "answers.jsonl")

    def ranks_killed(d, fx):
        "Rank 0 of 2 SIGKILLed after two answers (a torn line added), rank 1 killed at start; rank 1 reruns, then 0."
        import signal
        (d / "data.json").write_text(json.dumps(fx.vqa)); out = d / "out" / "answers.jsonl"; out.parent.mkdir()
        argv = [str(EXE), *map(str, predict_argv(fx, d / "data.json", out))]
        argv[argv.index("--batch-size") + 1] = "2"
        env = lambda rank: {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                            "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        part0 = out.parent / "answers.jsonl.parts" / "rank0-of-2.jsonl"
        proc = subprocess.Popen(argv, env=env(0), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t = time.monotonic()
        while time.monotonic() - t < 120 and proc.poll() is None:
            if part0.exists() and part0.read_bytes().count(b"\n") >= 2: break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL); proc.wait()
        with open(part0, "ab") as f: f.write(b'{"question_id": "torn", "te')
        proc = subprocess.Popen(argv, env=env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0); proc.send_signal(signal.SIGKILL); proc.wait()
        subprocess.run(argv, env=env(1), capture_output=True, check=True)
        single = [a if a != str(out) else str(d / "one.jsonl") for a in argv]
        subprocess.run(single, env={k: v for k, v in env(0).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
                       capture_output=True, check=True)
        return argv[1:]

    def merged_like_one(d, proc):
        if proc.returncode: return None
        out, one = d / "out" / "answers.jsonl", d / "one.jsonl"
        if not out.exists(): return "unclear", "the parts were not merged"
        if out.read_bytes() != one.read_bytes(): return "clobbered", "the merged answers differ from one process's"
        return "ok", "merged answers identical to one process's"

    ranks_case = Case("predict", "two ranks killed, then rerun", ranks_killed, codes=(0,), guard=(), model=True,
                      check=merged_like_one, env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    return [
        Case("predict", "--protocol unknown", argv_with("--protocol", "vqav2"), names=("vqav2",), model=True),
        Case("predict", "choice with one option", with_choice(["only"]), names=(LAST_QUESTION,), model=True),
        Case("predict", "choice with 27 options", with_choice([f"o{i}" for i in range(27)]), names=(LAST_QUESTION,),
             model=True),
        Case("predict", "choice option of a dict type", with_choice(["CT", {"text": "MRI"}]), names=(LAST_QUESTION,),
             model=True),
        Case("predict", "choice option of 5 MB", with_choice(["CT", "MRI " * 1_250_000]), names=(LAST_QUESTION,),
             model=True, memory=True),
        Case("predict", "--out is a folder", out_folder, names=("out",), model=True),
        Case("predict", "RANK outside WORLD_SIZE", argv_with(), names=("RANK=2",), model=True,
             env={"RANK": "2", "WORLD_SIZE": "2"}),
        Case("predict", "a rank's part made with other settings", other_settings_part, names=("other settings",),
             model=True, guard=("out",)),
        ranks_case,
    ]


COMMANDS = {"validate": validate_cases, "align": align_cases, "instruct": instruct_cases, "train": train_cases,
            "predict": lambda: predict_cases() + predict_protocol_cases(), "score": score_cases, "judge": judge_cases,
            "vqa-convert": lambda: vqa_cases() + vqa_hub_cases(), "pmc-pairs": pmc_pairs_cases}


def all_cases(commands=None, model=True) -> list:
    return [c for cmd, make in COMMANDS.items() if not commands or cmd in commands for c in make()
            if model or not c.model]


# ---------------------------------------------------------------- running and classifying
def snapshot(paths: list[Path]) -> dict:
    "Every file under `paths` with its bytes (a missing path is recorded as missing)."
    snap = {}
    for p in paths:
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file(): snap[str(f)] = f.read_bytes()
        else: snap[str(p)] = p.read_bytes() if p.exists() else None
    return snap


@dataclass
class Run:
    case: str
    command: str
    name: str
    rc: int
    cls: str
    first_line: str
    note: str = ""
    maxrss_mb: float = 0.0
    memory: bool = False
    seconds: float = 0.0


def run_child(argv: list, env: dict, timeout: float, mem_cap: int, cwd: Path):
    "Run llavamed; return (returncode, stdout, stderr, peak RSS in bytes, why it was killed or '')."
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(EXE), *map(str, argv)], stdout=out, stderr=err, env=env, cwd=cwd)
        killed, done = [""], threading.Event()

        def watch():
            start = time.monotonic()
            while not done.wait(0.1):
                try: rss = int(Path(f"/proc/{proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, ValueError, IndexError): rss = 0
                over = f"over the {mem_cap / 2**30:.0f} GB memory cap" if rss > mem_cap else \
                    f"over the {timeout:.0f} s limit" if time.monotonic() - start > timeout else ""
                if over: killed[0] = over; proc.kill(); return
        t = threading.Thread(target=watch, daemon=True); t.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set(); t.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0); err.seek(0)
        text = lambda f: f.read().decode("utf-8", "replace")
        return proc.returncode, text(out), text(err), usage.ru_maxrss * 1024, killed[0]


def error_lines(stderr: str) -> list[str]:
    "The lines of stderr that are not progress bars or library warnings."
    lines = [l.strip() for l in stderr.replace("\r", "\n").splitlines() if l.strip()]
    noise = ("Loading weights", "Writing model shards", "[WARNING]", "warnings.warn", "UserWarning", "it/s]", "s/it]")
    return [l for l in lines if not any(n in l for n in noise)]


def classify(case: Case, rc: int, stdout: str, stderr: str, changed: list[str], killed: str) -> tuple[str, str]:
    "(class, note) of one run against its case's target."
    if killed: return "killed", killed
    if changed: return "clobbered", "changed: " + ", ".join(changed)
    if "Traceback (most recent call last)" in stderr: return "traceback", ""
    if rc == 0 and 0 not in case.codes: return "silent", "exit 0 on bad input"
    if rc not in case.codes: return "unclear", f"exit {rc}, expected {' or '.join(map(str, case.codes))}"
    if rc == 0: return "ok", ""
    lines = error_lines(stderr)
    if case.where == "stderr" or rc == 2:
        prefix = f"llavamed {case.command}: error: "
        if not lines or not lines[-1].startswith(prefix): return "unclear", "no 'llavamed CMD: error:' line"
        if len(lines) > 1: return "unclear", f"{len(lines)} lines on stderr"
        text = lines[-1]
    else: text = stdout + stderr
    missing = [n if isinstance(n, str) else " or ".join(n) for n in case.names
               if not any(alt in text for alt in ((n,) if isinstance(n, str) else n))]
    return ("unclear", "does not name " + ", ".join(missing)) if missing else ("clear", "")


def run_case(case: Case, fx: Fixtures, folder: Path, timeout: float = 180, mem_cap: int = 6 * 2**30) -> Run:
    "Build the case in `folder`, run it, compare the earlier output and classify."
    t = time.monotonic()
    argv = case.build(folder, fx)
    guard = [folder / g for g in case.guard]
    before = snapshot(guard)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI")}
    env.update({"PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", **case.env})
    rc, stdout, stderr, maxrss, killed = run_child(argv, env, timeout, mem_cap, folder)
    after = snapshot(guard)
    kept = lambda old, new: old == new or (case.append_only and old is not None and new is not None
                                           and new.startswith(old))
    changed = sorted(str(Path(k).relative_to(folder)) for k in before.keys() | after.keys()
                     if not kept(before.get(k), after.get(k)))
    cls, note = classify(case, rc, stdout, stderr, changed, killed)
    if cls not in ("killed", "clobbered", "traceback") and case.check:
        proc = SimpleNamespace(returncode=rc, stdout=stdout, stderr=stderr)
        cls, note = case.check(folder, proc) or (cls, note)
    lines = error_lines(stderr)
    first = next((l for l in lines if l.startswith("llavamed ")), lines[-1] if lines else "")
    if case.where != "stderr" and rc == 1:
        out_lines = [l for l in stdout.splitlines() if l.strip()]
        first = next((l for l in out_lines if any(n in l for n in case.names)), out_lines[0] if out_lines else first)
    first = first.replace(str(folder) + "/", "").replace(str(folder), ".")
    return Run(case.id, case.command, case.name, rc, cls, first[:160], note, maxrss / 2**20, case.memory,
               time.monotonic() - t)


def run_all(cases: list, timeout=180, mem_cap=6 * 2**30, progress=True) -> list[Run]:
    with tempfile.TemporaryDirectory(prefix="bad_inputs_") as tmp:
        fx = Fixtures(Path(tmp) / "fixtures")
        try:
            runs = []
            for i, case in enumerate(cases):
                folder = Path(tmp) / f"case{i:03d}"; folder.mkdir()
                try: r = run_case(case, fx, folder, timeout, mem_cap)
                except Exception as e:  # a case that cannot be built is a bench bug: report it, go on
                    r = Run(case.id, case.command, case.name, -1, "unclear", f"bench error: {e!r}"[:160])
                runs.append(r)
                if progress: print(f"[{i + 1}/{len(cases)}] {r.case}: {r.cls} ({r.seconds:.1f} s)", file=sys.stderr)
                shutil.rmtree(folder, ignore_errors=True)
            return runs
        finally: fx.close()


def table(runs: list[Run]) -> str:
    rows = [f"{'command':<12} {'case':<40} {'rc':>3} {'class':<10} first line of stderr / note"]
    for r in runs:
        mem = f" [peak {r.maxrss_mb:,.0f} MB]" if r.memory else ""
        rows.append(f"{r.command:<12} {r.name[:40]:<40} {r.rc:>3} {r.cls:<10} {r.first_line[:110]}"
                    + (f" -- {r.note}" if r.note else "") + mem)
    totals = collections.Counter(r.cls for r in runs)
    rows.append("")
    rows.append(f"{len(runs)} runs: " + ", ".join(f"{c} {totals[c]}" for c in CLASSES))
    per = collections.defaultdict(collections.Counter)
    for r in runs: per[r.command][r.cls] += 1
    for cmd, cnt in per.items(): rows.append(f"  {cmd:<12} " + ", ".join(f"{c} {cnt[c]}" for c in CLASSES if cnt[c]))
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=list(COMMANDS), help="commands to run (default: all)")
    ap.add_argument("--case", help="only the cases whose 'command:name' contains this")
    ap.add_argument("--no-model", action="store_true", help="skip the cases that need the tiny model")
    ap.add_argument("--json", help="also write the runs as JSON to this file")
    ap.add_argument("--timeout", type=float, default=180, help="seconds per run")
    ap.add_argument("--mem-cap-gb", type=float, default=6, help="kill a run whose resident memory passes this")
    a = ap.parse_args(argv)
    cases = [c for c in all_cases(a.only, model=not a.no_model) if not a.case or a.case in c.id]
    runs = run_all(cases, a.timeout, int(a.mem_cap_gb * 2**30))
    print(table(runs))
    if a.json:
        from dataclasses import asdict
        Path(a.json).write_text(json.dumps({"runs": [asdict(r) for r in runs],
                                            "totals": collections.Counter(r.cls for r in runs)}, indent=1))


if __name__ == "__main__":
    main()
