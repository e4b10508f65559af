"A real loopback HTTP server for PMC-style tarballs, with per-path faults and request counting."
from __future__ import annotations
import io, tarfile, threading, time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def image_bytes(size=(16, 16), colour=(200, 30, 30), fmt="PNG") -> bytes:
    "A small real image file's bytes."
    from PIL import Image
    buf = io.BytesIO(); Image.new("RGB", size, colour).save(buf, fmt); return buf.getvalue()


def make_tar(members: dict[str, bytes], symlinks: dict[str, str] | None = None,
             hardlinks: dict[str, str] | None = None) -> bytes:
    "A .tar.gz holding `members` (name -> bytes) and optional symbolic/hard links (name -> target)."
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                ti = tarfile.TarInfo(name); ti.type = kind; ti.linkname = target; tf.addfile(ti)
    return buf.getvalue()


class TarServer:
    """Serves registered paths on 127.0.0.1. Each route: body bytes plus a fault `kind`:
    'ok'; 'status' (always answer `code`); 'cut' (announce the full length, send half, close);
    `fail_first` = answer 503 to the first N requests; `delay` = seconds before answering.
    Unregistered paths get 404. `latency` is added to every request. `requests` counts GETs per path."""

    def __init__(self, latency: float = 0.0):
        self.routes: dict[str, dict] = {}
        self.requests: Counter = Counter()
        self.latency, self.lock = latency, threading.Lock()
        self.last_request = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
                    server.last_request = time.monotonic()
                    n = server.requests[self.path]
                r = server.routes.get(self.path)
                time.sleep(server.latency + (r or {}).get("delay", 0))
                try:
                    if r is None: return self.send_error(404)
                    if n <= r.get("fail_first", 0): return self.send_error(503)
                    if r["kind"] == "status": return self.send_error(r["code"])
                    body = r["body"]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/gzip")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2] if r["kind"] == "cut" else body)
                    self.wfile.flush()
                    self.close_connection = True
                except (BrokenPipeError, ConnectionResetError): pass  # the client stopped reading early

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str: return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, body: bytes = b"", kind: str = "ok", **kw) -> str:
        "Register `path` and return its full URL."
        self.routes[path] = {"body": body, "kind": kind, **kw}
        return self.base + path

    def settle(self, quiet: float = 0.5, timeout: float = 15.0) -> Counter:
        """Wait until no request has arrived for `quiet` seconds (a killed client's queued connections are still
        accepted and counted for a moment after it dies), then return a copy of the counts."""
        t0 = time.monotonic()
        while time.monotonic() - self.last_request < quiet and time.monotonic() - t0 < timeout: time.sleep(0.05)
        with self.lock: return Counter(self.requests)

    def __enter__(self): self.thread.start(); return self
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()


XLINK = "http://www.w3.org/1999/xlink"
DOCTYPE = ('<!DOCTYPE article PUBLIC "-//NLM//DTD JATS (Z39.96) Journal Archiving and Interchange DTD v1.2 20190208//EN" '
           '"JATS-archivearticle1.dtd">')


def jats_article(pmid: str | None, pmcid: str, figures: list[dict], paragraphs: list[str], title: str = "An article",
                 namespace: str | None = None, xlink_prefix: str = "xlink", tables: bool = True,
                 supplementary: bool = True, license_url: str = "https://creativecommons.org/licenses/by/4.0/",
                 figures_in_floats: bool = False) -> bytes:
    """A PMC-shaped JATS article. `figures`: dicts with id, label, caption (an XML fragment) and href (None for
    no <graphic>); `paragraphs`: XML fragments of body <p>s. `namespace`: a default namespace for the JATS
    elements; `xlink_prefix`: the prefix bound to xlink; `tables`/`supplementary` add a table with a graphic and
    supplementary material holding a <fig> and a <media>, none of which is a figure of the article;
    `figures_in_floats` puts the figures in <floats-group> instead of the body."""
    x = xlink_prefix
    ns = f' xmlns="{namespace}"' if namespace else ""
    ids = (f'<article-id pub-id-type="pmid">{pmid}</article-id>' if pmid else "") + \
          f'<article-id pub-id-type="pmc">{pmcid.removeprefix("PMC")}</article-id>'
    figs = "".join(f'<fig id="{f["id"]}" position="float"><label>{f["label"]}</label>'
                   f'<caption>{f["caption"]}</caption>'
                   + (f'<graphic {x}:href="{f["href"]}"/>' if f.get("href") else "") + "</fig>" for f in figures)
    table = (f'<table-wrap id="T1"><label>Table 1</label><caption><p>Patient characteristics on CT.</p></caption>'
             f'<graphic {x}:href="{pmcid}-t001"/></table-wrap>') if tables else ""
    supp = (f'<sec><supplementary-material id="S1"><fig id="SF1"><label>Figure S1</label><caption><p>Extra MRI.'
            f'</p></caption><graphic {x}:href="{pmcid}-s001"/></fig><media {x}:href="{pmcid}-s002.mp4"/>'
            f'</supplementary-material></sec>') if supplementary else ""
    body = "".join(f"<p>{p}</p>" for p in paragraphs) + ("" if figures_in_floats else figs) + table
    floats = f"<floats-group>{figs}</floats-group>" if figures_in_floats else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n{DOCTYPE}\n<article{ns} xmlns:{x}="{XLINK}" '
            f'article-type="research-article"><front><journal-meta><journal-id>J</journal-id></journal-meta>'
            f'<article-meta>{ids}<title-group><article-title>{title}</article-title></title-group>'
            f'<permissions><license {x}:href="{license_url}"><license-p>Open access.</license-p></license>'
            f'</permissions></article-meta></front><body><sec><title>Results</title>{body}</sec></body>'
            f'<back>{supp}<ref-list><ref id="R1"><mixed-citation>See Fig. 9 of another paper.</mixed-citation>'
            f'</ref></ref-list></back>{floats}</article>').encode("utf-8")


def oa_file_list(rows: list[dict]) -> str:
    """The text of an Open Access package list (oa_file_list.csv) for rows with pmcid, and optionally pmid,
    license ('CC BY'), updated ('YYYY-MM-DD HH:MM:SS') and path (default oa_package/xx/yy/PMCID.tar.gz)."""
    import csv
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["File", "Article Citation", "Accession ID", "Last Updated (YYYY-MM-DD HH:MM:SS)", "PMID", "License"])
    for r in rows:
        p = r["pmcid"]
        w.writerow([r.get("path", f"oa_package/{p[-2:]}/{p[-4:-2]}/{p}.tar.gz"), f"J Test. 2020; {p}",
                    p, r.get("updated", "2020-01-01 00:00:00"), r.get("pmid", ""), r.get("license", "CC BY")])
    return buf.getvalue()
