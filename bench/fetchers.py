"""Benchmark: the HTTP clients weighed for the download stage's fetcher (docs/architecture.md, "The
fetcher"), on the same job: N small images (a few KB each, `--urls`, 2,000 by default) from Debian's
nginx on loopback, fetched by 32 threads (`--threads`), from two locations of the same files:
keep-alive on (`/bench/`) and off (`/bench-close/`: nginx answers `Connection: close` and closes).

  - vlp: `pipeline.data.fetch.fetch`, the stage's fetcher (urllib3 2.x; resolve, check and pin the
    address, one connection per URL, a watchdog for the deadline, the byte cap);
  - img2dataset: `img2dataset.downloader.download_image` (urllib.request's urlopen, one connection per URL);
  - httpx: one `httpx.Client` shared by the threads (its pool keeps connections alive);
  - pycurl: one `Curl` handle per thread (libcurl keeps its connection alive).

httpx and pycurl are measured where they are installed (`.venv/bin/pip install httpx pycurl`), else
reported "not installed". Clients are interleaved over the repeats (ABCD ABCD ...), each run over all
N URLs with fresh connections; each client first fetches a few URLs untimed (imports, first
connections). Every run checks every body against the file's bytes. Reported: URLs/s per run, the
median per client and location, and its ratio to vlp's fetch.

    .venv/bin/python bench/fetchers.py [--urls 2000] [--threads 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

# The nginx harness (tests/realservers.py) lives with the tests, which import it by this same path.
ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")   # img2dataset imports albumentations, which asks PyPI

FILES = 50            # distinct images; URL i asks for image i % FILES with its own query string
TIMEOUT = 10.0
LOCATIONS = {"keep-alive": "/bench/", "close": "/bench-close/"}
CLOSE_CONF = "location /bench-close/ {{ keepalive_timeout 0; alias {site}/bench/; }}"


# ---- the clients: make(threads) -> (fetch(url) -> bytes, close()) ------------------------------------------

def make_vlp(threads: int):
    from pipeline.data.fetch import Limits, fetch
    from pipeline.data.urlpolicy import HostPolicy

    policy = HostPolicy(("127.0.0.1",))
    limits = Limits(timeout=TIMEOUT, deadline=60.0, max_bytes=16 * 2**20, max_redirects=5, max_image_area=25_000_000)
    return (lambda url: fetch(url, policy, limits)), (lambda: None)


def make_img2dataset(threads: int):
    from img2dataset.downloader import download_image

    def get(url: str) -> bytes:
        _, stream, err = download_image((0, url), TIMEOUT, None, None)
        if err is not None:
            raise RuntimeError(err)
        return stream.getvalue()
    return get, (lambda: None)


def make_httpx(threads: int):
    import httpx

    client = httpx.Client(timeout=TIMEOUT, trust_env=False,
                          limits=httpx.Limits(max_connections=threads, max_keepalive_connections=threads))

    def get(url: str) -> bytes:
        response = client.get(url)
        response.raise_for_status()
        return response.content
    return get, client.close


def make_pycurl(threads: int):
    import pycurl

    local, handles, lock = threading.local(), [], threading.Lock()

    def get(url: str) -> bytes:
        curl = getattr(local, "curl", None)
        if curl is None:
            curl = local.curl = pycurl.Curl()
            curl.setopt(pycurl.NOSIGNAL, 1)
            curl.setopt(pycurl.TIMEOUT_MS, int(TIMEOUT * 1000))
            curl.setopt(pycurl.PROXY, "")   # no proxy from the environment, as the others
            with lock:
                handles.append(curl)
        buf = io.BytesIO()
        curl.setopt(pycurl.URL, url)
        curl.setopt(pycurl.WRITEDATA, buf)
        curl.perform()
        status = curl.getinfo(pycurl.RESPONSE_CODE)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return buf.getvalue()

    def close() -> None:
        for curl in handles:
            curl.close()
    return get, close


CLIENTS: dict[str, tuple[str, Callable]] = {
    "vlp": ("pipeline.data.fetch", make_vlp),
    "img2dataset": ("img2dataset", make_img2dataset),
    "httpx": ("httpx", make_httpx),
    "pycurl": ("pycurl", make_pycurl),
}


def installed(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def run(make, urls: list[str], expected: dict[str, bytes], threads: int) -> tuple[float, int]:
    """(seconds, failures) for fetching every URL once on `threads` threads with a fresh client."""
    get, close = make(threads)
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for url in urls:
        todo.put(url)
    failures = []

    def worker() -> None:
        while True:
            try:
                url = todo.get_nowait()
            except queue.Empty:
                return
            try:
                if get(url) != expected[url]:
                    failures.append((url, "wrong bytes"))
            except Exception as err:  # noqa: BLE001 (a failure is counted, and the run goes on)
                failures.append((url, f"{type(err).__name__}: {err}"))

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    close()
    if failures:
        print(f"    {len(failures)} failed, e.g. {failures[0]}", flush=True)
    return seconds, len(failures)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("urllib3", "img2dataset", "httpx", "httpcore", "h11", "pycurl"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} not installed")
    if installed("pycurl"):
        import pycurl

        out.append(f"({pycurl.version})")
    return ", ".join(out)


def main() -> None:
    from realservers import Nginx, nginx_binary, noisy_image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if nginx_binary() is None:
        raise SystemExit("nginx is not installed (Debian's nginx package: `make test` installs it)")
    images = {f"/bench/{i}.jpg": noisy_image("JPEG", (64, 48), seed=1000 + i) for i in range(FILES)}
    clients = {}
    for name, (module, make) in CLIENTS.items():
        if installed(module):
            clients[name] = make
        else:
            print(f"{name}: not installed (`.venv/bin/pip install {module}`), left out")
    rates: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vlp-fetchers-") as tmp:
        site = Path(tmp) / "nginx" / "site"
        with Nginx(Path(tmp) / "nginx", extra_files=images, extra_conf=CLOSE_CONF.format(site=site)) as server:
            nginx = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr.strip()
            lists = {}
            for location, prefix in LOCATIONS.items():
                urls = [server.url(f"{prefix}{i % FILES}.jpg?n={i}") for i in range(args.urls)]
                lists[location] = (urls, {url: images[f"/bench/{i % FILES}.jpg"] for i, url in enumerate(urls)})
            for name, make in clients.items():   # untimed: imports, first connections
                for urls, expected in lists.values():
                    run(make, urls[:2 * args.threads], expected, args.threads)
            for rep in range(args.repeats):
                for location, (urls, expected) in lists.items():
                    for name, make in clients.items():
                        seconds, failed = run(make, urls, expected, args.threads)
                        rates.setdefault((location, name), []).append(len(urls) / seconds)
                        print(f"run {rep} {location:<10} {name:<12} {len(urls)} URLs in {seconds:5.2f}s = "
                              f"{len(urls) / seconds:6.0f} URLs/s" + (f" ({failed} failed)" if failed else ""),
                              flush=True)
    size = statistics.mean(len(b) for b in images.values())
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    print(f"libraries: {versions()}; server: {nginx} (one process, on the same machine)")
    print(f"job: {args.urls} URLs of {FILES} JPEGs ({size / 1024:.1f} KB on average), {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")
    print(f"| {'client':<12} | " + " | ".join(f"{loc + ' URLs/s':>17} | {'/ vlp':>6}" for loc in LOCATIONS) + " |")
    print(f"|{'-' * 14}|" + "|".join(f"{'-' * 19}|{'-' * 8}" for _ in LOCATIONS) + "|")
    for name in CLIENTS:
        if name not in clients:
            print(f"| {name:<12} | " + " | ".join(f"{'not installed':>17} | {'':>6}" for _ in LOCATIONS) + " |")
            continue
        cells = []
        for location in LOCATIONS:
            median = statistics.median(rates[(location, name)])
            ratio = median / statistics.median(rates[(location, "vlp")])
            cells.append(f"{median:>17.0f} | {ratio:>6.2f}")
        print(f"| {name:<12} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
