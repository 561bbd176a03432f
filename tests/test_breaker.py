"""The breaker for mass drops: a filtering stage (prefilter, capfilt) whose one drop reason removes more
than `max_drop_share` of its input stops before its manifest with an error that says what to change;
`vlp resume --set ...` then continues from the committed shards without rewriting them."""
import hashlib
import json
import re
import shlex
import shutil

import pytest
import yaml

from conftest import CAPFILT, ROOT, load_config, pretrain_config, vlp, write_config
from pipeline import cli, runner, status
from pipeline.breaker import check_drop_shares
from stages.capfilt.config import CapfiltConfig
from stages.download.config import DownloadConfig
from stages.prefilter.config import PrefilterConfig
from pipeline.configtree import to_plain
from pipeline.errors import ConfigError, StageFailed
from pipeline.manifest import Accounting
from pipeline.runs import RunDir


def _committed_files(stage):
    """{name: (mtime_ns, sha256)} of every committed shard, stats file and fine-tuned model of a stage."""
    files = [p for p in stage.iterdir() if p.name.endswith((".tar", ".stats.json"))]
    files += [p for p in stage.glob("*/model.safetensors")]  # capfilt's captioner and filter
    return {str(p.relative_to(stage)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(files)}


def _accounting(stage):
    acc = Accounting()
    for path in stage.glob("*.stats.json"):
        acc.add(json.loads(path.read_text())["accounting"])
    return acc


def test_breaker_settings_are_checked_and_stay_out_of_the_fingerprint():
    for cls in (DownloadConfig, PrefilterConfig, CapfiltConfig):
        base = to_plain(cls(), output_only=True)
        assert to_plain(cls(max_drop_share=0.9, drop_share_limits={"x": 1.0}), output_only=True) == base
        assert "max_drop_share" in to_plain(cls()), "the saved config still records them"
    changed = PrefilterConfig(min_caption_words=3)
    assert to_plain(changed, output_only=True) != to_plain(PrefilterConfig(), output_only=True)
    tiny = ROOT / "configs" / "tiny.yaml"
    for bad, key in (("prefilter.max_drop_share=0", "prefilter.max_drop_share"),
                     ("capfilt.max_drop_share=1.5", "capfilt.max_drop_share"),
                     ("prefilter.drop_share_limits.duplicate_near=0", "prefilter.drop_share_limits.duplicate_near")):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: must be in (0, 1]")):
            load_config(tiny, [bad])
    assert load_config(tiny, ["prefilter.max_drop_share=1"]).prefilter.max_drop_share == 1.0


def test_the_error_names_stage_reason_share_and_the_setting(tmp_path):
    stage = RunDir(tmp_path / "run").stage("prefilter", 0)
    stage.begin("fp", {"shards_total": 2})

    def shard(kept, near, small):
        return {"accounting": {"samples_in": kept + near + small, "samples_kept": kept,
                               "dropped_by_reason": {"duplicate_near": near, "image_too_small": small}}}

    shards = [shard(100, 1400, 0), shard(90, 1248, 0)]  # duplicate_near: 2,648 of 2,838
    with pytest.raises(StageFailed) as err:
        check_drop_shares(stage, shards, 0.5, {})
    run_dir = tmp_path / "run"
    assert str(err.value) == (
        "prefilter (round 0) stopped before committing its manifest: duplicate_near dropped 93.3% (2,648 of 2,838) "
        "> prefilter.max_drop_share 0.5. Its 2 shards are committed and kept. If the rule is right for this data, "
        f"continue with `vlp resume {run_dir} --set prefilter.max_drop_share=0.95` (or --set "
        "prefilter.drop_share_limits.duplicate_near=0.95 to allow only this reason); if not, change the rule and "
        "resume.")
    assert stage.plan()["stopped"]["over"][0]["reason"] == "duplicate_near"
    check_drop_shares(stage, shards, 0.95, {})  # 93.3% is within 0.95
    check_drop_shares(stage, shards, 0.5, {"duplicate_near": 1.0})  # a per-reason limit replaces the stage-wide one
    # ... and may be tighter: 150 of 2,988 is just over 5%; the command raises that limit only
    with pytest.raises(StageFailed, match=r": image_too_small dropped 5\.0% \(150 of 2,988\) > "
                                          r"prefilter\.drop_share_limits\.image_too_small 0\.05\. .*"
                                          r"--set prefilter\.drop_share_limits\.image_too_small=0\.1`; if not"):
        check_drop_shares(stage, [*shards, shard(0, 0, 150)], 1.0, {"image_too_small": 0.05})


def test_prefilter_mass_drop_stops_and_resume_with_the_named_setting_continues(tmp_path, toyweb, reference_run):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)  # download and prefilter committed
    # the rebuild happens beside the committed prefilter result, which stays in place until it commits
    stage, current = run_dir / "round-0" / ".next-prefilter", run_dir / "round-0" / "prefilter"
    old_manifest = (current / "manifest.json").read_text()
    # The toy web's short sides are drawn in [40, 160]: a 130 px minimum drops about three quarters.
    config = write_config(tmp_path / "c.yaml", toyweb, prefilter={"min_image_side": 130})
    out = vlp("run", str(config), "--run-dir", str(run_dir), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("vlp: error: ")]
    assert len(errors) == 1, out.stderr
    error = errors[0]

    assert not (stage / "manifest.json").exists(), "the stage is not done"
    assert (current / "manifest.json").read_text() == old_manifest, "the old result stands meanwhile"
    acc = _accounting(stage)
    small = acc.dropped["image_too_small"]
    download = json.loads((run_dir / "round-0" / "download" / "manifest.json").read_text())["totals"]
    assert acc.samples_in == download["samples_kept"] and small / acc.samples_in > 0.5
    assert (f"vlp: error: prefilter (round 0) stopped before committing its manifest: image_too_small dropped "
            f"{small / acc.samples_in:.1%} ({small:,} of {acc.samples_in:,}) > prefilter.max_drop_share 0.5. "
            "Its 6 shards are committed and kept.") in error
    rows = json.loads(vlp("status", str(run_dir), "--json").stdout)["stages"]
    assert [(r["stage"], r["state"]) for r in rows] == [("download", "done"), ("prefilter", "done"),
                                                         ("prefilter", "rebuilding")]
    row = rows[2]
    assert (row["shards_done"], row["shards_total"]) == (6, 6)
    assert row["samples_in"] == row["samples_kept"] + row["samples_dropped"] + row["samples_failed"]
    assert row["stopped"]["over"][0]["reason"] == "image_too_small"
    assert "stopped: image_too_small dropped" in vlp("status", str(run_dir)).stdout

    # Run what the error says; the breaker's settings are not in the fingerprint, so nothing is redone.
    committed, fp = _committed_files(stage), (stage / ".fingerprint").read_text()
    command = shlex.split(re.search(r"continue with `vlp (resume [^`]+)`", error).group(1))
    assert command[1] == str(run_dir) and command[2] == "--set" and command[3].startswith("prefilter.max_drop_share=")
    vlp(*command)
    assert not stage.exists(), "the rebuild was put in place"
    stage = current
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["fingerprint"] == fp
    assert _committed_files(stage) == committed, "committed shards were not rewritten"
    assert {s["shard"]: s["sha256"] for s in manifest["shards"]} == \
        {name.replace(".stats.json", ".tar"): json.loads((stage / name).read_text())["sha256"]
         for name in committed if name.endswith(".stats.json")}
    t = manifest["totals"]
    assert t == acc.to_json() and t["samples_in"] == t["samples_kept"] + t["samples_dropped"] + t["samples_failed"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["prefilter"]["max_drop_share"] == float(command[3].split("=")[1]) > small / acc.samples_in
    rows = status.status(run_dir)
    assert [r["state"] for r in rows] == ["done", "done"] and "stopped" not in rows[1]
    [old] = list((run_dir / "superseded").iterdir())
    assert (old / "manifest.json").read_text() == old_manifest


def test_a_list_of_mostly_repeated_urls_stops_download_and_the_named_setting_continues(tmp_path, toyweb,
                                                                                       ray_cluster):
    # 16 distinct toy-web URLs, each listed 4 times: 48 of 64 rows are `duplicate_url` (75%).
    import pyarrow.parquet as pq

    laion = next(s for s in toyweb.inputs if s.format == "laion")
    urls = pq.read_table(laion.path, columns=["URL", "TEXT"]).slice(0, 16).to_pylist()
    lines = ["url,caption"] + [f"{r['URL']},{r['TEXT'].replace(',', ' ')}" for _ in range(4) for r in urls]
    (tmp_path / "repeats.csv").write_text("\n".join(lines) + "\n")
    config = write_config(tmp_path / "c.yaml", toyweb, stages=["download"],
                          data={"inputs": [{"path": str(tmp_path / "repeats.csv"), "format": "csv"}]})
    run_dir = tmp_path / "run"
    with pytest.raises(StageFailed) as stopped:
        runner.execute(load_config(config), run_dir)
    error = str(stopped.value)
    assert "download (round 0) stopped before committing its manifest: duplicate_url dropped 75.0% (48 of 64) > " \
           "download.max_drop_share 0.5" in error
    stage = run_dir / "round-0" / "download"
    assert not (stage / "manifest.json").exists()
    committed = _committed_files(stage)
    command = shlex.split(re.search(r"continue with `vlp (resume [^`]+)`", error).group(1))
    assert command[2:] == ["--set", "download.max_drop_share=0.8"]
    vlp(*command)
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["totals"]["dropped_by_reason"]["duplicate_url"] == 48
    assert _committed_files(stage) == committed, "nothing was fetched again"


def test_capfilt_mass_drop_stops_and_a_per_reason_limit_continues(tmp_path, toyweb, trained_run, ray_cluster, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    stage = run_dir / "round-1" / "capfilt"
    config = pretrain_config(tmp_path / "c.yaml", toyweb, stages=("download", "prefilter", "pretrain", "evaluate",
                                                                   "capfilt"))
    data = yaml.safe_load(config.read_text())
    data.update(rounds=1, capfilt={**CAPFILT, "threshold": 1.0})  # no ITM probability reaches 1: all rejected
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(StageFailed) as err:
        runner.execute(load_config(config), run_dir, ["capfilt"])
    images = json.loads((run_dir / "round-0" / "prefilter" / "manifest.json").read_text())["totals"]["samples_kept"]
    assert (f"capfilt (round 1) stopped before committing its manifest: filter_rejected dropped 100.0% "
            f"({images:,} of {images:,}) > capfilt.max_drop_share 0.5. Its 6 shards are committed and kept.") \
        in str(err.value)
    assert not (stage / "manifest.json").exists() and len(list(stage.glob("*.stats.json"))) == 6

    committed = _committed_files(stage)
    assert {"captioner/model.safetensors", "filter/model.safetensors"} <= set(committed)
    narrower = re.search(r"\(or (--set \S+) to allow only this reason\)", str(err.value)).group(1)
    assert narrower == "--set capfilt.drop_share_limits.filter_rejected=1.0"
    assert cli.main(["resume", str(run_dir), "--stage", "capfilt", *shlex.split(narrower)]) == 0
    assert "capfilt" in capsys.readouterr().out
    manifest = json.loads((stage / "manifest.json").read_text())
    assert _committed_files(stage) == committed, "nothing was redone: no fine-tuning, no shard"
    t = manifest["totals"]
    assert t["samples_in"] == images == t["dropped_by_reason"]["filter_rejected"] and t["samples_kept"] == 0
    assert manifest["pairs_out"] == 0 and manifest["config"]["drop_share_limits"] == {"filter_rejected": 1.0}
