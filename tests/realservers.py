"""Real third-party web servers for the fetcher's tests, each started on loopback by a test fixture and
stopped by its own PID (or, for the raw-socket faults, by its own thread):

  - `Nginx`: Debian's nginx, with a generated site and its own nginx.conf in a temporary directory:
    images, on-the-fly gzip (chunked), a chunked identity body, keep-alive off, redirects of every code
    with relative and absolute Locations, a chain of hops and a loop, images under a wrong Content-Type,
    a listener on [::1], and HTTPS with SNI: two names whose certificates a test CA signed and one
    self-signed name, all on one port;
  - `PythonHttpServer`: `python -m http.server`, which speaks HTTP/1.0 and closes every connection;
  - `FaultServer`: what no real server does on purpose: a body cut mid-stream (by Content-Length and
    by chunks) and a connection reset (TCP RST), before the answer and in the middle of the body.

Nothing here listens outside 127.0.0.1 and ::1.
"""
from __future__ import annotations

import datetime
import gzip
import io
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

from PIL import Image

HOST4, HOST6 = "127.0.0.1", "::1"
# certificates signed by the test CA; "localhost" for the stage's tests, which resolve names as users do
TLS_NAMES = ("images.test", "other.test", "localhost")
SELF_SIGNED_NAME = "selfsigned.test"        # a certificate that nobody vouches for
REDIRECT_CODES = (301, 302, 303, 307, 308)
MAX_HOPS = 6                                # /hops/N exists for N in 1..MAX_HOPS
MISSING_NGINX = ("nginx is not installed (no `nginx` on PATH or in /usr/sbin). The real-server tests need "
                 "Debian's nginx package: `make test` installs it (apt-get install nginx); CI runs `make test`.")
# One line per request, to check what the server really sent (gzip? chunked?) and what it was asked.
# ($sent_http_connection is no use here: by the time nginx logs, it reads "close" even after a response
# that said keep-alive.)
LOG_FORMAT = ('$request_uri status=$status ce=$sent_http_content_encoding te=$sent_http_transfer_encoding '
              'ae="$http_accept_encoding" sni=$ssl_server_name')


def free_port(host: str = HOST4) -> int:
    """A port the kernel just gave out on `host` (the server binds it a moment later; tests run alone)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ipv6_loopback() -> bool:
    """Whether this kernel has ::1 (some containers run without IPv6)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind((HOST6, 0))
        return True
    except OSError:
        return False


def wait_until_accepting(host: str, port: int, proc: subprocess.Popen, what: str, timeout: float = 10) -> None:
    """Returns once `host:port` accepts a connection; raises if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before accepting on {host}:{port}")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not accept on {host}:{port} within {timeout} s")


def response_head(host: str, port: int, path: str) -> tuple[int, dict[str, str]]:
    """(HTTP version as 10 or 11, headers) of a plain GET: checks what a server really answers, so that a
    test's premise (this one speaks HTTP/1.0, that location closes) is checked rather than assumed."""
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.version, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def stop(proc: subprocess.Popen, graceful: signal.Signals = signal.SIGTERM, timeout: float = 5) -> None:
    """Stops the process we started, by its own PID: `graceful`, then SIGKILL if it lingers."""
    if proc.poll() is None:
        os.kill(proc.pid, graceful)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


# ---- the generated site -------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def noisy_image(fmt: str, size=(64, 48), seed: int = 0) -> bytes:
    """A picture of random pixels: it compresses badly, so even a JPEG is a few KB, as real images are."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    out = io.BytesIO()
    img.save(out, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return out.getvalue()


@lru_cache(maxsize=None)
def gradient_bmp(size=(256, 128)) -> bytes:
    """An uncompressed BMP of a smooth gradient: ~100 KB that gzip packs to a few KB."""
    w, h = size
    img = Image.frombytes("RGB", size, bytes((x % 256, y % 256, (x + y) % 256)[c]
                                              for y in range(h) for x in range(w) for c in range(3)))
    out = io.BytesIO()
    img.save(out, "BMP")
    return out.getvalue()


@lru_cache(maxsize=None)
def black_bmp(side: int) -> bytes:
    """A BMP of side x side black pixels (3 bytes a pixel): megabytes that gzip packs ~1000:1."""
    out = io.BytesIO()
    Image.new("RGB", (side, side)).save(out, "BMP")
    return out.getvalue()


def write_site(root: Path) -> dict[str, bytes]:
    """Writes the site's files under `root`; returns {URL path: the bytes a client must end up with}."""
    files = {
        "/img/a.jpg": noisy_image("JPEG", seed=1),
        "/img/b.png": noisy_image("PNG", (40, 40), seed=2),
        "/img/c.gif": noisy_image("GIF", (48, 32), seed=3),
        "/gzip/gradient.bmp": gradient_bmp(),          # gzipped on the fly when the client accepts gzip
        "/gzip/bomb.bmp": black_bmp(1200),             # 4.3 MB that gzips to a few KB
        "/chunked/gradient.bmp": gradient_bmp(),       # sent chunked, not encoded (see the conf)
    }
    for path, data in files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    # Pre-compressed only, served as gzip whether or not the client asked (`gzip_static always`), as some
    # misconfigured servers do: the client gets gzip bytes with a Content-Length of the compressed size.
    static = {"/gzip-always/gradient.bmp": gradient_bmp(), "/gzip-always/bomb.bmp": black_bmp(1200)}
    for path, data in static.items():
        target = root / (path.lstrip("/") + ".gz")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))
    files.update(static)
    # Declared gzip, but not gzip at all: a client must not hand these bytes on as the image.
    (root / "gzip-always" / "broken.bmp.gz").write_bytes(b"this is not a gzip stream" * 10)
    return files


# ---- certificates ----------------------------------------------------------------------------------------

def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_pem(path: Path, cert, key=None) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_certificates(folder: Path) -> Path:
    """A test CA (ca.pem, the bundle a client trusts), a certificate it signed for each of TLS_NAMES
    (<name>.pem, <name>.key) and a self-signed one for SELF_SIGNED_NAME. Extensions as a strict verifier
    (OpenSSL 3 with X509_STRICT, as Python >= 3.13 sets it) wants them. Returns the CA bundle's path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def builder(subject: str, issuer: x509.Name, key, issuer_key) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                               critical=False))

    def leaf(name: str, issuer: x509.Name, key, issuer_key):
        return (builder(name, issuer, key, issuer_key)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .sign(issuer_key, hashes.SHA256()))

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vlp test CA")])
    ca = (builder("vlp test CA", ca_name, ca_key, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_pem(folder / "ca.pem", ca)
    for name in TLS_NAMES:
        key = _key()
        _write_pem(folder / f"{name}.pem", leaf(name, ca_name, key, ca_key), key)
    key = _key()   # issuer = subject, signed by its own key: valid in form, trusted by no one
    own = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SELF_SIGNED_NAME)])
    _write_pem(folder / f"{SELF_SIGNED_NAME}.pem", leaf(SELF_SIGNED_NAME, own, key, key), key)
    return folder / "ca.pem"


# ---- nginx -----------------------------------------------------------------------------------------------

def nginx_binary() -> str | None:
    """The nginx executable, or None (a non-root PATH often lacks /usr/sbin, so look there too)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class Nginx:
    """nginx on free ports: `port` (HTTP on 127.0.0.1, and on [::1] when the kernel has it) and `tls_port`
    (HTTPS on 127.0.0.1, one certificate per SNI name). `files` maps URL paths to the expected bytes,
    `ca_bundle` is the test CA's PEM file, `access_log()` the lines nginx wrote.

    It runs in the foreground as one process (`daemon off; master_process off`): the PID we started is
    the whole server, so stopping it by that PID leaves no worker behind."""

    def __init__(self, folder: Path, extra_files: dict[str, bytes] | None = None, extra_conf: str = ""):
        """`extra_files`: more of the site ({URL path: bytes}); `extra_conf`: more of the HTTP server's
        block (locations), for the tests of the download stage as a whole."""
        self.dir = folder
        self.ipv6 = ipv6_loopback()
        self.extra_files, self.extra_conf = extra_files or {}, extra_conf

    def __enter__(self) -> "Nginx":
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError(MISSING_NGINX)
        self.site = self.dir / "site"
        self.files = write_site(self.site)
        for path, body in self.extra_files.items():
            target = self.site / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(body)
            self.files[path] = body
        self.ca_bundle = make_certificates(self.dir / "certs")
        self.port, self.tls_port = free_port(), free_port()
        if self.ipv6:   # the same port number on ::1; retry a few times if it is taken there
            for _ in range(20):
                try:
                    with socket.socket(socket.AF_INET6) as probe:
                        probe.bind((HOST6, self.port))
                    break
                except OSError:
                    self.port = free_port()
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.dir / "temp" / sub).mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(self._conf())
        # -e: the error log before the conf is read (Debian's build defaults to stderr); -p: the prefix
        # that relative paths would use, so nothing touches /var/lib/nginx or /run.
        # (its output to a file, not a pipe nobody reads: a full pipe would block the server)
        with open(self.dir / "stderr.log", "wb") as out:
            self.proc = subprocess.Popen([binary, "-p", str(self.dir), "-c", str(conf), "-e", str(self.dir / "error.log")],
                                         stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until_accepting(HOST4, self.port, self.proc, "nginx")
            wait_until_accepting(HOST4, self.tls_port, self.proc, "nginx (TLS)")
            if self.ipv6:
                wait_until_accepting(HOST6, self.port, self.proc, "nginx ([::1])")
        except RuntimeError as err:
            stop(self.proc, signal.SIGQUIT)
            raise RuntimeError(f"{err}\n{(self.dir / 'stderr.log').read_text()}\n{self.error_log()}") from None
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc, signal.SIGQUIT)   # SIGQUIT: nginx's graceful shutdown

    def url(self, path: str, host: str = HOST4) -> str:
        return f"http://{host}:{self.port}{path}"

    def tls_url(self, name: str, path: str) -> str:
        return f"https://{name}:{self.tls_port}{path}"

    def access_log(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def logged(self, request_uri: str, timeout: float = 2.0) -> str:
        """nginx's log line for `request_uri` (tests make each URI unique with a query). nginx writes it as
        the request ends, which can be a moment after the client has the last byte: wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.access_log() if line.split(" ", 1)[0] == request_uri]
            if lines or time.monotonic() > deadline:
                assert len(lines) == 1, f"nginx logged {request_uri} {len(lines)} times: {lines}"
                return lines[0]
            time.sleep(0.02)

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text() if path.exists() else ""

    def _conf(self) -> str:
        d, site, certs = self.dir, self.site, self.dir / "certs"
        listen = f"listen {HOST4}:{self.port} default_server;"
        if self.ipv6:
            listen += f"\n        listen [{HOST6}]:{self.port} default_server ipv6only=on;"
        redirects = []
        for code in REDIRECT_CODES:
            for kind, target in (("relative", "/img/a.jpg"),                     # absolute path, same host
                                 ("dotted", "../../img/a.jpg"),                   # relative to the path
                                 ("absolute", f"http://{HOST4}:{self.port}/img/a.jpg"),
                                 ("othername", f"http://images.test:{self.port}/img/a.jpg"),
                                 ("schemeless", f"//{HOST4}:{self.port}/img/a.jpg")):
                redirects.append(f"location = /redirect/{code}/{kind} {{ return {code} {target}; }}")
        for n in range(1, MAX_HOPS + 1):
            redirects.append(f"location = /hops/{n} {{ return 302 {f'/hops/{n - 1}' if n > 1 else '/img/a.jpg'}; }}")
        redirects.append("location = /loop { return 302 /loop; }")
        redirects = "\n        ".join(redirects)
        tls_servers = "\n".join(f"""
    server {{
        listen {HOST4}:{self.tls_port} ssl{' default_server' if i == 0 else ''};
        server_name {name};
        ssl_certificate {certs / f'{name}.pem'};
        ssl_certificate_key {certs / f'{name}.key'};
        root {site};
    }}""" for i, name in enumerate(TLS_NAMES + (SELF_SIGNED_NAME,)))
        # As root nginx would hand requests to `nobody`, who cannot read pytest's 0700 temp dirs; with
        # master_process off it never switches user, and `user` is only allowed (and only needed) as root.
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""# generated by tests/realservers.py
daemon off;
master_process off;
worker_processes 1;
{user}
pid {d / 'nginx.pid'};
error_log {d / 'error.log'} warn;
events {{ worker_connections 128; }}
http {{
    types {{ image/jpeg jpg; image/png png; image/gif gif; image/bmp bmp; text/html html; }}
    default_type application/octet-stream;
    log_format probe '{LOG_FORMAT}';
    access_log {d / 'access.log'} probe;
    client_body_temp_path {d / 'temp/body'};
    proxy_temp_path {d / 'temp/proxy'};
    fastcgi_temp_path {d / 'temp/fastcgi'};
    uwsgi_temp_path {d / 'temp/uwsgi'};
    scgi_temp_path {d / 'temp/scgi'};
    server_tokens off;
    # Locations exactly as written in `return` (nginx would otherwise make a relative one absolute).
    absolute_redirect off;
    keepalive_timeout 30;
    server {{
        {listen}
        server_name _;
        root {site};
        location /img/ {{ }}
        # On-the-fly gzip for a client that sends Accept-Encoding: gzip; the compressed length is not
        # known up front, so an HTTP/1.1 answer is chunked.
        location /gzip/ {{ gzip on; gzip_types image/bmp; gzip_min_length 1; gzip_comp_level 6; }}
        location /gzip-always/ {{ gzip_static always; }}
        # sub_filter may change the body, so nginx drops Content-Length and sends chunks; the pattern
        # never matches, so the bytes are the file's.
        location /chunked/ {{ sub_filter_types image/bmp; sub_filter '@@never-in-a-bmp@@' ''; }}
        # Keep-alive off: nginx answers `Connection: close` and closes after the response.
        location /close/ {{ keepalive_timeout 0; alias {site}/img/; }}
        # The image's bytes under a type that says it is none.
        location /as-text/ {{ types {{ }} default_type text/plain; alias {site}/img/; }}
        location /as-octets/ {{ types {{ }} default_type application/octet-stream; alias {site}/img/; }}
        location /as-html/ {{ types {{ }} default_type text/html; alias {site}/img/; }}
        {redirects}
        {self.extra_conf}
    }}
{tls_servers}
}}
"""


# ---- Python's http.server --------------------------------------------------------------------------------

class PythonHttpServer:
    """`python -m http.server` serving `directory` on 127.0.0.1: HTTP/1.0, one request per connection
    (no keep-alive), Content-Length set. A subprocess, stopped by its PID."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self) -> "PythonHttpServer":
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", HOST4, str(self.port),
                                      "--directory", str(self.directory)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_accepting(HOST4, self.port, self.proc, "python -m http.server")
        except RuntimeError:
            stop(self.proc)
            raise
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)

    def url(self, path: str) -> str:
        return f"http://{HOST4}:{self.port}{path}"


# ---- faults no real server makes on purpose ----------------------------------------------------------------

class FaultServer:
    """A raw-socket HTTP server in a thread of the test process, on 127.0.0.1, one connection at a time.
    It reads the request line and headers, then, by path:
      /cut           HTTP/1.1 200, Content-Length N, N/2 bytes, then a clean close (FIN);
      /cut-chunked   HTTP/1.1 200, chunked, one chunk and half of the next, then a clean close;
      /reset         a TCP RST (SO_LINGER 0) instead of any answer;
      /reset-body    HTTP/1.1 200, Content-Length N, N/2 bytes, then an RST.
    `body` is what the full answer would have been."""

    def __init__(self, body: bytes):
        self.body = body

    def __enter__(self) -> "FaultServer":
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST4, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)   # so that the loop sees `stopping` soon
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="fault-server", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()

    def url(self, path: str) -> str:
        return f"http://{HOST4}:{self.port}{path}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    self._answer(conn)
                except OSError:   # the client hung up first: nothing to do
                    pass

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        request = b""
        while b"\r\n\r\n" not in request:
            data = conn.recv(4096)
            if not data:
                return
            request += data
        path = request.split(b" ", 2)[1].split(b"?", 1)[0].decode()
        half = self.body[:len(self.body) // 2]
        if path == "/cut":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(self.body), half))
            conn.shutdown(socket.SHUT_WR)
        elif path == "/cut-chunked":
            first = self.body[:1024]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"%x\r\n%s\r\n%x\r\n%s" % (len(first), first, 2048, self.body[1024:2048]))
            conn.shutdown(socket.SHUT_WR)
        elif path in ("/reset", "/reset-body"):
            if path == "/reset-body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(self.body), half))
                time.sleep(0.05)   # let the client read the headers and some body first
            # SO_LINGER on with a zero timeout: close() discards the connection with an RST, not a FIN.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
