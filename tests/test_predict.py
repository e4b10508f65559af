"`llavamed predict` at benchmark scale: protocols, choices, answer length, the image preflight, several processes."
import json, os, shutil, struct, subprocess, sys, zlib
from pathlib import Path
import pytest

pytest.importorskip("torch")
from PIL import Image
from llavamed.cli import main
from llavamed.core import IMAGE_TOKEN
from llavamed.predict import predict, part_path


def record(qid: str, image: str | None = "a.png", question: str = "Is there an effusion?", answer: str = "no",
           answer_type: str = "CLOSED", options: list[str] | None = None) -> dict:
    "A LLaVA VQA record (a choice record when `options` is given)."
    text = f"{question}\n{IMAGE_TOKEN}" if image else question
    rec = {"id": qid, "answer_type": answer_type,
           "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}
    if image: rec["image"] = image
    if options is not None: rec["options"] = options
    return rec


def png_header(width: int, height: int) -> bytes:
    "A small PNG whose header claims `width` x `height` pixels (a decompression bomb's header)."
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    "A saved tiny model (random weights, seeded): every process that loads it has the same weights."
    from llavamed.model import build_model, save_model
    d = tmp_path_factory.mktemp("tiny") / "model"
    texts = ["Is there an effusion? no yes", "Which organ is shown? liver spleen kidney", "Describe the figure."]
    save_model(*build_model("tiny", tokenizer_texts=texts * 20), d)
    return d


@pytest.fixture
def vqa(tmp_path) -> Path:
    "images/ with 6 distinct pictures and vqa.json with 11 questions about them (open, closed and choice)."
    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(tmp_path / "images" / f"i{i}.png")
    recs = [record(f"q{k}", f"i{k % 6}.png", f"Question {k}: is the organ enlarged?", "yes" if k % 2 else "no")
            for k in range(9)]
    recs.append(record("open9", "i1.png", "What organ is shown?", "liver", "OPEN"))
    recs.append(record("mc10", "i2.png", "Which organ is shown?", "B", "CHOICE", ["liver", "spleen", "kidney"]))
    (tmp_path / "vqa.json").write_text(json.dumps(recs))
    return tmp_path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_line(err: str) -> str:
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


KW = dict(batch_size=4, max_new_tokens=3, quiet=True, device="cpu")


# ---------------------------------------------------------------- protocols and choices, as the answers record them
def test_protocol_words_each_question_and_choices_are_lettered(vqa, model_dir):
    out = vqa / "a.jsonl"
    res = predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(out), protocol="medevalkit",
                  **KW)
    assert res.answered == 11 and res.protocol == "medevalkit"
    by_id = {r["question_id"]: r for r in rows(out)}
    assert by_id["q0"]["prompt"] == ("Question 0: is the organ enlarged?\n"
                                     "Please output 'yes' or 'no'(no extra output).")
    assert by_id["open9"]["prompt"] == "What organ is shown?\nPlease answer the question concisely."
    assert by_id["mc10"]["prompt"] == ("\nQuestion: Which organ is shown?\nOptions: \nA. liver\nB. spleen\n"
                                       "C. kidney\nAnswer with the option's letter from the given choices directly.")
    assert all(r["metadata"]["protocol"] == "medevalkit" and r["metadata"]["prompt_suffix"] is None
               for r in by_id.values())


def test_lmms_eval_suffix_and_the_override(vqa, model_dir):
    a, b = vqa / "lmms.jsonl", vqa / "own.jsonl"
    kw = dict(KW, limit=2)
    predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(a), protocol="lmms-eval", **kw)
    assert [r["prompt"] for r in rows(a)] == [f"Question {k}: is the organ enlarged?\nAnswer the question using "
                                              "a single word or phrase." for k in range(2)]
    predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(b), protocol="lmms-eval",
            prompt_suffix="Answer with one word.", **kw)
    assert rows(b)[0]["prompt"] == "Question 0: is the organ enlarged? Answer with one word."


def test_a_resumed_run_may_not_switch_protocol(vqa, model_dir, capsys):
    out = vqa / "a.jsonl"
    predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(out), limit=1, **KW)
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--data", vqa / "vqa.json", "--images",
                           vqa / "images", "--out", out, "--max-new-tokens", 3, "--protocol", "lmms-eval", "--quiet")
    assert code == 2 and "other settings" in last_line(err) and "'protocol': 'lmms-eval'" in last_line(err)
    assert out.read_bytes() == before


def test_answers_from_before_protocols_resume_as_llava_med(vqa, model_dir):
    out = vqa / "old.jsonl"
    md = {"decoding": {"do_sample": False, "max_new_tokens": 3, "seed": 0}, "image_ablation": "none",
          "prompt_suffix": None, "model": str(model_dir)}  # no 'protocol' key: written before protocols existed
    out.write_text(json.dumps({"question_id": "q0", "text": "no", "metadata": md}) + "\n")
    res = predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(out), limit=1, **KW)
    assert (res.skipped, res.answered) == (1, 1)


@pytest.mark.parametrize("options, needle", [
    (["only"], "question mc10: 1 options"), ([f"o{i}" for i in range(27)], "question mc10: 27 options"),
    (["liver", {"text": "spleen"}], "question mc10: option B is a dict, not text"),
    (["liver", "x" * 200_000], "question mc10: 200,026 characters (question and options) > max_question_chars")])
def test_a_choice_question_without_two_text_options_of_a_sane_size_stops_before_the_model(vqa, capsys, options,
                                                                                           needle):
    recs = json.loads((vqa / "vqa.json").read_text())
    recs[-1]["options"] = options
    (vqa / "vqa.json").write_text(json.dumps(recs))
    code, _, err = run_cli(capsys, "predict", "--model", "/would/not/load", "--data", vqa / "vqa.json",
                           "--out", vqa / "a.jsonl", "--quiet")
    assert code == 2 and last_line(err).startswith("llavamed predict: error: ") and needle in last_line(err)
    assert len(err.strip().splitlines()) == 1 and not (vqa / "a.jsonl").exists()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_one_is_a_one_line_error(vqa, capsys, limit):
    code, _, err = run_cli(capsys, "predict", "--model", "/would/not/load", "--data", vqa / "vqa.json",
                           "--out", vqa / "a.jsonl", "--limit", limit, "--quiet")
    assert code == 2 and last_line(err).endswith(f"limit={limit}: must be >= 1 (leave it out for all)")
    assert not (vqa / "a.jsonl").exists()


def test_an_out_that_is_a_folder_is_a_one_line_error(vqa, capsys):
    code, _, err = run_cli(capsys, "predict", "--model", "/would/not/load", "--data", vqa / "vqa.json",
                           "--out", vqa / "images", "--quiet")
    assert code == 2 and last_line(err).endswith(f"out {vqa / 'images'} is a folder: give the answers file, "
                                                 f"e.g. {vqa / 'images' / 'answers.jsonl'}")
    assert sorted(p.name for p in (vqa / "images").iterdir()) == [f"i{i}.png" for i in range(6)]


def test_unknown_protocol_is_a_one_line_error(vqa, capsys):
    code, _, err = run_cli(capsys, "predict", "--model", "tiny", "--data", vqa / "vqa.json", "--out", vqa / "a.jsonl",
                           "--protocol", "vqav2")
    assert code == 2 and "protocol='vqav2'" in last_line(err) and "lmms-eval" in last_line(err)


# ---------------------------------------------------------------- the answer length
def test_default_max_new_tokens_follows_the_question_kind(vqa, model_dir):
    res = predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(vqa / "a.jsonl"), limit=1,
                  batch_size=1, quiet=True, device="cpu")
    assert (res.max_new_tokens, res.max_new_tokens_from) == (32, "default for vqa questions")
    assert rows(vqa / "a.jsonl")[0]["metadata"]["decoding"]["max_new_tokens"] == 32
    assert "max_new_tokens 32 (default for vqa questions)" in str(res)


def test_the_benchmark_gets_long_answers_by_default(tmp_path):
    bench = tmp_path / "qa.jsonl"
    lines = [{"question_id": i, "image": "a.png", "text": f"Describe {i}.\n<image>"} for i in range(3)]
    bench.write_text("".join(json.dumps(line) + "\n" for line in lines))
    md = {"decoding": {"do_sample": False, "max_new_tokens": 1024, "seed": 0}, "image_ablation": "none",
          "prompt_suffix": None, "model": "tiny", "protocol": "llava-med"}
    answers = tmp_path / "answers.jsonl"
    answered = [{"question_id": str(i), "text": "x", "metadata": md} for i in range(3)]
    answers.write_text("".join(json.dumps(row) + "\n" for row in answered))
    res = predict("tiny", str(bench), out=str(answers), quiet=True)  # all answered with 1,024: nothing to generate
    assert (res.max_new_tokens, res.max_new_tokens_from) == (1024, "default for benchmark questions")
    assert res.skipped == 3
    md["decoding"]["max_new_tokens"] = 64  # answered with the old default: this run's 1,024 differs
    answers.write_text(json.dumps({"question_id": "0", "text": "x", "metadata": md}) + "\n")
    with pytest.raises(ValueError, match="other settings"):
        predict("tiny", str(bench), out=str(answers), quiet=True)


# ---------------------------------------------------------------- the image preflight
def test_every_bad_image_is_counted_by_reason_before_anything_loads(vqa, capsys):
    imgs = vqa / "images"
    (imgs / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (imgs / "text.png").write_text("not an image at all\n")
    (imgs / "cut.png").write_bytes((imgs / "i0.png").read_bytes()[:40])
    (vqa / "secret.png").write_bytes(b"secret bytes")
    recs = json.loads((vqa / "vqa.json").read_text())
    for rec, name in zip(recs, ["bomb.png", "text.png", "cut.png", "gone.png", "../secret.png"]):
        rec["image"] = name
    (vqa / "vqa.json").write_text(json.dumps(recs))
    (vqa / "a.jsonl").write_text('{"question_id": "earlier", "text": "kept"}\n')
    before = (vqa / "a.jsonl").read_bytes()
    code, out, err = run_cli(capsys, "predict", "--model", "/would/not/load", "--data", vqa / "vqa.json",
                             "--images", imgs, "--out", vqa / "a.jsonl", "--quiet")
    line = last_line(err)
    assert code == 2, err
    assert "5 of 9 images cannot be shown" in line  # 5 bad and the 4 good ones the other questions show
    for needle in ("image_unreadable 2", "image_too_large 1 (first: question q0", "image_missing 1 (first: question q3",
                   "image_outside_root 1 (first: record q4", "exceeds the limit", "'gone.png' not found"):
        assert needle in line, (needle, line)
    assert "secret bytes" not in out + err and (vqa / "a.jsonl").read_bytes() == before


def test_a_bad_image_in_the_last_batch_stops_the_run_before_the_first(vqa, model_dir, capsys):
    recs = json.loads((vqa / "vqa.json").read_text())
    (vqa / "images" / "empty.png").write_bytes(b"")
    recs[-1]["image"] = "empty.png"
    (vqa / "vqa.json").write_text(json.dumps(recs))
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--data", vqa / "vqa.json", "--images",
                           vqa / "images", "--out", vqa / "a.jsonl", "--batch-size", 1, "--max-new-tokens", 2,
                           "--quiet")
    assert code == 2 and "question mc10: image 'empty.png' unreadable" in last_line(err)
    assert not (vqa / "a.jsonl").exists()  # not one batch was answered


def test_only_the_images_still_to_be_shown_are_checked(vqa, model_dir):
    out = vqa / "a.jsonl"
    res = predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(out), limit=3, **KW)
    assert res.images_checked == 3
    (vqa / "images" / "i0.png").write_bytes(b"")  # q0's image breaks after q0 was answered
    res = predict(str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"), str(out), limit=2, **KW)
    assert (res.skipped, res.answered, res.images_checked) == (3, 2, 2)  # q3, q4: i3, i4


# ---------------------------------------------------------------- several processes (the launcher's environment)
def as_rank(monkeypatch, rank: int, world: int):
    "The environment torchrun gives rank `rank` of `world` on one machine."
    for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(key, str(value))


def test_two_ranks_write_the_file_one_process_writes(vqa, model_dir, monkeypatch):
    args = (str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"))
    predict(*args, str(vqa / "one.jsonl"), **KW)
    two = vqa / "two.jsonl"
    as_rank(monkeypatch, 0, 2)
    r0 = predict(*args, str(two), **KW)
    assert (r0.share, r0.answered, r0.merged, r0.part) == (6, 6, None, str(part_path(two, 0, 2)))
    assert not two.exists() and len(rows(part_path(two, 0, 2))) == 6  # waits for rank 1; `out` untouched
    as_rank(monkeypatch, 1, 2)
    r1 = predict(*args, str(two), **KW)
    assert (r1.share, r1.answered, r1.merged) == (5, 5, 11)
    assert two.read_bytes() == (vqa / "one.jsonl").read_bytes()  # same answers, same order, same bytes
    assert not (vqa / "two.jsonl.parts").exists()
    assert "rank 1 of 2 answered 5 of its 5 of 11 questions" in str(r1) and "holds 11 answers" in str(r1)


def test_a_rank_resumes_its_own_part(vqa, model_dir, monkeypatch):
    args = (str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"))
    out = vqa / "a.jsonl"
    as_rank(monkeypatch, 1, 2)
    predict(*args, str(out), limit=2, **KW)
    with open(part_path(out, 1, 2), "ab") as f: f.write(b'{"question_id": "q5", "te')  # killed mid-write
    r = predict(*args, str(out), **KW)
    assert (r.skipped, r.answered, r.merged) == (2, 3, None) and r.repaired_bytes > 0
    assert [x["question_id"] for x in rows(part_path(out, 1, 2))] == ["q1", "q3", "q5", "q7", "open9"]
    as_rank(monkeypatch, 0, 2)
    assert predict(*args, str(out), **KW).merged == 11


def test_a_run_with_fewer_processes_finishes_what_the_ranks_left(vqa, model_dir, monkeypatch):
    args = (str(model_dir), str(vqa / "vqa.json"), str(vqa / "images"))
    out = vqa / "a.jsonl"
    out.write_text('{"question_id": "earlier", "text": "an answer to another file, kept"}\n')
    as_rank(monkeypatch, 0, 3)
    predict(*args, str(out), **KW)  # ranks 1 and 2 of 3 never ran
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"): monkeypatch.delenv(key)
    r = predict(*args, str(out), **KW)
    assert (r.skipped, r.answered, r.merged) == (4, 7, 12)
    ids = [x["question_id"] for x in rows(out)]
    assert ids == [f"q{k}" for k in range(9)] + ["open9", "mc10", "earlier"]


def test_a_part_made_with_other_settings_is_refused(vqa, monkeypatch):
    out = vqa / "a.jsonl"
    part = part_path(out, 1, 2); part.parent.mkdir()
    md = {"decoding": {"do_sample": True, "max_new_tokens": 3, "seed": 0, "temperature": 0.7},
          "image_ablation": "none", "prompt_suffix": None, "model": "tiny", "protocol": "llava-med"}
    part.write_text(json.dumps({"question_id": "q1", "text": "no", "metadata": md}) + "\n")
    as_rank(monkeypatch, 0, 2)
    with pytest.raises(ValueError, match="other settings"):
        predict("tiny", str(vqa / "vqa.json"), str(vqa / "images"), str(out), max_new_tokens=3, quiet=True)


def test_a_bad_launcher_environment_is_a_one_line_error(vqa, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "2"); monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(capsys, "predict", "--model", "tiny", "--data", vqa / "vqa.json", "--out", vqa / "a.jsonl")
    assert code == 2 and "RANK=2 with WORLD_SIZE=2" in last_line(err)


# ---------------------------------------------------------------- torchrun itself: two CPU processes
@pytest.mark.slow
def test_torchrun_two_processes_match_one(vqa, model_dir):
    exe = Path(sys.executable).parent
    torchrun, llavamed = exe / "torchrun", exe / "llavamed"
    if not (torchrun.exists() and llavamed.exists()): pytest.skip("torchrun or the llavamed command is missing")
    common = [str(a) for a in ["predict", "--model", model_dir, "--data", vqa / "vqa.json", "--images", vqa / "images",
                               "--max-new-tokens", 4, "--batch-size", 3, "--device", "cpu", "--quiet"]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    one = subprocess.run([llavamed, *common, "--out", vqa / "one.jsonl"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", llavamed, *common,
                          "--out", vqa / "two.jsonl"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0 of 2" in two.stdout and "rank 1 of 2" in two.stdout and "holds 11 answers" in two.stdout
    assert (vqa / "two.jsonl").read_bytes() == (vqa / "one.jsonl").read_bytes()
    assert not (vqa / "two.jsonl.parts").exists()


def test_quiet_means_no_bars_at_all(vqa, model_dir):
    "`--quiet` silences transformers' and huggingface_hub's bars (loading weights) as well as predict's own."
    llavamed = Path(sys.executable).parent / "llavamed"
    r = subprocess.run([str(llavamed), "predict", "--model", str(model_dir), "--data", str(vqa / "vqa.json"),
                        "--images", str(vqa / "images"), "--out", str(vqa / "a.jsonl"), "--max-new-tokens", "2",
                        "--device", "cpu", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "it/s]" not in r.stderr and "Loading weights" not in r.stderr, r.stderr[-2000:]
