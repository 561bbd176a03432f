"""The download stage as a whole against server software no one here wrote: Python's http.server
(HTTP/1.0) serving JPEGs, and nginx serving the image zoo (tests/imagezoo.py: files written by real
encoders) beside a site's opt-outs: robots.txt, /.well-known/tdmrep.json, a `tdm-reservation` header
and an X-Robots-Tag header. Every URL ends kept or counted under its reason; the kept zoo images show
the source picture upright and in its colours. Real Ray, real img2dataset Resizer, real tars."""
from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagezoo import build_zoo, expected_quadrants
from pipeline.config import DataConfig, RayConfig, RunConfig, UrlListConfig
from stages.download.config import DownloadConfig
from pipeline.data.shards import read_shard
from pipeline.errors import ConfigError
from pipeline.ledger import stage_ledger
from realservers import HOST4, Nginx, PythonHttpServer
from test_imagezoo import quadrant_means

TOLERANCE = 24   # per channel, as test_imagezoo: JPEG at quality 95 after a resize

ROBOTS = b"User-agent: *\nDisallow: /private/\n\nUser-agent: othercrawler\nDisallow: /\n"
TDMREP = json.dumps([{"location": "/reserved/*", "tdm-reservation": 1},
                     {"location": "/*", "tdm-reservation": 0}]).encode()
OPT_OUT_CONF = """
        location /noai/ { add_header X-Robots-Tag "noai, noimageai"; alias %(site)s/img/; }
        location /tdm/ { add_header tdm-reservation 1; alias %(site)s/img/; }
        location /private/ { alias %(site)s/img/; }
        location /reserved/ { alias %(site)s/img/; }
"""


def download(tmp_path, urls: list[str], **settings) -> tuple[dict, dict[str, dict]]:
    """Run the download stage over `urls`; (manifest, {url: ledger row})."""
    from pipeline import runner

    tmp_path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"url": urls, "caption": [f"picture {i}" for i in range(len(urls))]}),
                   tmp_path / "list.parquet")
    settings = {"allow_private_hosts": (HOST4,)} | settings
    cfg = RunConfig(name="realweb", stages=("download",), ray=RayConfig(num_cpus=2),
                    data=DataConfig(inputs=(UrlListConfig(path=str(tmp_path / "list.parquet"), format="parquet"),)),
                    download=DownloadConfig(samples_per_shard=64, thread_count=8, image_size=64, timeout=5.0,
                                            deadline=10.0, **settings))
    run = runner.execute(cfg, tmp_path / "run")
    stage = run.stage("download").path
    ledger = {r["url"]: r for r in stage_ledger(stage).to_pylist()}
    return json.loads((stage / "manifest.json").read_text()), ledger


def test_python_http_server_every_jpeg_kept(tmp_path, ray_cluster):
    """http.server answers HTTP/1.0 and closes each connection: the fetcher before urllib3 failed all."""
    from realservers import noisy_image

    site = tmp_path / "site"
    site.mkdir()
    for i in range(12):
        (site / f"photo {i}.jpg").write_bytes(noisy_image("JPEG", seed=i))   # a space, as web lists have them
    with PythonHttpServer(site) as server:
        manifest, ledger = download(tmp_path, [server.url(f"/photo {i}.jpg") for i in range(12)])
    assert manifest["totals"]["samples_kept"] == 12, manifest["totals"]


@pytest.fixture(scope="module")
def zoo_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    zoo_dir = folder / "zoo-src"
    manifest = build_zoo(zoo_dir)
    files = {f"/zoo/{name}": (zoo_dir / name).read_bytes() for name in manifest}
    files |= {"/robots.txt": ROBOTS, "/.well-known/tdmrep.json": TDMREP}
    server = Nginx(folder / "nginx", extra_files=files, extra_conf=OPT_OUT_CONF % {"site": folder / "nginx" / "site"})
    with server:
        yield server, manifest


def test_the_zoo_and_the_opt_outs_behind_nginx(tmp_path, ray_cluster, zoo_site):
    server, zoo = zoo_site
    opt_outs = {server.url("/private/a.jpg"): "opt_out_robots", server.url("/reserved/a.jpg"): "opt_out_tdmrep",
                server.url("/tdm/a.jpg"): "opt_out_tdmrep", server.url("/noai/a.jpg"): "opt_out",
                server.url("/img/a.jpg"): "kept"}
    zoo_urls = {server.url(f"/zoo/{name}"): name for name in zoo}
    manifest, ledger = download(tmp_path, list(opt_outs) + list(zoo_urls))
    totals = manifest["totals"]
    assert totals["samples_in"] == len(opt_outs) + len(zoo_urls)
    for url, reason in opt_outs.items():
        row = ledger[url]
        assert (row["outcome"], row["reason"]) == (("kept", None) if reason == "kept" else ("dropped", reason)), row
    assert totals["dropped_by_reason"] == {"opt_out_robots": 1, "opt_out_tdmrep": 2, "opt_out": 1}
    assert manifest["opt_outs"]["robots_fetched"] == 1 and manifest["opt_outs"]["tdmrep_fetched"] == 1
    # every zoo file kept, or failed with the reason the zoo expects of it; never a task error
    for url, name in zoo_urls.items():
        expect, row = zoo[name]["expect"], ledger[url]
        assert (row["reason"] or "kept") == expect, (name, row)
    kept = {json.loads(s["json"])["url"]: s["jpg"] for tar in sorted(
        (tmp_path / "run" / "round-0" / "download").glob("*.tar")) for s in read_shard(tar)}
    for url, name in zoo_urls.items():
        if zoo[name]["expect"] != "kept":
            continue
        size, means = quadrant_means(kept[url])
        assert size[0] > size[1], f"{name}: stored {size}, not upright"
        for got, want in zip(means, expected_quadrants(zoo[name])):
            assert max(abs(g - w) for g, w in zip(got, want)) <= TOLERANCE, (name, means)


def test_opt_outs_can_be_turned_off_and_say_so(tmp_path, ray_cluster, zoo_site):
    server, _ = zoo_site
    urls = [server.url("/private/a.jpg"), server.url("/reserved/a.jpg"), server.url("/tdm/a.jpg")]
    manifest, _ = download(tmp_path, urls, robots_txt=False, tdmrep=False)
    assert manifest["totals"]["samples_kept"] == 3
    assert manifest["opt_outs_not_honoured"] == ["robots_txt", "tdmrep"]
    assert manifest["opt_outs"] == {}   # no robots.txt or tdmrep.json was asked for


def test_https_with_the_ca_bundle_setting(tmp_path, ray_cluster, zoo_site):
    """`download.ca_bundle` is the CA the stage trusts: nginx's certificate for localhost (signed by the
    test CA) verifies with it, and is a counted tls_error without it."""
    server, _ = zoo_site
    url = server.tls_url("localhost", "/img/a.jpg")
    hosts = (HOST4, "localhost")
    manifest, _ = download(tmp_path / "with", [url], ca_bundle=str(server.ca_bundle), allow_private_hosts=hosts)
    assert manifest["totals"]["samples_kept"] == 1
    manifest, ledger = download(tmp_path / "without", [url], allow_private_hosts=hosts, max_failed_share=1.0)
    assert manifest["totals"]["failed_by_reason"] == {"tls_error": 1} and "CERTIFICATE_VERIFY_FAILED" in ledger[url]["error"]
    with pytest.raises(ConfigError, match="download.ca_bundle"):
        download(tmp_path / "missing", [url], ca_bundle=str(tmp_path / "no-such.pem"), allow_private_hosts=hosts)
