"""The curation operators built on the shard map (pipeline/shardmap.py): score_filter with a local
Hugging Face CLIP model (a tiny random one built here: transformers' own CLIPModel, tokenizer and image
processor), and MetaCLIP's balance. Both run after the session's reference download + prefilter,
account for every sample, and are resumable and reproducible."""
from __future__ import annotations

import collections
import json
import shutil

import pyarrow.parquet as pq
import pytest

from conftest import load_config, shard_digests, write_config
from tinyclip import save_tiny_clip
from pipeline.data.shards import read_shard
from pipeline.ledger import stage_ledger
from pipeline.runs import STATS_SUFFIX


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    """A tiny random CLIPModel saved like any Hub checkpoint: config, safetensors, tokenizer, image processor."""
    words = "a an the small large red green blue yellow circle square triangle star on background of with".split()
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), words, width=32, layers=1, heads=2, intermediate=64,
                          image_size=32, projection_dim=16, max_positions=24)


def _run(tmp_path, toyweb, reference_run, clip_model, executor=None, **sections):
    from pipeline import runner
    from pipeline.executor import RAY

    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    if not run_dir.exists():
        shutil.copytree(reference_run.root, run_dir)
    sections = {"score_filter": {"clip_model": str(clip_model), "keep_top": 0.4, "batch_size": 16},
                "balance": {"t": 6}, **sections}
    cfg = load_config(write_config(tmp_path / "c.yaml", toyweb, stages=["download", "prefilter", "score_filter",
                                                                        "balance"], **sections))
    return runner.execute(cfg, run_dir, executor=executor or RAY)


def _manifest(run, stage):
    return json.loads((run.stage(stage).path / "manifest.json").read_text())


def test_score_filter_keeps_the_top_fraction_by_the_models_own_score(tmp_path, toyweb, reference_run, clip_model):
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    run = _run(tmp_path, toyweb, reference_run, clip_model)
    prefilter, scored = _manifest(run, "prefilter"), _manifest(run, "score_filter")
    totals = scored["totals"]
    assert totals["samples_in"] == prefilter["totals"]["samples_kept"]    # every sample prefilter kept came in
    assert totals["samples_in"] == totals["samples_kept"] + totals["samples_dropped"] + totals["samples_failed"]
    rule = scored["rule"]
    assert rule["keep_top"] == 0.4 and rule["kept_share"] == round(totals["samples_kept"] / rule["scored"], 6)
    ledger = stage_ledger(run.stage("score_filter").path).to_pylist()
    kept = [r["score"] for r in ledger if r["outcome"] == "kept"]
    dropped = [r["score"] for r in ledger if r["outcome"] == "dropped"]
    assert min(kept) >= rule["threshold"] > max(dropped)
    assert {r["reason"] for r in ledger if r["outcome"] == "dropped"} == {"score_below_top"}
    # the kept share is the target to within the samples of one histogram bin at the threshold
    at_edge = sum(1 for s in kept + dropped if abs(s - rule["threshold"]) < 0.001)
    assert abs(len(kept) - 0.4 * len(ledger)) <= at_edge + 1

    # The score is the model's: recomputed here with transformers alone, for the kept samples of a shard.
    model, tok = AutoModel.from_pretrained(clip_model).eval(), AutoTokenizer.from_pretrained(clip_model)
    images = AutoImageProcessor.from_pretrained(clip_model)
    shard = sorted(run.stage("score_filter").path.glob("*.tar"))[0]
    samples = list(read_shard(shard))[:5]
    import io
    pixels = images(images=[Image.open(io.BytesIO(s["jpg"])).convert("RGB") for s in samples], return_tensors="pt")
    enc = tok([s["txt"].decode() for s in samples], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(**pixels)
        txt = model.get_text_features(**enc)
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    expected = torch.nn.functional.cosine_similarity(img, txt).tolist()
    got = [json.loads(s["json"])["clip_score"] for s in samples]
    assert got == pytest.approx(expected, abs=1e-5)


def test_balance_caps_each_entry_and_keeps_the_tail(tmp_path, toyweb, reference_run, clip_model):
    run = _run(tmp_path, toyweb, reference_run, clip_model)
    folder = run.stage("balance").path
    manifest = _manifest(run, "balance")
    totals = manifest["totals"]
    assert totals["samples_in"] == _manifest(run, "score_filter")["totals"]["samples_kept"]
    assert totals["samples_in"] == totals["samples_kept"] + totals["samples_dropped"] + totals["samples_failed"]
    assert manifest["t"] == 6 and manifest["entries_over_t"] > 0
    table = pq.read_table(folder / manifest["entries_table"]).to_pylist()
    assert len(table) == manifest["entries"] and manifest["head"][0] == [table[0]["entry"], table[0]["matched"],
                                                                         table[0]["kept"]]
    for row in table:
        assert row["kept"] <= row["matched"]
        if row["matched"] <= 6:                      # under the cap: every pair kept
            assert row["kept"] == row["matched"], row
    # a head entry loses most of its pairs; its kept pairs are those another entry kept or it drew
    head = table[0]
    assert head["matched"] > 6 and head["kept"] < head["matched"]
    # the ledger lists each caption's entries; the counts per entry are the ledger's own
    ledger = stage_ledger(folder).to_pylist()
    matched = collections.Counter(e for r in ledger for e in (r["entries"] or ()))
    assert {row["entry"]: row["matched"] for row in table} == dict(matched)
    reasons = collections.Counter(r["reason"] for r in ledger if r["outcome"] == "dropped")
    assert set(reasons) <= {"balance_capped", "balance_no_entry"} and reasons["balance_capped"] > 0
    kept_json = [json.loads(s["json"]) for tar in sorted(folder.glob("*.tar")) for s in read_shard(tar)]
    assert all(isinstance(j["balance_entries"], list) and isinstance(j["clip_score"], float) for j in kept_json)


def test_the_operators_resume_to_the_same_bytes_and_rerun_the_same(tmp_path, toyweb, reference_run, clip_model):
    """A stage killed after some shards: the rest is measured and written again, the plan is the same, the
    shards are those of an uninterrupted run. Another run of the same config: the same bytes."""
    first = _run(tmp_path / "a", toyweb, reference_run, clip_model)
    expected = {s: shard_digests(first.stage(s).path) for s in ("score_filter", "balance")}
    for stage in ("score_filter", "balance"):
        folder = first.stage(stage).path
        (folder / "manifest.json").unlink()
        for stats in sorted(folder.glob(f"*{STATS_SUFFIX}"))[1:]:
            stats.unlink()
    resumed = _run(tmp_path / "a", toyweb, reference_run, clip_model)
    assert {s: shard_digests(resumed.stage(s).path) for s in expected} == expected
    again = _run(tmp_path / "b", toyweb, reference_run, clip_model)
    assert {s: shard_digests(again.stage(s).path) for s in expected} == expected
    assert not (again.stage("balance").path / "work").exists()   # the values went with the last commit


def test_a_missing_model_is_a_clear_error_before_anything_runs(tmp_path, toyweb, reference_run, clip_model):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="score_filter.clip_model"):
        _run(tmp_path, toyweb, reference_run, clip_model, score_filter={"clip_model": str(tmp_path / "nowhere")})


def test_the_report_shows_what_the_operators_did(tmp_path, toyweb, reference_run, clip_model):
    from pipeline.report import write_report

    run = _run(tmp_path, toyweb, reference_run, clip_model)
    page = write_report(run.root).read_text()
    balance = _manifest(run, "balance")
    assert "<h2>Curation operator: balance</h2>" in page and 'id="balance-entries"' in page
    assert f"<td>{balance['head'][0][0]}</td><td>{balance['head'][0][1]}</td>" in page
    assert f'id="score-threshold">{_manifest(run, "score_filter")["rule"]["threshold"]:g}<' in page
    # each URL's fate names the first stage that did not keep it, the operators included
    assert "<th>score_filter dropped</th>" in page and "<th>balance dropped</th>" in page
    assert "entries.parquet" in page and "score_below_top" in page   # the reason's examples


def test_the_same_stages_run_in_this_process_with_no_ray(tmp_path, toyweb, reference_run, clip_model):
    """The executor seam (pipeline/executor.py): the operators' tasks run in the driver's own process, one
    after another, and write the same shards as on Ray."""
    from pipeline.executor import LocalExecutor

    on_ray = _run(tmp_path / "ray", toyweb, reference_run, clip_model)
    local = _run(tmp_path / "local", toyweb, reference_run, clip_model, executor=LocalExecutor(cpus=2))
    for stage in ("score_filter", "balance"):
        assert shard_digests(local.stage(stage).path) == shard_digests(on_ray.stage(stage).path)
        assert _manifest(local, stage)["totals"] == _manifest(on_ray, stage)["totals"]
