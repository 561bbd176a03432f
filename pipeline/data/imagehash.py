"""Perceptual hashing for near-duplicate images, and a band index that finds close hashes fast.

dHash: shrink to 9x8 grey pixels and record whether each pixel is brighter than its right neighbour,
64 bits. Re-encoding, resizing and nudging an image by a pixel move few bits; different images many.
"""
from __future__ import annotations

import io

from PIL import Image


def dhash(image: Image.Image) -> int:
    grey = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    px = grey.tobytes()
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | (px[row * 9 + col] > px[row * 9 + col + 1])
    return bits


def dhash_bytes(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return dhash(img)


class NearDuplicateIndex:
    """Finds a stored hash within `max_distance` bits of a query.

    Splits the 64 bits into `max_distance + 1` bands: two hashes that differ in at most `max_distance`
    bits agree exactly on at least one band (pigeonhole), so looking up each band's bucket finds every
    near duplicate without comparing against all stored hashes.
    """

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        self.bands = max_distance + 1
        bounds = [round(i * 64 / self.bands) for i in range(self.bands + 1)]
        self.masks = [(bounds[i], ((1 << (bounds[i + 1] - bounds[i])) - 1)) for i in range(self.bands)]
        self.buckets: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]

    def _keys(self, h: int):
        for band, (shift, mask) in enumerate(self.masks):
            yield band, (h >> shift) & mask

    def find(self, h: int) -> int | None:
        """A stored hash within max_distance of h, or None."""
        for band, key in self._keys(h):
            for other in self.buckets[band].get(key, ()):
                if (h ^ other).bit_count() <= self.max_distance:
                    return other
        return None

    def add(self, h: int) -> None:
        for band, key in self._keys(h):
            self.buckets[band].setdefault(key, []).append(h)
