"""Hostile input for the client, `instruct` and `pmc`: credentials never leak, failed runs exit non-zero and keep
earlier output, `--limit` never shrinks an output, bad teacher-input records follow the one policy, and a URL list
cannot point the fetcher at local files. Real commands (`llavamed.cli.main`) against the loopback test servers."""
import base64, json, subprocess, sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from chat_server import ChatServer  # noqa: E402
from tar_server import TarServer, image_bytes, make_tar  # noqa: E402
from teacher_input import pair_ids, write_teacher_input  # noqa: E402
from llavamed.cli import main
from llavamed.client import ChatClient, redact, split_userinfo
from llavamed.instruct import sidecar_path

KEY_ENV = "LLAVAMED_TEST_HOSTILE_KEY"
PMC = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package"


def snapshot(folder: Path) -> dict[str, bytes]:
    "Every file under `folder` with its bytes."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str, cmd: str) -> str:
    "The one `llavamed CMD: error: ...` line of `err` (asserting there is no traceback)."
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith(f"llavamed {cmd}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def instruct_args(cap, out, srv=None, *extra):
    teacher = ["--teacher", "openai", "--base-url", srv, "--model", "any", "--api-key-env", KEY_ENV] if srv else []
    return ["instruct", "--captions", str(cap), "--out", str(out), *teacher, "--backoff", "0.01", "--quiet", *extra]


def with_userinfo(base_url: str, user: str, password: str) -> str:
    scheme, rest = base_url.split("://", 1)
    return f"{scheme}://{user}:{password}@{rest}"


# ---- item 6: credentials, wherever they came from ----

def test_split_userinfo_and_short_secrets():
    assert split_userinfo("http://bob:p%40ss@127.0.0.1:9/v1") == ("http://127.0.0.1:9/v1", ("bob", "p@ss"))
    assert redact("key k3y given; k3yboard stays", "k3y") == "key *** given; k3yboard stays"
    cl = ChatClient("m", base_url="http://bob:hunter2@127.0.0.1:9/v1")
    assert cl.base_url == "http://127.0.0.1:9/v1" and "hunter2" not in repr(cl)


@pytest.fixture
def verbose_reset():
    "Put the llavamed loggers back to their level after a test that runs `llavamed -v`."
    from llavamed.core import get_logger
    level = get_logger().level
    yield
    get_logger().setLevel(level)


def test_userinfo_in_base_url_is_basic_auth_and_never_leaks(tmp_path, monkeypatch, capsys, verbose_reset):
    user, password, key = "proxyuser", "pw9Zq", "k3y"  # a short password and a short key, as users pick
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    monkeypatch.setenv(KEY_ENV, key)
    cap = write_teacher_input(tmp_path / "captions.json", 4, facts=False)
    with ChatServer(require_auth=f"Basic {token}") as srv:
        url = with_userinfo(srv.base_url, user, password)
        assert main(["-v", *instruct_args(cap, tmp_path / "ok.jsonl", url)]) == 0  # -v: the HTTP library logs URLs
        ok = capsys.readouterr()
        assert srv.stats()["by_action"] == {"ok": 4}  # the credentials went out as the Basic header
        srv.configure(require_auth="Basic c29tZW9uZTplbHNl")  # now they are wrong: the server echoes the header
        before = snapshot(tmp_path)
        assert main(instruct_args(cap, tmp_path / "ok.jsonl", url, "--limit", "0")) == 0  # nothing to send
        assert main(instruct_args(cap, tmp_path / "bad.jsonl", url)) == 2
        bad = capsys.readouterr()
    line = one_error_line(bad.err, "instruct")
    assert "HTTP 401" in line and "Basic ***" in line
    texts = [ok.out, ok.err, bad.out, bad.err, *(b.decode() for b in snapshot(tmp_path).values())]
    for secret in (password, token, f"{user}:{password}"):
        assert not [t for t in texts if secret in t], secret
    assert not [t for t in texts if f" {key} " in t or f" {key}." in t]
    assert {k: snapshot(tmp_path)[k] for k in ("ok.jsonl", "ok.raw.jsonl")} == \
        {k: before[k] for k in ("ok.jsonl", "ok.raw.jsonl")}


def test_short_key_is_redacted_in_the_401_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "ab12x")  # shorter than 6 characters
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    with ChatServer(require_key="sk-the-right-one") as srv:
        assert main(instruct_args(cap, tmp_path / "out.jsonl", srv.base_url, "--concurrency", "1")) == 2
        assert srv.stats()["requests"] == 1  # a bad key is not retried
    err = capsys.readouterr().err
    line = one_error_line(err, "instruct")
    assert "HTTP 401" in line and "ab12x" not in err and "***" in line
    assert not [name for name, data in snapshot(tmp_path).items() if b"ab12x" in data]


def test_missing_key_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cap = write_teacher_input(tmp_path / "captions.json", 2, facts=False)
    assert main(instruct_args(cap, tmp_path / "out.jsonl", "https://api.example.invalid/v1")) == 2
    assert f"environment variable {KEY_ENV} is not set" in one_error_line(capsys.readouterr().err, "instruct")
    assert not (tmp_path / "out.jsonl").exists()


# ---- item 5 and 4 for instruct: failed runs and --limit keep earlier output ----

def test_every_request_failed_exits_1_and_keeps_output(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 6, facts=False)
    out, ids = tmp_path / "out.jsonl", pair_ids(cap)
    with ChatServer() as srv:
        assert main(instruct_args(cap, out, srv.base_url, "--limit", "3", "--max-attempts", "1")) == 0
        assert len(srv.stats()["by_key"]) == 3 and len(out.read_text().splitlines()) == 3
        srv.configure(script={i: ["500"] * 5 for i in ids})  # from now on every request fails
        report = out.with_name(out.name + ".report.json")
        before = (out.read_bytes(), report.read_bytes())
        capsys.readouterr()
        assert main(instruct_args(cap, out, srv.base_url, "--max-attempts", "1")) == 1
    res = capsys.readouterr()
    assert "no records written: every request failed" in res.out and "Traceback" not in res.err
    assert (out.read_bytes(), report.read_bytes()) == before


def test_no_record_survives_exits_1_and_keeps_output(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 3, facts=False)
    out = tmp_path / "out.jsonl"
    out.write_text('{"earlier": "good output"}\n')
    sidecar_path(out).write_text("")  # its checkpoint is there (without one, the run is refused: see below)
    with ChatServer(reply_text="User: What does the caption say?\nAssistant: The caption says so.") as srv:
        assert main(instruct_args(cap, out, srv.base_url)) == 1
    assert "no records written: no record survived cleaning" in capsys.readouterr().out
    assert out.read_text() == '{"earlier": "good output"}\n'


def test_rerun_without_the_raw_checkpoint_is_refused_unless_overwrite(tmp_path, capsys):
    cap = write_teacher_input(tmp_path / "captions.json", 6)
    out = tmp_path / "out.jsonl"
    assert main(instruct_args(cap, out, None, "--limit", "4")) == 0
    before = out.read_bytes()
    sidecar_path(out).unlink()  # the raw replies lost (deleted, or OUT copied without them)
    capsys.readouterr()
    assert main(instruct_args(cap, out, None, "--limit", "2")) == 2
    err = one_error_line(capsys.readouterr().err, "instruct")
    assert str(out) in err and str(sidecar_path(out)) in err and "--overwrite" in err and "restore" in err
    assert out.read_bytes() == before and not sidecar_path(out).exists()
    assert main(instruct_args(cap, out, None, "--limit", "2", "--overwrite")) == 0
    assert len(out.read_text().splitlines()) == 2  # replaced, as asked


def test_limit_on_a_rerun_never_shrinks_the_output(tmp_path):
    cap = write_teacher_input(tmp_path / "captions.json", 20)
    out = tmp_path / "out.jsonl"
    assert main(instruct_args(cap, out)) == 0 and len(out.read_text().splitlines()) == 20
    before = out.read_bytes()
    assert main(instruct_args(cap, out, None, "--limit", "3")) == 0
    assert out.read_bytes() == before
    grow = tmp_path / "grow.jsonl"
    for n in (3, 6, 9):
        assert main(instruct_args(cap, grow, None, "--limit", "3")) == 0
        assert len(grow.read_text().splitlines()) == n


# ---- the bad-record policy for instruct's teacher input ----

def caption_lines(n: int) -> list[str]:
    return [json.dumps({"pair_id": f"7{i:03d}_F1", "fig_caption": f"Axial CT {i} of the liver.", "domain": "ct_scan",
                        "facts": [{"question": "What modality is shown?", "answer": "CT"},
                                  {"question": "Which organ is shown?", "answer": "the liver"}]}) for i in range(n)]


def test_one_bad_caption_line_is_skipped_and_counted(tmp_path, capsys):
    cap, out = tmp_path / "captions.jsonl", tmp_path / "out.jsonl"
    good = caption_lines(100)
    cap.write_bytes(("\n".join(good[:40]) + "\n").encode() + b'{"pair_id": "x", "fig_caption": "\xff\xfe"}\n'
                    + ("\n".join(good[40:]) + "\n").encode())
    assert main(["--json", *instruct_args(cap, out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 100 and rep["bad_records"] == {"not UTF-8 text": 1}


@pytest.mark.parametrize("kind, content, says", [
    ("empty", b"", "no figure records"),
    ("wrong top-level type", b"42\n", "not an object (int) at line 1"),
    ("missing keys", b'{"pair_id": "a"}\n{"pair_id": "b"}\n', "record has no 'fig_caption' at line 1 (2)"),
    ("truncated", b'{"pair_id": "a", "fig_capt', "malformed JSON at line 1"),
    ("non-UTF-8", b'{"pair_id": "a", "fig_caption": "\xff"}\n', "not UTF-8 text at line 1"),
    ("duplicates", b'{"pair_id": "a", "fig_caption": "c"}\n' * 3, "duplicate pair_id at line 2 (pair_id 'a') (2)"),
])
def test_bad_teacher_input_is_one_line_and_keeps_output(tmp_path, capsys, kind, content, says):
    cap, out = tmp_path / "captions.jsonl", tmp_path / "out.jsonl"
    cap.write_bytes(content)
    out.write_text('{"earlier": "good output"}\n')
    assert main(instruct_args(cap, out)) == 2, kind
    line = one_error_line(capsys.readouterr().err, "instruct")
    assert str(cap) in line and says in line, line
    assert out.read_text() == '{"earlier": "good output"}\n'
    assert not sidecar_path(out).exists()


# ---- pmc: no local files from a URL list; a run that got nothing exits 1 ----

def write_urls(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pmc_refuses_file_urls_with_their_line(tmp_path, capsys):
    urls = write_urls(tmp_path / "urls.jsonl", [
        {"pmc_tar_url": "file:///etc/passwd", "image_file_path": "etc/passwd", "pair_id": "leak"},
        {"pmc_tar_url": f"{PMC}/../../../etc/passwd", "image_file_path": "x", "pair_id": "climb"}])
    assert main(["pmc", "--urls", str(urls), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    line = one_error_line(capsys.readouterr().err, "pmc")
    assert "urls.jsonl: no usable line" in line and "not an http(s) URL at line 1" in line
    assert "URL path with '..' at line 2" in line and "root:" not in line
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


def test_pmc_skips_a_file_url_beside_good_lines(tmp_path, capsys):
    with TarServer() as server:
        server.add("/oa_package/PMC1.tar.gz", make_tar({"PMC1/a.jpg": image_bytes()}))
        urls = write_urls(tmp_path / "urls.jsonl", [
            {"pmc_tar_url": f"{PMC}/PMC1.tar.gz", "image_file_path": "PMC1/a.jpg", "pair_id": "good"},
            {"pmc_tar_url": "file:///etc/passwd", "image_file_path": "etc/passwd", "pair_id": "leak"}])
        assert main(["--json", "pmc", "--urls", str(urls), "--out", str(tmp_path / "out"), "--mirror", server.base,
                     "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert (res["ok"], res["bad_lines"], res["bad_line_reasons"]) == (1, 1, {"not an http(s) URL": 1})
    assert sorted(p.name for p in (tmp_path / "out/images").iterdir()) == ["good.png"]


def test_pmc_every_download_failed_exits_1(tmp_path, capsys):
    urls = write_urls(tmp_path / "urls.jsonl", [
        {"pmc_tar_url": f"{PMC}/PMC{i}.tar.gz", "image_file_path": f"PMC{i}/a.jpg", "pair_id": f"f{i}"}
        for i in range(3)])
    with TarServer() as server:  # serves nothing: every tarball is a 404
        args = ["pmc", "--urls", str(urls), "--out", str(tmp_path / "out"), "--mirror", server.base, "--quiet"]
        assert main(args) == 1
    assert "pmc: ok 0, missing 0, not_found 3" in capsys.readouterr().out


def test_pmc_mirror_must_be_a_url(tmp_path, capsys):
    urls = write_urls(tmp_path / "urls.jsonl", [
        {"pmc_tar_url": f"{PMC}/PMC1.tar.gz", "image_file_path": "PMC1/a.jpg", "pair_id": "f1"}])
    assert main(["pmc", "--urls", str(urls), "--out", str(tmp_path / "out"), "--mirror", "ftp://m/pmc"]) == 2
    assert "--mirror 'ftp://m/pmc'" in one_error_line(capsys.readouterr().err, "pmc")
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_has_no_traceback(tmp_path, llavamed_cmd):
    cap = tmp_path / "captions.jsonl"
    cap.write_bytes(b'{"pair_id": "a", "fig_caption": "\xff"}\n')
    r = subprocess.run([llavamed_cmd, *instruct_args(cap, tmp_path / "out.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "not UTF-8 text at line 1" in one_error_line(r.stderr, "instruct")


def test_torn_checkpoint_line_is_not_glued_to_the_next_row(tmp_path):
    cap = write_teacher_input(tmp_path / "captions.json", 6)
    out = tmp_path / "out.jsonl"
    assert main(instruct_args(cap, out, None, "--limit", "3")) == 0
    raw = sidecar_path(out)
    with open(raw, "ab") as f: f.write(b'{"id": "30000099_F1", "status": "do')  # a run killed mid-append
    assert main(instruct_args(cap, out)) == 0
    assert len(out.read_text().splitlines()) == 6
    rows = raw.read_bytes().splitlines()  # the torn line is cut off: every line is a whole row, none glued
    assert [json.loads(r)["status"] for r in rows] == ["done"] * 6


def test_huge_caption_is_a_bad_record_not_a_prompt(tmp_path, capsys):
    cap, out = tmp_path / "captions.jsonl", tmp_path / "out.jsonl"
    huge = json.dumps({**json.loads(caption_lines(1)[0]), "pair_id": "big",
                       "fig_caption": "lesion " * 1_000_000})  # 7 MB on one line
    cap.write_text(huge + "\n" + "\n".join(caption_lines(2)) + "\n")
    assert main(instruct_args(cap, out)) == 2
    assert "caption and mentions longer than 20,000 characters at line 1" in \
        one_error_line(capsys.readouterr().err, "instruct")
    assert main(["--json", *instruct_args(cap, out, None, "--max-caption-chars", "10000000")]) == 0
    assert json.loads(capsys.readouterr().out)["bad_records"] == {}
