"Hostile input to `llavamed train` and `predict`: one-line errors naming the input, exit 2, earlier output kept."
import json, logging, os, struct, sys, zlib
from pathlib import Path
import pytest

pytest.importorskip("torch")
from PIL import Image
from llavamed.cli import main
from llavamed.core import IMAGE_TOKEN


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    "Run `llavamed ARGV` in this process: (exit code, stdout, stderr)."
    handlers = [h for h in logging.getLogger("llavamed").handlers if type(h) is logging.StreamHandler]
    for h in handlers: h.stream = sys.stderr  # the handler keeps the stderr it was made with: use this test's
    try: code = main([str(a) for a in argv])
    finally:
        for h in handlers: h.stream = sys.__stderr__  # not the closed capture of this test
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, cmd: str, *needles: str) -> None:
    "stderr's last line is `llavamed CMD: error: ...` naming every needle, and no traceback was printed."
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"llavamed {cmd}: error: "), err
    for n in needles: assert n in last, (n, last)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    "One PNG chunk: length, type, data, CRC."
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    "A small PNG file whose header claims `width` x `height` pixels (a decompression bomb's header)."
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def vqa_record(qid: str, image: str | None = "a.png", question: str = "Is there an effusion?") -> dict:
    "A LLaVA VQA record with one question and its answer."
    q = f"{question}\n{IMAGE_TOKEN}" if image else question
    rec = {"id": qid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "no"}]}
    return {**rec, "image": image} if image else rec


@pytest.fixture
def vqa(tmp_path):
    "A folder with images/a.png, a 2-question VQA file, and an earlier answers file (a good output to keep)."
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "images" / "a.png")
    (tmp_path / "vqa.json").write_text(json.dumps([vqa_record("q1"), vqa_record("q2")]))
    (tmp_path / "answers.jsonl").write_text('{"question_id": "q0", "text": "earlier"}\n')
    return tmp_path


def predict_args(d: Path, data="vqa.json", out="answers.jsonl", model="tiny", *more):
    "The `llavamed predict` command line over folder `d`."
    return ["predict", "--model", model, "--data", d / data, "--images", d / "images", "--out", d / out,
            "--max-new-tokens", 2, "--quiet", *more]


# ---------------------------------------------------------------- predict: item 1, image paths
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_predict_refuses_image_outside_images(vqa, capsys, kind):
    (vqa / "secret.png").write_bytes(b"secret bytes")
    name = {"absolute": str(vqa / "secret.png"), "dotdot": "../secret.png", "symlink": "link.png"}[kind]
    if kind == "symlink": os.symlink(vqa / "secret.png", vqa / "images" / "link.png")
    (vqa / "vqa.json").write_text(json.dumps([vqa_record("q1"), vqa_record("bad7", name)]))
    before = (vqa / "answers.jsonl").read_bytes()
    code, out, err = run_cli(capsys, *predict_args(vqa))
    assert code == 2
    one_line_error(err, "predict", "record bad7", "outside the images folder")
    assert "secret bytes" not in err + out
    assert (vqa / "answers.jsonl").read_bytes() == before


def test_predict_missing_image_names_the_question(vqa, capsys):
    (vqa / "vqa.json").write_text(json.dumps([vqa_record("q1"), vqa_record("q9", "gone.png")]))
    before = (vqa / "answers.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa))
    assert code == 2
    one_line_error(err, "predict", "question q9", "gone.png", "not found")
    assert (vqa / "answers.jsonl").read_bytes() == before


# ---------------------------------------------------------------- predict: item 4, out == data
@pytest.mark.parametrize("via_symlink", [False, True])
def test_predict_refuses_out_equal_to_data(vqa, capsys, via_symlink):
    out = "vqa.json"
    if via_symlink: os.symlink(vqa / "vqa.json", vqa / "answers_link.jsonl"); out = "answers_link.jsonl"
    before = (vqa / "vqa.json").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa, out=out))
    assert code == 2
    one_line_error(err, "predict", "is the data file", "vqa.json")
    assert (vqa / "vqa.json").read_bytes() == before


# ---------------------------------------------------------------- predict: a missing path says so
def test_predict_missing_model_says_it_does_not_exist(vqa, capsys):
    before = (vqa / "answers.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa, model="/nope"))
    assert code == 2
    one_line_error(err, "predict", "/nope", "no such directory")
    assert "Repo id" not in err and (vqa / "answers.jsonl").read_bytes() == before


def test_predict_missing_data_says_it_does_not_exist(vqa, capsys):
    code, _, err = run_cli(capsys, *predict_args(vqa, data="nope.json"))
    assert code == 2
    one_line_error(err, "predict", "nope.json", "no such file")


# ---------------------------------------------------------------- predict: item 3, bounded input
def test_predict_refuses_a_huge_question_before_loading(vqa, capsys):
    (vqa / "vqa.json").write_text(json.dumps([vqa_record("q1"), vqa_record("big3", question="x" * 200_001)]))
    before = (vqa / "answers.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa, model="/would/not/load"))
    assert code == 2  # stopped before the model (a missing one here) was even looked at
    one_line_error(err, "predict", "question big3", "max_question_chars 100,000")
    assert (vqa / "answers.jsonl").read_bytes() == before


def test_predict_bounds_prompt_tokens_before_generating(vqa, capsys):
    (vqa / "vqa.json").write_text(json.dumps([vqa_record("q1"), vqa_record("long5", question="word " * 300)]))
    before = (vqa / "answers.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa), "--max-prompt-tokens", 64)
    assert code == 2
    one_line_error(err, "predict", "question long5", "tokens > max_prompt_tokens 64")
    assert (vqa / "answers.jsonl").read_bytes() == before


# ---------------------------------------------------------------- predict: the bad-record policy
def _answered_file(path: Path, ids, model="tiny", max_new_tokens=2):
    "An answers file holding an answer (made with predict's default settings) for every id."
    md = {"decoding": {"do_sample": False, "max_new_tokens": max_new_tokens, "seed": 0},
          "image_ablation": "none", "prompt_suffix": None, "model": model}
    path.write_text("".join(json.dumps({"question_id": i, "text": "no", "metadata": md}) + "\n" for i in ids))


def test_predict_skips_and_counts_one_bad_line(vqa, capsys):
    lines = [json.dumps(vqa_record(f"q{i}")) for i in range(200)]
    lines.insert(30, '{"id": "torn", "conversations": [')
    lines.insert(40, b'{"id": "latin1 \xe9"}'.decode("latin-1"))
    (vqa / "vqa.jsonl").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    _answered_file(vqa / "answers.jsonl", [f"q{i}" for i in range(200)])
    code, out, err = run_cli(capsys, *predict_args(vqa, data="vqa.jsonl"))
    assert code == 0 and "Traceback" not in err
    assert "2 bad" in out and "line 31" in out, out


def test_predict_stops_when_too_many_records_are_bad(vqa, capsys):
    (vqa / "vqa.jsonl").write_text(json.dumps(vqa_record("q1")) + '\n[1, 2]\n"just a string"\n')
    before = (vqa / "answers.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa, data="vqa.jsonl"))
    assert code == 2
    one_line_error(err, "predict", "vqa.jsonl", "2 of 3 records are bad", "line 2")
    assert (vqa / "answers.jsonl").read_bytes() == before


@pytest.mark.parametrize("content", [b"", b"[]", b"{}", b"\n\n"])
def test_predict_refuses_empty_or_wrong_type_input(vqa, capsys, content):
    (vqa / "vqa.json").write_bytes(content)
    before = (vqa / "answers.jsonl").read_bytes()
    code, _, err = run_cli(capsys, *predict_args(vqa))
    assert code == 2
    one_line_error(err, "predict", "vqa.json")
    assert (vqa / "answers.jsonl").read_bytes() == before


def test_predict_names_the_question_of_an_undecodable_image(vqa, capsys):
    (vqa / "images" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (vqa / "vqa.json").write_text(json.dumps([vqa_record("bomb1", "bomb.png")]))
    code, _, err = run_cli(capsys, *predict_args(vqa, out="new.jsonl"))
    assert code == 2
    one_line_error(err, "predict", "question bomb1", "exceeds the limit")


# ---------------------------------------------------------------- predict: item 4, torn last line
def test_predict_repairs_a_torn_last_line_on_resume(vqa, capsys):
    _answered_file(vqa / "answers.jsonl", ["q1"])
    with open(vqa / "answers.jsonl", "ab") as f: f.write(b'{"question_id": "q2", "text": "ha')  # killed mid-write
    code, out, err = run_cli(capsys, *predict_args(vqa))
    assert code == 0 and "Traceback" not in err
    assert "torn last line" in out, out
    rows = [json.loads(line) for line in (vqa / "answers.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["q1", "q2"]


# ---------------------------------------------------------------- train
def make_train_data(d: Path, bad: dict[str, str] | None = None, n_good: int = 6) -> Path:
    "Records with good 32 px images, plus one record per `bad` id -> image name; returns the data file."
    (d / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n_good):
        Image.new("RGB", (32, 32), (40 * i % 255, 80, 80)).save(d / "images" / f"g{i}.png")
        recs.append({"id": f"g{i}", "image": f"g{i}.png", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nDescribe the figure."},
            {"from": "gpt", "value": "A grey square."}]})
    for rid, name in (bad or {}).items():
        recs.append({"id": rid, "image": name, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nWhat is it?"}, {"from": "gpt", "value": "Unknown."}]})
    (d / "train.json").write_text(json.dumps(recs))
    return d / "train.json"


@pytest.fixture
def earlier_run(tmp_path):
    "An output folder holding a finished run's files (their bytes must survive every failed run)."
    out = tmp_path / "run"
    out.mkdir()
    (out / "stage_config.json").write_text('{"name": "instruct", "earlier": true}\n')
    (out / "log_history.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    "Every file under `folder` with its bytes."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(d: Path, out: Path, *more, model="tiny"):
    "The `llavamed train` command line: one quiet optimiser step of the instruct stage."
    return ["train", "--stage", "instruct", "--model", model, "--data", d / "train.json", "--images", d / "images",
            "--out", out, "--max-steps", 1, "--global-batch-size", 2, "--per-device-batch-size", 2,
            "--num-workers", 0, "--quiet", *more]


def test_train_refuses_to_overwrite_an_earlier_run(tmp_path, earlier_run, capsys):
    make_train_data(tmp_path)
    before = snapshot(earlier_run)
    code, _, err = run_cli(capsys, *train_args(tmp_path, earlier_run))
    assert code == 2
    one_line_error(err, "train", str(earlier_run), "earlier run", "overwrite")
    assert snapshot(earlier_run) == before


def test_train_missing_model_says_it_does_not_exist(tmp_path, earlier_run, capsys):
    make_train_data(tmp_path)
    before = snapshot(earlier_run)
    code, _, err = run_cli(capsys, *train_args(tmp_path, earlier_run, "--overwrite", model="/nope"))
    assert code == 2
    one_line_error(err, "train", "/nope", "no such directory")
    assert "Repo id" not in err and snapshot(earlier_run) == before


def test_train_missing_data_says_it_does_not_exist(tmp_path, capsys):
    code, _, err = run_cli(capsys, *train_args(tmp_path, tmp_path / "run"))
    assert code == 2
    one_line_error(err, "train", "train.json", "no such file")
    assert not (tmp_path / "run").exists()


def test_train_checks_every_image_before_touching_out(tmp_path, earlier_run, capsys):
    (tmp_path / "outside.png").write_bytes(b"secret bytes")
    make_train_data(tmp_path, {"abs1": str(tmp_path / "outside.png"), "up2": "../outside.png", "link3": "link.png",
                               "gone4": "gone.png", "zero5": "zero.png", "fake6": "fake.png",
                               "bomb7": "bomb.png", "dcm8": "nopixels.dcm"})
    os.symlink(tmp_path / "outside.png", tmp_path / "images" / "link.png")
    (tmp_path / "images" / "zero.png").write_bytes(b"")
    (tmp_path / "images" / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (tmp_path / "images" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (tmp_path / "images" / "nopixels.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x00\x00")
    before = snapshot(earlier_run)
    code, out, err = run_cli(capsys, *train_args(tmp_path, earlier_run, "--overwrite"))
    assert code == 2
    one_line_error(err, "train", "8 of 14 records dropped", "image outside the images folder x3",
                   "image file missing x1", "image unreadable", "image too large x1", "max_dropped_share")
    assert "secret bytes" not in err + out
    assert snapshot(earlier_run) == before


def test_train_skips_a_few_bad_images_and_counts_them(tmp_path, capsys):
    make_train_data(tmp_path, {"gone1": "gone.png"}, n_good=6)
    out = tmp_path / "run"
    code, text, err = run_cli(capsys, "--json", *train_args(tmp_path, out, "--max-dropped-share", 0.5))
    assert code == 0 and "Traceback" not in err
    res = json.loads(text.strip().splitlines()[-1])  # DeepSpeed, when installed, may print a line first
    assert res["dataset"]["kept"] == 6 and res["dataset"]["dropped"] == {"image file missing": 1}
    assert (out / "stage_config.json").exists() and (out / "log_history.jsonl").exists()
    again = snapshot(out)
    code, _, err = run_cli(capsys, *train_args(tmp_path, out))  # a finished run is not trained over
    assert code == 2
    one_line_error(err, "train", str(out), "overwrite=True")
    assert snapshot(out) == again


def test_train_counts_malformed_lines_as_dropped_records(tmp_path, earlier_run, capsys):
    make_train_data(tmp_path)
    good = [json.dumps(r) for r in json.loads((tmp_path / "train.json").read_text())]
    (tmp_path / "train.json").write_bytes("\n".join(good[:3] + ['{"id": "cut', "[1, 2]"] + good[3:]).encode()
                                          + b'\n{"id": "\xff\xfe"}\n')
    before = snapshot(earlier_run)
    code, _, err = run_cli(capsys, *train_args(tmp_path, earlier_run, "--overwrite"))
    assert code == 2
    one_line_error(err, "train", "3 of 9 records dropped", "malformed record x3", "line 4", "max_dropped_share")
    assert snapshot(earlier_run) == before
