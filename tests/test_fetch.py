"""The downloader's guards against a hostile URL list, on real sockets (tests/webguard.py): an allowed
server on 127.0.0.2, a secret one on 127.0.0.1 that no spelling, name or redirect may reach."""
from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from pipeline.data.fetch import FetchFailed, Limits, fetch
from pipeline.data.images import check_header, image_size
from pipeline.data.urlpolicy import HostPolicy, Refused, is_public, literal_address, refusal
from pipeline.toyweb.server import QuietServer
from webguard import ALLOWED, HostileWeb, TlsServer, jpeg, png_bomb

POLICY = HostPolicy([ALLOWED])
LIMITS = Limits(timeout=1.5, deadline=3.0, max_bytes=2**20, max_redirects=3, max_image_area=4_000_000)


@pytest.fixture(scope="module")
def web():
    with HostileWeb() as w:
        yield w
        assert w.secret_hits == [], f"the secret server was reached: {w.secret_hits}"


def failure(url, policy=POLICY, limits=LIMITS, resolver=None) -> str:
    with pytest.raises(FetchFailed) as caught:
        fetch(url, policy, limits, **({"resolver": resolver} if resolver else {}))
    return caught.value.reason


def test_the_allowed_server_serves(web):
    assert fetch(web.url("/img.jpg"), POLICY, LIMITS) == jpeg()
    assert fetch(web.url("/a picture é.jpg"), POLICY, LIMITS) == jpeg()   # as web lists write paths


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0", "0.0.0.0",
                                  "127.000.000.001", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
                                  "[0:0:0:0:0:ffff:127.0.0.1]", "localhost", "LOCALHOST.", "a.localhost"])
def test_every_spelling_of_the_secret_host_is_refused(web, host):
    url = web.secret_url(host)
    assert refusal(url, [ALLOWED]) == "url_private_address"   # when the list is planned
    assert failure(url) == "url_private_address"              # and again when fetched


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("100.64.0.1", False),
    ("169.254.169.254", False), ("224.0.0.1", False), ("239.255.255.250", False), ("255.255.255.255", False),
    ("fe80::1", False), ("fc00::1", False), ("ff02::1", False), ("::", False),
    ("64:ff9b::a9fe:a9fe", False),     # NAT64 to the metadata address
    ("2002:7f00:1::", False),          # 6to4 of 127.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),   # Teredo whose client is 127.0.0.1
    ("::ffff:169.254.169.254", False),
])
def test_address_ranges(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


# IPv6 forms that carry a private IPv4 address, or reach a site's own network (a tunnel or translator
# delivers them); each is checked as the fetcher checks every hop (HostPolicy.pin), as a name's answer
# and as a literal host, and when the list is planned (refusal).
EMBEDDING_V6 = [
    "::10.0.0.1", "::127.0.0.1", "::169.254.169.254",   # IPv4-compatible (::/96, deprecated)
    "::8.8.8.8",                                        # ... refused whatever it carries
    "::ffff:10.0.0.1", "::ffff:127.0.0.1",              # IPv4-mapped
    "::ffff:0:10.0.0.1", "::ffff:0:127.0.0.1",          # SIIT (::ffff:0:0:0/96)
    "64:ff9b:1::a00:1", "64:ff9b:1:a9fe:a9:fe00::",      # local-use NAT64 (64:ff9b:1::/48), /96 and /48 forms
    "64:ff9b::10.0.0.1", "64:ff9b::169.254.169.254",    # well-known NAT64 with a private IPv4
    "2002:a00:1::1", "2002:a9fe:a9fe::",                # 6to4 of 10.0.0.1, of the metadata address
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",             # Teredo whose client is 10.0.0.1
    "fec0::1", "feff:ffff::1",                           # site-local (fec0::/10)
]


@pytest.mark.parametrize("address", EMBEDDING_V6)
def test_ipv6_forms_embedding_private_ipv4_are_refused_on_every_hop(address):
    assert not is_public(ipaddress.ip_address(address))
    # a name that resolves to it: refused by the check fetch() makes for every hop, before any connection
    assert failure("http://images.example/a.jpg", resolver=lambda h, p: [address]) == "url_private_address"
    policy = HostPolicy([ALLOWED])
    with pytest.raises(Refused) as caught:
        policy.pin("http://images.example/a.jpg", lambda h, p: [address], redirect=True)
    assert caught.value.reason == "redirect_private_address"
    # the address as the URL's host: refused when the list is planned, and when fetched
    literal = f"http://[{address}]/a.jpg"
    assert refusal(literal, [ALLOWED]) == "url_private_address" and failure(literal) == "url_private_address"
    # unless the allow-list names it (the address, or a network holding it)
    for named in (address, str(ipaddress.ip_network(f"{address}/64", strict=False))):
        assert HostPolicy([named]).refusal(literal) is None
        pinned = HostPolicy([named]).pin("http://images.example/a.jpg", lambda h, p: [address])[2]
        assert ipaddress.ip_address(pinned) == ipaddress.ip_address(address)


def test_public_ipv6_forms_still_pass():
    for address in ("2606:4700::1111", "64:ff9b::8.8.8.8", "2002:808:808::1"):
        assert is_public(ipaddress.ip_address(address)), address
        assert refusal(f"http://[{address}]/a.jpg") is None


def test_literal_addresses_in_resolver_spellings():
    assert str(literal_address("0177.0.0.1")) == "127.0.0.1" and str(literal_address("2130706433")) == "127.0.0.1"
    assert str(literal_address("[::1]")) == "::1" and literal_address("example.com") is None
    assert literal_address("deadbeef") is None   # a name (no 0x): the resolver decides


def test_names_are_resolved_once_checked_and_pinned(web):
    calls = []

    def resolver(answers):
        def resolve(host, port):
            calls.append(host)
            return answers[host]
        return resolve

    # a name the system cannot resolve: fetched from the address the resolver gave, Host header kept
    url = f"http://images.example:{web.port}/img.jpg"
    assert fetch(url, POLICY, LIMITS, resolver({"images.example": [ALLOWED]})) == jpeg()
    # a name that resolves to the secret host (an /etc/hosts entry, or a hostile DNS)
    assert failure(web.secret_url("rebind.example"), resolver=resolver({"rebind.example": ["127.0.0.1"]})) \
        == "url_private_address"
    # one good and one bad address: refused (which one a client gets is the name owner's choice)
    assert failure(web.secret_url("mixed.example"), resolver=resolver({"mixed.example": [ALLOWED, "127.0.0.1"]})) \
        == "url_private_address"
    # DNS rebinding: the first answer passes the check, a second lookup would answer the secret host;
    # the fetch connects to the first answer and never asks again
    calls.clear()
    answers = [[ALLOWED], ["127.0.0.1"]]

    def flip(host, port):
        calls.append(host)
        return answers.pop(0)
    assert fetch(f"http://flip.example:{web.port}/img.jpg", POLICY, LIMITS, flip) == jpeg()
    assert calls == ["flip.example"]
    assert failure(f"http://nowhere.example:{web.port}/x", resolver=lambda h, p: (_ for _ in ()).throw(OSError("NXDOMAIN"))) \
        == "dns_error"


def test_allowed_names_and_networks():
    policy = HostPolicy(["toyweb.internal", "10.0.0.0/8"])
    assert policy.refusal("http://toyweb.internal/a.jpg") is None
    assert policy.refusal("http://10.2.3.4/a.jpg") is None and policy.refusal("http://11.2.3.4/a.jpg") is None
    assert policy.refusal("http://192.168.0.1/a.jpg") == "url_private_address"
    assert policy.pin("http://toyweb.internal/a.jpg", lambda h, p: ["192.168.9.9"]) == ("toyweb.internal", 80, "192.168.9.9")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_to_the_secret_host_are_refused(web, code):
    for target in (web.secret_url(), web.secret_url("2130706433"), web.secret_url("[::ffff:127.0.0.1]")):
        assert failure(web.url(f"/redirect?code={code}&to={target}")) == "redirect_private_address"


def test_redirect_kinds(web):
    assert failure(web.url("/redirect?to=http://169.254.169.254/latest/meta-data/")) == "redirect_private_address"
    assert failure(web.url("/redirect?to=ftp://127.0.0.1/secret")) == "redirect_scheme_refused"
    assert failure(web.url("/redirect?to=file:///etc/passwd")) == "redirect_scheme_refused"
    assert failure(web.url("/loop")) == "too_many_redirects"
    assert fetch(web.url("/hops/3"), POLICY, LIMITS) == jpeg()            # 3 hops: allowed
    assert failure(web.url("/hops/4")) == "too_many_redirects"            # 4: one too many
    assert fetch(web.url("/redirect?to=/img.jpg"), POLICY, LIMITS) == jpeg()   # relative, same host


def test_bodies_are_capped(web):
    started = time.monotonic()
    assert failure(web.url("/declared-huge")) == "body_too_large"   # refused on its Content-Length
    assert failure(web.url("/endless")) == "body_too_large"         # chunked: stopped at the cap
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("path", ["/drip?every=0.4", "/drip-headers?every=0.4"])
def test_a_slow_drip_meets_the_deadline(web, path):
    started = time.monotonic()
    assert failure(web.url(path)) == "deadline_exceeded"   # every read is quick; the whole is not
    assert time.monotonic() - started < LIMITS.deadline + 1


def test_image_size_is_read_without_decoding():
    bomb = png_bomb()
    assert len(bomb) < 1_000_000   # 12000 x 12000 RGBA in well under a megabyte
    with pytest.raises(FetchFailed) as caught:
        image_size(bomb, 25_000_000)
    assert caught.value.reason == "image_too_large"
    assert image_size(jpeg(), 25_000_000) == (96, 64)
    with pytest.raises(FetchFailed) as caught:
        image_size(b"<!doctype html><html>sign in</html>", 25_000_000)
    assert caught.value.reason == "decode_error"


def test_an_image_that_claims_too_many_pixels_is_refused_at_its_header(web):
    """Its first chunk names 12000 x 12000 pixels: refused then, not after the body (which here drips
    past the deadline: a URL of the toy web's 4096 x 4096 pictures timed out on a loaded machine)."""
    checked = dataclasses.replace(LIMITS, header_check=functools.partial(check_header, max_image_area=4_000_000))
    assert failure(web.url("/bomb-drip.png"), limits=checked) == "image_too_large"
    assert failure(web.url("/bomb-drip.png")) == "deadline_exceeded"   # unchecked, the whole body is awaited
    assert fetch(web.url("/img.jpg"), POLICY, checked) == jpeg()         # a header that passes: the body as sent
    full = png_bomb()
    assert check_header(full[:20], 4_000_000) is False                   # IHDR not there yet
    assert check_header(jpeg()[:200], 4_000_000) is False                # a JPEG's size comes later (SOF)
    assert check_header(jpeg(), 4_000_000) is True
    assert check_header(b"<!doctype html><html>", 4_000_000) is False    # no image: the whole body decides
    with pytest.raises(FetchFailed) as caught:
        check_header(full[:64], 4_000_000)
    assert caught.value.reason == "image_too_large"


def test_tls_goes_to_the_pinned_address_and_checks_the_name(tmp_path):
    """The TCP connection goes to the checked address; TLS (SNI, certificate) is for the URL's name."""
    with TlsServer(tmp_path, "images.example") as tls:
        resolve = {"images.example": [ALLOWED], "other.example": [ALLOWED]}
        url = f"https://images.example:{tls.port}/img.jpg"
        assert fetch(url, POLICY, LIMITS, lambda h, p: resolve[h], tls.client_context()) == jpeg()
        with pytest.raises(FetchFailed) as caught:   # the same server under a name its certificate lacks
            fetch(f"https://other.example:{tls.port}/img.jpg", POLICY, LIMITS, lambda h, p: resolve[h],
                  tls.client_context())
        assert caught.value.reason == "tls_error"
        with pytest.raises(FetchFailed) as caught:   # and a certificate nobody vouches for
            fetch(url, POLICY, LIMITS, lambda h, p: resolve[h])
        assert caught.value.reason == "tls_error"


class _RobotsTagged(BaseHTTPRequestHandler):
    """An image whose answer carries the X-Robots-Tag header given in `?tag=` (repeatable)."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        body = jpeg()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for tag in parse_qs(urlsplit(self.path).query).get("tag", []):
            self.send_header("X-Robots-Tag", tag)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def tagged():
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset.downloader  # noqa: F401 (the X-Robots-Tag reader: its first import takes seconds, not
    # to be spent inside a URL's deadline)

    server = QuietServer((ALLOWED, 0), _RobotsTagged)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield lambda *tags: f"http://{ALLOWED}:{server.server_address[1]}/a.jpg?" + urlencode([("tag", t) for t in tags])
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("directives, tags, opted_out", [
    # the download stage's default directives (stages/download/config.py)
    (("noai", "noimageai", "noindex", "noimageindex"), ["none"], True),   # none = noindex, nofollow
    (("noai", "noimageai", "noindex", "noimageindex"), ["NONE"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["vlp: none"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["otherbot: none"], False),
    (("noai", "noimageai", "noindex", "noimageindex"), ["noarchive, none"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["noindex"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["all"], False),
    (("noai", "noimageai", "noindex", "noimageindex"), ["nofollow"], False),
    (("nofollow",), ["none"], True),       # either half of what `none` means
    (("noai",), ["none"], False),          # `none` says nothing of AI use
    # a directive with a value is not a crawler's name (img2dataset's reader took it for one)
    (("noai", "noimageai", "noindex", "noimageindex"), ["max-image-preview:large, noindex"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["unavailable_after: 25 Jun 2010 15:00:00 PST, noindex"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["unavailable_after: Friday, 25-Jun-10 15:00:00 PST, noai"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["googlebot: noindex, noimageai"], False),
    (("noai", "noimageai", "noindex", "noimageindex"), ["googlebot: noindex", "vlp: max-snippet:0, noai"], True),
    (("noai", "noimageai", "noindex", "noimageindex"), ["noarchive, googlebot: noindex"], False),
])
def test_x_robots_tag_none_is_noindex_nofollow(tagged, directives, tags, opted_out):
    limits = Limits(timeout=1.5, deadline=3.0, max_bytes=2**20, max_redirects=3, max_image_area=4_000_000,
                    user_agent_token="vlp", disallowed_header_directives=frozenset(directives))
    url = tagged(*tags)
    if opted_out:
        assert failure(url, limits=limits) == "opt_out"
    else:
        assert fetch(url, POLICY, limits) == jpeg()
