"""A hostile little web for the downloader's guards: an allowed server on 127.0.0.2 and a "secret" one on
127.0.0.1 that nothing may reach. The allowed one serves an image, redirects of every kind, a
decompression bomb, an oversized body (declared and streamed), slow drips (body and headers), and a
shard member that pickles. Every request the secret server gets is recorded. Nothing leaves 127/8."""
from __future__ import annotations

import datetime
import io
import ssl
import struct
import threading
import time
import zlib
from functools import lru_cache
from pathlib import Path
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image

from pipeline.toyweb.server import QuietServer

ALLOWED, SECRET = "127.0.0.2", "127.0.0.1"
BUSY_SEEN: dict[str, list[float]] = {}   # /busy: when each URL was asked for (monotonic clock)
BUSY_LOCK = threading.Lock()


def jpeg(size=(96, 64), colour=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG", quality=90)
    return out.getvalue()


@lru_cache(maxsize=None)
def png_bomb(side: int = 12000) -> bytes:
    """A valid RGBA PNG of side x side transparent pixels in a few hundred KB: zlib packs zero rows ~1000:1.
    Decoding it takes side^2 x 4 bytes, and img2dataset's alpha matting ~60 bytes a pixel."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (1 + 4 * side)   # filter byte + RGBA
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class _Allowed(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    secret_port = 0

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        route = unquote(parts.path)
        try:
            if route in ("/img.jpg", "/a picture é.jpg"):
                self._send(200, jpeg(), "image/jpeg", {"X-Host-Seen": self.headers.get("Host", "")})
            elif route == "/busy":   # 429 (or `code`) `times` times per URL, Retry-After `after` if given, then the image
                with BUSY_LOCK:
                    seen = BUSY_SEEN.setdefault(self.path, [])
                    seen.append(time.monotonic())
                if len(seen) <= int(query.get("times", 1)):
                    self._send(int(query.get("code", 429)), b"busy", "text/plain",
                               {"Retry-After": query["after"]} if "after" in query else {})
                else:
                    self._send(200, jpeg(), "image/jpeg")
            elif route == "/redirect":
                self._send(int(query.get("code", 302)), b"", "text/plain", {"Location": query["to"]})
            elif route == "/loop":
                self._send(302, b"", "text/plain", {"Location": "/loop"})
            elif route.startswith("/hops/"):
                n = int(route.rsplit("/", 1)[1])
                self._send(302, b"", "text/plain", {"Location": f"/hops/{n - 1}" if n > 1 else "/img.jpg"})
            elif route == "/bomb.png" and "rate" in query:   # served at `rate` bytes/s, as a slow host would
                body = png_bomb(int(query["side"])) if "side" in query else png_bomb()
                self._send_slowly(body, "image/png", 0, 16384, 16384 / float(query["rate"]))
            elif route == "/bomb.png":
                self._send(200, png_bomb(int(query["side"])) if "side" in query else png_bomb(), "image/png")
            elif route == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(300 * 2**20))
                self.end_headers()
                self.wfile.write(b"\xff\xd8" + b"\0" * 4096)
            elif route == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                block = b"\0" * 65536
                for _ in range(2000):   # 125 MB, unless the client hangs up first
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            elif route == "/drip":
                self._send_slowly(jpeg(), "image/jpeg", 0, 16, float(query.get("every", 0.5)))
            elif route == "/bomb-drip.png":   # a 12000 x 12000 PNG's header at once, the rest dripping
                self._send_slowly(png_bomb(), "image/png", 4096, 16, 0.5)
            elif route == "/drip-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(200):
                    self.wfile.write(b"X-Slow-%d: 1\r\n" % i)
                    self.wfile.flush()
                    time.sleep(float(query.get("every", 0.5)))
            else:
                self._send(404, b"not found", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_slowly(self, body: bytes, ctype: str, first: int, block: int, pause: float) -> None:
        """200 with the whole Content-Length: `first` bytes at once, then `block` bytes every `pause` s."""
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        pieces = ([body[:first]] if first else []) + [body[i:i + block] for i in range(first, len(body), block)]
        for piece in pieces:
            self.wfile.write(piece)
            self.wfile.flush()
            time.sleep(pause)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _Secret(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: list[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.hits.append(self.path)
        body = jpeg(colour=(0, 0, 0))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class HostileWeb:
    """Both servers, in threads of the test process; `stop()` shuts them down."""

    def __init__(self, port: int = 0):
        self.requested_port = port

    def __enter__(self) -> "HostileWeb":
        png_bomb()   # made once, before any client's timeout runs
        self.secret_hits: list[str] = []
        self.secret = QuietServer((SECRET, 0), type("Secret", (_Secret,), {"hits": self.secret_hits}))
        self.secret_port = self.secret.server_address[1]
        self.allowed = QuietServer((ALLOWED, self.requested_port),
                                   type("Allowed", (_Allowed,), {"secret_port": self.secret_port}))
        self.port = self.allowed.server_address[1]
        self.threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
                        for s in (self.secret, self.allowed)]
        for t in self.threads:
            t.start()
        return self

    def url(self, path: str) -> str:
        return f"http://{ALLOWED}:{self.port}{path}"

    def secret_url(self, host: str = SECRET, path: str = "/secret.jpg") -> str:
        return f"http://{host}:{self.secret_port}{path}"

    def __exit__(self, *exc) -> None:
        for s in (self.allowed, self.secret):
            s.shutdown()
            s.server_close()


def self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) PEM files for `name`, self-signed, made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class TlsServer:
    """The allowed server's routes over TLS on 127.0.0.2, with a certificate for `name` only."""

    def __init__(self, tmp: Path, name: str):
        self.cert, key = self_signed(tmp, name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.server = QuietServer((ALLOWED, 0), _Allowed)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def __enter__(self) -> "TlsServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
