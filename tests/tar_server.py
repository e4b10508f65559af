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
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_GET(self):
                with server.lock:
                    server.requests[self.path] += 1
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

    def __enter__(self): self.thread.start(); return self
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()
