"""Run directories on object storage: a real S3-compatible server (moto's server mode on 127.0.0.1),
reached through s3fs exactly as a bucket on AWS, MinIO or R2 would be (pipeline/storage.py)."""
from __future__ import annotations

import json

import pytest
import s3fs

from conftest import load_config, shard_digests, vlp, write_config
from pipeline import runner
from pipeline.runlock import LEASE_S, RunInUse, RunLock, holder
from pipeline.storage import as_path


def _digests(run_dir, stage: str) -> dict[str, str]:
    manifest = json.loads((as_path(run_dir) / "round-0" / stage / "manifest.json").read_text())
    return {s["shard"]: s["sha256"] for s in manifest["shards"]}


def test_download_and_prefilter_on_s3_commit_the_bytes_a_local_run_commits(tmp_path, toyweb, reference_run,
                                                                              s3_bucket):
    run_dir = f"{s3_bucket}/runs/tiny"
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb))
    runner.execute(cfg, run_dir)
    for stage in ("download", "prefilter"):
        assert _digests(run_dir, stage) == shard_digests(reference_run.root / "round-0" / stage)
    fs = s3fs.S3FileSystem()
    names = fs.find(run_dir)
    assert not [n for n in names if ".tmp-" in n], "an object store gets whole objects, no temporary names"
    assert not [n for n in names if "/prefilter/dedup/" in n], "the dedup shuffle is removed once decided"
    # A shard whose stats object is gone is not committed: resume redoes that shard alone, same bytes.
    stats = sorted(n for n in names if "/round-0/download/" in n and n.endswith(".stats.json"))
    fs.rm_file(stats[0])
    fs.rm_file(f"{run_dir}/round-0/download/manifest.json")
    before = {n: fs.info(n)["LastModified"] for n in names if n.endswith(".tar") and "/download/" in n}
    proc = vlp("resume", run_dir)
    assert "download" in proc.stdout + proc.stderr
    after = {n: fs.info(n)["LastModified"] for n in before}
    redone = [n for n in before if after[n] != before[n]]
    assert redone == [stats[0].replace(".stats.json", ".tar")]
    assert _digests(run_dir, "download") == shard_digests(reference_run.root / "round-0" / "download")
    status = json.loads(vlp("status", run_dir, "--json").stdout)
    assert status["run_dir"] == run_dir
    assert {r["stage"]: r["state"] for r in status["stages"]} == {"download": "done", "prefilter": "done"}
    # A changed setting rebuilds prefilter beside its result; publishing moves the old one (copy, then
    # delete: S3 has no rename) to superseded/, which only `vlp gc --yes` deletes.
    old = _digests(run_dir, "prefilter")
    vlp("resume", run_dir, "--set", "prefilter.min_image_side=40")
    assert _digests(run_dir, "prefilter") != old
    superseded = json.loads(vlp("status", run_dir, "--json").stdout)["superseded"]
    assert [(r["complete"], r["bytes"] > 0) for r in superseded] == [(True, True)]
    moved = as_path(superseded[0]["path"])
    assert {s["shard"]: s["sha256"] for s in json.loads((moved / "manifest.json").read_text())["shards"]} == old
    assert not fs.find(f"{run_dir}/round-0/.next-prefilter")
    vlp("gc", run_dir, "--yes")
    assert not fs.find(superseded[0]["path"]) and json.loads(vlp("status", run_dir, "--json").stdout)["superseded"] == []


def test_one_writer_per_s3_run_directory_and_a_dead_holders_lock_is_taken_over(s3_bucket):
    root = as_path(f"{s3_bucket}/run")
    with RunLock(root, "first"):
        assert holder(root)["command"] == "first"
        with pytest.raises(RunInUse, match="first"):
            RunLock(root, "second").acquire()
    assert holder(root) is None and not (root / ".lock").exists()
    # A holder that died without releasing: its lock stops being renewed and expires.
    stale = {"host": "elsewhere", "pid": 1, "command": "killed", "token": "x", "renewed": 0}
    (root / ".lock").write_text(json.dumps(stale))
    assert holder(root) is None
    with RunLock(root, "taker"):
        assert holder(root)["command"] == "taker"
    assert LEASE_S >= 30   # renewals every LEASE_S / 4 s: a slow store does not lose a live lock


def test_url_lists_on_s3_plain_and_gzip_compressed_plan_and_download_as_local_ones(tmp_path, toyweb, reference_run,
                                                                                   s3_bucket):
    import gzip

    fs = s3fs.S3FileSystem()
    inputs = []
    for spec in toyweb.inputs:
        data = open(spec.path, "rb").read()
        name = spec.path.rsplit("/", 1)[-1]
        if spec.format in ("cc3m", "tsv", "csv"):   # line-oriented lists are often shipped compressed
            data, name = gzip.compress(data, mtime=0), name + ".gz"
        fs.pipe_file(f"{s3_bucket[5:]}/lists/{name}", data)
        inputs.append({"path": f"{s3_bucket}/lists/{name}", "format": spec.format, "name": spec.name})
    assert any(i["path"].endswith(".gz") for i in inputs)
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, stages=["download"], data={"inputs": inputs}))
    run = runner.execute(cfg, tmp_path / "run")
    assert shard_digests(run.root / "round-0" / "download") == shard_digests(reference_run.root / "round-0" / "download")
    # the lists' hashes are cached by (size, ETag): a resume does not read them again
    cache = json.loads((run.root / ".cache" / "list-sha256.json").read_text())
    assert sorted(cache) == sorted(i["path"] for i in inputs)
