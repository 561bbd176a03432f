"""Near dedup on labelled pictures: the old rule (64-bit grey dHash within 4 bits) against the new one
(colour signature, LSH candidates, aligned verification: pipeline/data/neardup.py), in one run.

Two labelled sets, each put through the download's resize (img2dataset keep_ratio to a 64 px short side,
JPEG 95) and deduplicated as prefilter does (in order; exact copies by the original bytes' sha256 first,
then near copies of a kept image):
  - the toy web's pictures with its injected exact and near duplicates (the truth says which);
  - lookalikes (pipeline/toyweb/lookalikes.py): distinct but similar pictures of another look, each with
    a near copy.
Per rule: near-dup precision (a near drop is right when its match shows the same picture), recall (copies
dropped, of those whose picture was kept earlier), false-drop rate (pictures wrongly dropped, of all
pictures), and hashing + dedup time per 1,000 images. Then decontamination: a toy web whose URLs leak
eval pictures, matched against the eval split at `decontaminate_max_distance`.

    .venv/bin/python bench/dedup.py [--toy-urls 6000] [--bases 400] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pipeline.toyweb.config import ToyWebConfig  # noqa: E402

from stages.prefilter.config import PrefilterConfig  # noqa: E402
from pipeline.data import neardup  # noqa: E402
from pipeline.toyweb import lookalikes  # noqa: E402
from pipeline.toyweb.world import ToyWorld  # noqa: E402


@dataclass(frozen=True)
class Labelled:
    picture: int     # what the image shows: copies share it
    exact: str       # sha256 of the bytes as published (what exact dedup compares)
    jpeg: bytes      # as downloaded
    kind: str        # for the breakdown


def downloader(size: int):
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=size, resize_mode="keep_ratio", resize_only_if_bigger=True,
                      upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=95,
                      encode_format="jpg")

    def download(data: bytes) -> bytes:
        img, *_, err = resizer(io.BytesIO(data))
        if err:
            raise ValueError(err)
        return img
    return download


def toy_set(urls: int, seed: int, download) -> list[Labelled]:
    world = ToyWorld(ToyWebConfig(num_urls=urls, eval_size=0, seed_size=0, world_seed=seed, eval_leaks=0))
    out = []
    for i in range(urls):
        item = world.item(i)
        if item.fault != "none":
            continue
        data = world.render(item)
        kind = "flat" if world.is_flat(item.render_index) else "textured"
        out.append(Labelled(item.render_index, hashlib.sha256(data).hexdigest(), download(data), kind))
    return out


def lookalike_set(bases: int, seed: int, download) -> list[Labelled]:
    return [Labelled(x.picture, hashlib.sha256(x.jpeg).hexdigest(), download(x.jpeg), f"{x.family}/{x.variant}")
            for x in lookalikes.generate(bases, seed)]


# --- the old rule, as prefilter had it: dHash of 9x8 grey pixels, a band index, within 4 bits ------------

def dhash(image: Image.Image) -> int:
    px = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR).tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


class OldIndex:
    def __init__(self, max_bits: int = 4):
        self.max_bits, self.hashes, self.buckets = max_bits, [], collections.defaultdict(list)
        bounds = [round(i * 64 / (max_bits + 1)) for i in range(max_bits + 2)]
        self.bands = [(bounds[i], (1 << (bounds[i + 1] - bounds[i])) - 1) for i in range(max_bits + 1)]

    def _keys(self, h: int):
        return [(band, (h >> shift) & mask) for band, (shift, mask) in enumerate(self.bands)]

    def find(self, h: int) -> int | None:
        near = [i for key in self._keys(h) for i in self.buckets[key]
                if (h ^ self.hashes[i]).bit_count() <= self.max_bits]
        return min(near, key=lambda i: (h ^ self.hashes[i]).bit_count()) if near else None

    def add(self, h: int) -> None:
        self.hashes.append(h)
        for key in self._keys(h):
            self.buckets[key].append(len(self.hashes) - 1)


RULES = {"old: dHash <= 4 bits": (dhash, OldIndex),
         "new: colour signature": (neardup.signature,
                                   lambda: neardup.NearDuplicateIndex(PrefilterConfig().near_max_distance))}


def measure(items: list[Labelled], make_hash, make_index) -> dict:
    started = time.perf_counter()
    hashes = []
    for item in items:
        with Image.open(io.BytesIO(item.jpeg)) as img:
            img.load()
            hashes.append(make_hash(img))
    hashed = time.perf_counter()
    index, kept, seen_exact, kept_pictures = make_index(), [], set(), set()
    drops = wrong = copies = found = 0
    wrong_kinds, missed_kinds = collections.Counter(), collections.Counter()
    for position, (item, h) in enumerate(zip(items, hashes)):
        if item.exact in seen_exact:
            continue  # exact dedup: the same for both rules
        copy = item.picture in kept_pictures
        copies += copy
        match = index.find(h)
        if match is None:
            missed_kinds[item.kind] += copy
            index.add(h)
            kept.append(position)
            seen_exact.add(item.exact)
            kept_pictures.add(item.picture)
        elif items[kept[match]].picture == item.picture:
            drops, found = drops + 1, found + 1
        else:
            drops, wrong = drops + 1, wrong + 1
            wrong_kinds[" ~ ".join(sorted((item.kind, items[kept[match]].kind)))] += 1
    done = time.perf_counter()
    pictures = len({item.picture for item in items})
    return {"precision": 1 - wrong / max(1, drops), "recall": found / max(1, copies), "false_drop": wrong / pictures,
            "drops": drops, "wrong": wrong, "copies": copies, "pictures": pictures,
            "hash_ms": (hashed - started) / len(items) * 1e6, "dedup_ms": (done - hashed) / len(items) * 1e6,
            "wrong_kinds": wrong_kinds, "missed_kinds": missed_kinds}


def report(name: str, items: list[Labelled]) -> None:
    print(f"\n{name}: {len(items)} images, {len({i.picture for i in items})} pictures")
    print(f"  {'rule':<24}{'precision':>10}{'recall':>8}{'false-drop':>11}{'wrong/drops':>13}"
          f"{'hash ms/1k':>12}{'dedup ms/1k':>13}")
    results = {}
    for rule, (make_hash, make_index) in RULES.items():
        r = results[rule] = measure(items, make_hash, make_index)
        print(f"  {rule:<24}{r['precision']:>10.3f}{r['recall']:>8.3f}{r['false_drop']:>11.4f}"
              f"{r['wrong']:>6}/{r['drops']:<6}{r['hash_ms']:>12.0f}{r['dedup_ms']:>13.0f}")
    old, new = results.values()
    print(f"  ratio new/old: false drops x{new['false_drop'] / max(old['false_drop'], 1e-9):.3f}, "
          f"recall x{new['recall'] / max(old['recall'], 1e-9):.2f}, "
          f"time x{(new['hash_ms'] + new['dedup_ms']) / (old['hash_ms'] + old['dedup_ms']):.1f}")
    for rule, r in results.items():
        print(f"  {rule}: wrong drops by pair (dropped ~ kept): "
              + (", ".join(f"{k} {n}" for k, n in r["wrong_kinds"].most_common(8)) or "none")
              + (" ..." if len(r["wrong_kinds"]) > 8 else ""))
    print("  new rule: copies missed by kind: "
          + (", ".join(f"{k} {n}" for k, n in new["missed_kinds"].most_common() if n) or "none"))


def decontamination(urls: int, seed: int, download) -> None:
    """Web URLs leaking eval pictures (exact or near copies), matched against the eval split."""
    cfg = PrefilterConfig()
    world = ToyWorld(ToyWebConfig(num_urls=urls, eval_size=urls // 8, seed_size=0, world_seed=seed, eval_leaks=0.02))
    index, exact = neardup.NearDuplicateIndex(cfg.decontaminate_max_distance), set()
    for i in range(urls, urls + urls // 8):
        data = world.render(world.item(i))
        exact.add(hashlib.sha256(data).hexdigest())
        with Image.open(io.BytesIO(data)) as img:
            index.add(neardup.signature(img))
    found = missed = false = clean = 0
    for i in range(urls):
        item = world.item(i)
        if item.fault != "none":
            continue
        data = world.render(item)
        with Image.open(io.BytesIO(download(data))) as img:
            hit = hashlib.sha256(data).hexdigest() in exact or index.find(neardup.signature(img)) is not None
        if item.render_index >= urls:
            found, missed = found + hit, missed + (not hit)
        else:
            false, clean = false + hit, clean + 1
    print(f"\ndecontamination (toy web, {urls} URLs, eval split {urls // 8}, "
          f"distance {cfg.decontaminate_max_distance}):"
          f" {found} of {found + missed} contaminated images found; {false} of {clean} clean images dropped "
          f"({false / max(1, clean):.2%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy-urls", type=int, default=6000)
    parser.add_argument("--bases", type=int, default=400, help="lookalike base pictures (each has 1-5 variants)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="the download's short side (demo: 64, tests: 48)")
    args = parser.parse_args()
    download = downloader(args.size)
    report(f"toy web (world seed {args.seed}, {args.toy_urls} URLs)", toy_set(args.toy_urls, args.seed, download))
    report(f"lookalikes (seed {args.seed}, {args.bases} bases)", lookalike_set(args.bases, args.seed, download))
    decontamination(args.toy_urls // 2, args.seed + 1, download)


if __name__ == "__main__":
    main()
