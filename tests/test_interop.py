"""The run's outputs as users read them, with the real libraries: Hugging Face `datasets` loads every
stage's webdataset shards (non-streaming), and every sample json comes back as it was written (HF infers
the json's type from the first five samples of the first tar and casts every later one to it: a key null
there and a string later fails, a key absent there is silently dropped, an int there truncates a float).
CapFilt's shards: test_capfilt.py, over its own run."""
from __future__ import annotations

import json

import pytest

from pipeline.data.shards import read_shard


def _stage(run_root, stage: str, round_: int = 0):
    folder = run_root / f"round-{round_}" / stage
    manifest = json.loads((folder / "manifest.json").read_text())
    return folder, manifest


def _canonical(meta: dict) -> str:
    """A json as text with its keys sorted (NaN, a number the URL list lacks, equals itself this way)."""
    return json.dumps(meta, sort_keys=True)


def hf_load(tars: list, cache, monkeypatch):
    """`datasets.load_dataset("webdataset", data_files=...)`, non-streaming, cached under `cache`, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    datasets.disable_progress_bars()
    return datasets.load_dataset("webdataset", data_files={"train": [str(t) for t in tars]}, split="train",
                                 cache_dir=str(cache))


def check_hf_reads_stage(folder, manifest, tmp_path, monkeypatch) -> None:
    """Every committed shard of a stage loads in HF `datasets` with the tars in order and reversed (so the
    json's type is inferred from another tar's first samples): a row per sample the shards hold, each
    json equal to the one in the tar. Returns the number of rows."""
    tars = [folder / s["shard"] for s in manifest["shards"]]
    written = {s["__key__"]: _canonical(json.loads(s["json"])) for t in tars for s in read_shard(t)}
    assert len(written) == sum(s["samples"] for s in manifest["shards"]) > 0
    for order, files in (("in order", tars), ("reversed", tars[::-1])):
        ds = hf_load(files, tmp_path / f"hf-{order.replace(' ', '-')}", monkeypatch)
        assert ds.num_rows == len(written), order
        assert {"__key__", "jpg", "txt", "json"} <= set(ds.column_names)
        got = {row["__key__"]: _canonical(row["json"]) for row in ds.select_columns(["__key__", "json"])}
        changed = sorted(k for k in written if got.get(k) != written[k])
        assert not changed, (f"{order}: {len(changed)} jsons differ after HF's load, e.g. {changed[0]}:\n"
                             f"tar: {written[changed[0]]}\nHF:  {got.get(changed[0])}")
    return len(written)


@pytest.mark.parametrize("stage", ["download", "prefilter"])
def test_hf_datasets_loads_the_web_stages_shards(stage, reference_run, tmp_path, monkeypatch):
    folder, manifest = _stage(reference_run.root, stage)
    assert check_hf_reads_stage(folder, manifest, tmp_path, monkeypatch) == manifest["totals"]["samples_kept"]
