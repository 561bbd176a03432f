"""The user's shards (the seed and eval sets, CLIP_benchmark webdatasets) are read as the pipeline reads
its own: a whole archive or an InputError naming the shard, only the members we own, and every sample
or member left out counted and reported (pretrain's plan and manifest, evaluate's manifest, a warning)."""
from __future__ import annotations

import io
import json
import logging
import pickle
import re
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pipeline.data.shards import read_shard, write_shard
from pipeline.errors import InputError

CAPTION = b"a large red circle on the left"


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (i * 5 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def _samples(n: int, prefix: str = "s") -> list[dict]:
    return [{"__key__": f"{prefix}{i:04d}", "jpg": _jpeg(i), "txt": CAPTION, "json": b"{}"} for i in range(n)]


def _cut(whole: Path, out: Path, samples: int) -> Path:
    """The first `samples` samples of `whole`, cut where the next one's first header starts: no
    end-of-archive blocks, as a copy that stopped between two members leaves it."""
    with tarfile.open(whole) as tar:
        offset = tar.getmembers()[samples * 3].offset   # jpg, json, txt a sample
    out.write_bytes(whole.read_bytes()[:offset])
    return out


def _planted(path: Path) -> Path:
    """s0000 as it should be; s0001 with a `.pth` beside its members; s0002 a lone pickled `.pyd`;
    s0003 an image without a caption."""
    samples = _samples(4)
    samples[1]["pth"] = b"PK\x03\x04 not a checkpoint"
    samples[2] = {"__key__": "s0002", "pyd": pickle.dumps({"not": "data"})}
    del samples[3]["txt"]
    write_shard(path, samples)
    return path


def test_a_shard_cut_at_a_member_boundary_is_an_error_naming_it(tmp_path):
    whole = tmp_path / "whole.tar"
    write_shard(whole, _samples(40))
    assert len(list(read_shard(whole))) == 40
    cut = _cut(whole, tmp_path / "cut.tar", 37)
    with tarfile.open(cut) as tar:   # what tarfile alone makes of it: a valid shard of 37 samples
        assert len(tar.getmembers()) == 37 * 3
    boundary = rf"{re.escape(str(cut))}: not a whole tar archive: .*after member s0036.txt.*member boundary"
    with pytest.raises(InputError, match=boundary):
        list(read_shard(cut))
    from pipeline.data.shards import check_input_shards

    assert check_input_shards([whole]).samples == 40
    with pytest.raises(InputError, match=re.escape(str(cut))):
        check_input_shards([whole, cut])
    # cut inside a member, one end block of two, bytes that are no header
    data = cut.read_bytes()
    for name, tail in (("inside.tar", -300), ("lone.tar", b"\0" * 512), ("garbage.tar", b"x" * 1024)):
        path = tmp_path / name
        path.write_bytes(data[:tail] if isinstance(tail, int) else data + tail)
        with pytest.raises(InputError, match=rf"{re.escape(str(path))}: not a whole tar archive"):
            list(read_shard(path))


def test_a_cut_shard_streamed_from_an_object_store_is_an_error_too(tmp_path):
    from upath import UPath

    whole = tmp_path / "whole.tar"
    write_shard(whole, _samples(5))
    remote = UPath("memory://vlp-input-shards/whole.tar")
    remote.write_bytes(whole.read_bytes())
    assert [s["__key__"] for s in read_shard(remote)] == [f"s{i:04d}" for i in range(5)]
    remote = UPath("memory://vlp-input-shards/cut.tar")
    remote.write_bytes(_cut(whole, tmp_path / "cut.tar", 3).read_bytes())
    with pytest.raises(InputError, match="memory://vlp-input-shards/cut.tar: not a whole tar archive"):
        list(read_shard(remote))


def test_foreign_members_are_dropped_and_incomplete_samples_skipped_all_counted(tmp_path):
    from pipeline.data.shards import ShardCheck, read_input_shard

    shard = _planted(tmp_path / "seed.tar")
    check = ShardCheck()
    given = list(read_input_shard(shard, check))
    assert [s["__key__"] for s in given] == ["s0000", "s0001"]
    assert all(set(s) == {"__key__", "jpg", "txt", "json"} for s in given)
    assert check.to_json() == {"shards": 1, "samples": 2, "samples_skipped": 2,
                               "skipped_by_reason": {"missing_jpg": 1, "missing_txt": 1},
                               "members_dropped": {"pth": 1, "pyd": 1}}


def test_the_tokenizer_captions_skip_a_sample_with_only_a_foreign_member(tmp_path):
    from stages.pretrain.stage import sample_captions

    shard = _planted(tmp_path / "seed.tar")   # s0002 holds only a .pyd: it was a KeyError 'txt'
    seen = []
    assert list(sample_captions([str(shard)], 10, seed=0, seen=seen)) == [CAPTION.decode()] * 2
    assert seen == [2]


class _Stop(Exception):
    pass


def _pretrain_until_training(tmp_path, seed_shards, monkeypatch):
    """stages.pretrain.stage.run on a fake upstream of 100 web samples, stopped where the tokenizer is made."""
    from stages.pretrain.config import PretrainConfig
    from pipeline.runs import StageDir
    from pipeline.stage import Inputs
    from stages.pretrain import stage as pretrain

    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(pretrain, "_tokenizer", stop)
    upstream = SimpleNamespace(manifest=SimpleNamespace(shards=[{"shard": "00000.tar", "samples": 100}]),
                               path=tmp_path / "prefilter")
    inputs = Inputs((upstream,), {"seed_shards": [str(p) for p in seed_shards], "previous_model": None})
    out = StageDir(tmp_path / "pretrain", "pretrain", 0)
    with pytest.raises(_Stop):
        pretrain.run(PretrainConfig(), inputs, SimpleNamespace(out=out, fingerprint="fp", seed=0))
    return json.loads((out.path / "plan.json").read_text())


def test_pretrain_counts_and_reports_what_it_leaves_out_of_the_seed_set(tmp_path, monkeypatch, caplog):
    clean = tmp_path / "clean.tar"
    write_shard(clean, _samples(5, "c"))
    with caplog.at_level(logging.WARNING, logger="vlp"):
        plan = _pretrain_until_training(tmp_path, [clean, _planted(tmp_path / "seed.tar")], monkeypatch)
    assert plan["seed_samples"] == 7 and plan["samples_in"] == 107
    assert plan["seed_shards"] == {"shards": 2, "samples": 7, "samples_skipped": 2,
                                   "skipped_by_reason": {"missing_jpg": 1, "missing_txt": 1},
                                   "members_dropped": {"pth": 1, "pyd": 1}}
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == ["pretrain: seed shards: skipped 1 sample(s) missing_jpg, 1 sample(s) missing_txt, "
                       "1 .pth member(s), 1 .pyd member(s) of 9 samples in 2 shard(s)"]


def test_pretrain_stops_on_a_cut_seed_shard_before_it_starts(tmp_path, monkeypatch):
    whole = tmp_path / "seed.tar"
    write_shard(whole, _samples(40))
    cut = _cut(whole, tmp_path / "seed-cut.tar", 37)
    with pytest.raises(InputError, match=rf"{re.escape(str(cut))}: not a whole tar archive"):
        _pretrain_until_training(tmp_path, [whole, cut], monkeypatch)
    assert not (tmp_path / "pretrain").exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch

    from pipeline.data.tokenizer import train_tokenizer
    from pipeline.model import SIZES, MultiwayTransformer
    from pipeline.modelio import save_pretrained

    folder = tmp_path_factory.mktemp("model")
    tok = train_tokenizer([CAPTION.decode(), "a small blue square"] * 10, 60, folder / "tok")
    torch.manual_seed(0)
    cfg = SIZES["tiny"].replace(vocab_size=len(tok))
    save_pretrained(folder / "model", cfg, MultiwayTransformer(cfg).state_dict(), folder / "tok", {})
    return folder / "model"


def _evaluate(tmp_path, model_dir, eval_shards, monkeypatch):
    """stages.evaluate.stage.run with its task run in this process (pipeline/executor.py's LocalExecutor)."""
    from pipeline.executor import LocalExecutor
    from stages.evaluate.config import EvaluateConfig
    from pipeline.runs import StageDir
    from pipeline.stage import Inputs, StageContext
    from stages.evaluate import stage as evaluate

    upstream = SimpleNamespace(exported_model=lambda: model_dir)
    inputs = Inputs((upstream,), {"eval_shards": [str(p) for p in eval_shards], "benchmarks": []})
    out = StageDir(tmp_path / "evaluate", "evaluate", 0)
    ctx = StageContext(run=None, out=out, fingerprint="fp", input_fingerprints=(), seed=0, executor=LocalExecutor())
    return evaluate.run(EvaluateConfig(rerank_k=2, batch_size=4), inputs, ctx)


def test_evaluate_counts_and_reports_what_it_leaves_out_of_the_eval_set(tmp_path, tiny_model_dir, monkeypatch,
                                                                        caplog):
    clean = tmp_path / "eval-0.tar"
    samples = _samples(5, "e")
    samples[4]["jpg"] = b"not a jpeg"
    write_shard(clean, samples)
    with caplog.at_level(logging.WARNING, logger="vlp"):
        manifest = _evaluate(tmp_path, tiny_model_dir, [clean, _planted(tmp_path / "eval-1.tar")], monkeypatch)
    assert manifest.details["metrics"]["pairs"] == 6 and "eval_shards" not in manifest.details["metrics"]
    assert manifest.details["eval_shards"] == {"shards": 2, "samples": 6, "samples_skipped": 3,
                                               "skipped_by_reason": {"decode_error": 1, "missing_jpg": 1,
                                                                     "missing_txt": 1},
                                               "members_dropped": {"pth": 1, "pyd": 1}}
    totals = manifest.totals.to_json()
    assert totals["samples_in"] == 9 and totals["samples_kept"] == 6 and totals["samples_failed"] == 3
    assert any("evaluate: eval shards: skipped" in r.getMessage() for r in caplog.records)


def test_evaluate_stops_on_a_cut_eval_shard_naming_it(tmp_path, tiny_model_dir, monkeypatch):
    whole = tmp_path / "eval.tar"
    write_shard(whole, _samples(40, "e"))
    cut = _cut(whole, tmp_path / "eval-cut.tar", 37)
    with pytest.raises(InputError, match=rf"^{re.escape(str(cut))}: not a whole tar archive"):
        _evaluate(tmp_path, tiny_model_dir, [whole, cut], monkeypatch)


def test_a_cut_benchmark_tar_is_an_error_and_samples_without_captions_are_counted(tmp_path, tiny_model_dir):
    from pipeline.benchmarks import run_benchmark
    from pipeline.modelio import load_pretrained

    model, tok, _ = load_pretrained(tiny_model_dir)
    split = tmp_path / "wds" / "test"
    split.mkdir(parents=True)
    samples = _samples(6, "b")
    del samples[5]["txt"]
    samples[4] = {"__key__": "b0004", "pyd": b"x"}
    write_shard(split / "0.tar", samples)
    bench = {"name": "wds", "format": "wds", "path": str(tmp_path / "wds"), "rerank_k": 0}
    result = run_benchmark(bench, model, tok, "cpu", 4)
    assert result["images"] == 4 and result["skipped"] == {"missing_image": 1, "missing_txt": 1}
    write_shard(split / "1.tar", _samples(40, "c"))
    _cut(split / "1.tar", split / "1.tar", 37)
    with pytest.raises(InputError, match=rf"{re.escape(str(split / '1.tar'))}: not a whole tar archive"):
        run_benchmark(bench, model, tok, "cpu", 4)
