"""The polite downloader: per-host limits against the toy web's rate-limited host, 429/503 with and
without Retry-After, URL dedup before download, LAION's columns carried to prefilter rules, and
`--retry-failed`. Real HTTP servers on 127/8, real Ray where a stage runs."""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import urllib.parse
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import UrlListConfig
from pipeline.toyweb.config import DownloadFaults, ToyWebConfig

from pipeline.configbase import LIST_FIELDS

from stages.download.config import DownloadConfig
from pipeline.data.politeness import HostQueue, Politeness, parse_retry_after
from pipeline.ledger import read_ledger
from pipeline.toyweb.server import ToyWebServer, url_for
from pipeline.toyweb.world import LIMITED_HOST, ToyWorld
from stages.download.stage import fetch_rows
from webguard import ALLOWED, BUSY_SEEN, HostileWeb

NO_FAULTS = DownloadFaults(**{f.name: 0.0 for f in dataclasses.fields(DownloadFaults)})
CFG = DownloadConfig(thread_count=16, image_size=48, timeout=5.0, deadline=20.0,
                     allow_private_hosts=("127.0.0.1", "127.0.0.2"))


def rate_limited_web(urls: int) -> ToyWebConfig:
    return ToyWebConfig(num_urls=urls, eval_size=0, seed_size=0, eval_leaks=0, world_seed=11,
                        rate_limited_share=0.5, rate_limit=10, faults=NO_FAULTS)


def limited_host_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://{LIMITED_HOST}:{port}/_stats", timeout=5) as r:
        return json.loads(r.read())


def toy_rows(web: ToyWebConfig, port: int) -> list[dict]:
    world = ToyWorld(web)
    return [{"key": f"{i:04d}", "url": url_for(port, world, i)} for i in range(web.num_urls)]


def test_a_rate_limited_host_is_backed_off_and_every_url_kept():
    """16 threads at a host that serves 10 requests a second: it answers 429 + Retry-After; the task
    pauses that host, keeps fetching the other, and ends with every URL kept."""
    web = rate_limited_web(120)
    with ToyWebServer(web) as server:
        rows = toy_rows(web, server.port)
        counts = collections.Counter()
        results = fetch_rows(CFG, rows, counts)
        stats = limited_host_stats(server.port)
    limited = sum(LIMITED_HOST in r["url"] for r in rows)
    assert 0 < limited < len(rows)
    failed = {r["url"]: r.get("error") for r in results.values() if r["status"] != "success"}
    assert not failed and len(results) == len(rows), failed
    assert stats["refused"] > 0, "the test needs the host to have said 429"
    # each image once, and the host's robots.txt and tdmrep.json once each (pipeline/data/optouts.py)
    assert counts["rate_limited_answers"] == stats["refused"] and stats["served"] == limited + 2


def test_a_per_host_rate_below_the_hosts_limit_is_never_refused():
    web = rate_limited_web(60)
    cfg = dataclasses.replace(CFG, host_rates={LIMITED_HOST: 5.0})
    with ToyWebServer(web) as server:
        counts = collections.Counter()
        results = fetch_rows(cfg, toy_rows(web, server.port), counts)
        stats = limited_host_stats(server.port)
    assert all(r["status"] == "success" for r in results.values())
    assert stats["refused"] == 0 and counts["rate_limited_answers"] == 0


def test_retry_after_is_waited_for_and_a_long_one_fails_at_once():
    with HostileWeb() as web:
        rows = [{"key": "a", "url": web.url("/busy?n=a&after=1")},                 # 429, Retry-After: 1, then ok
                {"key": "b", "url": web.url("/busy?n=b&code=503&times=2")},        # 503 twice, no header: 1 s, 2 s
                {"key": "c", "url": web.url("/busy?n=c&after=1000&times=9")},      # asks too long a wait
                {"key": "d", "url": web.url("/busy?n=d&after=1&times=9")}]         # never serves
        cfg = dataclasses.replace(CFG, allow_private_hosts=(ALLOWED,), rate_limit_retries=2, per_host_connections=None)
        counts = collections.Counter()
        results = fetch_rows(cfg, rows, counts)
    seen = {key: BUSY_SEEN[urllib.parse.urlsplit(row["url"])._replace(scheme="", netloc="").geturl()]
            for key, row in zip("abcd", rows)}
    assert results["a"]["status"] == "success" and len(seen["a"]) == 2
    assert seen["a"][1] - seen["a"][0] >= 0.95          # waited for the Retry-After
    assert results["b"]["status"] == "success" and len(seen["b"]) == 3
    assert seen["b"][2] - seen["b"][1] >= 1.9           # backoff doubled without a Retry-After
    assert (results["c"]["status"], results["c"]["reason"], len(seen["c"])) == ("failed", "http_429", 1)
    assert (results["d"]["reason"], len(seen["d"])) == ("http_429", 3)   # 1 + rate_limit_retries tries
    assert counts["rate_limited_answers"] == 1 + 2 + 1 + 3


def test_a_host_that_says_slow_down_gets_half_the_connections_then_grows_back():
    """16 requests in flight, 6 answered 429: after the pause the host gets ~8 at once, not 16 (the burst
    would hit the same limit and spend the URLs' tries); answers without 429 grow it back to 16."""
    now = [0.0]
    rows = [{"key": str(i), "url": f"http://img.example/{i}.jpg"} for i in range(400)]
    queue = HostQueue(rows, Politeness(connections=16), clock=lambda: now[0])
    taken = [queue.take() for _ in range(16)]
    for row in taken[:6]:
        assert queue.rate_limited(row, retry_after=1.0) == 1.0
    for row in taken[6:]:
        queue.finish(row)
    now[0] = 1.0
    host, burst = queue.hosts["img.example"], []
    while not host.full(16):
        burst.append(queue.take())
    assert {r["key"] for r in burst[:6]} == {r["key"] for r in taken[:6]}, "the refused rows go first after the pause"
    assert 8 <= len(burst) <= 10, "about half the 16 connections after one 429 burst (and its 10 answers)"
    rounds = 0
    for row in burst:
        queue.finish(row)
    while host.cap is not None:   # a round: as many as the host may have at once, all answered
        batch = [queue.take() for _ in range(int(host.cap))]
        assert host.full(16)
        for row in batch:
            queue.finish(row)
        rounds += 1
    assert 5 <= rounds <= 10
    assert queue.hosts["img.example"].cap is None, "back to the configured 16 after answers without 429"


def test_retry_after_dates_and_seconds():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_urls_repeated_across_lists_are_fetched_once_and_laion_columns_reach_prefilter(tmp_path, ray_cluster):
    """Two LAION lists repeat URLs (whitespace aside); each URL is fetched once, the repeats dropped as
    duplicate_url naming the kept key. The lists' similarity and punsafe land in each sample's json,
    and prefilter's list rules drop by them (a missing punsafe counted on its own)."""
    from pipeline import runner
    from pipeline.config import DataConfig, RayConfig, RunConfig
    from stages.prefilter.config import PrefilterConfig

    with HostileWeb() as web:
        urls = [web.url(f"/img.jpg?n={i}") for i in range(8)]
        first = pa.table({"URL": urls[:6], "TEXT": [f"a red picture {i}" for i in range(6)],
                          "similarity": [0.35, 0.2, 0.35, 0.35, 0.35, 0.35],
                          "punsafe": pa.array([0.1, 0.1, 0.9, None, 0.1, 0.1], pa.float64()),
                          "WIDTH": [96] * 6, "HEIGHT": [64] * 6})
        second = pa.table({"URL": [urls[0], urls[6], " " + urls[4] + " ", urls[7], urls[6]],
                           "TEXT": [f"a red picture again {i}" for i in range(5)],
                           "similarity": [0.35] * 5, "punsafe": [0.1] * 5, "WIDTH": [96] * 5, "HEIGHT": [64] * 5})
        pq.write_table(first, tmp_path / "part-0.parquet")
        pq.write_table(second, tmp_path / "part-1.parquet")
        cfg = RunConfig(
            name="polite", stages=("download", "prefilter"), ray=RayConfig(num_cpus=2),
            data=DataConfig(inputs=tuple(UrlListConfig(path=str(tmp_path / f"part-{i}.parquet"), format="laion")
                                         for i in range(2))),
            download=dataclasses.replace(CFG, samples_per_shard=4, allow_private_hosts=(ALLOWED,)),
            prefilter=PrefilterConfig(min_image_side=8, dedup_exact=False, dedup_near=False, decontaminate=False,
                                      max_drop_share=1.0, list_min={"similarity": 0.3}, list_max={"punsafe": 0.5}))
        run = runner.execute(cfg, tmp_path / "run")
    download = json.loads((run.stage("download").path / "manifest.json").read_text())["totals"]
    assert download["samples_in"] == 11 and download["samples_kept"] == 8
    assert download["dropped_by_reason"] == {"duplicate_url": 3}
    ledgers = [r for p in sorted(run.stage("download").path.glob("*.parquet")) for r in read_ledger(p)]
    repeats = {r["source_row"]: r["error"] for r in ledgers if r["source"] == "part-1.parquet" and r["reason"]}
    kept_key = {(r["source"], r["source_row"]): r["key"] for r in ledgers if r["outcome"] == "kept"}
    assert repeats == {0: f"the URL of {kept_key[('part-0.parquet', 0)]}",
                       2: f"the URL of {kept_key[('part-0.parquet', 4)]}",
                       4: f"the URL of {kept_key[('part-1.parquet', 1)]}"}
    from pipeline.data.shards import read_shard

    metas = [json.loads(s["json"]) for p in sorted(run.stage("download").path.glob("*.tar")) for s in read_shard(p)]
    # every list field in every json (pipeline/data/samplejson.py): NaN where the list has none
    listed = {m["source_row"]: m["list"] for m in metas if m["source"] == "part-0.parquet"}[3]
    assert sorted(listed) == sorted(LIST_FIELDS)
    assert {k: v for k, v in listed.items() if not math.isnan(v)} == {"similarity": 0.35, "width": 96.0, "height": 64.0}
    prefilter = json.loads((run.stage("prefilter").path / "manifest.json").read_text())["totals"]
    assert prefilter["dropped_by_reason"] == {"list_similarity": 1, "list_punsafe": 1, "list_punsafe_missing": 1}
