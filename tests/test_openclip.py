"""open_clip trains on vlp's shards as they are: `open_clip_train.main` (open_clip 3.3's own training command)
with `--dataset-type webdataset` over a stage's tars, no `--train-num-samples` (it takes the count from
`sizes.json`), and the same tars as `--val-data`, which it reads once through, sample by sample.

open_clip runs in a venv of its own (requirements/openclip.txt, `make openclip-setup`, .venv/openclip), not
vlp's: open_clip_train's loader fails on webdataset >= 0.2.96 (`KeyError: 'fname'` at the first shard's
end, on the end-of-shard marker those versions yield), while vlp's lock has 0.2.111; and the only
torchvision for torch 2.13.0 on PyPI is a CUDA build, which does not import against the CPU torch (and,
installed beside it, breaks `from transformers import AutoImageProcessor`, which `vlp export` needs).
README, "Versions that interoperate"."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT
from test_lock import PIN

LOCK = ROOT / "requirements" / "openclip.txt"
SOURCE = ROOT / "requirements" / "openclip.in"
# `make test` names the venv's python; by hand: `make openclip-setup`, then pytest
PYTHON = Path(os.environ.get("OPENCLIP_PYTHON", ROOT / ".venv" / "openclip" / "bin" / "python"))
BATCH = 16

# A CLIP small enough for a CPU test: ViT 32 px, one block per tower, 32-d embeddings (no weights: random init).
TINY = {"model_cfg": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
                      "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}},
        "preprocess_cfg": {}}

# What the venv runs: open_clip_train.main with the given arguments. First, where torchvision's C++ ops do
# not load (PyPI's Linux torchvision is a CUDA build: its _C.so needs CUDA torch's libraries), the two ops
# whose fake kernels `import torchvision` registers are declared, so the import goes through; open_clip uses
# none of those ops (torchvision's transforms and FrozenBatchNorm2d, Python both). A CPU torchvision needs nothing.
MAIN = """
import importlib.util, pathlib, sys, torch
ops_library = next(pathlib.Path(importlib.util.find_spec("torchvision").origin).parent.glob("_C*.so"))
try:
    torch.ops.load_library(str(ops_library))
except OSError:
    ops = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        ops.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
from open_clip_train.main import main
sys.exit(main(sys.argv[1:]))
"""


def _pins() -> dict[str, tuple[str, list[str]]]:
    pins, current = {}, None
    for line in LOCK.read_text().splitlines():
        if (match := PIN.match(line)):
            current = canonicalize_name(match.group(1))
            pins[current] = (match.group(2), [])
        elif line.strip().startswith("--hash=") and current is not None:
            pins[current][1].append(line.strip())
    return pins


def test_the_openclip_lock_pins_its_source_with_hashes_and_no_cuda():
    pins = _pins()
    sources = [Requirement(line.split("#")[0]) for line in SOURCE.read_text().splitlines()
               if line.split("#")[0].strip()]
    wrong = [f"{r} (lock: {pins.get(canonicalize_name(r.name), ('none',))[0]})" for r in sources
             if canonicalize_name(r.name) not in pins
             or not r.specifier.contains(Version(pins[canonicalize_name(r.name)][0]), prereleases=True)]
    assert not wrong, f"run `make lock`: {wrong}"
    assert all(hashes for _, hashes in pins.values())
    assert pins["torch"][0].endswith("+cpu")
    cuda = [n for n in pins if n.startswith(("nvidia-", "cuda-", "triton"))]
    assert not cuda, f"CUDA packages in {LOCK.name}: {cuda}"


@pytest.fixture(scope="module")
def openclip_python():
    if not PYTHON.exists():
        pytest.fail(f"{PYTHON}: no open_clip venv; `make openclip-setup` installs {LOCK.relative_to(ROOT)}")
    listing = subprocess.run([PYTHON, "-c", "import importlib.metadata as m, json; print(json.dumps("
                              "{d.metadata['Name']: d.version for d in m.distributions()}))"],
                             capture_output=True, text=True, check=True).stdout
    installed = {canonicalize_name(k): v for k, v in json.loads(listing).items()}
    drift = [f"{n} {installed.get(n)} (lock: {v})" for n, (v, _) in _pins().items() if installed.get(n) != v]
    assert not drift, f"{PYTHON.parents[1]} is not {LOCK.name} (`make openclip-setup`): {drift}"
    return PYTHON


def check_openclip_trains_on_stage(python: Path, folder: Path, tmp_path: Path) -> int:
    """One epoch of open_clip_train.main on the stage's tars and an evaluation over them; returns the samples
    the evaluation read (each once), which equal sizes.json's."""
    sizes = json.loads((folder / "sizes.json").read_text())
    shards = sorted(sizes)
    assert shards and all(re.fullmatch(r"\d{5}\.tar", s) for s in shards), shards
    tars = str(folder / f"{{{shards[0][:-4]}..{shards[-1][:-4]}}}.tar")    # the brace pattern users pass
    model = tmp_path / "tiny"
    model.mkdir()
    (model / "open_clip_config.json").write_text(json.dumps(TINY))
    logs = tmp_path / "logs"
    args = ["--train-data", tars, "--val-data", tars, "--dataset-type", "webdataset", "--batch-size", str(BATCH),
            "--epochs", "1", "--workers", "1", "--model", f"local-dir:{model}", "--device", "cpu",
            "--precision", "fp32", "--seed", "0", "--logs", str(logs), "--name", "vlp"]
    proc = subprocess.run([python, "-c", MAIN, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    log = (logs / "vlp" / "out.log").read_text() if (logs / "vlp" / "out.log").exists() else ""
    assert proc.returncode == 0, f"open_clip_train.main exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    samples = sum(sizes.values())
    # the training set's size is sizes.json's, rounded up to whole batches (open_clip repeats a few samples)
    last = re.findall(r"Train Epoch: 0 \[\s*(\d+)/(\d+) \(100%\)\]", log)
    assert last == [(str(math.ceil(samples / BATCH) * BATCH),) * 2], log[-3000:]
    assert "Handling webdataset error" not in log, log   # the loader skips a sample it cannot read, with this
    assert (logs / "vlp" / "checkpoints" / "epoch_1.pt").stat().st_size > 0
    results = [json.loads(line) for line in (logs / "vlp" / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in results] == [1] and math.isfinite(results[0]["clip_val_loss"])
    assert results[0]["num_samples"] == samples, (results[0], sizes)
    return samples


@pytest.mark.parametrize("stage", ["download", "prefilter"])
def test_open_clip_trains_on_the_web_stages_shards(stage, reference_run, openclip_python, tmp_path):
    folder = reference_run.root / "round-0" / stage
    manifest = json.loads((folder / "manifest.json").read_text())
    assert check_openclip_trains_on_stage(openclip_python, folder, tmp_path) == manifest["totals"]["samples_kept"]


@pytest.fixture(scope="module")
def capfilt_run(tmp_path_factory, toyweb, trained_run, ray_cluster):
    """CapFilt keeping every text (test_capfilt.py's keep-all run): a web and a synthetic pair per image."""
    from test_capfilt import _capfilt

    return _capfilt(tmp_path_factory.mktemp("openclip_capfilt"), toyweb, trained_run, threshold=0.0)


def test_open_clip_trains_on_capfilt_shards(capfilt_run, openclip_python, tmp_path):
    folder = capfilt_run / "round-1" / "capfilt"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert check_openclip_trains_on_stage(openclip_python, folder, tmp_path) == manifest["pairs_out"]
