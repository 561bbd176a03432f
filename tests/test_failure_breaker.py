"""The failure breaker: a download whose URLs mostly fail for one reason stops, with the reason, its
count, example URLs and errors, and how to go on; committed shards stay, and a resume with the setting
raised finishes the stage. Real Ray, a real server on 127.0.0.2 and a closed port beside it."""
from __future__ import annotations

import json
import re
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataConfig, RayConfig, RunConfig, UrlListConfig

from stages.download.config import DownloadConfig
from pipeline.errors import StageFailed
from webguard import ALLOWED, HostileWeb


def closed_port() -> int:
    """A port on 127.0.0.2 nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind((ALLOWED, 0))
        return sock.getsockname()[1]


def run_config(path, **download) -> RunConfig:
    return RunConfig(name="breaker", stages=("download",), ray=RayConfig(num_cpus=2),
                     data=DataConfig(inputs=(UrlListConfig(path=str(path), format="parquet"),)),
                     download=DownloadConfig(image_size=48, timeout=3.0, deadline=5.0, thread_count=4,
                                             allow_private_hosts=(ALLOWED,), **download))


def write_list(path, urls) -> None:
    pq.write_table(pa.table({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}), path)


def test_a_download_whose_every_url_fails_stops_and_says_why(tmp_path, ray_cluster):
    from pipeline import runner

    dead = closed_port()
    write_list(tmp_path / "dead.parquet", [f"http://{ALLOWED}:{dead}/img-{i}.jpg" for i in range(12)])
    with pytest.raises(StageFailed) as stopped:
        runner.execute(run_config(tmp_path / "dead.parquet", samples_per_shard=4), tmp_path / "run")
    message = str(stopped.value)
    assert "connection_refused failed 100.0% of the URLs tried (12 of 12) > download.max_failed_share 0.5" in message
    examples = set(re.findall(rf"http://{re.escape(ALLOWED)}:{dead}/img-\d+\.jpg", message))
    assert len(examples) == 3 and message.count("Connection refused") == 3, message
    assert f"vlp resume {tmp_path / 'run'} --retry-failed" in message
    stage = tmp_path / "run" / "round-0" / "download"
    assert not (stage / "manifest.json").exists()
    assert len(list(stage.glob("*.stats.json"))) == 3, "finished shards stay committed"
    assert json.loads((stage / "plan.json").read_text())["stopped"]["over"][0]["reason"] == "connection_refused"


def test_a_long_list_stops_early_and_a_raised_share_finishes_it(tmp_path, ray_cluster):
    from pipeline import runner

    with HostileWeb() as web:
        dead = closed_port()
        # 2 of 10 URLs good: connection_refused is 80% of every shard
        urls = [web.url(f"/img.jpg?n={i}") if i % 5 == 0 else f"http://{ALLOWED}:{dead}/x-{i}.jpg" for i in range(200)]
        write_list(tmp_path / "list.parquet", urls)
        cfg = run_config(tmp_path / "list.parquet", samples_per_shard=10, failed_share_min_urls=10)
        with pytest.raises(StageFailed, match="connection_refused failed 80.0% of the URLs tried"):
            runner.execute(cfg, tmp_path / "run")
        stage = tmp_path / "run" / "round-0" / "download"
        committed = len(list(stage.glob("*.stats.json")))
        assert 1 <= committed < 20, f"judged after the first shard, only those in flight finish: {committed}"
        # expected failures accepted: the same run finishes, committed shards kept as they are
        import dataclasses
        raised = dataclasses.replace(cfg, download=dataclasses.replace(cfg.download, max_failed_share=0.9))
        run = runner.execute(raised, tmp_path / "run")
        totals = json.loads((run.stage("download").path / "manifest.json").read_text())["totals"]
        assert totals["samples_in"] == 200 and totals["samples_kept"] == 40
        assert totals["failed_by_reason"] == {"connection_refused": 160}
