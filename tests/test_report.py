"""The report a curator reads, over the session's download + prefilter run (no pipeline run of its own),
rendered by headless Chromium: the run's metadata, an example of every drop and failure reason (a copy
beside the kept sample or the eval image it copies), download's failures by host, and links that all
name files of the run; also for a run stopped in download and for a run on S3. CapFilt's threshold,
TensorBoard and the model: tests/test_capfilt.py's report test."""
from __future__ import annotations

import collections
import datetime
import json
import shutil
import subprocess

from conftest import ROOT
from pipeline import reportdata
from pipeline.benchmarks import part_items
from pipeline.data.shards import read_shard
from pipeline.ledger import stage_ledger
from pipeline.manifest import code_version
from pipeline.report import write_report
from pipeline.runs import RunDir
from reportcheck import difference, linked_files, render

PREFILTER_REASONS = ("caption_boilerplate", "duplicate_exact", "duplicate_near", "eval_contaminated")


def _samples(stage_dir) -> dict[str, dict]:
    return {s["__key__"]: s for tar in sorted(stage_dir.glob("*.tar")) for s in read_shard(tar)}


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def test_report_shows_every_drop_reason_by_example_failures_by_host_metadata_and_links(tmp_path, reference_run, toyweb):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    page = write_report(run_dir)
    dom = render(page, tmp_path)
    run = RunDir(run_dir)
    down, pre = run.stage("download").manifest(), run.stage("prefilter").manifest()

    # every reason prefilter counted has example cards, each the ledger's row for its key
    ledger = {r["key"]: r for r in stage_ledger(run.stage("prefilter").path).to_pylist()}
    counted = {**pre.totals.to_json()["dropped_by_reason"], **pre.totals.to_json()["failed_by_reason"]}
    cards = collections.defaultdict(list)
    for card in dom["examples"]:
        cards[card["data"]["reason"]].append(card)
        assert ledger[card["data"]["key"]]["reason"] == card["data"]["reason"], card["data"]
    assert set(cards) == set(counted) and set(PREFILTER_REASONS) <= set(counted), (set(cards), counted)
    report_dir, web, evals = page.parent, _samples(run.stage("download").path), _samples(toyweb.eval_shards[0].parent)

    def shown(card, role) -> bytes:
        (img,) = [i for i in card["images"] if i["role"] == role]
        (sample,) = [i for i in card["images"] if i["role"] == "sample"]
        assert img["width"] > 0 and (role == "sample" or img["src"] != sample["src"]), (role, card["data"])
        return (report_dir / img["src"]).read_bytes()

    for card in cards["duplicate_near"] + cards["duplicate_exact"]:   # beside its keeper, the keeper's picture
        key, keeper = card["data"]["key"], card["data"]["keeper"]
        assert keeper == ledger[key]["keeper"], card["data"]
        picture = shown(card, "keeper")
        assert difference(picture, web[keeper]["jpg"]) < 3, card["data"]
        if ledger[key]["distance"] > 0:   # a near copy: the picture shown is the keeper's, not the copy's
            assert difference(picture, web[keeper]["jpg"]) < difference(picture, web[key]["jpg"]), card["data"]
        assert difference(shown(card, "sample"), web[key]["jpg"]) < 3
    for card in cards["eval_contaminated"]:                         # beside the eval image it copies
        row = ledger[card["data"]["key"]]
        assert (card["data"]["benchmark"], card["data"]["item"]) == (row["benchmark"], row["item"])
        twin, original = shown(card, "twin"), evals[row["item"].split("/", 1)[1]]["jpg"]
        assert row["benchmark"] == "evaluate.shards" and difference(twin, original) < 3, card["data"]
        if row["distance"] > 0:   # a near copy: the picture shown is the eval image, not the copy
            assert difference(twin, original) < difference(twin, web[row["key"]]["jpg"]), card["data"]
    for card in cards["caption_boilerplate"]:                       # with the caption that is boilerplate
        assert web[card["data"]["key"]]["txt"].decode() in card["text"]

    # download: every reason, its count and an example URL from the ledger; the failures by host
    reasons = {row["data"]["reason"]: row["cells"] for row in dom["tables"]["download-reasons"]}
    totals = down.totals.to_json()
    assert reasons.keys() == {**totals["dropped_by_reason"], **totals["failed_by_reason"]}.keys()
    down_ledger = stage_ledger(run.stage("download").path).to_pylist()
    for reason, cells in reasons.items():
        assert int(cells[2]) == {**totals["dropped_by_reason"], **totals["failed_by_reason"]}[reason]
        assert any(r["url"] in cells[4] for r in down_ledger if r["reason"] == reason), (reason, cells)
    hosts = dom["tables"]["failures-by-host"]
    assert [h["data"]["host"] for h in hosts] == ["127.0.0.1"]   # the toy web's one host
    assert int(hosts[0]["data"]["failed"]) == totals["samples_failed"] > 0
    assert hosts[0]["cells"][1] == str(totals["samples_in"])
    assert all(f"{reason} {n}" in hosts[0]["cells"][4] for reason, n in totals["failed_by_reason"].items())

    # metadata: dates, code version, config, every stage's fingerprint
    assert _when(down.started) in dom["text"]["run-dates"] and _when(pre.finished) in dom["text"]["run-dates"]
    assert f"vlp {code_version()}" in dom["text"]["code-version"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.strip() in dom["text"]["code-version"]
    assert "config.yaml" in dom["text"]["config"] and "prefilter:" in dom["text"]["config"]
    prints = {(r["data"]["stage"], int(r["data"]["round"])): r["cells"][3] for r in dom["tables"]["fingerprints"]}
    assert prints == {("download", 0): down.fingerprint, ("prefilter", 0): pre.fingerprint}

    # every link names a file of the run: config, manifests, every committed shard and its ledger
    linked = linked_files(dom, page, run_dir)
    expected = {"config.yaml"} | {f"round-0/{stage}/{name}" for stage, m in (("download", down), ("prefilter", pre))
                                  for s in m.shards for name in ("manifest.json", s["shard"], s["shard"][:-4] + ".parquet")}
    assert expected <= linked, sorted(expected - linked)


def test_report_of_a_run_stopped_in_download(tmp_path, reference_run):
    """Only download, and it stopped: no manifest, a shard written but not committed (no stats file)."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)
    shutil.rmtree(run_dir / "round-0" / "prefilter")
    download = run_dir / "round-0" / "download"
    (download / "manifest.json").unlink()
    (download / "00005.stats.json").unlink()
    page = write_report(run_dir)
    dom = render(page, tmp_path)
    linked = linked_files(dom, page, run_dir)
    assert "round-0/download/00004.tar" in linked and "round-0/download/00005.tar" not in linked
    assert not any(name.startswith("round-0/prefilter") for name in linked) and not dom["examples"]
    committed = [r for r in stage_ledger(download).to_pylist() if not r["key"].startswith("00005")]
    (host,) = dom["tables"]["failures-by-host"]
    assert host["cells"][1] == str(len(committed))
    assert int(host["data"]["failed"]) == sum(r["outcome"] == "failed" for r in committed)
    assert dom["tables"]["download-reasons"] and dom["text"]["threshold"] is None


def test_report_of_a_run_on_s3(tmp_path, reference_run, s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    root = f"{s3_bucket}/run"
    fs.put(f"{reference_run.root}/", root[len("s3://"):], recursive=True)
    page = str(write_report(root))
    text = fs.cat(page[len("s3://"):]).decode()
    local = tmp_path / "run"
    fs.get(root[len("s3://"):] + "/", str(local), recursive=True)   # the report folder as a browser gets it
    dom = render(local / "report" / "index.html", tmp_path)
    assert len(linked_files(dom, local / "report" / "index.html", local)) > 10 and "failures-by-host" in text
    assert {c["data"]["reason"] for c in dom["examples"]} >= set(PREFILTER_REASONS)


def test_eval_twins_are_found_in_each_benchmark_layout(tmp_path, reference_run, toyweb):
    """An image the ledger names by a benchmark and its path (toy COCO's Karpathy json, toy ImageNet's
    class folders), as prefilter names it, is the image the report shows."""
    run = RunDir(reference_run.root)
    wanted = {}
    for bench in toyweb.benchmarks:
        item, data = next(part_items(bench, 0))
        wanted[(bench["name"], item)] = data
    assert len(wanted) == 2
    sources = run.stage("prefilter", 0).manifest().details["eval_sources"]
    assert reportdata.eval_images(sources, set(wanted)) == wanted
