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

Use in-process (`with ChatServer(latency=0.2) as srv: srv.base_url`) or in a child process
(`with ChatServerProcess(...) as srv`), which keeps the server off the caller's GIL for benchmarks.
Both have `.base_url`, `.stats()`, `.configure(**kw)` and `.reset()` (over HTTP, so they behave alike).
Run `python tests/chat_server.py --port 8000 --latency 0.2` to serve from a shell.
"""
from __future__ import annotations
import argparse, collections, hashlib, json, random, socket, subprocess, sys, threading, time, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACTIONS = ("ok", "429", "500", "503", "slow", "drop", "garbage", "badjson", "401")
DEFAULTS = dict(latency=0.0, latency_jitter=0.0, script={}, fault_rate=0.0,
                faults=["429", "500", "slow", "drop", "garbage"], retry_after=0.1, slow_seconds=5.0,
                replies={}, reply_text=None, require_key=None, require_auth=None, seed=0,
                model="loopback-chat")


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
                    "by_action": dict(self.by_action), "max_inflight": self.max_inflight}

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

    def do_GET(self):
        if self.path.rstrip("/").endswith("/stats"): return self._json(200, self.server.stats())
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
        if act == "garbage": text = "I'm sorry, I can't help with that request."
        elif key in cfg["replies"]: text = cfg["replies"][key]
        elif cfg["reply_text"] is not None: text = cfg["reply_text"]
        elif srv.reply_fn is not None: text = srv.reply_fn(messages, key)
        else: text = default_reply(messages, key)
        prompt_toks = sum(len(str(m.get("content", "")).split()) for m in messages)
        comp_toks = len(text.split())
        self._json(200, {
            "id": f"chatcmpl-{key}-{srv.by_key[key]}", "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model", cfg["model"]),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_toks, "completion_tokens": comp_toks,
                      "total_tokens": prompt_toks + comp_toks}})


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
