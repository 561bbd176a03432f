"""The prefilter stage on pictures the test draws: real Ray, real tars, img2dataset's own resizer for the
download step. Distinct but similar pictures stay, their near copies go; the caption language rule."""
import hashlib
import io
import os

import pytest

from stages.prefilter.config import PrefilterConfig
from pipeline.toyweb import lookalikes
from pipeline.data.shards import encode_json, read_shard
from pipeline.errors import ConfigError
from pipeline.ledger import read_ledger
from pipeline.manifest import Accounting, Manifest, shard_summary
from pipeline.runs import RunDir
from pipeline.stage import Inputs, StageContext, Upstream
from stages.prefilter import stage as prefilter

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def _download(images: list[bytes], captions: list[str], run: RunDir, per_shard: int = 40) -> Inputs:
    """Commit the images as a download stage would: resized by img2dataset (keep_ratio, 64 px), with the
    original bytes' sha256 and size in the json. Returns what prefilter is given: that manifest, no eval set."""
    from img2dataset.resizer import Resizer

    resize = Resizer(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95)
    out, shards = run.stage("download"), []
    out.path.mkdir(parents=True)
    for start in range(0, len(images), per_shard):
        samples, acc = [], Accounting()
        for i in range(start, min(start + per_shard, len(images))):
            jpg, _, _, width, height, err = resize(io.BytesIO(images[i]))
            assert err is None, err
            meta = {"sha256": hashlib.sha256(images[i]).hexdigest(), "original_width": width, "original_height": height}
            samples.append({"__key__": f"{i:09d}", "jpg": jpg, "txt": captions[i].encode(), "json": encode_json(meta)})
            acc.samples_in += 1
            acc.samples_kept += 1
        name = f"{start // per_shard:05d}.tar"
        records = [{"key": sample["__key__"], "outcome": "kept"} for sample in samples]
        shards.append(out.commit_shard(name, samples, acc, records, 0.0))
    manifest = Manifest.build(out, "test", {}, [], [shard_summary(s) for s in shards], 0.0)  # prefilter verifies each
    return Inputs((Upstream(out, manifest),), {"eval_shards": []})


def _prefilter(cfg: PrefilterConfig, upstream: Inputs, run: RunDir) -> dict[int, str]:
    """Run the stage; {sample index: reason} ("kept" for kept samples), checked against its accounting."""
    ctx = StageContext(run=run, out=run.stage("prefilter"), fingerprint="test", input_fingerprints=(), seed=0)
    manifest = prefilter.run(cfg, upstream, ctx)
    outcome = {}
    for s in manifest.shards:
        outcome.update({int(r["key"]): r["reason"] for r in read_ledger(run.stage("prefilter").ledger_path(s["shard"]))
                        if r["outcome"] != "kept"})
        for sample in read_shard(run.stage("prefilter").shard_path(s["shard"])):
            outcome[int(sample["__key__"])] = "kept"
    totals = manifest.totals
    assert totals.samples_in == len(outcome) == totals.samples_kept + totals.samples_dropped + totals.samples_failed
    return outcome


def test_lookalikes_stay_and_their_near_copies_go(tmp_path, ray_cluster):
    # Every variant the rule is meant to tell apart; a small shape swapped for another of the same size,
    # colour and place is often below what a 64 px download resolves (BENCHMARKS.md), so it is left out.
    items = [x for x in lookalikes.generate(8, seed=1, families=("product", "icon", "gradient", "text", "photo"))
             if x.variant != "reshaped"]
    run = RunDir(tmp_path / "run")
    upstream = _download([x.jpeg for x in items], [f"a {x.family} picture" for x in items], run)
    outcome = _prefilter(PrefilterConfig(), upstream, run)
    kept = [items[i].picture for i, reason in outcome.items() if reason == "kept"]
    pictures = {x.picture for x in items}
    assert len(pictures) >= 25 and set(kept) == pictures, "every distinct picture is kept"
    assert set(outcome.values()) <= {"kept", "duplicate_near"}
    # recall 25 of 31 here; 0.87 over the 3,600 lookalikes of bench/dedup.py
    assert len(kept) - len(pictures) <= 0.25 * len(pictures), "most near copies are dropped"


def test_caption_language_rule(tmp_path, ray_cluster):
    captions = {
        "a small red circle on the left of a grey background": "kept",
        "a photo of a yellow car parked in front of an old house": "kept",
        "ein kleiner roter Kreis links auf grauem Hintergrund": "caption_language",
        "un petit cercle rouge à gauche sur un fond gris": "caption_language",
        "un pequeño círculo rojo a la izquierda sobre un fondo gris": "caption_language",
        "灰色背景左侧的一个红色小圆圈": "caption_language",
        "маленький красный круг слева на сером фоне": "caption_language",
        "灰色の背景の左側にある小さな赤い丸": "caption_language",
        "roter Kreis": "kept",      # two words: the identifier cannot tell, so the rule keeps it
        "red circle": "kept",
    }
    images = [x.jpeg for x in lookalikes.generate(6, seed=2, copies=0, families=("photo",))][:len(captions)]
    run = RunDir(tmp_path / "run")
    upstream = _download(images, list(captions), run)
    # most of this tiny input is foreign on purpose: tell the mass-drop breaker so
    outcome = _prefilter(PrefilterConfig(languages=("en",), drop_share_limits={"caption_language": 1.0}), upstream, run)
    assert [outcome[i] for i in range(len(captions))] == list(captions.values())
    with pytest.raises(ConfigError, match="prefilter.languages: xx not known"):
        ctx = StageContext(run=run, out=run.stage("prefilter2"), fingerprint="t", input_fingerprints=(), seed=0)
        prefilter.run(PrefilterConfig(languages=("xx",)), upstream, ctx)
