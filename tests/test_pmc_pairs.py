"pmc-pairs against a real loopback tar server: JATS articles of several styles, bad inputs, filters, resume after SIGKILL."
import hashlib, json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from llavamed.core import BadRecords, Shard
from llavamed.instruct import load_captions
from llavamed.pmc_pairs import fetch_pairs, select_packages

sys.path.insert(0, str(Path(__file__).parent))
from tar_server import TarServer, image_bytes, jats_article, make_tar, oa_file_list  # noqa: E402

PNG, JPG, GIF = image_bytes(), image_bytes(colour=(10, 200, 10), fmt="JPEG"), image_bytes(fmt="GIF")


def fig(i, caption, href=None, label=None):
    return {"id": f"F{i}", "label": label or f"Figure {i}", "caption": caption, "href": href}


def path_of(pmcid): return f"oa_package/{pmcid[-2:]}/{pmcid[-4:-2]}/{pmcid}.tar.gz"


def serve(server, pmcid, members, **kw):
    server.add("/" + path_of(pmcid), make_tar(members, **kw))


def rows_of(p): return [json.loads(l) for l in Path(p).read_text().splitlines()]


def last(p, key="pair_id"): return {r[key]: r for r in rows_of(p)}


def write(p, text):
    Path(p).write_text(text); return str(p)


@pytest.fixture
def server():
    with TarServer() as s: yield s


def styles(server):
    "Three articles in different styles, served; returns the list rows."
    a = jats_article("1001", "PMC1001", [
        fig(1, "<title>Chest radiograph.</title><p>A mass in the <italic>right</italic> upper lobe (arrow).</p>", "a-g001"),
        fig(2, "<p>(A) Axial CT and (B) coronal CT of the abdomen.</p>", "a-g002.tif"),
        fig(3, "<p>Western blot of cell lysates.</p>", "a-g003"),
        fig(4, "<p>H&amp;E staining of the biopsy, original magnification x200.</p>", "a-g004")], [
        'The radiograph showed a mass (<xref ref-type="fig" rid="F1">Figure 1</xref>). It was large.',
        'CT followed (Figs. <xref ref-type="fig" rid="F2">2</xref>&#x2013;<xref ref-type="fig" rid="F4">4</xref>).',
        'Blots and slides agree (<xref ref-type="fig" rid="F3 F4">Figs. 3, 4</xref>; see '
        '<xref ref-type="table" rid="T1">Table 1</xref>).'])
    b = jats_article("1002", "PMC1002", [
        fig(1, "<p>Axial T2-weighted MRI of the brain.</p>", "b-g001"),
        fig(2, "<p>Gross specimen: the cut surface of the resected kidney.</p>", "b-g002")],
        ["As Figure 1A,B shows, the lesion is bright. Figs. 1 and 2 agree.", "Nothing here cites a figure."],
        namespace="http://jats.nlm.nih.gov", xlink_prefix="xl", figures_in_floats=True)
    serve(server, "PMC1001", {"PMC1001/a-g001.gif": GIF, "PMC1001/a-g001.jpg": JPG, "PMC1001/a-g002.jpg": PNG,
                              "PMC1001/a-g003.png": PNG, "PMC1001/a-g004.jpg": JPG, "PMC1001/PMC1001-t001.jpg": JPG,
                              "PMC1001/PMC1001-s001.jpg": JPG, "PMC1001/a.pdf": b"%PDF" + bytes(3000),
                              "PMC1001/a.nxml": a})
    serve(server, "PMC1002", {"PMC1002/b.nxml": b, "PMC1002/b-g001.png": PNG, "PMC1002/b-g002.jpg": JPG})
    return [{"pmcid": "PMC1001", "pmid": "1001"}, {"pmcid": "PMC1002", "pmid": "1002", "license": "CC BY-NC"}]


def test_pairs_mentions_domains_and_manifest(server, tmp_path):
    csv = write(tmp_path / "oa.csv", oa_file_list(styles(server)))
    out = tmp_path / "out"
    res = fetch_pairs(csv, str(out), mirror=server.base, workers=2, quiet=True)
    assert (res.articles, res.pairs, res.skipped_figures, res.failed_articles) == (2, 6, 0, 0)
    sets = json.loads((out / "fig_captions.json").read_text())
    assert list(sets) == ["chest_xray", "mri", "histology", "gross", "ct_scan", "other"]
    by_id = {r["pair_id"]: (k, r) for k, recs in sets.items() for r in recs}
    assert {k: v[0] for k, v in by_id.items()} == {
        "1001_F1": "chest_xray", "1001_F2": "ct_scan", "1001_F3": "other", "1001_F4": "histology",
        "1002_F1": "mri", "1002_F2": "gross"}  # no table, no supplementary figure
    r = by_id["1001_F1"][1]
    assert r["fig_caption"] == "Chest radiograph. A mass in the right upper lobe (arrow)."
    assert r["fig_label"] == "Figure 1" and r["pmid"] == "1001" and r["fig_id"] == "F1" and r["pmcid"] == "PMC1001"
    assert r["in_text_mention"] == "The radiograph showed a mass (Figure 1)."
    assert by_id["1001_F3"][1]["in_text_mention"] == "CT followed (Figs. 2–4). Blots and slides agree (Figs. 3, 4; see Table 1)."
    assert by_id["1002_F1"][1]["in_text_mention"] == "As Figure 1A,B shows, the lesion is bright. Figs. 1 and 2 agree."
    assert by_id["1002_F2"][1]["in_text_mention"] == "Figs. 1 and 2 agree."
    assert by_id["1001_F2"][1]["compound"] and not by_id["1001_F1"][1]["compound"]
    assert by_id["1002_F1"][1]["license"] == "CC BY-NC"
    assert r["license_url"] == "https://creativecommons.org/licenses/by/4.0/" and r["article_title"] == "An article"
    # the graphic matched whatever its extension: the JPEG, not the GIF thumbnail; a PNG named .jpg is saved .png
    man = last(out / "manifest.jsonl")
    assert man["1001_F1"]["member"] == "PMC1001/a-g001.jpg" and man["1001_F2"]["file"] == "images/1001_F2.png"
    for pid, row in man.items():
        data = (out / row["file"]).read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest() and row["bytes"] == len(data)
        assert row["package"] == path_of(row["pmcid"]) and by_id[pid][1]["image"] == Path(row["file"]).name
    pngs = ("1001_F2", "1001_F3", "1002_F1")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{p}.{'png' if p in pngs else 'jpg'}" for p in by_id)
    assert len(load_captions(out / "fig_captions.json")) == 6
    # a rerun reads nothing; an image deleted by hand brings its article back
    again = fetch_pairs(csv, str(out), mirror=server.base, quiet=True)
    assert (again.articles, again.already_done, again.total_pairs) == (0, 2, 6)
    (out / "images/1002_F2.jpg").unlink()
    assert fetch_pairs(csv, str(out), mirror=server.base, quiet=True).articles == 1
    assert dict(server.requests) == {"/" + path_of("PMC1001"): 1, "/" + path_of("PMC1002"): 2}


def test_every_bad_input_is_skipped_with_a_counted_reason(server, tmp_path):
    secret = tmp_path / "secret.txt"; secret.write_text("TOP-SECRET-VALUE")
    good = lambda p, **kw: jats_article(p[3:], p, [fig(1, "<p>Axial CT.</p>", f"{p}-g1")], ["See Figure 1."], **kw)
    laughs = (b'<?xml version="1.0"?><!DOCTYPE article [<!ENTITY a "aaaaaaaaaa">' +
              b"".join(b'<!ENTITY a%d "%s">' % (i, (b"&a%d;" % (i - 1) if i else b"&a;") * 10) for i in range(1, 9)) +
              b']><article><body><p>&a8;</p></body></article>')
    xxe = f'<!DOCTYPE article [<!ENTITY x SYSTEM "{secret.as_uri()}">]><article><body><p>&x;</p></body></article>'
    entity = good("PMC2003").replace(b"<article ", b'<!DOCTYPE a [<!ENTITY e "x">]><article ', 1) \
        .replace(b'<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN" "JATS-archivearticle1.dtd">', b"")
    cases = {
        "PMC2001": {"PMC2001/a.nxml": laughs},
        "PMC2002": {"PMC2002/a.nxml": xxe.encode()},
        "PMC2003": {"PMC2003/a.nxml": entity, "PMC2003/PMC2003-g1.jpg": JPG},
        "PMC2004": {"PMC2004/a.nxml": jats_article("2004", "PMC2004", [fig(1, "<p> </p>", "PMC2004-g1"),
                    fig(2, "<p>MRI.</p>", "nowhere"), fig(3, "<p>MRI.</p>"), fig(4, "<p>Axial CT.</p>", "PMC2004-g4")], []),
                    "PMC2004/PMC2004-g1.jpg": JPG, "PMC2004/PMC2004-g4.jpg": JPG},
        "PMC2005": {"PMC2005/only.jpg": JPG},  # no XML
        "PMC2006": {"PMC2006/a.nxml": good("PMC2006"), "../../../PMC2006-g1.jpg": JPG, "/abs.jpg": JPG},
        "PMC2007": {"PMC2007/a.nxml": good("PMC2007")},  # its graphic is a link: see below
        "PMC2008": {"PMC2008/a.nxml": b"<article><body><p>torn"},
        "PMC2009": {"PMC2009/a.nxml": good("PMC2009"), "PMC2009/PMC2009-g1.jpg": b"\xff\xd8\xff not a jpeg"},
        "PMC2010": {"PMC2010/a.nxml": good("PMC2010"), "PMC2010/PMC2010-g1.png": PNG},  # the one good article
    }
    for p, members in cases.items():
        serve(server, p, members, symlinks={"PMC2007/PMC2007-g1.jpg": str(secret)} if p == "PMC2007" else None)
    rows = [{"pmcid": p, "pmid": p[3:]} for p in [*cases, "PMC2011"]]  # PMC2011 is not on the server
    rows.append({"pmcid": "PMC2012", "path": "../../etc/PMC2012.tar.gz"})  # a list row that climbs out
    csv = write(tmp_path / "oa.csv", oa_file_list(rows))
    out = tmp_path / "out"
    res = fetch_pairs(csv, str(out), mirror=server.base, workers=3, max_bad=0.1, quiet=True)
    assert res.reasons == {
        "package: XML declares entities": 3, "package: package has no XML": 1, "package: malformed XML": 1,
        "package not_found": 1, "figure: empty caption": 1, "figure: graphic not in package": 1,
        "figure: figure has no graphic": 1, "figure: graphic member refused": 2,
        "figure: graphic not a decodable image": 1}
    assert res.bad_rows == {"package path absolute or with '..'": 1}
    assert (res.pairs, res.unsafe_members, res.exit_code) == (2, 3, 0)
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2004_F4.jpg", "2010_F1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oa.csv", "out", "secret.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["articles.jsonl", "fig_captions.json", "images", "manifest.jsonl"]
    for f in out.rglob("*"):
        assert f.is_dir() or b"TOP-SECRET" not in f.read_bytes(), f
    art = last(out / "articles.jsonl", "pmcid")
    assert art["PMC2011"]["status"] == "not_found" and art["PMC2006"]["unsafe_members"] == 2


def test_cli_filters_shards_and_errors(server, tmp_path, llavamed_cmd):
    rows = [{"pmcid": f"PMC30{i:02d}", "pmid": f"30{i:02d}", "license": lic, "updated": f"20{18 + i % 4}-06-01 00:00:00"}
            for i, lic in enumerate(["CC BY", "CC BY-NC", "CC0", "NO-CC CODE", "CC BY-NC-ND", "CC BY-SA"] * 2)]
    for r in rows:
        p = r["pmcid"]
        serve(server, p, {f"{p}/a.nxml": jats_article(r["pmid"], p, [fig(1, "<p>CT.</p>", "g1")], []), f"{p}/g1.png": PNG})
    csv = write(tmp_path / "oa.csv", oa_file_list(rows))
    pick = lambda **kw: [p.pmcid for p in select_packages(csv, **kw)[0]]
    assert len(pick(license="comm")) == 4 and len(pick(license="noncomm")) == 6 and len(pick()) == 12
    assert pick(since="2020-01-01", until="2020-12-31") == ["PMC3002", "PMC3006", "PMC3010"]
    pmids = write(tmp_path / "pmids.txt", "3003\n# a comment\nPMID:3005\n\n")
    cmd = [llavamed_cmd, "pmc-pairs", "--file-list", csv, "--mirror", server.base, "--quiet"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "p"), "--pmids", pmids], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "pairs 2," in r.stdout and "left out: PMID list 10" in r.stdout
    assert sorted(last(tmp_path / "p/manifest.jsonl")) == ["3003_F1", "3005_F1"]
    shares = []
    for k in range(3):
        res = fetch_pairs(csv, str(tmp_path / f"s{k}"), mirror=server.base, shard=f"{k}/3", quiet=True)
        shares.append(set(last(tmp_path / f"s{k}/manifest.jsonl")) if res.pairs else set())
        assert all(Shard(k, 3).holds(f"PMC{p.split('_')[0]}") for p in shares[-1])
    assert set().union(*shares) == {f"{r['pmid']}_F1" for r in rows} and sum(map(len, shares)) == 12
    assert fetch_pairs(csv, str(tmp_path / "lim"), mirror=server.base, license="comm", limit=2, quiet=True).pairs == 2
    for bad, msg in [(["--license", "free"], "--license 'free'"), (["--since", "2020"], "want YYYY-MM-DD"),
                     (["--shard", "4/3"], "shard 4/3"), (["--since", "2031-01-01"], "no article passes the filters"),
                     (["--classifier", "nope:f"], "--classifier 'nope:f'"), (["--mirror", "ftp://x"], "--mirror")]:
        r = subprocess.run(cmd + ["--out", str(tmp_path / "bad")] + bad, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
    assert not (tmp_path / "bad").exists()
    r = subprocess.run([llavamed_cmd, "pmc-pairs", "--file-list", csv, "--out", str(tmp_path / "x"),
                        "--mirror", server.base + "/gone", "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "package not_found 12" in r.stdout  # every package missing: not a success


def test_align_and_instruct_read_the_output_unchanged(server, tmp_path, llavamed_cmd, monkeypatch):
    from chat_server import ChatServer
    csv = write(tmp_path / "oa.csv", oa_file_list(styles(server)))
    out = tmp_path / "out"
    fetch_pairs(csv, str(out), mirror=server.base, quiet=True)
    caps = str(out / "fig_captions.json")
    r = subprocess.run([llavamed_cmd, "align", "--captions", caps, "--out", str(tmp_path / "align.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    align = json.loads((tmp_path / "align.json").read_text())
    assert sorted(a["id"] for a in align) == sorted(last(out / "manifest.jsonl"))
    assert all((out / "images" / a["image"]).is_file() for a in align)
    r = subprocess.run([llavamed_cmd, "validate", str(tmp_path / "align.json"), "--images", str(out / "images")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {**os.environ, "LLAVAMED_TEST_KEY": "sk-local"}
    with ChatServer() as chat:
        r = subprocess.run([llavamed_cmd, "instruct", "--captions", caps, "--out", str(tmp_path / "inst.jsonl"),
                            "--teacher", "openai", "--base-url", chat.base_url, "--model", "any", "--api-key-env",
                            "LLAVAMED_TEST_KEY", "--inline-mentions", "--quiet", "--backoff", "0.01"],
                           capture_output=True, text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        assert chat.stats()["requests"] == 6
    inst = rows_of(tmp_path / "inst.jsonl")
    assert sorted(x["id"] for x in inst) == sorted(last(out / "manifest.jsonl"))
    assert {x["id"]: x["image"] for x in inst} == {a["id"]: a["image"] for a in align}


def _tree(out: Path) -> dict:
    "What a run leaves: image bytes, fig_captions.json, the last manifest and article rows."
    return {"images": {p.name: p.read_bytes() for p in (out / "images").iterdir()},
            "captions": (out / "fig_captions.json").read_bytes(),
            "manifest": last(out / "manifest.jsonl"),
            "articles": {k: {f: v for f, v in r.items()} for k, r in last(out / "articles.jsonl", "pmcid").items()}}



def test_one_run_at_a_time_per_out_and_a_killed_runs_partial_files_go(server, tmp_path, llavamed_cmd):
    "A second run into a folder another run holds is refused in one line; a dead run's unfinished writes are removed."
    from llavamed.core import file_lock
    serve(server, "PMC3100", {"PMC3100/a.nxml": jats_article("3100", "PMC3100", [fig(1, "<p>CT.</p>", "g1")], []),
                              "PMC3100/g1.png": PNG})
    csv = write(tmp_path / "oa.csv", oa_file_list([{"pmcid": "PMC3100", "pmid": "3100"}]))
    out = tmp_path / "out"
    cmd = [llavamed_cmd, "pmc-pairs", "--file-list", csv, "--mirror", server.base, "--out", str(out), "--quiet"]
    with file_lock(out / ".pmc-pairs.lock"):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "another pmc-pairs run is writing there" in r.stderr, r.stderr
    assert not (out / "images").exists()
    (out / "images").mkdir(); (out / "images" / ".3100_F1.png.x1y2z3.tmp").write_bytes(b"half an image")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "images").iterdir()) == ["3100_F1.png"]
    assert not (out / ".pmc-pairs.lock").exists()

@pytest.mark.slow
def test_sigkill_midway_then_resume_equals_an_uninterrupted_run(tmp_path, llavamed_cmd):
    n = 30
    with TarServer(latency=0.15) as server:
        rows = []
        for i in range(n):
            p = f"PMC{4000 + i}"
            figs = [fig(j, f"<p>{['Axial CT.', 'T1-weighted MRI.', 'H&amp;E stain.'][j % 3]} Panel (A) and (B).</p>",
                        f"g{j}") for j in range(1, 3)]
            serve(server, p, {f"{p}/a.nxml": jats_article(str(4000 + i), p, figs, ["See Figs. 1 and 2."]),
                              f"{p}/g1.jpg": image_bytes(colour=(i, 1, 1), fmt="JPEG"), f"{p}/g2.png": image_bytes(colour=(1, i, 1))})
            rows.append({"pmcid": p, "pmid": str(4000 + i)})
        csv = write(tmp_path / "oa.csv", oa_file_list(rows))
        ref, out = tmp_path / "ref", tmp_path / "out"
        fetch_pairs(csv, str(ref), mirror=server.base, workers=2, quiet=True)
        cmd = [llavamed_cmd, "pmc-pairs", "--file-list", csv, "--out", str(out), "--mirror", server.base,
               "--workers", "2", "--quiet"]
        server.requests.clear()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        arts, t0 = out / "articles.jsonl", time.time()
        while not (arts.exists() and len(arts.read_text().splitlines()) >= 6):
            assert proc.poll() is None and time.time() - t0 < 60, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL); proc.wait()
        done_first = set(last(arts, "pmcid"))
        assert 6 <= len(done_first) < n and not (out / "fig_captions.json").exists()
        before = dict(server.settle())
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"already_done {len(done_first)}," in r.stdout
        assert _tree(out) == _tree(ref)
        for p in done_first: assert server.requests["/" + path_of(p)] == 1  # finished packages never refetched
        assert sum(server.requests.values()) <= n + 4 and sum(before.values()) < n


def test_per_article_source_gives_the_same_pairs_as_packages(server, tmp_path):
    rows = styles(server)
    for path, route in list(server.routes.items()):  # the same articles, served one file per URL
        import io, tarfile
        with tarfile.open(fileobj=io.BytesIO(route["body"]), mode="r:gz") as tf:
            for m in tf.getmembers():
                pmcid, name = m.name.split("/")
                data = tf.extractfile(m).read()
                server.add(f"/cloud/{pmcid}/{pmcid}.xml" if name.endswith(".nxml") else f"/cloud/{pmcid}/{name}", data)
    hostile = jats_article("1003", "PMC1003", [fig(1, "<p>Axial CT.</p>", "../../secret")], [])
    server.add("/cloud/PMC1003/PMC1003.xml", hostile)
    csv = write(tmp_path / "oa.csv", oa_file_list(rows + [{"pmcid": "PMC1003", "pmid": "1003"}, {"pmcid": "PMC1004"}]))
    by_package = fetch_pairs(csv, str(tmp_path / "pk"), mirror=server.base, quiet=True)
    res = fetch_pairs(csv, str(tmp_path / "url"), article_url=server.base + "/cloud/{pmcid}/{pmcid}.xml",
                      figure_url=server.base + "/cloud/{pmcid}/{name}", quiet=True, workers=2)
    assert (res.pairs, by_package.pairs) == (6, 6)
    assert res.reasons == {"figure: graphic not in package": 1, "package not_found": 1}
    assert (tmp_path / "url/fig_captions.json").read_bytes() == (tmp_path / "pk/fig_captions.json").read_bytes()
    for name in ("1001_F1.jpg", "1001_F2.png", "1002_F1.png"):
        assert (tmp_path / "url/images" / name).read_bytes() == (tmp_path / "pk/images" / name).read_bytes()
    # the hostile href '../../secret' is only a file name in its article's folder on the source's host
    asked = sorted(p for p in server.requests if "PMC1003" in p and p.startswith("/cloud/"))
    assert asked == sorted(f"/cloud/PMC1003/{n}" for n in ["PMC1003.xml", "secret.jpg", "secret.png", "secret.tif",
                                                             "secret.gif"])
    assert last(tmp_path / "url/manifest.jsonl")["1001_F1"]["member"] == "a-g001.jpg"
    r = fetch_pairs  # a template without its placeholder is refused before --out exists
    with pytest.raises(ValueError, match="needs {name}"):
        r(csv, str(tmp_path / "no"), article_url=server.base + "/{pmcid}.xml", figure_url=server.base + "/x.jpg")
    assert not (tmp_path / "no").exists()


def test_a_hostile_package_list_is_counted_by_row_or_refused_in_one_line(tmp_path, llavamed_cmd):
    rows = [{"pmcid": f"PMC40{i:02d}", "pmid": f"40{i:02d}"} for i in range(60)]
    lines = oa_file_list(rows).splitlines(keepends=True)
    lines[3] = lines[3].replace("J Test", "J " + "x" * 200_000)  # a field over the csv module's limit
    (tmp_path / "huge.csv").write_text("".join(lines))
    picked, _ = select_packages(tmp_path / "huge.csv")
    assert len(picked) == 59 and "PMC4002" not in {p.pmcid for p in picked}
    raw = oa_file_list(rows).encode().replace(b"J Test. 2020; PMC4005", b"J \xff\xfeTest")
    (tmp_path / "latin.csv").write_bytes(raw + b"\n")  # and a blank last line, not a row
    bad = BadRecords("latin.csv")
    picked, _ = select_packages(tmp_path / "latin.csv", bad=bad)
    assert len(picked) == 59 and bad.counts == {"not UTF-8 text": 1} and "line 7" in bad.summary()
    write(tmp_path / "pmids.txt", "4001\n")
    (tmp_path / "latin.txt").write_bytes(b"4001\n\xff4002\n")
    write(tmp_path / "header.csv", oa_file_list([]))
    cmd = [llavamed_cmd, "pmc-pairs", "--out", str(tmp_path / "out"), "--quiet"]
    for argv, message in [
            (["--file-list", tmp_path / "latin.csv", "--max-bad", "0"], "latin.csv: 1 of 60 records are bad"),
            (["--file-list", tmp_path / "huge.csv", "--max-bad", "0"], "malformed CSV row at line 4"),
            (["--file-list", tmp_path / "nope.csv"], "--file-list " + str(tmp_path / "nope.csv") + ": no such file"),
            (["--file-list", tmp_path / "header.csv"], "header.csv: the list holds no package row"),
            (["--file-list", tmp_path / "huge.csv", "--pmids", tmp_path / "latin.txt"], "latin.txt: line 2: not UTF-8"),
            (["--file-list", tmp_path / "huge.csv", "--pmids", tmp_path / "gone.txt"], "gone.txt: no such file"),
            (["--file-list", tmp_path / "huge.csv", "--since", "2020-13-45"], "--since '2020-13-45': want YYYY-MM-DD"),
            (["--file-list", tmp_path / "huge.csv", "--limit", "0"], "--limit 0: want at least 1 article")]:
        r = subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=60)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and message in err[0], (argv, r.stderr)
    assert not (tmp_path / "out").exists()
