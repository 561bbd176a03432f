"""The downloader's fetcher against real third-party server software on loopback (tests/realservers.py):
Debian's nginx (keep-alive, chunked, gzip, keep-alive off, redirects, SNI, [::1], wrong types), Python's
http.server (HTTP/1.0), and a raw-socket server for what no server does on purpose (a body cut
mid-stream, a reset). Only the fetcher's public API is used: `fetch(url, policy, limits, resolver, tls)`
returns the body's bytes or raises FetchFailed(reason)."""
from __future__ import annotations

import dataclasses
import itertools
import ssl

import pytest

from pipeline.data.fetch import FetchFailed, Limits, fetch
from pipeline.data.images import image_size
from pipeline.data.urlpolicy import HostPolicy
from realservers import (HOST4, HOST6, MAX_HOPS, MISSING_NGINX, REDIRECT_CODES, SELF_SIGNED_NAME, TLS_NAMES,
                         FaultServer, Nginx, PythonHttpServer, nginx_binary, response_head, write_site)

POLICY = HostPolicy([HOST4, HOST6, "localhost"])   # localhost: one of the certificates' names
V4_ONLY = HostPolicy([HOST4])
LIMITS = Limits(timeout=2.0, deadline=5.0, max_bytes=2**20, max_redirects=3, max_image_area=4_000_000)
IMAGES = ("/img/a.jpg", "/img/b.png", "/img/c.gif")
_unique = itertools.count()


def resolve(host: str, port: int) -> list[str]:
    """The test names (images.test, other.test, ..., localhost) all live on 127.0.0.1; nothing else resolves."""
    if host.endswith(".test") or host == "localhost":
        return [HOST4]
    raise OSError(f"{host}: not a test name")


def get(url: str, policy=POLICY, limits=LIMITS, tls: ssl.SSLContext | None = None) -> bytes:
    return fetch(url, policy, limits, resolver=resolve, **({"tls": tls} if tls else {}))


def failure(url: str, policy=POLICY, limits=LIMITS, tls: ssl.SSLContext | None = None) -> str:
    with pytest.raises(FetchFailed) as caught:
        get(url, policy, limits, tls)
    return caught.value.reason


def unique(path: str) -> str:
    """`path` with a query no other request has: its line in nginx's access log is this request's."""
    return f"{path}?n={next(_unique)}"


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    if nginx_binary() is None:   # CI runs `make test`, which installs it: a missing nginx fails, never skips
        pytest.fail(MISSING_NGINX, pytrace=False)
    with Nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The same generated site as nginx serves, for the servers that need no nginx: {URL path: bytes}."""
    root = tmp_path_factory.mktemp("site")
    return root, write_site(root)


@pytest.fixture(scope="module")
def pyserver(site):
    with PythonHttpServer(site[0]) as server:
        yield server


@pytest.fixture(scope="module")
def faults(site):
    with FaultServer(site[1]["/img/a.jpg"]) as server:
        yield server


@pytest.fixture(scope="module")
def test_ca(nginx) -> ssl.SSLContext:
    """What `download.ca_bundle` gives the fetcher: the system's verification, trusting the test CA."""
    return ssl.create_default_context(cafile=str(nginx.ca_bundle))


# ---- HTTP/1.0, Connection: close, keep-alive -------------------------------------------------------------

@pytest.mark.parametrize("path", IMAGES)
def test_http10_server(pyserver, site, path):
    version, _ = response_head(HOST4, pyserver.port, path)
    assert version == 10, "the premise: python -m http.server answers HTTP/1.0 (and closes)"
    assert get(pyserver.url(path)) == site[1][path]


def test_http10_server_missing_file(pyserver):
    assert failure(pyserver.url("/img/none.jpg")) == "http_404"


def test_keep_alive_off(nginx):
    version, headers = response_head(HOST4, nginx.port, "/close/a.jpg")
    assert (version, headers.get("connection")) == (11, "close"), "the premise: keepalive_timeout 0 closes"
    assert get(nginx.url("/close/a.jpg")) == nginx.files["/img/a.jpg"]


@pytest.mark.parametrize("path", IMAGES)
def test_keep_alive_server(nginx, path):
    assert response_head(HOST4, nginx.port, path)[1].get("connection") == "keep-alive"
    assert get(nginx.url(path)) == nginx.files[path]


# ---- chunked and gzip -------------------------------------------------------------------------------------

def test_chunked_body(nginx):
    path = unique("/chunked/gradient.bmp")
    assert get(nginx.url(path)) == nginx.files["/chunked/gradient.bmp"]
    assert "te=chunked" in nginx.logged(path)


def test_gzip_on_the_fly_is_asked_for_and_decoded(nginx):
    """nginx gzips only for a client that accepts gzip, and then sends chunks (the length is unknown)."""
    path = unique("/gzip/gradient.bmp")
    assert get(nginx.url(path)) == nginx.files["/gzip/gradient.bmp"]
    line = nginx.logged(path)
    assert "gzip" in line.split('ae="', 1)[1], f"the fetcher did not send Accept-Encoding: gzip: {line}"
    assert "ce=gzip te=chunked" in line, line


def test_gzip_sent_unasked_is_decoded(nginx):
    """`gzip_static always`: gzip bytes whatever the client said, with the compressed Content-Length."""
    assert get(nginx.url("/gzip-always/gradient.bmp")) == nginx.files["/gzip-always/gradient.bmp"]


@pytest.mark.parametrize("folder", ["/gzip/", "/gzip-always/"])
def test_gzip_is_capped_after_decoding(nginx, folder):
    """4.3 MB of BMP in a few KB of gzip: the cap is on what it decodes to, and decoding stops there."""
    path = unique(f"{folder}bomb.bmp")
    assert len(nginx.files[f"{folder}bomb.bmp"]) > LIMITS.max_bytes
    assert failure(nginx.url(path)) == "body_too_large"
    assert "ce=gzip" in nginx.logged(path), "the cap must have met a gzip body, not a declared 4.3 MB"


def test_gzip_that_is_no_gzip_is_a_counted_failure(nginx):
    """Content-Encoding: gzip over bytes that are not gzip: no image, a reason instead of garbage."""
    with pytest.raises(FetchFailed):
        get(nginx.url("/gzip-always/broken.bmp"))


# ---- redirects --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["relative", "dotted", "absolute", "othername", "schemeless"])
@pytest.mark.parametrize("code", REDIRECT_CODES)
def test_redirects(nginx, code, kind):
    """Each code, with Location as nginx sends it verbatim: /img/a.jpg, ../../img/a.jpg, http://127.0.0.1:P/..,
    http://images.test:P/.. (another name), //127.0.0.1:P/.. (scheme-relative)."""
    assert get(nginx.url(f"/redirect/{code}/{kind}")) == nginx.files["/img/a.jpg"]


def test_hop_limit(nginx):
    assert get(nginx.url("/hops/3")) == nginx.files["/img/a.jpg"]                   # 3 hops: allowed
    assert failure(nginx.url("/hops/4")) == "too_many_redirects"                    # one too many
    assert failure(nginx.url(f"/hops/{MAX_HOPS}")) == "too_many_redirects"
    assert failure(nginx.url("/loop")) == "too_many_redirects"
    more = dataclasses.replace(LIMITS, max_redirects=MAX_HOPS)
    assert get(nginx.url(f"/hops/{MAX_HOPS}"), limits=more) == nginx.files["/img/a.jpg"]


# ---- HTTPS: SNI and verification --------------------------------------------------------------------------

@pytest.mark.parametrize("name", TLS_NAMES)
def test_https_names_verify_with_the_test_ca(nginx, test_ca, name):
    """Two names on one address and port: SNI picks each one's certificate, the test CA vouches for both."""
    path = unique("/img/a.jpg")
    assert get(nginx.tls_url(name, path), tls=test_ca) == nginx.files["/img/a.jpg"]
    assert f"sni={name}" in nginx.logged(path)


def test_https_untrusted_certificates_are_tls_errors(nginx, test_ca):
    # a self-signed certificate, even with the test CA trusted
    assert failure(nginx.tls_url(SELF_SIGNED_NAME, "/img/a.jpg"), tls=test_ca) == "tls_error"
    # a name on no certificate: nginx answers with its default server's (images.test), which is not it
    assert failure(nginx.tls_url("nowhere.test", "/img/a.jpg"), tls=test_ca) == "tls_error"
    # the test CA's certificates, without the test CA: only the system's CAs
    assert failure(nginx.tls_url(TLS_NAMES[0], "/img/a.jpg")) == "tls_error"


# ---- [::1] ------------------------------------------------------------------------------------------------

def test_ipv6_loopback_when_allowed(nginx):
    if not nginx.ipv6:
        pytest.skip("this kernel has no ::1 (IPv6 off): nginx listens on 127.0.0.1 only")
    url = nginx.url("/img/a.jpg", host=f"[{HOST6}]")
    assert get(url) == nginx.files["/img/a.jpg"]
    assert failure(url, policy=V4_ONLY) == "url_private_address"


# ---- a wrong Content-Type ---------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["/as-text/", "/as-octets/", "/as-html/"])
def test_wrong_content_type_still_gives_the_bytes(nginx, folder):
    """The type a server claims is not checked: the image is judged by its bytes."""
    body = get(nginx.url(f"{folder}a.jpg"))
    assert body == nginx.files["/img/a.jpg"]
    assert image_size(body, LIMITS.max_image_area) == (64, 48)


# ---- a body cut mid-stream, a reset -------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/cut", "/cut-chunked"])
def test_body_cut_mid_stream(faults, path):
    assert failure(faults.url(path)) == "truncated"


@pytest.mark.parametrize("path", ["/reset", "/reset-body"])
def test_server_resets(faults, path):
    assert failure(faults.url(path)) == "connection_reset"
