"""The download stage against a hostile list (tests/webguard.py): every refusal counted with its reason,
the secret server never reached, a decompression bomb refused without decoding it (the task's peak
memory measured), oversized and dripping bodies bounded. Real Ray, real sockets on 127/8."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pipeline.config import UrlListConfig
from stages.download.config import DownloadConfig
from pipeline.configtree import to_plain
from pipeline.ledger import not_kept
from stages.download.stage import task_memory
from webguard import ALLOWED, HostileWeb

PEAK_RSS = """
def peak_rss():
    # VmHWM: the high-water mark of this process image. getrusage's ru_maxrss also counts the parent's
    # pages the child held between fork and exec: under a 700 MB pytest it read 700 MB for any child.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""
CFG = DownloadConfig(samples_per_shard=100, thread_count=8, image_size=48, timeout=5.0, deadline=8.0,
                     max_body_bytes=2**20, max_image_area=4_000_000, allow_private_hosts=(ALLOWED,))


def hostile_list(web: HostileWeb, path: Path) -> dict[str, str]:
    """{url: the reason it must end with} written as a parquet URL list."""
    expected = {web.url(f"/img.jpg?n={i}"): "kept" for i in range(4)}
    for host in ("127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0", "[::ffff:127.0.0.1]"):
        expected[web.secret_url(host, f"/secret.jpg?via={host}")] = "url_private_address"
    expected[web.url(f"/redirect?to={web.secret_url()}")] = "redirect_private_address"
    expected[web.url("/redirect?to=http://169.254.169.254/latest/meta-data/")] = "redirect_private_address"
    expected[web.url("/redirect?to=ftp://127.0.0.1/x")] = "redirect_scheme_refused"
    expected[web.url("/loop")] = "too_many_redirects"
    expected[web.url("/redirect?to=/img.jpg")] = "kept"
    expected[web.url("/bomb.png")] = "image_too_large"
    expected[web.url("/declared-huge")] = "body_too_large"
    expected[web.url("/endless")] = "body_too_large"
    expected[web.url("/drip?every=0.4")] = "deadline_exceeded"
    expected["ftp://127.0.0.2/x.jpg"] = "url_scheme_refused"
    urls = list(expected)
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)
    return expected


@pytest.fixture(scope="module")
def web():
    with HostileWeb() as w:
        yield w
        assert w.secret_hits == [], f"the secret server was reached: {w.secret_hits}"


def test_the_stage_counts_every_refusal_and_never_reaches_the_secret_host(tmp_path, web, ray_cluster):
    from pipeline import runner
    from pipeline.config import DataConfig, RayConfig, RunConfig

    expected = hostile_list(web, tmp_path / "hostile.parquet")
    cfg = RunConfig(name="guard", stages=("download",), ray=RayConfig(num_cpus=2),
                    data=DataConfig(inputs=(UrlListConfig(path=str(tmp_path / "hostile.parquet"), format="parquet"),)),
                    download=CFG)
    run = runner.execute(cfg, tmp_path / "run")
    stage = run.stage("download").path
    manifest = json.loads((stage / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["samples_in"] == len(expected) and totals["samples_kept"] == 5
    outcome = {}
    outcome.update({r["url"]: r["reason"] for r in not_kept(stage)})
    for url, reason in expected.items():
        assert outcome.get(url, "kept") == reason, url


def test_a_bomb_is_refused_within_the_tasks_memory_bound(tmp_path, web):
    """The very function a download task runs, in a process of its own, over a shard holding a 12000 x 12000
    RGBA PNG (decoding it: 576 MB of pixels, ~8 GB in img2dataset's alpha matting) next to good images."""
    parquet = tmp_path / "bomb.parquet"
    urls = [web.url("/bomb.png")] * 3 + [web.url(f"/img.jpg?n={i}") for i in range(3)]
    pq.write_table(pa.table({"url": urls, "caption": ["a bomb"] * 3 + ["an image"] * 3}), parquet)
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from pipeline.config import UrlListConfig
        from stages.download.config import DownloadConfig
        from pipeline.configtree import build
        from stages.download.listplan import input_name, plan_list
        from stages.download.stage import download_shard
        out = Path({str(tmp_path / "stage")!r}); (out / "inputs").mkdir(parents=True)
        plan_list(dict(path={str(parquet)!r}, format="parquet"), 0, str(out / "inputs"), 1000)
        stats = download_shard(str(out), (0, "inputs/" + input_name(0), 0, 6), json.loads(sys.argv[1]))
        print(json.dumps({{"stats": stats, "peak_rss": peak_rss()}}))
    """)
    done = subprocess.run([sys.executable, "-c", PEAK_RSS + script, json.dumps(to_plain(CFG))], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    accounting = result["stats"]["accounting"]
    assert accounting["failed_by_reason"] == {"image_too_large": 3} and accounting["samples_kept"] == 3
    bound = 600 * 2**20   # what the process needs for its imports and a few small images, with margin
    assert result["peak_rss"] < bound < task_memory(CFG), result["peak_rss"]


def test_retry_failed_fetches_transient_failures_again_and_keeps_the_rest(tmp_path, ray_cluster):
    """Half of a list's host was down (connection_refused). A plain resume keeps the committed result;
    `--retry-failed` fetches just those URLs again, keeps every kept image byte for byte, sets the earlier
    manifest aside, and gives the stages after it a new input."""
    import socket

    from pipeline import runner
    from pipeline.config import DataConfig, RayConfig, RunConfig
    from pipeline.data.shards import read_shard

    with socket.socket() as s:   # a port nobody serves yet
        s.bind((ALLOWED, 0))
        down = s.getsockname()[1]
    with HostileWeb() as up:
        urls = [u for i in range(4) for u in (up.url(f"/img.jpg?n={i}"), f"http://{ALLOWED}:{down}/img.jpg?n={i}")]
        urls.append("ftp://127.0.0.2/x.jpg")
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}),
                       tmp_path / "list.parquet")
        cfg = RunConfig(name="transient", stages=("download",), ray=RayConfig(num_cpus=2),
                        data=DataConfig(inputs=(UrlListConfig(path=str(tmp_path / "list.parquet"), format="parquet"),)),
                        download=dataclasses.replace(CFG, samples_per_shard=4))
        run = runner.execute(cfg, tmp_path / "run")
    stage = run.stage("download").path
    first = run.stage("download").manifest()
    assert first.totals.failed == {"connection_refused": 4} and first.totals.dropped == {"url_scheme_refused": 1}
    kept_before = {s["__key__"]: s["jpg"] for p in sorted(stage.glob("*.tar")) for s in read_shard(p)}
    assert len(kept_before) == 4
    with HostileWeb(down):
        runner.execute(cfg, tmp_path / "run")   # a plain resume: committed work is final
        assert run.stage("download").manifest().to_json() == first.to_json()
        runner.execute(cfg, tmp_path / "run", retry_failed=True)
    again = run.stage("download").manifest()
    assert again.totals.samples_kept == 8 and again.totals.samples_failed == 0
    assert again.totals.dropped == {"url_scheme_refused": 1}
    assert again.fingerprint == first.fingerprint and again.result_id == f"{first.fingerprint}+retry-1"
    assert json.loads((stage / "manifest.pass-0.json").read_text())["totals"] == first.totals.to_json()
    kept_after = {s["__key__"]: s["jpg"] for p in sorted(stage.glob("*.tar")) for s in read_shard(p)}
    assert all(kept_after[k] == jpg for k, jpg in kept_before.items()) and len(kept_after) == 8
