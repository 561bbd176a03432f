"""Pretraining through Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers, export, evaluation, and exact
resume (from a checkpoint, and after a worker is killed)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, VLP, load_config, pretrain_config, vlp
from pipeline import runner, status
from pipeline.precision import resolve

def _history(run_dir):
    lines = (run_dir / "round-0" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _losses(history):
    return [(h["step"], h["loss"], h["itc"], h["bow"], h.get("itm"), h.get("mlm"), h.get("lm")) for h in history]


@pytest.fixture(scope="module")
def trained(trained_run):
    return trained_run


def test_trains_exports_and_evaluates(trained):
    stage = trained / "round-0" / "pretrain"
    history = _history(trained)
    assert [h["step"] for h in history] == list(range(1, 13))
    # fusion_every 2: itm, mlm and lm run (and are logged) on even steps only; itc and bow on every step
    assert all(("itm" in h) == (h["step"] % 2 == 0) for h in history)
    assert all({"itc", "bow"} <= set(h) for h in history)
    full = [h for h in history if "itm" in h]
    assert full[-1]["loss"] < full[0]["loss"], "the loss goes down"
    assert all(h["samples_per_s"] > 0 for h in history)
    # FLOPs counted once per kind of step: a fusion step (itm, mlm, lm too) costs more than an ITC+BoW one
    per_sample = {h["step"]: h["tflops"] / h["samples_per_s"] for h in history}   # TFLOP per sample, exact
    fusion, unimodal = {round(v, 15) for k, v in per_sample.items() if k % 2 == 0}, \
        {round(v, 15) for k, v in per_sample.items() if k % 2}
    assert len(fusion) == len(unimodal) == 1 and min(fusion) > min(unimodal) > 0, per_sample
    assert "mfu" not in history[0]   # no known peak for a CPU
    assert list((stage / "tensorboard").glob("events.out.tfevents.*"))
    assert (stage / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["model"]["width"] == 32 and manifest["parameters"] > 10_000
    # precision auto, resolved on this machine (bf16 where the CPU has bf16 instructions), and why: in every
    # record and so in the manifest's final one (the exact-resume tests below then run in that precision)
    chosen = resolve("auto")
    assert all(h["precision"] == chosen.name for h in history)
    assert (manifest["final"]["precision"], manifest["final"]["precision_reason"]) == (chosen.name, chosen.reason)
    rows = {r["stage"]: r for r in status.status(trained)}
    assert [r["state"] for r in rows.values()] == ["done"] * 4
    metrics = rows["evaluate"]["metrics"]
    assert metrics["pairs"] == 40
    for key in ("itc_tr_r1", "itc_ir_r1", "itc_tr_r5", "itc_ir_r5", "itm_tr_r1", "itm_ir_r1"):
        assert 0 <= metrics[key] <= 1
    assert metrics["itc_tr_r5"] >= metrics["itc_tr_r1"]
    coco, imagenet = metrics["benchmarks"]["toy-coco"], metrics["benchmarks"]["toy-imagenet"]
    assert coco["images"] == 40 and coco["texts"] == 200 and coco["rerank_k"] == 4
    assert imagenet["images"] == 40 and 0 <= imagenet["top1"] <= imagenet["top5"] <= 1
    shown = vlp("status", str(trained)).stdout
    assert "toy-coco (karpathy, 40 images, 200 texts): ITC TR@1/5/10" in shown
    assert "toy-imagenet (imagefolder, 40 images" in shown


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
    checkpoint that never completed), and resume with new execution-only settings (a logging and a
    checkpoint interval: `--set pretrain.log_every=2` once deleted a complete checkpoint and the model).
    The resumed run must start at 8, leave step 8's files alone and end with the same weights."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    stage = run_dir / "round-0" / "pretrain"
    ckpts = stage / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000012"
    (ckpts / "step-00000012" / "COMPLETE").unlink()
    for path in ("manifest.json", "model"):
        shutil.rmtree(stage / path) if (stage / path).is_dir() else (stage / path).unlink()
    with open(stage / "metrics.jsonl", "a") as f:   # a line torn by a kill in the middle of writing it
        f.write('{"step": 13, "loss": 1.2')
    step8 = {p.name: p.stat().st_mtime_ns for p in (ckpts / "step-00000008").iterdir()}
    config = pretrain_config(tmp_path / "c.yaml", toyweb, log_every=2, checkpoint_every=6)
    # A fresh Ray per training run (the CLI's own): see docs/architecture.md, "Ray Train in a long-lived Ray".
    vlp("run", str(config), "--run-dir", str(run_dir), "--only", "pretrain")
    assert {p.name: p.stat().st_mtime_ns for p in (ckpts / "step-00000008").iterdir()} == step8
    history = _history(run_dir)
    assert [h["step"] for h in history] == list(range(1, 9)) + [10, 12], "resumed at 8, not retrained from 0"
    # (log_every 2 logs the mean of two steps: the weights say whether the steps were the same)
    weights = "model/model.safetensors"
    assert (stage / weights).read_bytes() == (trained / "round-0" / "pretrain" / weights).read_bytes()


def _our_train_workers(me: int):
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and me in {p.pid for p in proc.parents()}:
                found.append(proc)
        except psutil.Error:
            pass
    return found


@contextlib.contextmanager
def _pretraining_past_step_4(tmp_path, toyweb, trained):
    """`vlp run --only pretrain` in a subprocess, on a copy of `trained` without its pretraining, once the
    step-4 checkpoint is complete: (the process, the run directory, its Ray Train workers). Killed on the
    way out if still running."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    shutil.rmtree(run_dir / "round-0" / "pretrain")
    shutil.rmtree(run_dir / "round-0" / "evaluate")
    cfg = pretrain_config(tmp_path / "c.yaml", toyweb)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.Popen(VLP + ["run", str(cfg), "--run-dir", str(run_dir), "--only", "pretrain"], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        complete = run_dir / "round-0" / "pretrain" / "checkpoints" / "step-00000004" / "COMPLETE"
        deadline = time.time() + 240
        while not complete.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert complete.exists(), "no checkpoint at step 4"
        workers = _our_train_workers(proc.pid)
        assert workers, "no Ray Train worker"
        yield proc, run_dir, workers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_worker_resumes_from_the_last_complete_checkpoint(tmp_path, toyweb, trained):
    with _pretraining_past_step_4(tmp_path, toyweb, trained) as (proc, run_dir, workers):
        workers[0].kill()
        _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert _losses(_history(run_dir)) == _losses(_history(trained)), "resumed exactly"
    assert (run_dir / "round-0" / "pretrain" / "manifest.json").is_file()


def test_ctrl_c_stops_training_keeps_its_checkpoints_and_the_run_resumes(tmp_path, toyweb, trained):
    """Ctrl-C (SIGINT to `vlp run`) while the workers train: they stop, the CLI says what was kept and
    exits 130, and `vlp resume` finishes the stage from the last checkpoint, exactly. (Ray Train's own
    Ctrl-C handler ended the run with exit code 1 and no word: pipeline/executor.py `_interruptible`.)"""
    with _pretraining_past_step_4(tmp_path, toyweb, trained) as (proc, run_dir, workers):
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "vlp: interrupted; committed shards are kept" in err
    _, alive = psutil.wait_procs(workers, timeout=60)
    assert not alive, "training workers outlived the interrupted run"
    pretrain = run_dir / "round-0" / "pretrain"
    assert (pretrain / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    assert not (pretrain / "manifest.json").exists()
    vlp("resume", str(run_dir), "--stage", "pretrain", timeout=400)
    assert _losses(_history(run_dir)) == _losses(_history(trained)), "resumed exactly"


def test_training_gives_ctrl_c_back_to_its_caller(trained):
    """`trained` pretrained in this process; Ray Train's fit() left its SIGINT handler behind, and a later
    Ctrl-C in the same run (CapFilt, evaluate) reached it and did nothing."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_seed_is_part_of_what_pretraining_made(tmp_path, toyweb, trained):
    """`--set seed=1` over a run trained with seed 0 must not skip pretraining (nor claim seed 1 made it)."""
    from pipeline.runs import RunDir
    from pipeline.sources import Sources

    config = pretrain_config(tmp_path / "c.yaml", toyweb)
    cfg = load_config(config)
    run = RunDir(trained)
    assert runner.prepare_stage(cfg, Sources(cfg, run, cfg.data.inputs, None), "pretrain", 0) is None  # committed
    reseeded = load_config(config, ["seed=1"])
    sources = Sources(reseeded, run, reseeded.data.inputs, None)
    assert runner.prepare_stage(reseeded, sources, "pretrain", 0) is not None
    assert runner.prepare_stage(reseeded, sources, "prefilter", 0) is None  # unseeded


def test_a_build_lock_left_by_a_killed_build_does_not_hang_training(tmp_path):
    """DeepSpeed's CPU backend JIT-builds an op under torch's lock *file*; a build killed by SIGKILL used
    to leave it, and every later `init_distributed` on the machine waited for it forever (bench/chaos.py
    found it). The build vlp runs first takes a kernel lock and removes such a file."""
    code = ("import os; os.environ.setdefault('DS_ACCELERATOR', 'cpu'); "
            "from deepspeed.accelerator import get_accelerator; from torch.utils import cpp_extension; "
            "b = get_accelerator().create_op_builder('ShareMemCommBuilder'); "
            "print(cpp_extension._get_build_directory(b.NAME, verbose=False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    baton = Path(out.stdout.strip().splitlines()[-1]) / "lock"
    baton.parent.mkdir(parents=True, exist_ok=True)
    baton.write_text("")   # as a build killed between taking the lock and releasing it leaves it
    build = subprocess.run([sys.executable, "-c", "from pipeline.deepspeed_setup import build_comm_op; "
                            "build_comm_op()"], cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert build.returncode == 0, build.stderr[-2000:]
    assert not baton.exists() and "removing the build lock a killed build left" in build.stderr


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_launcher_trains_the_same_model_as_ray_train(tmp_path, toyweb, reference_run, trained, launcher):
    """`vlp train` under torchrun or the deepspeed launcher on 2 CPU processes, no Ray: the losses, the
    fingerprint and the exported weights are those of the Ray Train run with the same config and data.
    torchrun trains from step 0; the deepspeed launcher resumes the Ray run, killed after its step-8
    checkpoint (the same checkpoints serve both paths)."""
    import socket

    run_dir = tmp_path / "run"
    if launcher == "torchrun":
        shutil.copytree(reference_run.root, run_dir)
    else:
        shutil.copytree(trained, run_dir)
        stage = run_dir / "round-0" / "pretrain"
        (stage / "checkpoints" / "step-00000012" / "COMPLETE").unlink()
        for path in ("manifest.json", "model", "_ray"):   # _ray: Ray Train's own files, none of ours
            shutil.rmtree(stage / path) if (stage / path).is_dir() else (stage / path).unlink()
        shutil.rmtree(run_dir / "round-0" / "evaluate")
    step8 = run_dir / "round-0" / "pretrain" / "checkpoints" / "step-00000008"
    before = {p.name: p.stat().st_mtime_ns for p in step8.iterdir()} if step8.exists() else None
    cfg = pretrain_config(tmp_path / "c.yaml", toyweb)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tool = str(Path(sys.executable).with_name(launcher))
    train = ["pipeline.cli", "train", str(cfg), "--run-dir", str(run_dir)]
    if launcher == "torchrun":
        command = [tool, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", *train]
    else:   # it passes --local_rank=N to each process, which vlp accepts
        command = [tool, "--num_nodes", "1", "--num_gpus", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   "--module", *train]
    # one thread per process, as Ray Train (num_cpus) and torchrun set it: the deepspeed launcher leaves
    # torch its default, and 2 threads sum in another order (losses 1e-6 apart at the first fusion step)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(_history(run_dir)) == _losses(_history(trained))
    ours, theirs = (json.loads((r / "round-0" / "pretrain" / "manifest.json").read_text()) for r in (run_dir, trained))
    assert ours["fingerprint"] == theirs["fingerprint"]
    model = Path("round-0/pretrain/model/model.safetensors")
    assert (run_dir / model).read_bytes() == (trained / model).read_bytes()
    assert not (run_dir / "round-0" / "pretrain" / "_ray").exists(), "no Ray Train run"
    if before is not None:   # resumed at 8, not retrained from 0
        assert {p.name: p.stat().st_mtime_ns for p in step8.iterdir()} == before
    again = vlp("run", str(cfg), "--run-dir", str(run_dir), "--only", "pretrain")   # the Ray path sees it done
    assert "already committed" in again.stderr
