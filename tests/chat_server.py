"""A real chat-completions HTTP server on 127.0.0.1 with fault injection, for tests and benchmarks.

It speaks the subset of the OpenAI protocol that `POST /v1/chat/completions` needs, so the official
`openai` client talks to it unchanged. Each request is keyed by the `X-Client-Request-Id` header (the
id `llavamed.client.ChatClient` sends) or, without it, by a hash of the last user message; the server
counts requests per key and decides per request what to do:

  ok        answer (after `latency` seconds)        429      rate limited, with a `Retry-After` header
  500, 503  server error                            slow     sleep `slow_seconds`, then answer
  drop      close the connection without a reply    garbage  200 with content that is no conversation
  badjson   200 whose body is not JSON              401      bad key (the message echoes the key, or
                                                             the whole Basic header, as real providers
                                                             and proxies do, to test redaction)

`require_key` answers 401 unless the request carries `Bearer KEY`; `require_auth` unless its whole
`Authorization` header is the given value (a proxy's `Basic ...`).

The action comes from `script` (per key: a list of actions for its 1st, 2nd, ... request), else from
`fault_rate` (a seeded random draw among `faults`), else `ok`. Replies come from `replies` (per key),
`reply_text`, a `reply_fn(messages, key)` (in-process only), or a default that writes a short
User/Assistant conversation from the words of the last user message.

It also speaks the files and batches endpoints of the Batch API (`POST /v1/files` multipart upload,
`GET /v1/files/ID` and `/content`, `POST /v1/batches`, `GET /v1/batches/ID`, `GET /v1/batches` list), so
`client.files.create(..., purpose="batch")` and `client.batches.create/retrieve/list` work unchanged. A
batch moves validating -> in_progress -> completed over `batch_seconds` (a compressed 24-hour window);
each line's action comes from `batch_script` (per custom id) or `batch_fault_rate` among `batch_faults`:
`ok`, `500`/`429`/`400` (a line in the error file), `expire` (an error line `batch_expired`), `drop`
(the line is in neither file), `garbage`. The batches whose creation index is in `expire_batches` end
`expired` (the first half of their lines answered, the rest `batch_expired`); those in `fail_batches`
end `failed` (validation errors, no output). A batch over `batch_max_lines` lines or an input file over
`batch_max_bytes` bytes fails validation, as the provider's limits do. `batch_output_extra` holds raw lines
added to every output file (malformed JSON, unknown or repeated custom ids). `api_faults` maps a files/batches
route (`files.create`, `files.content`, `batches.create`, `batches.retrieve`, `batches.list`) to the HTTP
codes its 1st, 2nd, ... calls answer (401, 404, 500: a JSON error; 0 answers normally). Image parts (`image_url` with a
data URL) are decoded and counted in `stats()["image_parts"]`; `OpenAI-Organization` / `OpenAI-Project`
headers are counted in `stats()["headers_seen"]`.

Use in-process (`with ChatServer(latency=0.2) as srv: srv.base_url`) or in a child process
(`with ChatServerProcess(...) as srv`), which keeps the server off the caller's GIL for benchmarks.
Both have `.base_url`, `.stats()`, `.configure(**kw)` and `.reset()` (over HTTP, so they behave alike).
Run `python tests/chat_server.py --port 8000 --latency 0.2` to serve from a shell.
"""
from __future__ import annotations
import argparse, base64, collections, email, email.policy, hashlib, json, random, socket, subprocess, sys
import threading, time, urllib.parse, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACTIONS = ("ok", "429", "500", "503", "slow", "drop", "garbage", "badjson", "401")
DEFAULTS = dict(latency=0.0, latency_jitter=0.0, script={}, fault_rate=0.0,
                faults=["429", "500", "slow", "drop", "garbage"], retry_after=0.1, slow_seconds=5.0,
                replies={}, reply_text=None, require_key=None, require_auth=None, seed=0,
                model="loopback-chat", batch_seconds=0.5, validate_seconds=0.05, batch_script={},
                batch_fault_rate=0.0, batch_faults=["500", "expire", "drop"], expire_batches=[], fail_batches=[],
                batch_max_lines=50_000, batch_max_bytes=200 * 1024 * 1024, batch_output_extra=[], api_faults={})
BATCH_ACTIONS = ("ok", "500", "429", "400", "expire", "drop", "garbage")
TERMINAL = ("completed", "failed", "expired", "cancelled")


def _words(text: str) -> list[str]:
    return [w.strip(".,;:()[]\"'") for w in text.split() if len(w.strip(".,;:()[]\"'")) > 3]


def default_reply(messages: list[dict], key: str) -> str:
    "A two-turn User/Assistant conversation built from the words of the last user message."
    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    if isinstance(last, list): last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
    w = _words(last)[-40:] or ["structure"]
    return (f"User: What does this image show?\nAssistant: The image shows {' '.join(w[:12])}.\n"
            f"User: Which feature stands out most?\nAssistant: The most notable feature is the {w[-1].lower()}.")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # the default backlog of 5 drops connections when 32 clients connect at once

    def __init__(self, addr, config: dict, reply_fn=None):
        super().__init__(addr, _Handler)
        self.lock = threading.Lock()
        self.config = {**DEFAULTS, **config}
        self.reply_fn = reply_fn
        self.reset()

    def handle_error(self, request, client_address):
        "A client that gave up (timeout, dropped connection) is expected here, not an error."
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    def reset(self):
        with self.lock:
            self.by_key, self.by_action = collections.Counter(), collections.Counter()
            self.log: list[tuple[str, str]] = []
            self.inflight = self.max_inflight = 0
            self.rng = random.Random(self.config["seed"])
            self.files: dict[str, dict] = {}  # id -> {"meta": file object, "content": bytes}
            self.batches: dict[str, dict] = {}  # id -> {"obj": batch object, "lines": [...], "index": n}
            self.batch_by_key, self.image_parts, self.headers_seen = collections.Counter(), 0, collections.Counter()
            self.upload_bytes = self.uploads = 0
            self.api_calls = collections.Counter()  # files/batches calls per route (for `api_faults`)
            self.body_keys = collections.Counter()  # top-level request fields seen (chat requests and batch lines)

    def decide(self, key: str) -> tuple[str, float]:
        with self.lock:
            n = self.by_key[key]
            self.by_key[key] += 1
            script = self.config["script"].get(key)
            if script is not None and n < len(script): act = script[n]
            elif self.config["fault_rate"] and self.rng.random() < self.config["fault_rate"]:
                act = self.rng.choice(self.config["faults"])
            else: act = "ok"
            jitter = self.rng.uniform(0, self.config["latency_jitter"]) if self.config["latency_jitter"] else 0.0
            self.by_action[act] += 1
            self.log.append((key, act))
            return act, jitter

    def stats(self) -> dict:
        with self.lock:
            return {"requests": sum(self.by_key.values()), "by_key": dict(self.by_key),
                    "by_action": dict(self.by_action), "max_inflight": self.max_inflight,
                    "batches_created": len(self.batches), "batch_lines": sum(self.batch_by_key.values()),
                    "batch_by_key": dict(self.batch_by_key), "uploads": self.uploads,
                    "upload_bytes": self.upload_bytes, "image_parts": self.image_parts,
                    "headers_seen": dict(self.headers_seen), "body_keys": dict(self.body_keys),
                    "batch_status": {b: d["obj"]["status"] for b, d in self.batches.items()}}

    def batch_action(self, key: str) -> str:
        with self.lock:
            n = self.batch_by_key[key]
            self.batch_by_key[key] += 1
            script = self.config["batch_script"].get(key)
            if script is not None and n < len(script): return script[n]
            if self.config["batch_fault_rate"] and self.rng.random() < self.config["batch_fault_rate"]:
                return self.rng.choice(self.config["batch_faults"])
            return "ok"

    def reply_text(self, messages: list[dict], key: str, act: str) -> str:
        "The assistant text for one answered request."
        cfg = self.config
        if act == "garbage": return "I'm sorry, I can't help with that request."
        if key in cfg["replies"]: return cfg["replies"][key]
        if cfg["reply_text"] is not None: return cfg["reply_text"]
        if self.reply_fn is not None: return self.reply_fn(messages, key)
        return default_reply(messages, key)

    def completion(self, req: dict, key: str, text: str) -> dict:
        "A chat.completion object for `text`, with word-count usage."
        messages = req.get("messages") or []
        prompt_toks = sum(len(str(m.get("content", "")).split()) for m in messages)
        comp_toks = len(text.split())
        return {"id": f"chatcmpl-{key}-{self.by_key[key] + self.batch_by_key[key]}", "object": "chat.completion",
                "created": int(time.time()), "model": req.get("model", self.config["model"]),
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt_toks, "completion_tokens": comp_toks,
                          "total_tokens": prompt_toks + comp_toks}}

    def count_images(self, messages: list[dict]):
        "Count (and decode, so a broken one fails the request) the data-URL image parts of `messages`."
        n = 0
        for m in messages:
            for part in m.get("content") if isinstance(m.get("content"), list) else []:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part["image_url"]["url"]
                    head, _, data = url.partition(",")
                    if not head.startswith("data:image/") or not head.endswith(";base64"):
                        raise ValueError(f"image part is not a base64 data URL: {head[:40]!r}")
                    base64.b64decode(data, validate=True)
                    n += 1
        with self.lock: self.image_parts += n

    def new_file(self, content: bytes, filename: str, purpose: str) -> dict:
        with self.lock:
            fid = f"file-{len(self.files) + 1:06d}"
            meta = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                    "filename": filename, "purpose": purpose, "status": "processed"}
            self.files[fid] = {"meta": meta, "content": content}
            return meta

    def create_batch(self, body: dict) -> dict:
        "Create a batch from an uploaded input file; its lines are answered now and revealed when it completes."
        cfg, fid = self.config, body.get("input_file_id")
        if fid not in self.files: raise KeyError(f"No such File object: {fid}")
        content = self.files[fid]["content"]
        lines = [json.loads(l) for l in content.decode("utf-8").splitlines() if l.strip()]
        with self.lock:
            index = len(self.batches)
            bid = f"batch_{index + 1:06d}"
        now = time.time()
        obj = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
               "input_file_id": fid, "completion_window": body.get("completion_window"), "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": int(now), "in_progress_at": None,
               "expires_at": int(now) + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
               "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
               "metadata": body.get("metadata") or None}
        too_big = len(lines) > cfg["batch_max_lines"] or len(content) > cfg["batch_max_bytes"]
        failing = index in cfg["fail_batches"] or too_big
        results = []
        for i, line in enumerate(lines if not failing else []):
            key, req = line["custom_id"], line.get("body") or {}
            with self.lock: self.body_keys.update(list(req))
            act = self.batch_action(key)
            if act == "ok" or act == "garbage": self.count_images(req.get("messages") or [])
            if index in cfg["expire_batches"] and i >= len(lines) // 2: act = "expire"
            results.append((key, act, req))
        with self.lock:
            self.batches[bid] = {"obj": obj, "results": results, "t0": now, "index": index, "failing": failing,
                                 "too_big": too_big, "n_lines": len(lines), "n_bytes": len(content)}
        return obj

    def batch_object(self, bid: str) -> dict:
        "The batch's object now: its status follows the clock; the output files appear when it ends."
        d = self.batches[bid]
        obj, cfg = d["obj"], self.config
        if obj["status"] in TERMINAL: return obj
        elapsed = time.time() - d["t0"]
        if elapsed < cfg["validate_seconds"]: return obj
        if d["failing"]:
            why = (f"batch of {d['n_lines']} lines, {d['n_bytes']} bytes is over the limits "
                   f"({cfg['batch_max_lines']} lines, {cfg['batch_max_bytes']} bytes)" if d["too_big"]
                   else "Invalid input file (simulated validation failure).")
            obj.update(status="failed", failed_at=int(time.time()),
                       errors={"object": "list", "data": [{"code": "invalid_request", "message": why,
                                                           "param": None, "line": None}]})
            return obj
        obj["in_progress_at"] = obj["in_progress_at"] or int(time.time())
        total = len(d["results"])
        if elapsed < cfg["batch_seconds"]:
            obj.update(status="in_progress")
            obj["request_counts"]["completed"] = int(total * elapsed / cfg["batch_seconds"])
            return obj
        out, err = [], []
        for i, (key, act, req) in enumerate(d["results"]):
            rid = f"batch_req_{bid}_{i}"
            if act in ("ok", "garbage"):
                out.append({"id": rid, "custom_id": key, "error": None,
                            "response": {"status_code": 200, "request_id": f"req_{i}",
                                         "body": self.completion(req, key, self.reply_text(req.get("messages") or [],
                                                                                           key, act))}})
            elif act == "expire":
                err.append({"id": rid, "custom_id": key, "response": None,
                            "error": {"code": "batch_expired", "message": "This request could not be executed "
                                      "before the completion window expired."}})
            elif act in ("500", "429", "400"):
                msg = {"500": "The server had an error.", "429": "Rate limit reached.",
                       "400": "Invalid request."}[act]
                err.append({"id": rid, "custom_id": key, "error": None,
                            "response": {"status_code": int(act), "request_id": f"req_{i}",
                                         "body": {"error": {"message": msg, "type": "server_error", "code": None,
                                                            "param": None}}}})
        expired = d["index"] in cfg["expire_batches"]
        dump = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()
        extra = "".join(line + "\n" for line in cfg["batch_output_extra"]).encode()
        if out or extra:
            obj["output_file_id"] = self.new_file(dump(out) + extra, f"{bid}_output.jsonl", "batch_output")["id"]
        if err: obj["error_file_id"] = self.new_file(dump(err), f"{bid}_error.jsonl", "batch_output")["id"]
        now = int(time.time())
        obj["request_counts"].update(completed=len(out), failed=total - len(out))
        obj.update(status="expired" if expired else "completed", finalizing_at=now,
                   **({"expired_at": now} if expired else {"completed_at": now}))
        return obj

    def api_fault(self, route: str) -> int:
        "The HTTP code `api_faults` scripts for this call of `route` (0: answer normally)."
        with self.lock:
            n = self.api_calls[route]
            self.api_calls[route] += 1
            codes = self.config["api_faults"].get(route) or []
            return int(codes[n]) if n < len(codes) else 0

    def enter(self):
        with self.lock: self.inflight += 1; self.max_inflight = max(self.max_inflight, self.inflight)

    def leave(self):
        with self.lock: self.inflight -= 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections as with a real provider

    def log_message(self, *a): pass

    def _send(self, code: int, body: bytes, ctype="application/json", headers=None):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items(): self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj, headers=None): self._send(code, json.dumps(obj).encode(), headers=headers)

    def _error(self, code: int, msg: str, typ: str, headers=None):
        self._json(code, {"error": {"message": msg, "type": typ, "code": None, "param": None}}, headers)

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def _authorised(self) -> bool:
        "Whether the request carries the key (or header) the server requires; answers 401 when not."
        cfg, auth = self.server.config, self.headers.get("Authorization", "")
        for name in ("OpenAI-Organization", "OpenAI-Project"):
            if self.headers.get(name):
                with self.server.lock: self.server.headers_seen[f"{name}={self.headers[name]}"] += 1
        if (cfg["require_key"] and auth != f"Bearer {cfg['require_key']}") or \
           (cfg["require_auth"] and auth != cfg["require_auth"]):
            self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}.", "invalid_request_error")
            return False
        return True

    def _faulted(self, route: str) -> bool:
        "Whether `api_faults` answers this call of `route` with an error (sent here)."
        code = self.server.api_fault(route)
        if code:
            self._error(code, f"simulated {code} on {route}", "server_error" if code >= 500 else "invalid_request_error")
        return bool(code)

    def _batch_get(self, path: str) -> bool:
        "Answer the files and batches GET routes; False when `path` is none of them."
        srv, parts = self.server, urllib.parse.urlsplit(path)
        segs = [s for s in parts.path.split("/") if s]
        if "files" in segs:
            rest = segs[segs.index("files") + 1:]
            if not self._authorised(): return True
            if self._faulted("files.content" if rest[1:] == ["content"] else "files.retrieve"): return True
            f = srv.files.get(rest[0]) if rest else None
            if f is None: self._error(404, f"No such File object: {rest[:1]}", "invalid_request_error")
            elif rest[1:] == ["content"]: self._send(200, f["content"], "application/octet-stream")
            else: self._json(200, f["meta"])
            return True
        if "batches" in segs:
            rest = segs[segs.index("batches") + 1:]
            if not self._authorised(): return True
            if self._faulted("batches.retrieve" if rest else "batches.list"): return True
            if rest:
                if rest[0] not in srv.batches: self._error(404, f"No such Batch object: {rest[0]}", "not_found")
                else: self._json(200, srv.batch_object(rest[0]))
                return True
            query = urllib.parse.parse_qs(parts.query)
            limit, after = int(query.get("limit", ["20"])[0]), query.get("after", [None])[0]
            ids = sorted(srv.batches, reverse=True)  # newest first, as the provider lists them
            if after in ids: ids = ids[ids.index(after) + 1:]
            page = [srv.batch_object(b) for b in ids[:limit]]
            self._json(200, {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit})
            return True
        return False

    def _upload(self):
        "POST /v1/files: a multipart form with 'purpose' and 'file'."
        srv = self.server
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        msg = email.message_from_bytes(f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw,
                                       policy=email.policy.HTTP)
        fields, filename = {}, "upload.jsonl"
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = part.get_payload(decode=True)
            if name == "file": filename = part.get_filename() or filename
        if "file" not in fields or "purpose" not in fields:
            return self._error(400, "multipart form needs 'file' and 'purpose'", "invalid_request_error")
        with srv.lock: srv.uploads += 1; srv.upload_bytes += len(fields["file"])
        self._json(200, srv.new_file(fields["file"], filename, fields["purpose"].decode()))

    def do_GET(self):
        if self.path.rstrip("/").endswith("/stats"): return self._json(200, self.server.stats())
        if self._batch_get(self.path): return
        if self.path.rstrip("/").endswith("/models"):
            return self._json(200, {"object": "list", "data": [{"id": self.server.config["model"], "object": "model"}]})
        self._error(404, f"no route {self.path}", "not_found")

    def do_POST(self):
        srv: _Server = self.server
        path = self.path.rstrip("/")
        if path.endswith("/reset"): srv.reset(); return self._json(200, {"ok": True})
        if path.endswith("/config"):
            upd = self._body()
            bad = [k for k in upd if k not in DEFAULTS]
            if bad: return self._error(400, f"unknown config keys {bad}", "invalid_request_error")
            with srv.lock: srv.config.update(upd)
            return self._json(200, srv.config)
        if path.endswith("/files"):
            if not self._authorised() or self._faulted("files.create"):
                self.rfile.read(int(self.headers.get("Content-Length") or 0)); return
            return self._upload()
        if path.endswith("/batches"):
            body = self._body()
            if not self._authorised() or self._faulted("batches.create"): return
            try: return self._json(200, srv.create_batch(body))
            except KeyError as e: return self._error(404, str(e).strip("'\""), "invalid_request_error")
        if not path.endswith("/chat/completions"): return self._error(404, f"no route {self.path}", "not_found")
        try: req = self._body()
        except json.JSONDecodeError: return self._error(400, "request body is not JSON", "invalid_request_error")
        cfg = srv.config
        messages = req.get("messages") or []
        key = self.headers.get("X-Client-Request-Id")
        if not key:
            last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
            key = hashlib.sha1(json.dumps(last).encode()).hexdigest()[:12]
        act, jitter = srv.decide(key)
        srv.enter()
        try: self._answer(srv, cfg, req, messages, key, act, jitter)
        finally: srv.leave()

    def _answer(self, srv, cfg, req, messages, key, act, jitter):
        auth = self.headers.get("Authorization", "")
        for name in ("OpenAI-Organization", "OpenAI-Project"):
            if self.headers.get(name):
                with srv.lock: srv.headers_seen[f"{name}={self.headers[name]}"] += 1
        with srv.lock: srv.body_keys.update(list(req))
        try: srv.count_images(messages)
        except (ValueError, KeyError, TypeError) as e:
            return self._error(400, f"bad image part: {e}", "invalid_request_error")
        if cfg["require_key"] and auth != f"Bearer {cfg['require_key']}": act = "401"
        if cfg["require_auth"] and auth != cfg["require_auth"]: act = "401"  # e.g. a proxy's 'Basic ...'
        time.sleep(cfg["latency"] + jitter)
        if act == "429":
            return self._error(429, "Rate limit reached, retry later.", "rate_limit_exceeded",
                               {"Retry-After": f"{cfg['retry_after']:g}"})
        if act in ("500", "503"): return self._error(int(act), "The server had an error.", "server_error")
        if act == "401":
            given = auth.removeprefix("Bearer ")
            return self._error(401, f"Incorrect API key provided: {given}.", "invalid_request_error")
        if act == "drop":
            self.close_connection = True
            try: self.connection.shutdown(socket.SHUT_RDWR)
            except OSError: pass
            return
        if act == "slow": time.sleep(cfg["slow_seconds"])
        if act == "badjson": return self._send(200, b"<html>upstream proxy error</html>{", "application/json")
        self._json(200, srv.completion(req, key, srv.reply_text(messages, key, act)))


class _Remote:
    "Shared HTTP control of a running server (stats, configure, reset)."
    def _call(self, route: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.root}/{route}", data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r: return json.loads(r.read())

    def stats(self) -> dict: return self._call("stats")
    def configure(self, **kw) -> dict: return self._call("config", kw)
    def reset(self) -> dict: return self._call("reset", {})
    @property
    def base_url(self) -> str: return f"{self.root}/v1"
    def __exit__(self, *exc): self.stop()
    def __enter__(self): return self.start()


class ChatServer(_Remote):
    "The server in a background thread of this process; a context manager."
    def __init__(self, port: int = 0, reply_fn=None, **config):
        self.port, self.reply_fn, self.config, self.httpd = port, reply_fn, config, None

    def start(self) -> "ChatServer":
        self.httpd = _Server(("127.0.0.1", self.port), self.config, self.reply_fn)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self

    @property
    def log(self) -> list: return list(self.httpd.log)

    def stop(self):
        if self.httpd: self.httpd.shutdown(); self.httpd.server_close(); self.httpd = None


class ChatServerProcess(_Remote):
    "The server in a child Python process (JSON-serialisable config only); a context manager."
    def __init__(self, port: int = 0, **config):
        self.port, self.config, self.proc = port, config, None

    def start(self) -> "ChatServerProcess":
        self.proc = subprocess.Popen([sys.executable, __file__, "--port", str(self.port), "--config", json.dumps(self.config)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "): self.stop(); raise RuntimeError(f"chat server did not start: {line!r}")
        self.root = line.split()[1]
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(5)
            except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        self.proc = None


def main(argv=None):
    p = argparse.ArgumentParser(description="Loopback chat-completions server with fault injection")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=None, help="seconds before each reply")
    p.add_argument("--fault-rate", type=float, default=None, help="share of requests that get a random fault")
    p.add_argument("--config", default="{}", help="JSON object of server settings (see DEFAULTS)")
    a = p.parse_args(argv)
    cfg = json.loads(a.config)
    if a.latency is not None: cfg["latency"] = a.latency
    if a.fault_rate is not None: cfg["fault_rate"] = a.fault_rate
    srv = _Server(("127.0.0.1", a.port), cfg)
    print(f"listening http://127.0.0.1:{srv.server_address[1]}", flush=True)
    try: srv.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt: pass


if __name__ == "__main__":
    main()
