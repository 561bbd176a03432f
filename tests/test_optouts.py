"""robots.txt and tdmrep.json opt-outs (pipeline/data/optouts.py), over real HTTP on 127.0.0.1.

Each test serves the files it needs from its own ThreadingHTTPServer (HTTP/1.1, Content-Length on every
answer) and fetches them with the download stage's guarded fetcher; every request the server gets is
recorded, so "fetched once" and "not fetched at all" are checked on the server's side."""
from __future__ import annotations

import collections
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest

from pipeline.data.fetch import FetchFailed, Limits, fetch
from pipeline.data.optouts import HostOptOuts, TdmRule, parse_tdmrep, tdm_reservation
from pipeline.data.urlpolicy import HostPolicy
from pipeline.toyweb.server import QuietServer

LIMITS = Limits(timeout=2, deadline=4, max_bytes=2**20, max_redirects=5, max_image_area=1e8)


def fetch_text(url: str) -> bytes:
    return fetch(url, HostPolicy(["127.0.0.1"]), LIMITS)


class Site:
    """A web server on 127.0.0.1 answering `routes` {path: (status, body[, headers][, wait])}; 404 for the
    rest. `wait`: seconds, or an Event the answer waits for. `seen` counts the requests per path."""

    def __init__(self, routes: dict):
        self.routes, self.seen, self.lock = routes, collections.Counter(), threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                with site.lock:
                    site.seen[self.path] += 1
                route = site.routes.get(self.path, (404, b"not here"))
                status, body, headers, wait = (*route, {}, 0)[:4] if len(route) == 2 else (*route, 0)[:4]
                if isinstance(wait, threading.Event):
                    wait.wait(5)
                else:
                    time.sleep(wait)
                body = body.encode() if isinstance(body, str) else body
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def site():
    made = []

    def make(routes: dict) -> Site:
        made.append(Site(routes))
        return made[-1]

    yield make
    for s in made:
        s.close()


ROBOTS = "User-agent: *\nDisallow: /private/\nAllow: /private/ok.jpg\n"


def test_robots_disallow_for_star(site):
    web = site({"/robots.txt": (200, ROBOTS)})
    opt = HostOptOuts(fetch_text, "vlp", tdmrep=False)
    assert opt.refusal(f"{web.base}/private/a.jpg") == "opt_out_robots"
    assert opt.refusal(f"{web.base}/private/ok.jpg") is None      # the longer Allow wins
    assert opt.refusal(f"{web.base}/public/a.jpg") is None
    assert web.seen["/robots.txt"] == 1 and opt.counts["robots_fetched"] == 1


def test_agent_group_overrides_star(site):
    web = site({"/robots.txt": (200, "User-agent: *\nDisallow: /\n\nUser-agent: VLP\nDisallow: /private/\n")})
    ours, other = HostOptOuts(fetch_text, "vlp", tdmrep=False), HostOptOuts(fetch_text, "otherbot", tdmrep=False)
    assert ours.refusal(f"{web.base}/public/a.jpg") is None        # its own group, matched case-insensitively
    assert ours.refusal(f"{web.base}/private/a.jpg") == "opt_out_robots"
    assert other.refusal(f"{web.base}/public/a.jpg") == "opt_out_robots"   # falls back to *


def test_robots_redirect_followed(site):
    web = site({"/robots.txt": (301, "", {"Location": "/real-robots.txt"}),
                "/real-robots.txt": (200, "User-agent: *\nDisallow: /x/\n")})
    opt = HostOptOuts(fetch_text, "vlp", tdmrep=False)
    assert opt.refusal(f"{web.base}/x/a.jpg") == "opt_out_robots"
    assert opt.refusal(f"{web.base}/y/a.jpg") is None


@pytest.mark.parametrize("status", [404, 403, 410, 401])
def test_robots_4xx_allows_everything(site, status):
    web = site({"/robots.txt": (status, "User-agent: *\nDisallow: /\n")})   # a 4xx body is no robots.txt
    opt = HostOptOuts(fetch_text, "vlp", tdmrep=False)
    assert opt.refusal(f"{web.base}/a.jpg") is None
    assert opt.refusal(f"{web.base}/b.jpg") is None
    assert web.seen["/robots.txt"] == 1 and opt.counts["robots_missing"] == 1


@pytest.mark.parametrize("status", [429, 503])
def test_robots_rate_limited_sends_the_url_back_in_line_uncached(site, status):
    """A 429/503 says "not now": the URL waits for its host (rate_limited), and robots.txt is asked again."""
    web = site({"/robots.txt": (status, "slow down")})
    opt = HostOptOuts(fetch_text, "vlp")
    for name in ("a.jpg", "b.jpg"):
        with pytest.raises(FetchFailed) as caught:
            opt.refusal(f"{web.base}/{name}")
        assert caught.value.reason == "robots_unavailable" and caught.value.rate_limited
    assert web.seen["/robots.txt"] == 2 and web.seen["/.well-known/tdmrep.json"] == 0


@pytest.mark.parametrize("status", [500, 502])
def test_robots_5xx_unavailable_and_cached(site, status):
    web = site({"/robots.txt": (status, "down")})
    opt = HostOptOuts(fetch_text, "vlp")
    for name in ("a.jpg", "b.jpg"):
        with pytest.raises(FetchFailed) as caught:
            opt.refusal(f"{web.base}/{name}")
        assert caught.value.reason == "robots_unavailable" and not caught.value.rate_limited
    assert web.seen["/robots.txt"] == 1                        # kept for the task: not asked again
    assert web.seen["/.well-known/tdmrep.json"] == 0          # nothing more asked of that host
    assert opt.counts["robots_unavailable"] == 1


def test_robots_unreachable_host():
    with socket.socket() as sock:   # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    opt = HostOptOuts(fetch_text, "vlp")
    with pytest.raises(FetchFailed) as caught:
        opt.refusal(f"http://127.0.0.1:{port}/a.jpg")
    # the host is down: named as such (the image would fail the same way), not as a robots.txt matter
    assert caught.value.reason == "connection_refused" and opt.counts["robots_unreachable"] == 1


def test_refused_host_keeps_its_reason():
    # 127.0.0.1 without the exception: the URL policy's own refusal, as fetching the image would give.
    opt = HostOptOuts(lambda url: fetch(url, HostPolicy(), LIMITS), "vlp")
    with pytest.raises(FetchFailed) as caught:
        opt.refusal("http://127.0.0.1:9/a.jpg")
    assert caught.value.reason == "url_private_address"


def test_robots_parsed_up_to_500_kib(site):
    filler = "# " + "x" * 1000 + "\n"
    body = "User-agent: *\nDisallow: /early/\n" + filler * 520 + "Disallow: /late/\n"   # the rule after 500 KiB
    web = site({"/robots.txt": (200, body)})
    opt = HostOptOuts(fetch_text, "vlp", tdmrep=False)
    assert opt.refusal(f"{web.base}/early/a.jpg") == "opt_out_robots"
    assert opt.refusal(f"{web.base}/late/a.jpg") is None


def test_robots_over_the_body_cap(site):
    web = site({"/robots.txt": (200, "User-agent: *\n" + "#" * (2**20 + 10) + "\n")})
    opt = HostOptOuts(fetch_text, "vlp")
    with pytest.raises(FetchFailed) as caught:
        opt.refusal(f"{web.base}/a.jpg")
    assert caught.value.reason == "robots_too_large"


def test_fetched_once_from_many_threads(site):
    release = threading.Event()
    slow = site({"/robots.txt": (200, ROBOTS, {}, release),
                 "/.well-known/tdmrep.json": (200, '[{"location": "/tdm/", "tdm-reservation": 1}]', {}, 0.05)})
    fast = site({"/robots.txt": (200, ROBOTS)})
    opt = HostOptOuts(fetch_text, "vlp")
    start = threading.Barrier(17)
    answers, errors = {}, []

    def ask(i: int) -> None:
        start.wait()
        try:
            answers[i] = opt.refusal(f"{slow.base}/{['private', 'tdm', 'public'][i % 3]}/{i}.jpg")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    start.wait()
    wait_until(lambda: slow.seen["/robots.txt"] == 1)
    # The slow host's robots.txt is on its way and 16 threads wait for it: another host does not.
    assert opt.refusal(f"{fast.base}/private/a.jpg") == "opt_out_robots"
    assert not answers and fast.seen["/robots.txt"] == 1
    release.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert answers == {i: ["opt_out_robots", "opt_out_tdmrep", None][i % 3] for i in range(16)}
    assert slow.seen["/robots.txt"] == 1 and slow.seen["/.well-known/tdmrep.json"] == 1
    assert opt.counts["hosts"] == 2 and opt.counts["robots_fetched"] == 2 and opt.counts["tdmrep_fetched"] == 1


def wait_until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_ports_and_schemes_are_separate_hosts(site):
    one, two = site({"/robots.txt": (200, "User-agent: *\nDisallow: /\n")}), site({})
    opt = HostOptOuts(fetch_text, "vlp", tdmrep=False)
    assert opt.refusal(f"{one.base}/a.jpg") == "opt_out_robots"
    assert opt.refusal(f"{two.base}/a.jpg") is None


TDMREP = [{"location": "/directory-a/", "tdm-reservation": 1},
          {"location": "/directory-b/images/*.jpg", "tdm-reservation": 0},
          {"location": "/directory-b/", "tdm-reservation": 1, "tdm-policy": "https://provider.example/p.json"}]


def test_tdmrep_rules(site):
    web = site({"/.well-known/tdmrep.json": (200, json.dumps(TDMREP))})   # robots.txt: 404
    opt = HostOptOuts(fetch_text, "vlp")
    assert opt.refusal(f"{web.base}/directory-a/x.png") == "opt_out_tdmrep"
    assert opt.refusal(f"{web.base}/directory-b/images/cat.jpg") is None   # the first match is not reserved
    assert opt.refusal(f"{web.base}/directory-b/images/cat.png") == "opt_out_tdmrep"
    assert opt.refusal(f"{web.base}/elsewhere/cat.jpg") is None
    assert web.seen["/.well-known/tdmrep.json"] == 1 and opt.counts["tdmrep_fetched"] == 1


def test_tdmrep_not_asked_when_robots_refuses(site):
    web = site({"/robots.txt": (200, "User-agent: *\nDisallow: /\n"),
                "/.well-known/tdmrep.json": (200, json.dumps(TDMREP))})
    opt = HostOptOuts(fetch_text, "vlp")
    assert opt.refusal(f"{web.base}/directory-a/x.png") == "opt_out_robots"
    assert web.seen["/.well-known/tdmrep.json"] == 0


@pytest.mark.parametrize("answer, counted", [((404, "no"), "tdmrep_missing"), ((500, "down"), "tdmrep_unavailable"),
                                             ((200, "<html>not json</html>"), "tdmrep_invalid"),
                                             ((200, '{"location": "/", "tdm-reservation": 1}'), "tdmrep_invalid")])
def test_tdmrep_without_usable_file_reserves_nothing(site, answer, counted):
    web = site({"/.well-known/tdmrep.json": answer})
    opt = HostOptOuts(fetch_text, "vlp")
    assert opt.refusal(f"{web.base}/a.jpg") is None
    assert opt.refusal(f"{web.base}/b.jpg") is None
    assert web.seen["/.well-known/tdmrep.json"] == 1 and opt.counts[counted] == 1


def test_both_off_asks_nothing(site):
    web = site({"/robots.txt": (200, "User-agent: *\nDisallow: /\n"),
                "/.well-known/tdmrep.json": (200, '[{"location": "/", "tdm-reservation": 1}]')})
    opt = HostOptOuts(fetch_text, "vlp", robots_txt=False, tdmrep=False)
    assert opt.refusal(f"{web.base}/a.jpg") is None
    assert sum(web.seen.values()) == 0 and not opt.counts
    only_tdm = HostOptOuts(fetch_text, "vlp", robots_txt=False)
    assert only_tdm.refusal(f"{web.base}/a.jpg") == "opt_out_tdmrep"
    assert web.seen["/robots.txt"] == 0


def test_not_http_urls_are_left_to_fetch():
    opt = HostOptOuts(lambda url: pytest.fail(f"fetched {url}"), "vlp")
    for url in ("ftp://example.com/a.jpg", "not a url", "", "http:///a.jpg", "http://example.com:99999/a.jpg"):
        assert opt.refusal(url) is None


# --- tdmrep.json's `location` matching, no network ---

@pytest.mark.parametrize("location, path, matches", [
    ("/", "/anything/at/all.jpg", True),
    ("/directory-a/", "/directory-a/x.pdf", True),
    ("/directory-a/", "/directory-a", False),              # a prefix of the path, not the other way
    ("/directory-a/", "/Directory-A/x.pdf", False),         # case-sensitive
    ("/images/*.jpg", "/images/2024/cat.jpg", True),
    ("/images/*.jpg", "/images/cat.jpg.png", True),         # no "$": the rest of the path may follow
    ("/images/*.jpg", "/images/cat.png", False),
    ("/*.jpg$", "/a/b.jpg", True),
    ("/*.jpg$", "/a/b.jpgx", False),
    ("/exact$", "/exact", True),
    ("/exact$", "/exact/more", False),
    ("/a*b*c$", "/a-b-c", True),
    ("/a*b*c$", "/a-b-c-d", False),
    ("/a**b", "/a/x/b", True),
    ("/a*", "/a", True),
    ("*.gif", "/x/y.gif", True),
    ("images/", "/images/a.jpg", True),                     # a location without its leading "/"
    ("/path/foo-%24", "/path/foo-$", True),                 # the report's own example
    ("/path/foo-%24", "/path/foo-", False),
    ("/star-%2A", "/star-*", True),
    ("/%7Euser/", "/~user/a.jpg", True),                    # escapes of unreserved characters decoded
    ("/~user/", "/%7euser/a.jpg", True),
    ("/a%2Fb", "/a/b", False),                              # a reserved character's escape is kept
    ("/a%2fb", "/a%2Fb", True),
    ("/café/", "/caf%C3%A9/a.jpg", True),                   # non-ASCII as its UTF-8 escapes
    ("/caf%c3%a9/", "/café/a.jpg", True),
    ("/with space", "/with%20space.jpg", True),
])
def test_location_matching(location, path, matches):
    assert TdmRule(location, 1).matches(path) is matches


def test_first_matching_rule_decides():
    rules, bad = parse_tdmrep(json.dumps(TDMREP).encode())
    assert bad == 0 and [r.reservation for r in rules] == [1, 0, 1]
    assert rules[2].policy == "https://provider.example/p.json"
    assert tdm_reservation(rules, "/directory-b/images/a.jpg") == 0
    assert tdm_reservation(rules, "/directory-b/html/a.html") == 1
    assert tdm_reservation(rules, "/other") is None


def test_malformed_rules():
    doc = [{"location": "/true/", "tdm-reservation": True}, {"location": "/str/", "tdm-reservation": "1"},
           {"location": "/two/", "tdm-reservation": 2}, {"tdm-reservation": 1}, "junk",
           {"location": "", "tdm-reservation": 1}, {"location": "/", "tdm-reservation": 1}]
    rules, bad = parse_tdmrep(("\ufeff" + json.dumps(doc)).encode())
    assert bad == 6 and [r.location for r in rules] == ["/true/", "/str/", "/two/", "/"]
    assert tdm_reservation(rules, "/str/a.jpg") is None      # a protocol error is "unset", and ends the search
    assert tdm_reservation(rules, "/other/a.jpg") == 1
    for not_an_array in (b'{"location": "/"}', b"nope", b"\xff\xfe", b"null"):
        with pytest.raises(ValueError):
            parse_tdmrep(not_an_array)
