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


def ledgers_by_glob(folder) -> list[dict]:
    """A stage's ledgers as duckdb reads them: every `*.parquet` of the folder, one table."""
    import duckdb

    return duckdb.sql(f"select * from '{folder}/*.parquet'").to_arrow_table().to_pylist()


@pytest.mark.parametrize("stage", ["download", "prefilter"])
def test_duckdb_reads_a_stage_folders_ledgers_by_glob(stage, reference_run):
    """`STAGE/*.parquet` are the ledgers and nothing else: a row per sample in, the ledger's columns."""
    from pipeline.ledger import SCHEMA

    folder, manifest = _stage(reference_run.root, stage)
    rows = ledgers_by_glob(folder)
    assert len(rows) == manifest["totals"]["samples_in"]
    assert list(rows[0]) == SCHEMA.names
    assert sum(r["outcome"] == "kept" for r in rows) == manifest["totals"]["samples_kept"]


def test_capfilt_decisions_in_their_folder_and_an_older_layout_still_read(tmp_path):
    """CapFilt's decisions live in `decisions/`; a stage folder an older vlp began keeps `<shard>.decisions.parquet`
    beside the ledgers, and a resumed stage may hold both: stage_decisions reads both, stage_ledger neither."""
    from pipeline.ledger import (DECISIONS_SCHEMA, OLD_DECISIONS_SUFFIX, decisions_path, stage_decisions,
                                 stage_ledger, write_ledger, write_records)

    def decision(key):
        return {"key": key, "url": f"http://e.com/{key}", "web_caption": "a", "web_score": 0.5, "web_kept": True,
                "synthetic_caption": "b", "synthetic_score": 0.1, "synthetic_kept": False, "verdict": "web"}

    write_ledger(tmp_path / "00000.parquet", [{"key": "0000000", "outcome": "kept"}])
    write_records(tmp_path / f"00000{OLD_DECISIONS_SUFFIX}", [decision("0000000")], DECISIONS_SCHEMA)   # older vlp
    write_ledger(tmp_path / "00001.parquet", [{"key": "0000100", "outcome": "kept"}])
    write_records(decisions_path(tmp_path, "00001.tar"), [decision("0000100")], DECISIONS_SCHEMA)
    assert decisions_path(tmp_path, "00001.tar") == tmp_path / "decisions" / "00001.parquet"
    assert [d["key"] for d in stage_decisions(tmp_path)] == ["0000000", "0000100"]
    assert stage_ledger(tmp_path)["key"].to_pylist() == ["0000000", "0000100"]
    (tmp_path / f"00000{OLD_DECISIONS_SUFFIX}").unlink()   # the new layout: the glob gives the ledgers only
    assert [r["key"] for r in ledgers_by_glob(tmp_path)] == ["0000000", "0000100"]


def test_prefilter_signatures_live_beside_the_shards_not_in_the_json(reference_run):
    """`prefilter/signatures/<shard>.parquet`: the near-duplicate signature of every kept sample, the one its
    image gives; the sample json has none, so a prefilter shard (a subset of download's samples with the
    same json) is no larger than download's."""
    import io

    from PIL import Image

    from pipeline.data import neardup
    from pipeline.ledger import SIGNATURES, stage_signatures

    folder, manifest = _stage(reference_run.root, "prefilter")
    download, _ = _stage(reference_run.root, "download")
    signatures = dict(zip(*stage_signatures(folder).to_pydict().values()))
    assert len(signatures) == manifest["totals"]["samples_kept"]
    assert sorted(p.name for p in (folder / SIGNATURES).iterdir()) == [s["shard"].replace(".tar", ".parquet")
                                                                        for s in manifest["shards"]]
    for s in manifest["shards"]:
        for sample in read_shard(folder / s["shard"]):
            assert "prefilter" not in json.loads(sample["json"])
            with Image.open(io.BytesIO(sample["jpg"])) as img:
                assert signatures[sample["__key__"]] == neardup.signature(img)
        assert (folder / s["shard"]).stat().st_size <= (download / s["shard"]).stat().st_size, s["shard"]
