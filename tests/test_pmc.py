"PMC fetcher against a real loopback HTTP server: outcomes, retries, safe extraction, resuming after SIGKILL."
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from llavamed.pmc import fetch_figures, finished_pairs, mirror_url

sys.path.insert(0, str(Path(__file__).parent))
from tar_server import TarServer, image_bytes, make_tar  # noqa: E402

PMC = "https://ftp.ncbi.nlm.nih.gov/pub/pmc/oa_package"
PNG, JPG = image_bytes(), image_bytes(colour=(10, 200, 10), fmt="JPEG")


def line(pair_id, pmcid, member):
    return {"pmc_tar_url": f"{PMC}/{pmcid}.tar.gz", "image_file_path": member, "pair_id": pair_id}


def write_list(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def manifest(out):
    return [json.loads(l) for l in (Path(out) / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture
def server():
    with TarServer() as s: yield s


def serve(server, pmcid, body=b"", **kw):
    server.add(f"/oa_package/{pmcid}.tar.gz", body, **kw)


def test_mirror_url_keeps_the_path_below_pub_pmc():
    assert mirror_url(f"{PMC}/08/e0/PMC1.tar.gz", "http://m:1/x/") == "http://m:1/x/oa_package/08/e0/PMC1.tar.gz"
    assert mirror_url(f"{PMC}/PMC1.tar.gz", None) == f"{PMC}/PMC1.tar.gz"


def test_every_outcome_is_recorded(server, tmp_path):
    serve(server, "PMC1", make_tar({"PMC1/a.jpg": PNG, "PMC1/b.jpg": JPG, "PMC1/text.nxml": b"<article/>" * 500}))
    good = make_tar({"PMC3/a.jpg": PNG})
    serve(server, "PMC3", good[: len(good) // 2])  # complete HTTP body, truncated gzip: corrupt
    serve(server, "PMC4", make_tar({"PMC4/other.jpg": PNG}))  # wanted member absent: missing
    serve(server, "PMC5", make_tar({"PMC5/a.jpg": PNG, "../escape.jpg": PNG, "/abs.jpg": PNG}))
    serve(server, "PMC6", make_tar({"PMC6/real.png": PNG}, symlinks={"PMC6/a.jpg": "/etc/passwd"},
                                   hardlinks={"PMC6/b.jpg": "PMC6/real.png"}))
    serve(server, "PMC7", make_tar({"PMC7/a.jpg": PNG}), fail_first=2)  # 503 twice, then fine
    serve(server, "PMC8", make_tar({"PMC8/a.jpg": b"\x89PNG\r\n\x1a\n" + b"\0" * 50}))  # not decodable
    serve(server, "PMC9", kind="status", code=403)
    rows = [line("p1a", "PMC1", "PMC1/a.jpg"), line("p1b", "PMC1", "./PMC1/b.jpg"), line("p2", "PMC2", "PMC2/a.jpg"),
            line("p3", "PMC3", "PMC3/a.jpg"), line("p4", "PMC4", "PMC4/a.jpg"), line("p5", "PMC5", "PMC5/a.jpg"),
            line("p5up", "PMC5", "../escape.jpg"), line("p5abs", "PMC5", "/abs.jpg"),
            line("p6sym", "PMC6", "PMC6/a.jpg"), line("p6hard", "PMC6", "PMC6/b.jpg"),
            line("p7", "PMC7", "PMC7/a.jpg"), line("p8", "PMC8", "PMC8/a.jpg"), line("p9", "PMC9", "PMC9/a.jpg")]
    urls, out = write_list(tmp_path / "urls.jsonl", rows), tmp_path / "out"
    s = fetch_figures(urls, str(out), workers=4, mirror=server.base, backoff=0.01, quiet=True)
    st = {r["pair_id"]: r for r in manifest(out)}
    assert {k: v["status"] for k, v in st.items()} == {
        "p1a": "ok", "p1b": "ok", "p2": "not_found", "p3": "corrupt", "p4": "missing", "p5": "ok",
        "p5up": "corrupt", "p5abs": "corrupt", "p6sym": "corrupt", "p6hard": "corrupt", "p7": "ok",
        "p8": "corrupt", "p9": "error"}
    assert (s.ok, s.not_found, s.corrupt, s.missing, s.error, s.tarballs) == (4, 1, 6, 1, 1, 9)
    # real extension from content; bytes unchanged; hash recorded
    assert st["p1a"]["file"] == "images/p1a.png" and st["p1b"]["file"] == "images/p1b.jpg"
    assert (out / "images/p1a.png").read_bytes() == PNG
    assert st["p1b"]["sha256"] == hashlib.sha256(JPG).hexdigest() and st["p1b"]["bytes"] == len(JPG)
    assert "unsafe member name" in st["p5up"]["reason"] and "symbolic link" in st["p6sym"]["reason"]
    assert "hard link" in st["p6hard"]["reason"] and "HTTP 403" in st["p9"]["reason"]
    # nothing but the wanted figures was written, nowhere else
    assert sorted(p.name for p in (out / "images").iterdir()) == ["p1a.png", "p1b.jpg", "p5.png", "p7.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "urls.jsonl"]
    assert server.requests["/oa_package/PMC7.tar.gz"] == 3 and server.requests["/oa_package/PMC9.tar.gz"] == 1
    assert server.requests["/oa_package/PMC1.tar.gz"] == 1  # one download serves both figures


def test_rerun_fetches_only_unfinished(server, tmp_path):
    serve(server, "PMC1", make_tar({"PMC1/a.jpg": PNG}))
    serve(server, "PMC3", make_tar({"PMC3/a.jpg": PNG})[:60])
    serve(server, "PMC4", make_tar({"PMC4/x.jpg": PNG}))
    rows = [line("a", "PMC1", "PMC1/a.jpg"), line("b", "PMC2", "PMC2/a.jpg"), line("c", "PMC3", "PMC3/a.jpg"),
            line("d", "PMC4", "PMC4/a.jpg")]
    urls, out = write_list(tmp_path / "u.jsonl", rows), str(tmp_path / "out")
    fetch_figures(urls, out, workers=2, mirror=server.base, quiet=True)
    serve(server, "PMC3", make_tar({"PMC3/a.jpg": PNG}))  # the server's copy is repaired
    s = fetch_figures(urls, out, workers=2, mirror=server.base, quiet=True)
    assert (s.already_done, s.tarballs, s.ok) == (3, 1, 1)
    assert dict(server.requests) == {f"/oa_package/PMC{i}.tar.gz": n for i, n in [(1, 1), (2, 1), (3, 2), (4, 1)]}
    assert set(finished_pairs(out)) == {"a", "b", "c", "d"}
    # a figure deleted by hand is fetched again
    (Path(out) / "images/a.png").unlink()
    assert fetch_figures(urls, out, mirror=server.base, quiet=True).ok == 1


def test_short_body_and_timeout_are_retried_then_error(tmp_path):
    with TarServer() as server:
        serve(server, "PMC1", make_tar({"PMC1/a.jpg": PNG, "PMC1/pad.bin": os.urandom(20000)}), kind="cut")
        serve(server, "PMC2", make_tar({"PMC2/a.jpg": PNG}), delay=1.0)
        rows = [line("a", "PMC1", "PMC1/pad.bin"), line("b", "PMC2", "PMC2/a.jpg")]
        urls = write_list(tmp_path / "u.jsonl", rows)
        s = fetch_figures(urls, str(tmp_path / "o"), workers=2, mirror=server.base, retries=2, backoff=0.01,
                          timeout=0.3, quiet=True)
        st = {r["pair_id"]: r for r in manifest(tmp_path / "o")}
        assert s.error == 2 and s.corrupt == 0
        assert "gave up after 3 attempts" in st["a"]["reason"] and "closed after" in st["a"]["reason"]
        assert "timed out" in st["b"]["reason"]
        assert server.requests["/oa_package/PMC1.tar.gz"] == 3 and server.requests["/oa_package/PMC2.tar.gz"] == 3


def test_limit_bad_lines_and_cli(server, tmp_path, llavamed_cmd):
    for i in range(4): serve(server, f"PMC{i}", make_tar({f"PMC{i}/a.jpg": PNG}))
    rows = [line(f"f{i}", f"PMC{i}", f"PMC{i}/a.jpg") for i in range(4)]
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n" + json.dumps(rows[0]) + "\n")
    r = subprocess.run([llavamed_cmd, "pmc", "--urls", str(p), "--out", str(tmp_path / "o"), "--mirror", server.base,
                        "--limit", "3", "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ok 3," in r.stdout and len(manifest(tmp_path / "o")) == 3
    s = fetch_figures(str(p), str(tmp_path / "o"), mirror=server.base, quiet=True)
    assert (s.ok, s.already_done, s.bad_lines, s.bad_line_reasons) == (
        1, 3, 2, {"malformed JSON": 1, "repeated pair_id": 1})


def test_sigkill_midway_then_resume_refetches_nothing_finished(tmp_path, llavamed_cmd):
    n = 24
    with TarServer(latency=0.2) as server:
        for i in range(n): serve(server, f"PMC{i}", make_tar({f"PMC{i}/a.jpg": PNG, f"PMC{i}/b.jpg": JPG}))
        rows = [line(f"f{i}{m}", f"PMC{i}", f"PMC{i}/{m}.jpg") for i in range(n) for m in "ab"]
        urls, out = write_list(tmp_path / "u.jsonl", rows), tmp_path / "o"
        cmd = [llavamed_cmd, "pmc", "--urls", urls, "--out", str(out), "--workers", "2", "--mirror", server.base, "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        man, t0 = out / "manifest.jsonl", time.time()
        while not (man.exists() and len(man.read_text().splitlines()) >= 10):
            assert proc.poll() is None and time.time() - t0 < 30, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL); proc.wait()
        done_first = {r["pair_id"] for r in manifest(out)}
        assert 10 <= len(done_first) < 2 * n
        before = dict(server.settle())
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        final = {row["pair_id"]: row["status"] for row in manifest(out)}
        assert final == {row["pair_id"]: "ok" for row in rows}
        for i in range(n):
            path = f"/oa_package/PMC{i}.tar.gz"
            if {f"f{i}a", f"f{i}b"} <= done_first: assert server.requests[path] == 1, path  # never refetched
            else: assert server.requests[path] == before.get(path, 0) + 1, path
        assert sum(server.requests.values()) <= n + 4  # at most the in-flight tarballs were fetched twice


def test_shard_splits_the_list_into_disjoint_shares(server, tmp_path, llavamed_cmd):
    from llavamed.core import Shard
    for i in range(6): serve(server, f"PMC{i}", make_tar({f"PMC{i}/a.jpg": PNG, f"PMC{i}/b.jpg": JPG}))
    rows = [line(f"f{i}{m}", f"PMC{i}", f"PMC{i}/{m}.jpg") for i in range(6) for m in "ab"]
    urls = write_list(tmp_path / "u.jsonl", rows)
    r = subprocess.run([llavamed_cmd, "pmc", "--urls", urls, "--out", str(tmp_path / "o0"), "--mirror", server.base,
                        "--shard", "0/3", "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    shares = [{m["pair_id"] for m in manifest(tmp_path / "o0")}]
    for k in (1, 2):
        s = fetch_figures(urls, str(tmp_path / f"o{k}"), mirror=server.base, shard=f"{k}/3", quiet=True)
        shares.append({m["pair_id"] for m in manifest(tmp_path / f"o{k}")} if s.ok else set())
    assert set().union(*shares) == {row["pair_id"] for row in rows} and sum(map(len, shares)) == len(rows)
    for k, share in enumerate(shares): assert all(Shard(k, 3).holds(p) for p in share)
    # a share's limit counts its own figures; a bad --shard is one line and exit 2, with nothing written
    assert fetch_figures(urls, str(tmp_path / "lim"), mirror=server.base, shard="1/3", limit=1, quiet=True).ok == 1
    r = subprocess.run([llavamed_cmd, "pmc", "--urls", urls, "--out", str(tmp_path / "bad"), "--shard", "3/3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "shard 3/3" in r.stderr and "Traceback" not in r.stderr
    for bad in (["--shard=-1/3"], ["--shard", "1/0"], ["--shard", "a/b"], ["--limit", "0"], ["--limit", "-2"]):
        r = subprocess.run([llavamed_cmd, "pmc", "--urls", urls, "--out", str(tmp_path / "bad"), *bad],
                           capture_output=True, text=True, timeout=60)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and err[0].startswith("llavamed pmc: error: "), (bad, r.stderr)
        assert bad[-1].removeprefix("--shard=") in err[0], (bad, err)
    assert not (tmp_path / "bad").exists()
