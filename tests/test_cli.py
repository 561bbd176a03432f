"""The CLI through a subprocess: the shipped tiny config's curation stages with their own toy web and Ray,
a rerun that skips them, a moved run directory, and clear errors. (The rest of the loop through the CLI:
test_capfilt's round one, test_tracking, test_pretrain.)"""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from conftest import ROOT, vlp


def test_tiny_config_curates_with_its_own_toy_web_and_ray(tmp_path):
    run_dir = tmp_path / "run"
    out = vlp("run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run_dir), "--only", "download,prefilter")
    assert "prefilter  done" in out.stdout and f"run directory: {run_dir}" in out.stdout
    assert "toy web: serving 240 URLs on 127.0.0.1" in out.stderr
    assert "samples/s" in out.stderr, "long loops report progress"
    report = json.loads(vlp("status", str(run_dir), "--json").stdout)
    assert [s["stage"] for s in report["stages"]] == ["download", "prefilter"]
    for s in report["stages"]:
        assert s["state"] == "done"
        assert s["samples_in"] == s["samples_kept"] + s["samples_dropped"] + s["samples_failed"]
        assert set(s) >= {"stage", "round", "state", "samples_in", "samples_kept", "samples_dropped", "samples_failed"}
    kept = report["stages"][1]["samples_kept"]
    assert kept > 100
    urls = wds.WebDataset(str(run_dir / "round-0" / "prefilter" / "{00000..00005}.tar"), shardshuffle=False)
    assert sum(1 for _ in urls) == kept
    # the toy web's files live in the run; the truth file is there for measuring, never read by stages
    assert (run_dir / "toyweb" / "truth.parquet").is_file() and (run_dir / "toyweb" / "eval.parquet").is_file()

    again = vlp("run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run_dir), "--only", "download,prefilter")
    assert again.stderr.count("already committed") == 2
    assert "toy web: serving" not in again.stderr, "nothing to download: no server, no Ray"
    text = vlp("status", str(run_dir)).stdout
    assert "download" in text and "failed: " in text and "dropped: " in text

    # a run directory can be moved: nothing in it names where it was
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    after = vlp("run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(moved), "--only", "download,prefilter")
    assert after.stderr.count("already committed") == 2 and "toy web: serving" not in after.stderr
    assert str(run_dir) not in (moved / "toyweb" / "state.json").read_text()


def test_config_errors_exit_2_with_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {toyweb: {}}\ndownload: {thread_count: -1}\n")
    out = vlp("run", str(bad), "--run-dir", str(tmp_path / "r"), check=False)
    assert out.returncode == 2
    assert f"vlp: error: {bad}: download.thread_count: must be > 0" in out.stderr
    assert "Traceback" not in out.stderr
    out = vlp("run", str(ROOT / "configs" / "tiny.yaml"), "--set", "download.timeout=soon", check=False)
    assert out.returncode == 2 and "download.timeout: expected a number, got 'soon'" in out.stderr


def test_bad_list_fails_before_any_download(tmp_path):
    lst = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"url": ["http://e.com/a.jpg"], "text": ["a cat"]}), lst)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: x\ndata:\n  inputs: [{{path: {lst}, format: laion}}]\n")
    out = vlp("run", str(cfg), "--run-dir", str(tmp_path / "r"), check=False)
    assert out.returncode == 2
    assert f"{lst}: laion list lacks column(s) 'URL', 'TEXT'; found 'url', 'text'" in out.stderr
    assert not (tmp_path / "r" / "round-0").exists(), "nothing started"


def test_status_and_resume_of_a_missing_run(tmp_path):
    for args in (("status", str(tmp_path)), ("resume", str(tmp_path))):
        out = vlp(*args, check=False)
        assert out.returncode == 2 and "not a vlp run directory" in out.stderr
    out = vlp("run", str(ROOT / "configs" / "tiny.yaml"), "--only", "bogus", check=False)
    assert out.returncode == 2 and "unknown stage(s) bogus" in out.stderr


def test_bad_settings_and_places_are_one_line_errors(tmp_path):
    """Exit 2 and a sentence, never a traceback: a config that is not text, impossible values, a run
    directory that cannot be written."""
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    cases = [(["run", str(binary)], "not UTF-8 text"),
             (["run", "configs/tiny.yaml", "--set", "ray.num_cpus=-2"], "ray.num_cpus: must be >= 1"),
             (["run", "configs/tiny.yaml", "--set", "pretrain.cpus_per_worker=0"], "pretrain.cpus_per_worker: must be > 0"),
             (["run", "configs/tiny.yaml", "--set", "pretrain.grad_clip=-1"], "pretrain.grad_clip: must be >= 0"),
             (["run", "configs/tiny.yaml", "--set", "pretrain.weight_decay=-0.1"], "pretrain.weight_decay: must be >= 0"),
             (["run", "configs/tiny.yaml", "--set", "pretrain.lr=.nan"], "pretrain.lr: must be finite")]
    (tmp_path / "a-file").write_text("x")
    cases.append((["run", "configs/tiny.yaml", "--run-dir", str(tmp_path / "a-file" / "run")], "cannot write to it"))
    for args, message in cases:
        done = vlp(*args, check=False, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
