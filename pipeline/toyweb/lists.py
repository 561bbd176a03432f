"""Writes the toy web's URL lists (in the real LAION / CC3M / SBU formats), its truth file and the
clean eval and seed splits. Streams in batches, so a million URLs need no more than a batch in memory.

The truth file is for measuring the pipeline (filter precision/recall, retrieval); the pipeline itself
never reads it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import UrlListConfig
from pipeline.toyweb.config import ToyWebConfig
from pipeline.toyweb.server import url_for
from pipeline.toyweb.world import ATTRIBUTES, TEMPLATES, ToyWorld
from pipeline.data.shards import encode_json, write_shard
from pipeline.fsutil import atomic_path

BATCH = 50_000
FILE_NAMES = {"laion": "web.laion.parquet", "cc3m": "web.cc3m.tsv", "sbu": "web.sbu.json"}
INVALID_UTF8 = b"\xff\xfe caption \xc3\x28"  # what a broken scraper stored (CC3M tsv only)


@dataclass(frozen=True)
class ToyWebFiles:
    folder: Path
    inputs: tuple[UrlListConfig, ...]
    truth: Path
    eval: Path
    seed: Path
    eval_shards: tuple[Path, ...]
    seed_shards: tuple[Path, ...]
    benchmarks: tuple[dict, ...] = ()


def write_toyweb(cfg: ToyWebConfig, folder: Path, port: int) -> ToyWebFiles:
    folder.mkdir(parents=True, exist_ok=True)
    world = ToyWorld(cfg)
    n = cfg.num_urls
    chunks = [(fmt, i * n // len(cfg.formats), (i + 1) * n // len(cfg.formats)) for i, fmt in enumerate(cfg.formats)]
    inputs = []
    for fmt, start, stop in chunks:
        path = folder / FILE_NAMES[fmt]
        {"laion": _write_laion, "cc3m": _write_cc3m, "sbu": _write_sbu}[fmt](world, path, port, start, stop)
        inputs.append(UrlListConfig(path=str(path), format=fmt, name=f"toyweb-{fmt}"))
    truth = folder / "truth.parquet"
    _write_parquet(truth, (_truth_rows(world, port, a, b) for a, b in _batches(0, world.total)))
    split_eval, split_seed = folder / "eval.parquet", folder / "seed.parquet"
    _write_laion(world, split_eval, port, n, n + cfg.eval_size, with_attributes=True)
    _write_laion(world, split_seed, port, n + cfg.eval_size, world.total, with_attributes=True)
    eval_shard, seed_shard = folder / "eval" / "00000.tar", folder / "seed" / "00000.tar"
    write_shard(eval_shard, (_rendered(world, i, "eval") for i in range(n, n + cfg.eval_size)))
    write_shard(seed_shard, (_rendered(world, i, "seed") for i in range(n + cfg.eval_size, world.total)))
    held_out = range(n, n + cfg.eval_size)
    benchmarks = (_write_toy_coco(world, folder / "coco", held_out), _write_toy_imagenet(world, folder / "imagenet", held_out))
    return ToyWebFiles(folder, tuple(inputs), truth, split_eval, split_seed, (eval_shard,), (seed_shard,), benchmarks)


# A fifth phrasing beside the web's four templates: a "COCO" image has five captions
COCO_EXTRA = "{colour} {shape}, {size}, {position}, on a {background} background"


def _write_toy_coco(world: ToyWorld, folder: Path, indices: range) -> dict:
    """The held-out images as a Karpathy-split COCO: images/ and karpathy_test.json in Karpathy's layout
    (images[].filepath/filename/split/sentences[].raw), five caption variants per image."""
    entries = []
    for i, index in enumerate(indices):
        item = world.item(index)
        name = f"{index:09d}.jpg"
        _write_file(folder / "images" / name, world.render(item))
        attrs = item.scene.attributes()
        texts = [t.format(**attrs) for t in (*TEMPLATES, COCO_EXTRA)]
        entries.append({"filepath": "images", "filename": name, "imgid": i, "cocoid": index, "split": "test",
                        "sentences": [{"raw": t, "tokens": t.split(), "sentid": 5 * i + j} for j, t in enumerate(texts)]})
    _write_file(folder / "karpathy_test.json", json.dumps({"dataset": "toy-coco", "images": entries}).encode())
    return {"name": "toy-coco", "format": "karpathy", "path": str(folder / "karpathy_test.json")}


def _write_toy_imagenet(world: ToyWorld, folder: Path, indices: range) -> dict:
    """The held-out images as an ImageNet-style folder: one folder per colour + shape class."""
    for index in indices:
        item = world.item(index)
        _write_file(folder / f"{item.scene.colour}_{item.scene.shape}" / f"{index:09d}.jpg", world.render(item))
    return {"name": "toy-imagenet", "format": "imagefolder", "path": str(folder),
            "templates": ["a {}", "photo of a {}", "there is a {}"]}


def _write_file(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _rendered(world: ToyWorld, index: int, split: str) -> dict:
    """A clean pair as a webdataset sample, rendered directly: the held-out eval split is never
    downloaded through the pipeline, so nothing of it can leak into training; the seed split stands
    for a curated data set such as COCO, which one has on disk rather than crawls."""
    item = world.item(index)
    meta = {"index": index, "caption": item.caption, "attributes": item.scene.attributes()}
    return {"__key__": f"{split}{index:09d}", "jpg": world.render(item), "txt": item.caption.encode(),
            "json": encode_json(meta)}


def _batches(start: int, stop: int):
    for a in range(start, stop, BATCH):
        yield a, min(stop, a + BATCH)


def _write_parquet(path: Path, tables) -> None:
    with atomic_path(path) as tmp:
        writer = None
        for table in tables:
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
        if writer is None:
            raise ValueError(f"{path}: nothing to write")
        writer.close()


def _write_laion(world: ToyWorld, path: Path, port: int, start: int, stop: int, with_attributes=False) -> None:
    def tables():
        for a, b in _batches(start, stop) if stop > start else [(start, start)]:
            items = [world.item(i) for i in range(a, b)]
            cols = {"URL": [url_for(port, world, it.index) for it in items],
                    "TEXT": [it.caption for it in items],
                    "WIDTH": pa.array([it.width for it in items], pa.int32()),
                    "HEIGHT": pa.array([it.height for it in items], pa.int32())}
            scores = [world.list_scores(it) for it in items]   # what LAION's list adds: CLIP's and detectors' guesses
            cols.update({name: pa.array([s[name] for s in scores], pa.float32()) for name in LAION_SCORES})
            if with_attributes:
                cols.update({attr: [getattr(it.scene, attr) for it in items] for attr in ATTRIBUTES})
            yield pa.table(cols, schema=_laion_schema(with_attributes))
    _write_parquet(path, tables())


LAION_SCORES = ("similarity", "punsafe", "pwatermark")


def _laion_schema(with_attributes: bool) -> pa.Schema:
    fields = [("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int32()), ("HEIGHT", pa.int32())] + \
        [(name, pa.float32()) for name in LAION_SCORES]
    return pa.schema(fields + ([(a, pa.string()) for a in ATTRIBUTES] if with_attributes else []))


def _write_cc3m(world: ToyWorld, path: Path, port: int, start: int, stop: int) -> None:
    """The real CC3M file: `caption<TAB>url` per line, no header."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(start, stop):
            item = world.item(i)
            caption = INVALID_UTF8 if item.caption is None else item.caption.encode()
            f.write(caption + b"\t" + url_for(port, world, i).encode() + b"\n")


def _write_sbu(world: ToyWorld, path: Path, port: int, start: int, stop: int) -> None:
    """SBU's json: one object of parallel lists `image_urls` and `captions` (streamed)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for key, value_of in (("image_urls", lambda it: url_for(port, world, it.index)),
                              ("captions", lambda it: it.caption)):
            f.write(("{" if key == "image_urls" else ", ") + json.dumps(key) + ": [")
            f.write(", ".join(json.dumps(value_of(world.item(i))) for i in range(start, stop)))
            f.write("]")
        f.write("}\n")


def _truth_rows(world: ToyWorld, port: int, a: int, b: int) -> pa.Table:
    items = [world.item(i) for i in range(a, b)]
    cols = {
        "index": pa.array([it.index for it in items], pa.int64()),
        "split": [it.split for it in items],
        "url": [url_for(port, world, it.index) for it in items],
        "caption": [it.caption for it in items],
        "noise": [it.noise for it in items],
        "noisy": [it.noise != "none" for it in items],
        "fault": [it.fault for it in items],
        "duplicate_of": pa.array([it.duplicate_of for it in items], pa.int64()),
        "near_duplicate": [it.near_duplicate for it in items],
        "image_of": pa.array([it.render_index for it in items], pa.int64()),
        "eval_leak": [it.eval_leak for it in items],
        "width": pa.array([it.width for it in items], pa.int32()),
        "height": pa.array([it.height for it in items], pa.int32()),
    }
    cols.update({attr: [getattr(it.scene, attr) for it in items] for attr in ATTRIBUTES})
    return pa.table(cols)
