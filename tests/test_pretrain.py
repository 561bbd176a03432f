"""Pretraining through Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, export, evaluation, and exact
resume (from a checkpoint, and after a worker is killed)."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import psutil
import pytest

from conftest import ROOT, pretrain_config
from pipeline import runner
from pipeline.config import load_config

def _config(tmp_path, toyweb, **pretrain):
    return load_config(pretrain_config(tmp_path / "c.yaml", toyweb, **pretrain))


def _history(run_dir):
    lines = (run_dir / "round-0" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(history):
    return [(h["step"], h["loss"], h["itc"], h["itm"], h["mlm"], h["lm"]) for h in history]


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


def test_trains_exports_and_evaluates(trained):
    stage = trained / "round-0" / "pretrain"
    history = _history(trained)
    assert [h["step"] for h in history] == list(range(1, 13))
    assert history[-1]["loss"] < history[0]["loss"], "the loss goes down"
    assert all(h["samples_per_s"] > 0 for h in history)
    assert list((stage / "tensorboard").glob("events.out.tfevents.*"))
    assert (stage / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["model"]["width"] == 32 and manifest["parameters"] > 10_000
    rows = {r["stage"]: r for r in runner.status(trained)}
    assert [r["state"] for r in rows.values()] == ["done"] * 4
    metrics = rows["evaluate"]["metrics"]
    assert metrics["pairs"] == 40
    for key in ("itc_tr_r1", "itc_ir_r1", "itc_tr_r5", "itc_ir_r5", "itm_tr_r1", "itm_ir_r1"):
        assert 0 <= metrics[key] <= 1
    assert metrics["itc_tr_r5"] >= metrics["itc_tr_r1"]


def test_export_loads_without_deepspeed_or_ray(trained):
    code = ("import sys, torch\n"
            "from pipeline.modelio import load_pretrained\n"
            f"model, tok, info = load_pretrained({str(trained / 'round-0' / 'pretrain' / 'model')!r})\n"
            "enc = tok(['a small red circle'], return_tensors='pt')\n"
            "_, feat = model('encode_text', enc['input_ids'], enc['attention_mask'])\n"
            "assert feat.shape == (1, 32), feat.shape\n"
            "assert model.cfg.vocab_size == len(tok)\n"
            "assert 'deepspeed' not in sys.modules and 'ray' not in sys.modules, 'imported a training dependency'\n"
            "print('ok', info['pretrain']['zero_stage'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok 2"


def test_resume_from_a_checkpoint_reproduces_the_next_steps(tmp_path, toyweb, trained):
    """Drop everything after step 8 except DeepSpeed's own files of step 12 (so `latest` names a
    checkpoint that never completed): the resumed run must start at 8 and retrace the same losses."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    stage = run_dir / "round-0" / "pretrain"
    ckpts = stage / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    (ckpts / "step-00000012" / "COMPLETE").unlink()
    for path in ("manifest.json", "model"):
        shutil.rmtree(stage / path) if (stage / path).is_dir() else (stage / path).unlink()
    runner.execute(_config(tmp_path, toyweb), run_dir, ["pretrain"])
    assert _losses(_history(run_dir)) == _losses(_history(trained))
    assert (stage / "model" / "model.safetensors").is_file()


def _our_train_workers():
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and me in {p.pid for p in proc.parents()}:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_a_killed_worker_resumes_from_the_last_complete_checkpoint(tmp_path, toyweb, trained):
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.rmtree(run_dir / "round-0" / "pretrain")
    shutil.rmtree(run_dir / "round-0" / "evaluate")
    errors = []

    def train():
        try:
            runner.execute(_config(tmp_path, toyweb), run_dir, ["pretrain"])
        except Exception as err:  # noqa: BLE001 (re-raised below)
            errors.append(err)

    thread = threading.Thread(target=train)
    thread.start()
    complete = run_dir / "round-0" / "pretrain" / "checkpoints" / "step-00000004" / "COMPLETE"
    deadline = time.time() + 240
    while not complete.exists() and time.time() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert complete.exists(), f"no checkpoint at step 4 ({errors})"
    victims = _our_train_workers()
    assert victims, "no Ray Train worker to kill"
    victims[0].kill()
    thread.join(timeout=400)
    assert not errors, errors
    assert _losses(_history(run_dir)) == _losses(_history(trained)), "resumed exactly"
    assert (run_dir / "round-0" / "pretrain" / "manifest.json").is_file()
