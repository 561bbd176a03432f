"""The toy web's HTTP server: renders each image from its URL and serves the configured faults.
With `rate_limited_share`, a second listener on 127.0.0.2 (same port) serves the rate-limited host.

Run as a child process (`ToyWebServer`), so that rendering does not share the pipeline's GIL and the
server can be stopped by its own PID. It binds loopback addresses only.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pipeline.toyweb.config import ToyWebConfig
from pipeline.configtree import build, to_plain
from pipeline.toyweb.world import HOST, LIMITED_HOST, ToyWorld

PATH = re.compile(r"^/(\d+)/(\d+)\.jpg$")


def url_for(port: int, world: ToyWorld, index: int) -> str:
    return f"http://{world.host(index)}:{port}/{world.cfg.world_seed}/{index}.jpg"


class RateWindow:
    """The rate-limited host's rule: at most `rate` requests served in any second (a sliding window);
    the rest get 429 and a Retry-After of the seconds until the window has room. Counts what it did."""

    def __init__(self, rate: float):
        self.limit = max(1, int(rate))
        self.served: collections.deque = collections.deque()
        self.lock = threading.Lock()
        self.counts = collections.Counter(served=0, refused=0)

    def admit(self) -> float | None:
        """None if the request may be served now, else the seconds to wait."""
        with self.lock:
            now = time.monotonic()
            while self.served and self.served[0] <= now - 1.0:
                self.served.popleft()
            if len(self.served) >= self.limit:
                self.counts["refused"] += 1
                return self.served[0] + 1.0 - now
            self.served.append(now)
            self.counts["served"] += 1
            return None


class _Handler(BaseHTTPRequestHandler):
    world: ToyWorld
    limiter: RateWindow | None = None   # set on the rate-limited host's server only
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: thousands of requests per second
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/_stats":   # what the rate-limited host served and refused (tests read it)
            counts = dict(self.limiter.counts) if self.limiter is not None else {}
            return self._send(200, json.dumps(counts).encode(), "application/json")
        if self.limiter is not None and (wait := self.limiter.admit()) is not None:
            return self._send(429, b"slow down", "text/plain", {"Retry-After": str(max(1, math.ceil(wait)))})
        match = PATH.match(self.path.split("?")[0])
        if not match or int(match.group(1)) != self.world.cfg.world_seed:
            return self._send(404, b"not found", "text/plain")
        try:
            item = self.world.item(int(match.group(2)))
        except IndexError:
            return self._send(404, b"not found", "text/plain")
        fault = item.fault
        if fault == "not_found":
            return self._send(404, b"<html>gone</html>", "text/html")
        if fault == "html":
            return self._send(200, b"<!doctype html><html><body>Sign in to view</body></html>", "text/html")
        if fault == "corrupt":
            body = b"\xff\xd8\xff\xe0" + os.urandom(64) + bytes(range(256)) * 4
            return self._send(200, body, "image/jpeg")
        if fault == "slow":
            time.sleep(self.world.cfg.slow_seconds)
        body = self.world.render(item)
        if fault == "truncated":  # promise the whole image, send a third, hang up
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        extra = {"X-Robots-Tag": "noai"} if fault == "noai" else {}
        self._send(200, body, "image/jpeg", extra)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): fine
            pass


class QuietServer(ThreadingHTTPServer):
    """The toy web's server (and the tests' own): a thread per connection, quiet about clients that hang up."""
    daemon_threads = True
    request_queue_size = 256

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (its timeout, its deadline, a breaker stopping it) is the web as it
        is, not a server fault: one quiet line instead of socketserver's traceback on stderr."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


def serve(cfg: ToyWebConfig, port: int, outlive_lock: str | None = None) -> None:
    """Serve until SIGTERM. `outlive_lock`: a run directory whose lock the driver (this process's parent)
    holds; when the parent dies, keep serving until that lock is free (see ToyWebServer)."""
    world = ToyWorld(cfg)
    server = QuietServer((HOST, port), type("Handler", (_Handler,), {"world": world}))
    servers = [server]
    if cfg.rate_limited_share > 0:   # the rate-limited host: the same port on another loopback address
        limited = type("LimitedHandler", (_Handler,), {"world": world, "limiter": RateWindow(cfg.rate_limit)})
        servers.append(QuietServer((LIMITED_HOST, server.server_address[1]), limited))
        threading.Thread(target=servers[1].serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))   # the driver's stop()
    if outlive_lock is not None:   # the kernel's word that the driver died (PR_SET_PDEATHSIG, see ToyWebServer)
        signal.signal(PARENT_DIED, lambda *_: threading.Thread(target=_shutdown_when_free, args=(server, outlive_lock),
                                                               daemon=True).start())
    print(f"READY {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        for s in servers:
            s.server_close()


def _shutdown_when_free(server, run_root: str, limit_s: float = 30.0) -> None:
    """The driver died: serve on until its run lock is free, then stop. A shard task that outlived the
    driver checks that lock before committing; were the web gone first, the task could see only refused
    connections while the lock still looked held (the driver's threads and files die a moment after the
    signal that ends this process) and commit a shard of false failures."""
    from pipeline.runlock import holder

    deadline = time.monotonic() + limit_s
    while holder(run_root) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    server.shutdown()


# The signal the kernel sends a web that outlives its driver's run lock when the driver dies: not SIGTERM,
# which is the driver's own stop. It comes when the thread that started the web exits, which under kill -9
# is before the driver's files (its lock) are closed, while getppid() still names the driver.
PARENT_DIED = signal.SIGUSR1


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: ask the kernel to send this child `sig` when its parent dies (even by kill -9)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ToyWebServer:
    """Runs the toy web server as a child process; stop() ends it by its PID."""

    def __init__(self, cfg: ToyWebConfig, port: int = 0, outlive_lock: str | None = None):
        """`outlive_lock`: the run directory whose lock this process holds: the server runs in a session of
        its own (a kill of this process's group does not reach it), learns of this process's death from
        the kernel (PR_SET_PDEATHSIG), and stops once that lock is free."""
        self.cfg, self.requested_port, self.outlive_lock = cfg, port, outlive_lock
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self) -> "ToyWebServer":
        cmd = [sys.executable, "-m", "pipeline.toyweb.server",
               "--config", json.dumps(to_plain(self.cfg)), "--port", str(self.requested_port)]
        if self.outlive_lock:
            cmd += ["--outlive-lock", str(self.outlive_lock)]
        pdeath = (lambda: _die_with_parent(PARENT_DIED)) if self.outlive_lock else _die_with_parent
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=pdeath,
                                     start_new_session=bool(self.outlive_lock))
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"toy web server did not start on port {self.requested_port} (said {line!r})")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "ToyWebServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the toy web on 127.0.0.1")
    parser.add_argument("--config", default="{}", help="ToyWebConfig as JSON")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--outlive-lock", help="a run directory: if the parent dies, serve until its lock is free")
    args = parser.parse_args(argv)
    serve(build(ToyWebConfig, json.loads(args.config), source="--config"), args.port, args.outlive_lock)


if __name__ == "__main__":
    main()
