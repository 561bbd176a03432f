"""Near-duplicate images: a compact signature per image, candidate keys, and a pairwise verification.

Why not a 64-bit grey hash: on flat pictures (product shots on white, icons, logos) a dHash or pHash
maps most pictures with an object at the same place to nearly the same bits, whatever the object's
colour or shape, and a threshold on bits cannot tell them apart (measured in bench/dedup.py).

The signature keeps what a grey hash throws away: the low-frequency DCT coefficients of a 32x32
thumbnail in colour (Y 12x12, Cb and Cr 6x6: a band-limited image), quantised to int8, plus the
mean colour and the aspect ratio: 219 bytes. Two images are near copies when
  - both carry information (a near-uniform image is deduplicated only exactly: its signature is noise),
  - their aspect ratios and mean colours agree (a copy keeps its shape and, up to a brightness nudge,
    its colours), and
  - their band-limited thumbnails differ by at most `max_distance` of their own contrast, after the
    best of a few crops of up to 3% per side (re-published copies are often trimmed a little), and
  - the contrast of Y, Cb and Cr changed alike (a copy may be brighter or darker as a whole; the same
    scene drawn again in another shade of its colours is another picture).
Candidate keys are SimHash bands of the coarse coefficients (LSH): a pair is verified only if it shares
a band, so the work is one lookup per band, not a scan; keys and verification are pure functions of
the signatures, so the search can run as a band join over partitions, in any order.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy.fft import dctn, idctn

THUMB = 32           # thumbnail side the DCT is taken of
LUMA_K, CHROMA_K = 12, 6   # low-frequency coefficients kept per axis (chroma is subsampled by JPEG anyway)
HEADER = 7           # aspect (int8), mean Y/Cb/Cr (uint8 x3), scale (float16), reserved (uint8)
SIZE = HEADER + LUMA_K * LUMA_K - 1 + 2 * (CHROMA_K * CHROMA_K - 1)
MIN_INFORMATION = 2.0    # RMS grey levels of the band-limited thumbnail around its mean
MAX_ASPECT_CHANGE = 0.1  # |log(aspect a / aspect b)|: a crop of up to 3% per side changes it by <= 0.06
MAX_MEAN_LUMA, MAX_MEAN_CHROMA = 24, 12   # mean colour: a brightness nudge of ~8% moves Y by <= 20
CROP_STEPS = (-0.03, -0.015, 0.0, 0.015, 0.03)
UNALIGNED_SLACK = 0.3    # a crop of a few percent moves the unaligned distance by up to ~0.25
MIN_CHANNEL_CONTRAST, MAX_COLOUR_SHIFT = 3.0, 0.10   # see compare()
COARSE_K = 6         # SimHash over Y 6x6 and Cb/Cr 3x3: the part of the signature a small crop barely moves
BANDS, BAND_BITS = 8, 16


@dataclass(frozen=True)
class Signature:
    aspect: float                 # log(width / height)
    mean: np.ndarray              # Y, Cb, Cr means (0..255)
    ac: np.ndarray                # float32 coefficients: Y (LUMA_K^2 - 1), Cb, Cr (CHROMA_K^2 - 1 each)

    @property
    def information(self) -> float:
        """RMS deviation of the band-limited thumbnail from its mean colour, in grey levels."""
        return float(np.linalg.norm(self.ac)) / THUMB

    def thumbnail(self) -> np.ndarray:
        """The band-limited thumbnail around its mean (THUMB x THUMB x 3), rebuilt from the coefficients."""
        out = np.zeros((THUMB, THUMB, 3), np.float32)
        offset = 0
        for channel, k in enumerate((LUMA_K, CHROMA_K, CHROMA_K)):
            block = np.zeros(k * k, np.float32)
            block[1:] = self.ac[offset:offset + k * k - 1]
            offset += k * k - 1
            c = np.zeros((THUMB, THUMB), np.float32)
            c[:k, :k] = block.reshape(k, k)
            out[..., channel] = idctn(c, norm="ortho")
        return out


def _ycbcr_thumb(image: Image.Image) -> np.ndarray:
    rgb = image.convert("RGB")
    return np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX).convert("YCbCr"), np.float32)


def signature(image: Image.Image) -> bytes:
    """The image's signature (SIZE bytes)."""
    t = _ycbcr_thumb(image)
    coef = [dctn(t[..., c], norm="ortho") for c in range(3)]
    ac = np.concatenate([coef[0][:LUMA_K, :LUMA_K].ravel()[1:], coef[1][:CHROMA_K, :CHROMA_K].ravel()[1:],
                         coef[2][:CHROMA_K, :CHROMA_K].ravel()[1:]])
    scale = float(np.abs(ac).max()) / 127 or 1.0
    q = np.clip(np.round(ac / scale), -127, 127).astype(np.int8)
    aspect = int(np.clip(round(math.log(image.width / image.height) * 32), -127, 127))
    mean = [int(round(coef[c][0, 0] / THUMB)) for c in range(3)]  # the orthonormal DC is THUMB x the mean
    header = np.array([aspect], np.int8).tobytes() + bytes(np.clip(mean, 0, 255).tolist()) + \
        np.array([scale], np.float16).tobytes() + b"\0"
    return header + q.tobytes()


def decode(sig: bytes) -> Signature:
    if len(sig) != SIZE:
        raise ValueError(f"near-duplicate signature of {len(sig)} bytes, expected {SIZE}")
    aspect = np.frombuffer(sig[:1], np.int8)[0] / 32
    mean = np.frombuffer(sig[1:4], np.uint8).astype(np.float32)
    scale = float(np.frombuffer(sig[4:6], np.float16)[0])
    ac = np.frombuffer(sig[HEADER:], np.int8).astype(np.float32) * scale
    return Signature(float(aspect), mean, ac)


# --- candidate keys -------------------------------------------------------------------------------

def _coarse(ac: np.ndarray) -> np.ndarray:
    y = np.zeros(LUMA_K * LUMA_K, np.float32)
    y[1:] = ac[:LUMA_K * LUMA_K - 1]
    n = CHROMA_K * CHROMA_K - 1
    parts = [y.reshape(LUMA_K, LUMA_K)[:COARSE_K, :COARSE_K].ravel()[1:]]
    for start in (LUMA_K * LUMA_K - 1, LUMA_K * LUMA_K - 1 + n):
        c = np.zeros(CHROMA_K * CHROMA_K, np.float32)
        c[1:] = ac[start:start + n]
        parts.append(c.reshape(CHROMA_K, CHROMA_K)[:COARSE_K // 2, :COARSE_K // 2].ravel()[1:])
    return np.concatenate(parts)


@lru_cache(maxsize=1)
def _projections() -> np.ndarray:
    """Random +-1 hyperplanes for SimHash, from SHA-256 (the same on every machine and numpy version)."""
    dim = COARSE_K * COARSE_K - 1 + 2 * ((COARSE_K // 2) ** 2 - 1)
    need = dim * BANDS * BAND_BITS
    stream = b"".join(hashlib.sha256(f"vlp-neardup:{i}".encode()).digest() for i in range(need // 256 + 1))
    bits = np.unpackbits(np.frombuffer(stream, np.uint8))[:need]
    return (bits.astype(np.float32) * 2 - 1).reshape(dim, BANDS * BAND_BITS)


def candidate_keys(sig: bytes) -> list[int]:
    """One key per LSH band (band number in the high bits); none for a low-information image.
    Two signatures are verified only if they share a key."""
    s = decode(sig)
    if s.information < MIN_INFORMATION:
        return []
    bits = (_coarse(s.ac) @ _projections()) > 0
    weights = 1 << np.arange(BAND_BITS - 1, -1, -1, dtype=np.int64)
    return [(band << BAND_BITS) | int(bits[band * BAND_BITS:(band + 1) * BAND_BITS] @ weights)
            for band in range(BANDS)]


# --- verification ---------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _crops() -> np.ndarray:
    """Resampling matrices (n, THUMB, THUMB): output pixel i reads the input where a copy cropped by
    (left, right) of the width (negative: the copy shows more) would place it; linear, edges repeated."""
    mats = []
    for left in CROP_STEPS:
        for right in CROP_STEPS:
            m = np.zeros((THUMB, THUMB), np.float32)
            for i in range(THUMB):
                x = min(max(left * THUMB + (i + 0.5) * (1 - left - right) - 0.5, 0.0), THUMB - 1.0)
                j, f = int(x), x - int(x)
                m[i, j] += 1 - f
                if f:
                    m[i, j + 1] += f
            mats.append(m)
    return np.stack(mats)


def compare(a: Signature, b: Signature) -> tuple[float, float]:
    """(distance, colour shift) of b from a, after the crop of a (along x, then along y) that fits b best.
    distance: the residual relative to the two thumbnails' contrast (0: the same picture, ~1: unrelated).
    colour shift: how unequally the channels' contrast changed (0 when the copy is the same picture with a
    common brightness factor; a re-render in another shade of colour changes Y, Cb and Cr differently)."""
    ta, tb = a.thumbnail(), b.thumbnail()
    norm = float(np.linalg.norm(ta) + np.linalg.norm(tb)) or 1.0
    crops, n = _crops(), THUMB
    # along x: rows of the (x, y*channel) matrix; then along y on the best of those
    along_x = (crops @ ta.transpose(1, 0, 2).reshape(n, -1)).reshape(-1, n, n, 3).transpose(0, 2, 1, 3)
    ta = along_x[np.argmin(np.linalg.norm((along_x - tb).reshape(len(crops), -1), axis=1))]
    along_y = (crops @ ta.reshape(n, -1)).reshape(-1, n, n, 3)
    ta = along_y[np.argmin(np.linalg.norm((along_y - tb).reshape(len(crops), -1), axis=1))]
    gains = []  # per channel, the factor that best maps a's contrast onto b's
    for c in range(3):
        x, y = ta[..., c].ravel(), tb[..., c].ravel()
        if np.sqrt((x @ x + y @ y) / 2) / n >= MIN_CHANNEL_CONTRAST:  # a flat channel's gain is noise
            gains.append(float(x @ y) / float(x @ x) if x @ x > 0 else 0.0)
    if len(gains) < 2:
        shift = 0.0        # grey pictures: one channel, nothing to compare it with
    elif min(gains) <= 0:
        shift = math.inf   # contrast where the other has none, or inverted
    else:
        shift = max(gains) / min(gains) - 1
    return float(np.linalg.norm(ta - tb)) / norm, shift


def _unaligned_distance(a: Signature, b: Signature) -> float:
    return float(np.linalg.norm(a.ac - b.ac) / ((np.linalg.norm(a.ac) + np.linalg.norm(b.ac)) or 1.0))


def near_copy_distance(a: Signature, b: Signature, max_distance: float) -> float | None:
    """The distance between a and b if they are near copies of each other, else None (symmetric)."""
    if min(a.information, b.information) < MIN_INFORMATION:
        return None
    if abs(a.aspect - b.aspect) > MAX_ASPECT_CHANGE:
        return None
    dmean = np.abs(a.mean - b.mean)
    if dmean[0] > MAX_MEAN_LUMA or dmean[1:].max() > MAX_MEAN_CHROMA:
        return None
    if _unaligned_distance(a, b) > max_distance + UNALIGNED_SLACK:  # too far for any crop: skip the search
        return None
    d, shift = min(compare(a, b), compare(b, a))
    return d if d <= max_distance and shift <= MAX_COLOUR_SHIFT else None


class NearDuplicateIndex:
    """Signatures by candidate key: `find` returns the closest stored near copy of a query. Holds the
    signatures' bytes (SIZE each); pairs sharing a key are decoded and verified on demand."""

    def __init__(self, max_distance: float):
        self.max_distance = max_distance
        self.signatures: list[bytes] = []
        self.buckets: dict[int, list[int]] = {}

    def find(self, sig: bytes) -> int | None:
        """Index (in the order added) of the closest stored near copy of `sig`, or None."""
        candidates = {i for key in candidate_keys(sig) for i in self.buckets.get(key, ())}
        query, best = decode(sig), None
        for i in sorted(candidates):
            d = near_copy_distance(query, decode(self.signatures[i]), self.max_distance)
            if d is not None and (best is None or d < best[0]):
                best = (d, i)
        return None if best is None else best[1]

    def add(self, sig: bytes) -> int:
        self.signatures.append(sig)
        i = len(self.signatures) - 1
        for key in candidate_keys(sig):
            self.buckets.setdefault(key, []).append(i)
        return i
