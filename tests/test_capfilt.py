"""CapFilt (round 1) over the tiny trained run: accounting, provenance, determinism under kill -9 and
under a dead actor, the curation job from a checkpoint alone, the per-round status and the report."""
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import CAPFILT, ROOT, VLP, load_config, pretrain_config, shard_digests, vlp, write_config
from pipeline import runner
from pipeline.data.shards import read_shard
from pipeline.ledger import not_kept, stage_decisions
from reportcheck import linked_files, render

STAGES = ("download", "prefilter", "pretrain", "evaluate", "capfilt")


def _config_path(tmp_path, toyweb, **capfilt):
    path = pretrain_config(tmp_path / "c.yaml", toyweb, stages=STAGES)
    data = yaml.safe_load(path.read_text())
    data["capfilt"] = {**CAPFILT, **capfilt}
    data["rounds"] = 1
    path.write_text(yaml.safe_dump(data))
    return path


def _capfilt(tmp_path, toyweb, trained_run, **capfilt):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    runner.execute(load_config(_config_path(tmp_path, toyweb, **capfilt)), run_dir, ["capfilt"])
    return run_dir


def _decisions(stage_dir):
    return stage_decisions(stage_dir)


@pytest.fixture(scope="module")
def keep_all(tmp_path_factory, toyweb, trained_run, ray_cluster):
    return _capfilt(tmp_path_factory.mktemp("keep_all"), toyweb, trained_run, threshold=0.0)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, toyweb, trained_run, keep_all):
    """Threshold at the median web score of the keep-all run: some texts pass, some do not."""
    scores = sorted(d["web_score"] for d in _decisions(keep_all / "round-1" / "capfilt"))
    return _capfilt(tmp_path_factory.mktemp("filtered"), toyweb, trained_run, threshold=scores[len(scores) // 2])


def test_keep_all_writes_both_texts_per_image_with_complete_provenance(keep_all):
    stage = keep_all / "round-1" / "capfilt"
    manifest = json.loads((stage / "manifest.json").read_text())
    prefilter = json.loads((keep_all / "round-0" / "prefilter" / "manifest.json").read_text())
    images = prefilter["totals"]["samples_kept"]
    assert manifest["totals"]["samples_in"] == images == manifest["totals"]["samples_kept"]
    assert manifest["pairs"]["web"] == images
    syn = sum(1 for d in _decisions(stage) if d["synthetic_caption"].strip())
    assert manifest["pairs"]["synthetic"] == syn > 0
    fps = {m["fingerprint"] for m in manifest["models"].values()}
    assert len(fps) == 2, "captioner and filter are two separately fine-tuned copies"
    samples = [s for tar in sorted(stage.glob("*.tar")) for s in read_shard(tar)]
    assert len(samples) == manifest["pairs_out"] == images + syn
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["source"] in ("web", "synthetic") and meta["round"] == 1
        assert meta["captioner"] == manifest["models"]["captioner"]["fingerprint"]
        assert meta["filter"] == manifest["models"]["filter"]["fingerprint"]
        assert meta["url"].startswith("http://127.0.0.1:") and meta["original_caption"]
        assert s["txt"].decode() == (meta["original_caption"] if meta["source"] == "web" else meta["synthetic_caption"])
        assert 0.0 <= meta["score"] <= 1.0 and s["jpg"][:2] == b"\xff\xd8"
    synthetic = [json.loads(s["json"]) for s in samples if json.loads(s["json"])["source"] == "synthetic"]
    assert all(not m["synthetic_caption"].startswith("a picture of") for m in synthetic), "prompt is removed"


def test_filtering_accounts_for_every_image_and_text(filtered):
    stage = filtered / "round-1" / "capfilt"
    manifest = json.loads((stage / "manifest.json").read_text())
    threshold = manifest["config"]["threshold"]
    decided = _decisions(stage)
    t = manifest["totals"]
    assert t["samples_in"] == len(decided) == t["samples_kept"] + t["samples_dropped"] + t["samples_failed"]
    assert 0 < t["samples_dropped"] == t["dropped_by_reason"]["filter_rejected"] < t["samples_in"]
    out = {s["__key__"] for tar in stage.glob("*.tar") for s in read_shard(tar)}
    for d in decided:
        assert d["web_kept"] == (d["web_score"] >= threshold)
        assert (f"{d['key']}_web" in out) == d["web_kept"]
        assert (f"{d['key']}_syn" in out) == d["synthetic_kept"]
        assert (d["verdict"] == "dropped") == (not d["web_kept"] and not d["synthetic_kept"])
    rejects = not_kept(stage)
    assert {r["key"] for r in rejects} == {d["key"] for d in decided if d["verdict"] == "dropped"}


def test_hf_datasets_and_duckdb_read_capfilt_output(filtered, tmp_path, monkeypatch):
    """HF `datasets` loads a row per text CapFilt kept, each json (provenance, and prefilter's json as
    `origin`) as written; duckdb's `capfilt/*.parquet` is the ledgers (a row per image in), the decisions
    being in `decisions/`."""
    from test_interop import check_hf_reads_stage, ledgers_by_glob

    stage = filtered / "round-1" / "capfilt"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert check_hf_reads_stage(stage, manifest, tmp_path, monkeypatch) == manifest["pairs_out"]
    ledgers = ledgers_by_glob(stage)
    assert len(ledgers) == manifest["totals"]["samples_in"] == len(_decisions(stage))
    assert sorted(p.name for p in (stage / "decisions").iterdir()) == [f"{s['shard'].split('.')[0]}.parquet"
                                                                        for s in manifest["shards"]]


def test_round_one_pretrains_on_capfilt_output_plus_seed_and_status_shows_rounds(tmp_path, toyweb, filtered):
    run_dir = tmp_path / "run"
    shutil.copytree(filtered, run_dir)
    cfg_path = tmp_path / "c.yaml"
    shutil.copy(filtered.parent / "c.yaml", cfg_path)
    vlp("run", str(cfg_path), "--run-dir", str(run_dir), timeout=600)
    pretrain = json.loads((run_dir / "round-1" / "pretrain" / "manifest.json").read_text())
    capfilt = json.loads((run_dir / "round-1" / "capfilt" / "manifest.json").read_text())
    assert pretrain["totals"]["samples_in"] == capfilt["pairs_out"] + pretrain["seed_samples"]
    assert pretrain["seed_samples"] == 40
    # the tests' web is served by a fixture, not by the run: put its truth where the toy web writes it
    (run_dir / "toyweb").mkdir()
    shutil.copy(toyweb.truth, run_dir / "toyweb" / "truth.parquet")
    status = json.loads(vlp("status", str(run_dir), "--json").stdout)
    rounds = {r["round"]: r for r in status["rounds"]}
    assert set(rounds) == {0, 1} and "tr_r1" in rounds[1]
    flt = rounds[1]["filter"]
    assert flt["pairs"] == capfilt["totals"]["samples_in"] and flt["removed"] == capfilt["totals"]["samples_in"] - capfilt["pairs"]["web"]
    by_attribute = flt["wrong_attribute_removed"]
    assert sum(v["of"] for v in by_attribute.values()) == flt["removed_by_noise"].get("wrong_attribute", {}).get("of", 0)
    assert rounds[1]["captioner"]["images"] == flt["pairs"]
    assert set(rounds[1]["captioner"]["correct"]) == set(by_attribute)
    text = vlp("status", str(run_dir)).stdout
    assert "filter P" in text and "synthetic" in text and "wrong-attribute removed" in text


def test_kill_9_mid_capfilt_then_resume_gives_the_same_shards(tmp_path, toyweb, trained_run, keep_all):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    cfg = _config_path(tmp_path, toyweb, threshold=0.0, actors=1)
    stage = run_dir / "round-1" / "capfilt"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(VLP + ["run", str(cfg), "--run-dir", str(run_dir), "--only", "capfilt"], cwd=ROOT,
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(stage.glob("*.stats.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert list(stage.glob("*.stats.json")), "capfilt never committed a shard before the kill"
    assert not (stage / "manifest.json").exists(), "the kill came too late to test anything"
    time.sleep(3)  # a Ray task may outlive its killed driver by a moment (see docs/architecture.md)
    vlp("resume", str(run_dir), "--stage", "capfilt", timeout=600)
    # actors=1 and keep_all's 2 actors give the same shards: sampling is seeded per shard
    assert shard_digests(stage) == shard_digests(keep_all / "round-1" / "capfilt")


def _busy_capfilt_actors():
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "CapfiltWorker.process" in cmd and p.pid != os.getpid():
            found.append(p)
    return found


def test_a_dead_actor_is_replaced_and_its_shard_redone(tmp_path, toyweb, trained_run, keep_all, ray_cluster):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    cfg = load_config(_config_path(tmp_path, toyweb, threshold=0.0))
    errors = []

    def run():
        try:
            runner.execute(cfg, run_dir, ["capfilt"])
        except Exception as err:  # noqa: BLE001 (re-raised in the test thread)
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.time() + 300
        while not _busy_capfilt_actors() and time.time() < deadline and thread.is_alive():
            time.sleep(0.01)
        victims = _busy_capfilt_actors()
        assert victims, "no capfilt actor seen at work"
        victims[0].kill()
    finally:
        thread.join(timeout=600)
    assert not errors, errors
    stage = run_dir / "round-1" / "capfilt"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["actor_restarts"] >= 1
    assert shard_digests(stage) == shard_digests(keep_all / "round-1" / "capfilt")


def test_curation_job_runs_from_a_checkpoint_alone(tmp_path, toyweb, trained_run, reference_run):
    model = tmp_path / "checkpoint"
    shutil.copytree(trained_run / "round-0" / "pretrain" / "model", model)
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run.root, run_dir)  # download + prefilter done; no pretraining anywhere
    cfg = write_config(tmp_path / "curate.yaml", toyweb, stages=["download", "prefilter", "capfilt"], rounds=1,
                       data={"seed_shards": str(toyweb.seed_shards[0])},
                       capfilt={**CAPFILT, "model": str(model), "threshold": 0.0})
    out = vlp("run", str(cfg), "--run-dir", str(run_dir), timeout=600).stdout
    manifest = json.loads((run_dir / "round-1" / "capfilt" / "manifest.json").read_text())
    assert manifest["base_model"] == str(model)
    assert not (run_dir / "round-0" / "pretrain").exists() and not (run_dir / "round-1" / "pretrain").exists()
    assert "capfilt" in out
    cfg_bad = write_config(tmp_path / "bad.yaml", toyweb, stages=["download", "prefilter", "capfilt"], rounds=1,
                           data={"seed_shards": str(toyweb.seed_shards[0])},
                           capfilt={**CAPFILT, "model": str(tmp_path / "nowhere")})
    proc = vlp("run", str(cfg_bad), "--run-dir", str(run_dir), check=False)
    assert proc.returncode == 2 and "not an exported vlp model" in proc.stderr


def test_report_renders_in_headless_chromium(tmp_path, filtered):
    """Every image decodes, every link names a file of the run (the model, TensorBoard's events, CapFilt's
    shards, ledgers and decisions among them), the threshold is written, every stage has its fingerprint.
    The drop examples, failures by host and metadata: tests/test_report.py, over round 0 alone."""
    run_dir = tmp_path / "run"
    shutil.copytree(filtered, run_dir)
    page = vlp("report", str(run_dir)).stdout.strip().split("report: ")[-1]
    assert page.endswith("report/index.html")
    html = open(page).read()
    for part in ("Accounting funnel", "Noise per source", "Filter scores", "Samples", "Round over round", "Files"):
        assert part in html, part
    dom = render(Path(page), tmp_path)
    assert len(dom["images"]) >= 5, dom["images"]
    capfilt = json.loads((run_dir / "round-1" / "capfilt" / "manifest.json").read_text())
    assert float(dom["text"]["threshold"]) == pytest.approx(capfilt["threshold"], rel=1e-5)
    assert capfilt["threshold"] == yaml.safe_load((run_dir / "config.yaml").read_text())["capfilt"]["threshold"]
    linked = linked_files(dom, Path(page), run_dir)
    pretrain = run_dir / "round-0" / "pretrain"
    expected = {"config.yaml", "round-0/pretrain/model/model.safetensors", "round-0/pretrain/model/config.yaml",
                "round-1/capfilt/captioner/model.safetensors", "round-1/capfilt/filter/model.safetensors"}
    expected |= {f"round-0/pretrain/tensorboard/{p.name}" for p in (pretrain / "tensorboard").iterdir()}
    expected |= {f"round-1/capfilt/{name}" for s in capfilt["shards"]
                 for name in (s["shard"], s["shard"][:-4] + ".parquet", f"decisions/{s['shard'][:-4]}.parquet")}
    assert (pretrain / "tensorboard").is_dir() and expected <= linked, sorted(expected - linked)
    prints = {(r["data"]["stage"], int(r["data"]["round"])): r["cells"][3] for r in dom["tables"]["fingerprints"]}
    for folder in run_dir.glob("round-*/*/manifest.json"):
        manifest = json.loads(folder.read_text())
        assert prints[(manifest["stage"], manifest["round"])] == manifest["fingerprint"]


# The precision of CapFilt's calibration, captioning and scoring (no Ray: the fine-tune is a plain function
# and the actor's class a plain object): that of the fine-tune that produced the model, as its export says.

def _seed_shard(path: Path, n: int = 48) -> Path:
    """`n` small pictures (a coloured square on a noisy background) with their captions."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data.shards import write_shard

    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    samples = []
    for i in range(n):
        colour, side = sorted(colours)[rng.integers(4)], ("left", "right")[rng.integers(2)]
        img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        img.paste(colours[colour], (2, 10, 18, 26) if side == "left" else (22, 10, 38, 26))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        samples.append({"__key__": f"seed{i:04d}", "jpg": buf.getvalue(),
                        "txt": f"a {colour} square on the {side}".encode()})
    write_shard(path, samples)
    return path


def _held_out(shard: Path, holdout: float, size: int, tok, max_len: int):
    """The held-out pairs as one batch, as `calibrate` reads them (fewer than its batch of 64)."""
    import torch

    from pipeline.data.loader import decode_image, in_holdout

    pairs = [(decode_image(s["jpg"], size, None), s["txt"].decode()) for s in read_shard(shard)
             if in_holdout(s["__key__"], holdout)]
    assert 10 <= len(pairs) < 64
    enc = tok([p[1] for p in pairs], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return torch.stack([p[0] for p in pairs]), [p[1] for p in pairs], enc["input_ids"], enc["attention_mask"]


def test_calibration_captioning_and_scoring_run_in_the_fine_tunes_precision(tmp_path, monkeypatch):
    import torch

    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.model import SIZES, MultiwayTransformer
    from pipeline.model import generate as generate_module
    from pipeline.model.scoring import Calibration, match_scores
    from pipeline.modelio import load_pretrained, read_info, save_pretrained
    from stages.capfilt.finetune import calibrate, finetune, model_precision
    from pipeline.precision import resolve
    from stages.capfilt.stage import CapfiltWorker

    holdout, reject_rate = 0.4, 0.1
    shard = _seed_shard(tmp_path / "seed.tar")
    captions = [s["txt"].decode() for s in read_shard(shard)]
    tok = train_tokenizer(captions * 3, 200, tmp_path / "tok")
    cfg = SIZES["tiny"].replace(vocab_size=200)
    torch.manual_seed(0)
    base = tmp_path / "base"
    save_pretrained(base, cfg, MultiwayTransformer(cfg).state_dict(), tmp_path / "tok",
                    {"pretrain": {"precision": "bf16"}})
    ft = {"steps": 2, "batch_size": 8, "warmup_steps": 0}
    summary = finetune(str(base), [str(shard)], str(tmp_path / "filter"), "filter", ft, "", seed=1,
                       holdout=holdout, reject_rate=reject_rate)
    assert summary["precision"] == "bf16" and read_info(tmp_path / "filter")["precision"] == "bf16"

    model, tok, _ = load_pretrained(tmp_path / "filter")
    images, texts, ids, mask = _held_out(shard, holdout, cfg.image_size, tok, cfg.max_text_len)
    fp32 = match_scores(model, images, ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = match_scores(model, images, ids, mask)
    for a, b in zip(bf16, fp32):   # float32 on the CPU either way; bf16's matmuls: close, not the same
        assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
        assert not torch.equal(a, b) and torch.allclose(a, b, atol=0.1), (a - b).abs().max()
    # the fine-tune calibrated on bf16 scores, not on fp32 ones
    assert summary["calibration"] == Calibration.fit(*bf16, reject_rate).to_json()
    assert summary["calibration"] != Calibration.fit(*fp32, reject_rate).to_json()

    # the same export saying fp32 (a fine-tune that ran in fp32), and one from before precisions were recorded
    exports = {"bf16": tmp_path / "filter"}
    for name, precision in (("fp32", "fp32"), ("none", None)):
        exports[name] = tmp_path / f"filter-{name}"
        shutil.copytree(tmp_path / "filter", exports[name])
        data = read_info(exports[name])
        data.pop("precision")
        if precision:
            data["precision"] = precision
        (exports[name] / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert model_precision(read_info(exports["none"])).name == resolve("auto").name
    fp32_info = read_info(exports["fp32"])
    in_fp32 = calibrate(model, tok, [str(shard)], holdout, reject_rate, "cpu", model_precision(fp32_info))
    assert in_fp32.to_json() == Calibration.fit(*fp32, reject_rate).to_json()

    seen = []
    real_generate = generate_module.generate

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real_generate(*args, **kwargs)
    monkeypatch.setattr(generate_module, "generate", spy)
    for name, scores in (("bf16", bf16), ("fp32", fp32)):
        worker = CapfiltWorker(str(exports[name]), str(exports[name]), {**CAPFILT, "rule": "calibrated"},
                               str(tmp_path / "stage"), 1, 0, {"captioner": "-", "filter": "-"},
                               summary["calibration"])
        assert worker.precision["filter"].name == worker.precision["captioner"].name == name
        # the actor scores exactly as the calibration did (bf16) or exactly in fp32
        assert worker.match(images, texts) == Calibration(**summary["calibration"]).combine(*scores).tolist()
        worker.caption(images[:4], torch.Generator().manual_seed(0))
        assert seen.pop() == (torch.bfloat16 if name == "bf16" else False)


def test_calibration_skips_and_counts_seed_samples_it_cannot_use(tmp_path, caplog):
    """A seed sample with no image (only a .pyd), or an image that does not decode, is skipped and
    counted as the fine-tune's stream skips it; it used to end the stage with KeyError 'jpg'."""
    import torch

    from pipeline.data.shards import write_shard
    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.model import SIZES, MultiwayTransformer
    from stages.capfilt.finetune import calibrate
    from pipeline.precision import resolve

    good = list(read_shard(_seed_shard(tmp_path / "good.tar")))
    bad = [{"__key__": "seedx0001", "pyd": b"not ours"},
           {"__key__": "seedx0002", "jpg": b"not a jpeg", "txt": b"a red square on the left"}]
    write_shard(tmp_path / "seed.tar", good + bad)
    tok = train_tokenizer([s["txt"].decode() for s in good] * 3, 200, tmp_path / "tok")
    cfg = SIZES["tiny"].replace(vocab_size=200)
    torch.manual_seed(0)
    model = MultiwayTransformer(cfg).eval()
    with caplog.at_level("WARNING", logger="vlp"):
        mixed = calibrate(model, tok, [str(tmp_path / "seed.tar")], 1.0, 0.1, "cpu", resolve("fp32"))
    clean = calibrate(model, tok, [str(tmp_path / "good.tar")], 1.0, 0.1, "cpu", resolve("fp32"))
    assert mixed == clean and mixed.pairs == len(good)
    assert "1 sample(s) decode_error" in caplog.text and "1 sample(s) missing_jpg" in caplog.text


def test_a_fine_tune_is_the_same_bits_on_two_threads(tmp_path):
    # with 2 threads some CPU backward kernels sum in the order threads finish: without the fine-tune's
    # deterministic kernels one of three fine-tunes of this demo-size model came out different
    import torch

    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.model import SIZES, MultiwayTransformer
    from pipeline.modelio import save_pretrained
    from pipeline.threads import cpu_threads
    from stages.capfilt.finetune import finetune

    shard = _seed_shard(tmp_path / "seed.tar", 64)
    tok_dir = tmp_path / "tok"
    train_tokenizer([s["txt"].decode() for s in read_shard(shard)] * 3, 200, tok_dir)
    cfg = SIZES["demo"].replace(vocab_size=200)
    torch.manual_seed(0)
    # "auto": the precision this CPU trains in (bf16 forced on a CPU without bf16 instructions is
    # emulated: this test took 145 s on an AVX2-only EPYC)
    save_pretrained(tmp_path / "base", cfg, MultiwayTransformer(cfg).state_dict(), tok_dir,
                    {"pretrain": {"precision": "auto"}})
    with cpu_threads(2):   # as a 2-CPU task runs it
        prints = {finetune(str(tmp_path / "base"), [str(shard)], str(tmp_path / f"f{i}"), "filter",
                           {"steps": 6, "batch_size": 32, "warmup_steps": 0}, "", seed=1)["fingerprint"]
                  for i in range(4)}
    assert len(prints) == 1, prints
    # restored for whatever runs next in this (pooled) process
    assert not torch.are_deterministic_algorithms_enabled()
