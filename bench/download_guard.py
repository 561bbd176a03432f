"""Benchmark: what one decompression bomb costs a download worker — img2dataset's way (fetch, then decode
and check the size) against vlp's (read the size from the header, refuse undecoded). One run, each way
in a fresh process over the same bytes from a local server; peak RSS and time per URL, and the ratio.
Then, over a slow host (`--rate` bytes/s), vlp's header read after the whole body against its header
check while the body streams in (the fetcher's `header_check`: refused at the first chunk).

    .venv/bin/python bench/download_guard.py [--side 6000] [--rate 1000000]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BARE = """
    import io, resource, time, urllib.request
    from img2dataset.resizer import Resizer
    resizer = Resizer(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True, upscale_interpolation="lanczos",
                      downscale_interpolation="area", encode_quality=95, encode_format="jpg", skip_reencode=False,
                      disable_all_reencoding=False, min_image_size=0, max_image_area=25_000_000, max_aspect_ratio=float("inf"))
    started = time.perf_counter()
    data = urllib.request.urlopen(URL, timeout=30).read()
    *_, err = resizer(io.BytesIO(data))
    seconds = time.perf_counter() - started
"""
OURS = """
    import time
    from img2dataset.resizer import Resizer  # the stage resizes with it too: the same imports on both sides
    from pipeline.data.fetch import FetchFailed, Limits, fetch
    from pipeline.data.images import image_size
    from pipeline.data.urlpolicy import HostPolicy
    started = time.perf_counter()
    try:
        data = fetch(URL, HostPolicy(["127.0.0.2"]), Limits(timeout=30, deadline=60, max_bytes=16 * 2**20,
                                                             max_redirects=5, max_image_area=25_000_000))
        image_size(data, 25_000_000)
        err = None
    except FetchFailed as failed:
        err = failed.reason
    seconds = time.perf_counter() - started
"""
STREAMED = OURS.replace("max_image_area=25_000_000)", "max_image_area=25_000_000,\n"
                        "        header_check=lambda prefix: check_header(prefix, 25_000_000))") \
    .replace("import image_size", "import check_header, image_size")
PEAK_RSS = """
def peak_rss():
    # VmHWM: the high-water mark of this process image. getrusage's ru_maxrss also counts the parent's
    # pages the child held between fork and exec: under a 700 MB pytest it read 700 MB for any child.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
REPORT = """
    import json
    print(json.dumps({"error": err, "seconds": seconds, "peak_rss": peak_rss()}))
"""


def measure(body: str, url: str) -> dict:
    script = f"URL = {url!r}\n" + PEAK_RSS + textwrap.dedent(body) + textwrap.dedent(REPORT)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}", "seconds": None,
                "peak_rss": None}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from webguard import HostileWeb, png_bomb

    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=6000, help="the bomb's width and height (RGBA PNG)")
    parser.add_argument("--rate", type=float, default=1e6, help="the slow host's bytes per second")
    args = parser.parse_args()
    with HostileWeb() as web:
        png_bomb(args.side)
        url = web.url(f"/bomb.png?side={args.side}")
        size = len(png_bomb(args.side))
        results = {name: measure(body, url) for name, body in (("img2dataset", BARE), ("vlp", OURS))}
        slow = web.url(f"/bomb.png?side={args.side}&rate={args.rate:.0f}")
        streamed = {name: measure(body, slow) for name, body in (("after body", OURS), ("at header", STREAMED))}
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; bomb: {args.side} x {args.side} RGBA PNG, "
          f"{size / 1e3:.0f} KB")
    for name, r in results.items():
        rss = f"{r['peak_rss'] / 2**20:.0f} MB" if r["peak_rss"] else "-"
        took = f"{r['seconds']:.2f} s" if r["seconds"] is not None else "-"
        print(f"{name:>12}: peak RSS {rss}, {took}, outcome {r['error'] or 'accepted'}")
    a, b = results["img2dataset"], results["vlp"]
    if a["peak_rss"] and b["peak_rss"]:
        print(f"ratio img2dataset / vlp: peak RSS x{a['peak_rss'] / b['peak_rss']:.1f}, time x{a['seconds'] / b['seconds']:.1f}")
    print(f"over a host serving {args.rate / 1e6:g} MB/s, vlp's size check:")
    for name, r in streamed.items():
        took = f"{r['seconds']:.3f} s" if r["seconds"] is not None else "-"
        print(f"{name:>12}: {took}, outcome {r['error'] or 'accepted'}")
    a, b = streamed["after body"], streamed["at header"]
    if a["seconds"] and b["seconds"]:
        print(f"ratio after body / at header: time x{a['seconds'] / b['seconds']:.1f}")


if __name__ == "__main__":
    main()
