"""Near-duplicate images: a compact signature per image, candidate keys, and a pairwise verification.

Why not a 64-bit grey hash: on flat pictures (product shots on white, icons, logos) a dHash or pHash
maps most pictures with an object at the same place to nearly the same bits, whatever the object's
colour or shape, and a threshold on bits cannot tell them apart (measured in bench/dedup.py).

The signature has two parts (SIZE bytes in all):
  - coarse: the low-frequency DCT coefficients of a 32x32 thumbnail in colour (Y 12x12, Cb and Cr 6x6: a
    band-limited image), quantised to int8, plus the mean colour and the aspect ratio (220 bytes);
  - detail: a luma thumbnail of about 1,500 pixels in the image's own aspect (39x39 for a square) and Cb,
    Cr at half its resolution (JPEG keeps no finer colour), 4 bits a pixel (1,160 bytes): 1,380 bytes.
Two images are near copies when
  - both carry information (an image with little is deduplicated only exactly: its coarse signature is
    noise; but two blanks, near-uniform with no detail at all, are copies if their shape and colour
    agree), and
  - their aspect ratios and mean colours agree (a copy keeps its shape and, up to a brightness nudge,
    its colours), and
  - their band-limited thumbnails differ by at most `max_distance` of their own contrast, after the
    best of a few crops of up to 3% per side (re-published copies are often trimmed a little) and the
    best common brightness factor, and
  - the contrast of Y, Cb and Cr changed alike (a copy may be brighter or darker as a whole; the same
    scene drawn again in another shade of its colours is another picture), and
  - their detail thumbnails, aligned to a fraction of a pixel, differ nowhere by more than a copy makes
    them differ (`detail_differences`): resampling, re-encoding and a brightness nudge move every pixel a
    little, most at edges and in fine texture; a small object drawn in another shape or another colour,
    or a faint pattern added or removed, moves a few pixels a lot. The band-limited thumbnail cannot see
    those (a 10 px star and a 10 px pentagon have the same low frequencies); the detail can.
Candidate keys are SimHash bands of the coarse coefficients (LSH): a pair is verified only if it shares
a band, so the work is one lookup per band, not a scan; keys and verification are pure functions of
the signatures, so the search can run as a band join over partitions, in any order.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.fft import dctn, idctn
from scipy.ndimage import binary_erosion, gaussian_filter, maximum_filter, minimum_filter

THUMB = 32           # thumbnail side the DCT is taken of
LUMA_K, CHROMA_K = 12, 6   # low-frequency coefficients kept per axis (chroma is subsampled by JPEG anyway)
HEADER = 7           # aspect (int8), mean Y/Cb/Cr (uint8 x3), scale (float16), reserved (uint8)
COARSE_SIZE = HEADER + LUMA_K * LUMA_K - 1 + 2 * (CHROMA_K * CHROMA_K - 1)
MIN_INFORMATION = 2.0    # RMS grey levels of the band-limited thumbnail around its mean
# A blank (under MIN_INFORMATION, and its detail spans at most BLANK_RANGE grey levels in Y, and in Cb and Cr:
# what re-encoding a flat colour leaves) is nothing but its colour: blanks of one shape whose mean colours
# agree within BLANK_LEVELS (rounding to whole levels and re-encoding) are copies. (A brightness nudge moves
# a light grey as far as to the next shade of grey: a blank nudged is kept.) Keys: aspect and colour in
# cells of BLANK_CELLS, at least twice the tolerances.
BLANK_RANGE = (8, 4)
BLANK_LEVELS = 2.0
BLANK_CELLS = (0.25, 8, 8, 8)   # log aspect, Y, Cb, Cr
MAX_ASPECT_CHANGE = 0.1  # |log(aspect a / aspect b)|: a crop of up to 3% per side changes it by <= 0.06
MAX_MEAN_LUMA, MAX_MEAN_CHROMA = 24, 12   # mean colour: a brightness nudge of ~8% moves Y by <= 20
CROP_STEPS = (-0.03, -0.015, 0.0, 0.015, 0.03)
UNALIGNED_SLACK = 0.3    # a crop of a few percent moves the unaligned distance by up to ~0.25
MAX_GAIN = 1.15          # the common brightness factor a copy may carry (a nudge of ~8%, with margin)
MIN_CHANNEL_CONTRAST, MAX_COLOUR_SHIFT = 3.0, 0.10   # see compare()
COARSE_K = 6         # SimHash over Y 6x6 and Cb/Cr 3x3: the part of the signature a small crop barely moves
BANDS, BAND_BITS = 8, 16
SIMHASH_BYTES = BANDS * BAND_BITS // 8

# The detail thumbnail (see detail_differences): luma at DETAIL_PIXELS in the image's aspect, chroma at half
# that resolution per axis, 4 bits a pixel over the plane's own range.
DETAIL_PIXELS = 1536
DETAIL_SIDES = (8, 192)
DETAIL_HEADER = 8        # width, height (uint8), then min and max of Y, Cb, Cr (uint8 each)
DETAIL_LUMA_BYTES = DETAIL_PIXELS // 2
DETAIL_CHROMA_BYTES = DETAIL_PIXELS // 8   # (width // 2) * (height // 2) <= DETAIL_PIXELS / 4 pixels
SIZE = COARSE_SIZE + DETAIL_HEADER + DETAIL_LUMA_BYTES + 2 * DETAIL_CHROMA_BYTES
# Alignment: the coarse crop (steps of 1.5%) refined per axis in steps of 0.25%, 0.1% and 0.05%.
REFINE_PASSES = ((0.0025, 3), (0.001, 2), (0.0005, 1))
# What a copy may do to the aligned detail thumbnails (thumbnail pixels; ~1.6 of them to a 64 px download's):
DETAIL_BLUR = 0.6        # luma compared at this scale (sigma): below it, resampling decides, not the picture
MAX_LUMA_STEP = 0.15     # no pixel off by more than this share of the luma range (at least MIN_LUMA_RANGE)...
MIN_LUMA_RANGE = 10.0
SPREAD = 6.0             # ...unless the largest difference is under SPREAD x the RMS one: spread evenly
CHROMA_BLUR = 0.85       # chroma pixels
MAX_CHROMA_STEP = 0.15   # the same for (Cb, Cr), relative to the chroma range (at least MIN_CHROMA_RANGE)
MIN_CHROMA_RANGE = 20.0
CHROMA_SPREAD = 5.0      # (a quarter of the pixels: noise peaks lower against its RMS)
SMOOTH_BLUR = 1.5        # and at a coarse scale (coarse thumbnail pixels) no region off by more than
SMOOTH_LEVELS = 8.0      # this many grey levels + SMOOTH_EDGE x the local contrast at the fine scale
SMOOTH_EDGE, SMOOTH_RADIUS = 0.1, 2


@dataclass(frozen=True)
class Signature:
    aspect: float                 # log(width / height)
    mean: np.ndarray              # Y, Cb, Cr means (0..255)
    ac: np.ndarray                # float32 coefficients: Y (LUMA_K^2 - 1), Cb, Cr (CHROMA_K^2 - 1 each)
    raw_detail: bytes = b""       # the detail part as stored; decoded on first use

    @cached_property
    def detail(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(Y, Cb, Cr) detail planes, float32 grey levels; Cb and Cr at half the luma resolution."""
        return _decode_detail(self.raw_detail)

    @property
    def blank(self) -> bool:
        """Near-uniform: nothing in the picture but its colour (see BLANK_RANGE)."""
        d = self.raw_detail
        if self.information >= MIN_INFORMATION or len(d) < DETAIL_HEADER:
            return False
        ranges = [d[3] - d[2], d[5] - d[4], d[7] - d[6]]   # max - min of Y, Cb, Cr, from the detail header
        return ranges[0] <= BLANK_RANGE[0] and max(ranges[1:]) <= BLANK_RANGE[1]

    @property
    def information(self) -> float:
        """RMS deviation of the band-limited thumbnail from its mean colour, in grey levels."""
        return float(_information(self.ac[None])[0])

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


def detail_shape(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the luma detail thumbnail: about DETAIL_PIXELS in the image's aspect."""
    lo, hi = DETAIL_SIDES
    ratio = width / height
    w = min(max(round(math.sqrt(DETAIL_PIXELS * ratio)), lo), hi)
    h = min(max(round(math.sqrt(DETAIL_PIXELS / ratio)), lo), hi)
    while w * h > DETAIL_PIXELS:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def _pack_plane(plane: np.ndarray, capacity: int) -> tuple[bytes, int, int]:
    """4-bit levels over the plane's own (integer) range, two to a byte, padded to `capacity` bytes."""
    lo, hi = int(np.floor(plane.min())), int(np.ceil(plane.max()))
    levels = np.clip(np.round((plane - lo) / max(hi - lo, 1) * 15), 0, 15).astype(np.uint8).ravel()
    if levels.size % 2:
        levels = np.append(levels, np.uint8(0))
    data = (levels[0::2] << 4 | levels[1::2]).tobytes()
    return data + bytes(capacity - len(data)), lo, hi


def _unpack_plane(data: bytes, shape: tuple[int, int], lo: int, hi: int) -> np.ndarray:
    n = shape[0] * shape[1]
    packed = np.frombuffer(data, np.uint8, count=(n + 1) // 2)
    levels = np.stack([packed >> 4, packed & 15], axis=1).ravel()[:n]
    return (levels.astype(np.float32) * (max(hi - lo, 1) / 15) + lo).reshape(shape)


def _detail(image: Image.Image) -> bytes:
    rgb = image.convert("RGB")
    w, h = detail_shape(rgb.width, rgb.height)
    ycc = rgb.resize((w, h), Image.Resampling.LANCZOS).convert("YCbCr")
    y, cb, cr = (np.asarray(c, np.float32) for c in ycc.split())
    cw, ch = max(w // 2, 1), max(h // 2, 1)
    half = [np.asarray(Image.fromarray(c).resize((cw, ch), Image.Resampling.BOX), np.float32) for c in (cb, cr)]
    parts, bounds = [], []
    for plane, capacity in ((y, DETAIL_LUMA_BYTES), (half[0], DETAIL_CHROMA_BYTES), (half[1], DETAIL_CHROMA_BYTES)):
        data, lo, hi = _pack_plane(plane, capacity)
        parts.append(data)
        bounds += [lo, hi]
    return bytes([w, h] + bounds) + b"".join(parts)


def _decode_detail(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w, h = data[0], data[1]
    bounds = data[2:DETAIL_HEADER]
    at = DETAIL_HEADER
    y = _unpack_plane(data[at:at + DETAIL_LUMA_BYTES], (h, w), bounds[0], bounds[1])
    at += DETAIL_LUMA_BYTES
    chroma = []
    for c in range(2):
        chroma.append(_unpack_plane(data[at:at + DETAIL_CHROMA_BYTES], (max(h // 2, 1), max(w // 2, 1)),
                                    bounds[2 + 2 * c], bounds[3 + 2 * c]))
        at += DETAIL_CHROMA_BYTES
    return y, chroma[0], chroma[1]


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
    return header + q.tobytes() + _detail(image)


def decode(sig: bytes) -> Signature:
    if len(sig) != SIZE:
        raise ValueError(f"near-duplicate signature of {len(sig)} bytes, expected {SIZE}")
    aspect = np.frombuffer(sig[:1], np.int8)[0] / 32
    mean = np.frombuffer(sig[1:4], np.uint8).astype(np.float32)
    scale = float(np.frombuffer(sig[4:6], np.float16)[0])
    ac = np.frombuffer(sig[HEADER:COARSE_SIZE], np.int8).astype(np.float32) * scale
    return Signature(float(aspect), mean, ac, sig[COARSE_SIZE:])


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


def _information(ac: np.ndarray) -> np.ndarray:
    """`Signature.information` of rows of coefficients. In float64 the sum of squares is exact (each
    coefficient is an int8 times a float16 scale), so one row or a batch gives the same bits."""
    return np.sqrt(np.square(ac.astype(np.float64)).sum(axis=1)) / THUMB


def _blank_keys(aspect: float, mean: list[float]) -> list[int]:
    """A blank's keys: its (aspect, Y, Cb, Cr) cell in each of 16 grids, offset by half a cell on every
    axis or not; two blanks whose values differ by at most half a cell on every axis share a key."""
    values = (aspect, *mean)
    keys = []
    for combo in range(16):
        cells = [math.floor(v / size + 0.5 * ((combo >> axis) & 1))
                 for axis, (v, size) in enumerate(zip(values, BLANK_CELLS))]
        digest = hashlib.sha256(repr(cells).encode()).digest()
        keys.append(((BANDS + combo) << BAND_BITS) | int.from_bytes(digest[:2], "big"))
    return keys


def candidate_keys(sig: bytes) -> list[int]:
    """One key per LSH band (band number in the high bits); none for a low-information image but a blank
    (which has keys by its colour). Two signatures are verified only if they share a key."""
    return lsh(sig)[0]


def lsh(sig: bytes) -> tuple[list[int], bytes]:
    """(candidate keys, the whole SimHash: BANDS * BAND_BITS bits; zero for an image of little
    information; for a blank, its aspect and colour). The SimHash's Hamming distance screens the pairs
    that share a key before they are verified (stages/prefilter/dedup/band.py); blanks are verified from theirs."""
    return lsh_many([sig])[0]


def lsh_many(sigs: list[bytes]) -> list[tuple[list[int], bytes]]:
    """`lsh` of many signatures (see `lsh_arrays`)."""
    owner, keys, simhash = lsh_arrays(signature_matrix(sigs))
    bounds = np.searchsorted(owner, np.arange(len(sigs) + 1))
    keys = keys.tolist()
    return [(keys[bounds[i]:bounds[i + 1]], simhash[i].tobytes()) for i in range(len(sigs))]


def signature_matrix(sigs: list[bytes]) -> np.ndarray:
    """Signatures as one (n, SIZE) uint8 array."""
    if any(len(s) != SIZE for s in sigs):
        bad = next(len(s) for s in sigs if len(s) != SIZE)
        raise ValueError(f"near-duplicate signature of {bad} bytes, expected {SIZE}")
    return np.frombuffer(b"".join(sigs), np.uint8).reshape(len(sigs), SIZE)


def lsh_arrays(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, keys, simhash) of the signatures in `raw` (n, SIZE): keys[k] belongs to row owner[k]
    (ascending; BANDS keys a picture, 16 a blank, none an image of little information), simhash (n,
    SIMHASH_BYTES) uint8: zero for little information, a blank's aspect and mean colour (header bytes
    0..3) for a blank. Decoded with array operations, not per signature: the scan hashes millions. The
    bits do not depend on the batch: every coefficient is an int8 times the signature's float16 scale,
    so each projection sums multiples of one scale with integer factors under 2^13, exactly in float32,
    in any order."""
    n = len(raw)
    scale = raw[:, 4:6].copy().view(np.float16).astype(np.float32)
    ac = raw[:, HEADER:COARSE_SIZE].view(np.int8).astype(np.float32) * scale
    informative = _information(ac) >= MIN_INFORMATION
    d = raw[:, COARSE_SIZE:COARSE_SIZE + DETAIL_HEADER].astype(np.int16)
    blank = ~informative & (d[:, 3] - d[:, 2] <= BLANK_RANGE[0]) & \
        (np.maximum(d[:, 5] - d[:, 4], d[:, 7] - d[:, 6]) <= BLANK_RANGE[1])
    simhash = np.zeros((n, SIMHASH_BYTES), np.uint8)
    keys = np.zeros((n, 16), np.int64)
    count = np.zeros(n, np.int64)
    rows = np.flatnonzero(informative)
    if len(rows):
        packed = np.packbits((ac[rows][:, _coarse_index()] @ _projections()) > 0, axis=1)
        simhash[rows] = packed
        keys[rows, :BANDS] = packed.view(">u2").astype(np.int64) | (np.arange(BANDS, dtype=np.int64) << BAND_BITS)
        count[rows] = BANDS
    rows = np.flatnonzero(blank)
    if len(rows):
        aspect = raw[rows, 0].view(np.int8).astype(np.float64) / 32
        mean = raw[rows, 1:4].astype(np.float32)
        keys[rows] = [_blank_keys(float(a), m) for a, m in zip(aspect.tolist(), mean.tolist())]
        simhash[rows, :4] = raw[rows, :4]
        count[rows] = 16
    owner = np.repeat(np.arange(n, dtype=np.int64), count)
    return owner, keys[np.arange(16) < count[:, None]], simhash


@lru_cache(maxsize=1)
def _coarse_index() -> np.ndarray:
    """Which of a signature's coefficients `_coarse` keeps, in its order (it only selects)."""
    return (_coarse(np.arange(1, COARSE_SIZE - HEADER + 1, dtype=np.float32)) - 1).astype(np.int64)


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


class Comparison(NamedTuple):
    distance: float               # see compare()
    shift: float
    crop_x: tuple[float, float]   # (left, right) share of a's width cropped to fit b (negative: b shows more)
    crop_y: tuple[float, float]   # (top, bottom)


def compare(a: Signature, b: Signature) -> Comparison:
    """b against a, after the crop of a (along x, then along y) that fits b best.
    distance: the residual relative to the two thumbnails' contrast after the best common brightness factor
    (up to MAX_GAIN) (0: the same picture, ~1: unrelated).
    shift: how unequally the channels' contrast changed (0 when the copy is the same picture with a
    common brightness factor; a re-render in another shade of colour changes Y, Cb and Cr differently)."""
    ta, tb = a.thumbnail(), b.thumbnail()
    norm = float(np.linalg.norm(ta) + np.linalg.norm(tb)) or 1.0
    crops, n = _crops(), THUMB
    # along x: rows of the (x, y*channel) matrix; then along y on the best of those
    along_x = (crops @ ta.transpose(1, 0, 2).reshape(n, -1)).reshape(-1, n, n, 3).transpose(0, 2, 1, 3)
    ix = int(np.argmin(np.linalg.norm((along_x - tb).reshape(len(crops), -1), axis=1)))
    along_y = (crops @ along_x[ix].reshape(n, -1)).reshape(-1, n, n, 3)
    iy = int(np.argmin(np.linalg.norm((along_y - tb).reshape(len(crops), -1), axis=1)))
    ta = along_y[iy]
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
    x, y = ta.ravel(), tb.ravel()
    gain = min(max(float(x @ y) / float(x @ x), 1 / MAX_GAIN), MAX_GAIN) if x @ x > 0 else 1.0
    k = len(CROP_STEPS)
    return Comparison(float(np.linalg.norm(gain * ta - tb)) / norm, shift,
                      (CROP_STEPS[ix // k], CROP_STEPS[ix % k]), (CROP_STEPS[iy // k], CROP_STEPS[iy % k]))


# --- the detail check -----------------------------------------------------------------------------

def _cubic_weights(f: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keys' cubic convolution (a = -0.5) weights of the inputs at -1, 0, 1, 2 around a point f in [0, 1) past
    input 0: interpolates without the blur linear interpolation adds at half-pixel offsets (which would
    differ between a copy and its original by their crop's phase)."""
    f2, f3 = f * f, f * f * f
    return -0.5 * f3 + f2 - 0.5 * f, 1.5 * f3 - 2.5 * f2 + 1, -1.5 * f3 + 2 * f2 + 0.5 * f, 0.5 * f3 - 0.5 * f2


def _source(n_out: int, n_in: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """(k, n_out): where output pixel i reads the input (pixel units) for each crop (left, right)."""
    i = np.arange(n_out, dtype=np.float64)
    return left[:, None] * n_in + (i + 0.5) * ((1 - left - right) * n_in / n_out)[:, None] - 0.5


def _resampling(n_out: int, n_in: int, left, right) -> np.ndarray:
    """(k, n_out, n_in) matrices: a copy's view of the input cropped by (left[k], right[k]) of its side,
    cubic interpolation, edges repeated."""
    left, right = np.atleast_1d(np.asarray(left, np.float64)), np.atleast_1d(np.asarray(right, np.float64))
    x = np.clip(_source(n_out, n_in, left, right), 0, n_in - 1)
    j0 = np.floor(x).astype(np.int64)
    m = np.zeros((len(left), n_out, n_in + 3), np.float32)   # columns: input -1 .. n_in + 1
    k_idx, i_idx = np.meshgrid(np.arange(len(left)), np.arange(n_out), indexing="ij")
    for tap, weight in enumerate(_cubic_weights(x - j0)):
        m[k_idx, i_idx, j0 + tap] = weight
    m[:, :, 1] += m[:, :, 0]
    m[:, :, n_in] += m[:, :, n_in + 1] + m[:, :, n_in + 2]
    return m[:, :, 1:n_in + 1]


def _inside(n_out: int, n_in: int, crop: tuple[float, float]) -> np.ndarray:
    x = _source(n_out, n_in, np.array([crop[0]]), np.array([crop[1]]))[0]
    return (x >= -0.01) & (x <= n_in - 1 + 0.01)


def _refine(ya: np.ndarray, yb: np.ndarray, crop_x, crop_y):
    """The crop of a (per axis, (left, right)) near the given one that best fits b, by REFINE_PASSES."""
    (ha, wa), (hb, wb) = ya.shape, yb.shape
    target = yb - yb.mean()

    def best(views: np.ndarray, lefts: np.ndarray, rights: np.ndarray) -> tuple[float, float]:
        views = views - views.mean(axis=(1, 2), keepdims=True)
        k = int(np.argmin(((views - target) ** 2).sum(axis=(1, 2))))
        return float(lefts[k]), float(rights[k])

    for step, n in REFINE_PASSES:
        offsets = step * np.arange(-n, n + 1)
        dl, dr = (g.ravel() for g in np.meshgrid(offsets, offsets, indexing="ij"))
        lefts, rights = crop_x[0] + dl, crop_x[1] + dr
        rows = _resampling(hb, ha, crop_y[0], crop_y[1])[0] @ ya                     # (hb, wa)
        crop_x = best(rows[None] @ _resampling(wb, wa, lefts, rights).transpose(0, 2, 1), lefts, rights)
        lefts, rights = crop_y[0] + dl, crop_y[1] + dr
        cols = ya @ _resampling(wb, wa, crop_x[0], crop_x[1])[0].T                   # (ha, wb)
        crop_y = best(_resampling(hb, ha, lefts, rights) @ cols[None], lefts, rights)
    return crop_x, crop_y


def _view(plane: np.ndarray, shape: tuple[int, int], crop_x, crop_y) -> tuple[np.ndarray, np.ndarray]:
    """plane resampled onto a grid of `shape` through the crop, and where it shows the plane itself
    (not its repeated edge)."""
    (h, w), (ho, wo) = plane.shape, shape
    view = _resampling(ho, h, crop_y[0], crop_y[1])[0] @ plane @ _resampling(wo, w, crop_x[0], crop_x[1])[0].T
    return view, _inside(ho, h, crop_y)[:, None] & _inside(wo, w, crop_x)[None, :]


def _fit(x: np.ndarray, y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """x with the gain and offset that best map it onto y where mask holds (a brightness nudge)."""
    xs, ys = x[mask], y[mask]
    xm, ym = float(xs.mean()), float(ys.mean())
    var = float(((xs - xm) ** 2).sum())
    gain = float(((xs - xm) * (ys - ym)).sum()) / var if var > 0 else 1.0
    return gain * (x - xm) + ym


def _erode(mask: np.ndarray, n: int) -> np.ndarray:
    out = binary_erosion(mask, iterations=n, border_value=1)
    return out if out.any() else mask


def _range(*planes: np.ndarray) -> float:
    return max(float(p.max() - p.min()) for p in planes)


def _excess(diff: np.ndarray, limit: float, spread: float) -> float:
    """The largest difference over what a copy may leave: `limit`, or `spread` x the RMS difference when the
    differences are spread evenly (fine texture or text re-sampled: every pixel a little different).
    Over 1: not a copy."""
    return float(diff.max()) / max(limit, spread * float(np.sqrt((diff ** 2).mean())), 1e-6)


class Detail(NamedTuple):
    """How far b's detail is from what a copy of a could show, per test (over 1: not a copy)."""
    luma: float
    smooth: float
    chroma: float

    @property
    def copy(self) -> bool:
        return max(self) <= 1


def detail_differences(a: Signature, b: Signature, crop_x: tuple[float, float],
                       crop_y: tuple[float, float]) -> Detail:
    """b's detail against a's, with a cropped near (crop_x, crop_y) (from compare()).
    After aligning a to b to a fraction of a pixel and fitting a brightness factor, what a copy changes
    (resampling, re-encoding, a brightness nudge) leaves, and what it does not:
      - luma (at DETAIL_BLUR): no pixel off by more than MAX_LUMA_STEP of the luma range, unless the
        differences are spread over the picture (SPREAD); a small object drawn in another shape moves a few
        pixels by most of its contrast;
      - smooth: at a coarse scale (SMOOTH_BLUR, from the band-limited thumbnails, whose levels are finer
        than the detail's 4 bits), no region off by more than SMOOTH_LEVELS grey levels beyond SMOOTH_EDGE
        of its local contrast; a faint pattern or shading added or removed;
      - chroma (at half resolution, CHROMA_BLUR): no pixel's (Cb, Cr) off by more than MAX_CHROMA_STEP of
        the chroma range (unless spread, CHROMA_SPREAD); a small object in another colour of about the
        same grey.
    Pixels that a's crop does not cover (b shows more) are left out."""
    ya, cba, cra = a.detail
    yb, cbb, crb = b.detail
    crop_x, crop_y = _refine(ya, yb, crop_x, crop_y)
    view, inside = _view(ya, yb.shape, crop_x, crop_y)
    fitted = _fit(view, yb, inside)
    fa, fb = gaussian_filter(fitted, DETAIL_BLUR), gaussian_filter(yb, DETAIL_BLUR)
    near = _erode(inside, 1)
    luma = _excess(np.abs(fa - fb)[near], MAX_LUMA_STEP * max(_range(fa[near], fb[near]), MIN_LUMA_RANGE), SPREAD)

    size = 2 * SMOOTH_RADIUS + 1   # local contrast at the fine scale, onto b's coarse thumbnail grid
    contrast = np.maximum(maximum_filter(fa, size) - minimum_filter(fa, size),
                          maximum_filter(fb, size) - minimum_filter(fb, size))
    contrast = np.asarray(Image.fromarray(contrast).resize((THUMB, THUMB), Image.Resampling.BILINEAR))
    ta, tb = a.thumbnail()[..., 0], b.thumbnail()[..., 0]
    view, inside = _view(ta, tb.shape, crop_x, crop_y)
    fitted = _fit(view, tb, inside)
    smooth = np.abs(gaussian_filter(fitted, SMOOTH_BLUR) - gaussian_filter(tb, SMOOTH_BLUR))
    smooth = float((smooth / (SMOOTH_LEVELS + SMOOTH_EDGE * contrast))[_erode(inside, 2)].max())

    squared, ranges, chroma_near = 0.0, [], None
    for pa, pb in ((cba, cbb), (cra, crb)):
        view, inside = _view(pa, pb.shape, crop_x, crop_y)
        chroma_near = _erode(inside, 1)
        va = gaussian_filter(view - view[inside].mean() + pb[inside].mean(), CHROMA_BLUR)
        vb = gaussian_filter(pb, CHROMA_BLUR)
        squared = squared + (va - vb) ** 2
        ranges.append(_range(va[chroma_near], vb[chroma_near]))
    chroma = _excess(np.sqrt(squared)[chroma_near], MAX_CHROMA_STEP * max(max(ranges), MIN_CHROMA_RANGE),
                     CHROMA_SPREAD)
    return Detail(luma, smooth, chroma)


def _unaligned_distance(a: Signature, b: Signature) -> float:
    return float(np.linalg.norm(a.ac - b.ac) / ((np.linalg.norm(a.ac) + np.linalg.norm(b.ac)) or 1.0))


def blank_copies(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which pairs of blanks are copies, from their `lsh` hashes (rows of bytes: aspect int8, mean Y, Cb,
    Cr uint8): near_copy_distance's rule for two blanks, for many pairs at once."""
    aspect = lambda h: h[:, :1].view(np.int8)[:, 0].astype(np.float64) / 32  # noqa: E731
    means = lambda h: h[:, 1:4].astype(np.float32)  # noqa: E731
    return (np.abs(aspect(a) - aspect(b)) <= MAX_ASPECT_CHANGE) & \
        (np.abs(means(a) - means(b)).max(axis=1) / BLANK_LEVELS <= 1)


def blank_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`_blank_distance` of pairs from their first four bytes (rows of a (n, 4) uint8: aspect, mean Y, Cb,
    Cr), for many pairs at once: 0 for the same colour (the same pixels: equal signatures)."""
    return np.abs(a[:, 1:4].astype(np.float32) - b[:, 1:4].astype(np.float32)).max(axis=1, initial=0) / BLANK_LEVELS


def _blank_distance(a: Signature, b: Signature) -> float:
    """How far two blanks' colours are apart, relative to what a copy may move them (over 1: not copies)."""
    return float(np.abs(a.mean - b.mean).max()) / BLANK_LEVELS


def headers_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For pictures (not blanks), whether `near_copy_distance` can accept a pair from the signatures'
    first four bytes alone (aspect and mean colour, rows of a (n, 4) uint8): its first two tests, on
    arrays, with the same arithmetic. The band join screens millions of candidates with it."""
    aspect = np.abs(a[:, 0].view(np.int8).astype(np.float64) / 32 - b[:, 0].view(np.int8).astype(np.float64) / 32)
    dmean = np.abs(a[:, 1:4].astype(np.int16) - b[:, 1:4].astype(np.int16))
    return (aspect <= MAX_ASPECT_CHANGE) & (dmean[:, 0] <= MAX_MEAN_LUMA) & (dmean[:, 1:].max(axis=1) <= MAX_MEAN_CHROMA)


def near_copy_distance(a: Signature, b: Signature, max_distance: float) -> float | None:
    """The distance between a and b if they are near copies of each other, else None (symmetric)."""
    if abs(a.aspect - b.aspect) > MAX_ASPECT_CHANGE:
        return None
    if a.blank and b.blank:
        d = _blank_distance(a, b)
        return d * max_distance if d <= 1 else None
    if min(a.information, b.information) < MIN_INFORMATION:
        return None
    dmean = np.abs(a.mean - b.mean)
    if dmean[0] > MAX_MEAN_LUMA or dmean[1:].max() > MAX_MEAN_CHROMA:
        return None
    if _unaligned_distance(a, b) > max_distance + UNALIGNED_SLACK:  # too far for any crop: skip the search
        return None
    ab, ba = compare(a, b), compare(b, a)
    best = min(ab, ba)
    if best.distance > max_distance or best.shift > MAX_COLOUR_SHIFT:
        return None
    # either way round: cropping the one that shows more leaves nothing out
    first, second = ((a, b, ab), (b, a, ba)) if ab <= ba else ((b, a, ba), (a, b, ab))
    if not any(detail_differences(x, y, c.crop_x, c.crop_y).copy for x, y, c in (first, second)):
        return None
    return best.distance


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
