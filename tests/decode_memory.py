"""Peak memory of one download decode, per stored pixel: prepare_image, then img2dataset's Resizer, as
stages/download/stage.py's fetch_rows runs them (its Decoder: one at a time, on one thread), on large images of the formats
of the image zoo (tests/imagezoo.py) that cost the most.

Each measurement is two fresh processes: one writes the image file, the other imports everything,
decodes a small image of the same kind (codecs and caches loaded), reads the file, and then takes its
resident size as the baseline and its peak (`VmHWM`, the kernel's ru_maxrss, reset through
/proc/self/clear_refs where the kernel allows it) around the decode: once, or once in each of `threads`
threads, each through the one Decoder (as the fetch threads decode). Peak minus baseline, over the stored
pixels, is what stages/download/stage.py budgets as DECODE_BYTES_PER_PIXEL. With `trace`, tracemalloc's
peak too (numpy's and Python's allocations; Pillow's image memory is not traced).

`python tests/decode_memory.py [side]` prints the table for side x side images (default 4999: just under
the default max_image_area of 25 million pixels); it sets stages/download/stage.py's DECODE_BYTES_PER_PIXEL.
tests/test_decode_memory.py checks an RGBA PNG decoded for 16 threads against it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: what the file is (all written by real encoders, as in the zoo)
KINDS = {
    "png_rgba": "8-bit RGBA PNG, alpha in levels (slow path: Pillow decode, matting on white, BMP)",
    "png_rgba16": "16-bit RGBA PNG written by libpng through OpenCV (slow path)",
    "png_rgb16": "16-bit RGB PNG written by libpng through OpenCV (slow path)",
    "png_grey16": "16-bit grey PNG (slow path: numpy to 8-bit)",
    "png_palette_trns": "palette PNG with a transparent index (slow path: to RGBA, matting)",
    "jpeg_cmyk": "CMYK JPEG (Adobe, inverted; slow path: to RGB)",
    "jpeg_rotated": "RGB JPEG with EXIF orientation 6 (slow path: turned)",
    "webp_rgba": "lossy WebP with alpha (slow path)",
    "webp_animated": "animated lossy WebP with alpha, two frames (slow path: the first frame)",
    "apng": "animated PNG, RGBA, two frames (slow path: the first frame)",
    "gif": "GIF, two frames (slow path: palette to RGB)",
    "tiff_rgba": "RGBA TIFF (slow path)",
    "avif_rgba": "AVIF with alpha, 10-bit (slow path: Pillow's libavif)",
    "heic_rgba": "HEIC with alpha (slow path: pillow-heif)",
    "jpeg_rgb": "RGB JPEG (fast path: cv2 decodes the bytes as they are)",
    "png_rgb": "8-bit RGB PNG (fast path)",
}
RAW = "raw:"   # prefix: the bytes straight to the Resizer, without prepare_image (img2dataset's own path)

_WRITE = r"""
import io, sys
import numpy as np
from PIL import Image
kind, sizes = sys.argv[1], sys.argv[2:]   # then width, height, path, width, height, path ...

def channels(w, h, n):
    # smooth ramps and a coarse checker: compresses as photos do (a few MB), every pixel distinct enough
    px = np.empty((h, w, n), np.uint8)
    x, y = np.arange(w, dtype=np.int64), np.arange(h, dtype=np.int64)
    px[..., 0] = (x * 255 // max(w - 1, 1))[None, :]
    if n >= 3:
        px[..., 1] = (y * 255 // max(h - 1, 1))[:, None]
        px[..., 2] = (((x // 64)[None, :] + (y // 64)[:, None]) % 2 * 200 + 30).astype(np.uint8)
    if n in (2, 4):   # alpha in levels
        px[..., n - 1] = ((x % 256)[None, :] // 2 + (y % 256)[:, None] // 2).astype(np.uint8)
    return px

def pil(img, fmt, **kw):
    buf = io.BytesIO(); img.save(buf, fmt, **kw); return buf.getvalue()

def cv2_png16(px):
    import cv2
    order = cv2.COLOR_RGBA2BGRA if px.shape[2] == 4 else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(px.astype(np.uint16) * 257, order)); assert ok
    return buf.tobytes()

def image(w, h):
    rgb = lambda: Image.fromarray(channels(w, h, 3), "RGB")
    rgba = lambda: Image.fromarray(channels(w, h, 4), "RGBA")
    if kind == "png_rgba":
        return pil(rgba(), "PNG", compress_level=1)
    if kind == "png_rgba16":
        return cv2_png16(channels(w, h, 4))
    if kind == "png_rgb16":
        return cv2_png16(channels(w, h, 3))
    if kind == "png_grey16":
        return pil(Image.fromarray(channels(w, h, 1)[..., 0].astype(np.uint16) * 257), "PNG", compress_level=1)
    if kind == "png_palette_trns":
        img = Image.fromarray((channels(w, h, 3)[..., 2] // 100).astype(np.uint8), "P")
        img.putpalette([230, 30, 30, 60, 200, 60, 30, 30, 200, 0, 0, 0])
        return pil(img, "PNG", transparency=0, compress_level=1)
    if kind == "jpeg_cmyk":
        return pil(rgb().convert("CMYK"), "JPEG", quality=90)
    if kind == "jpeg_rotated":
        exif = Image.Exif(); exif[0x0112] = 6
        return pil(rgb(), "JPEG", quality=90, exif=exif)
    if kind == "webp_rgba":
        return pil(rgba(), "WEBP", quality=80, method=0)
    if kind in ("webp_animated", "apng"):
        first = rgba()
        kw = dict(quality=80, method=0) if kind == "webp_animated" else dict(compress_level=1)
        return pil(first, "WEBP" if kind == "webp_animated" else "PNG", save_all=True, duration=100,
                   append_images=[first.transpose(Image.Transpose.ROTATE_180)], **kw)
    if kind == "gif":
        first = rgb().quantize(64)
        return pil(first, "GIF", save_all=True, append_images=[first.transpose(Image.Transpose.ROTATE_180)])
    if kind == "tiff_rgba":
        return pil(rgba(), "TIFF", compression="tiff_deflate")
    if kind == "avif_rgba":
        return pil(rgba(), "AVIF", quality=60, speed=10, max_threads=1)
    if kind == "heic_rgba":
        import pillow_heif
        pillow_heif.register_heif_opener()
        return pil(rgba(), "HEIF", quality=60)
    if kind == "jpeg_rgb":
        return pil(rgb(), "JPEG", quality=90)
    if kind == "png_rgb":
        return pil(rgb(), "PNG", compress_level=1)
    raise SystemExit(f"unknown kind {kind}")

for i in range(0, len(sizes), 3):
    open(sizes[i + 2], "wb").write(image(int(sizes[i]), int(sizes[i + 1])))
"""

_MEASURE = r"""
import gc, io, json, resource, sys, threading, time
kind, path, small, mode, trace = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
threads = int(sys.argv[6])
raw = kind.startswith("raw:")
from stages.download.config import DownloadConfig
from stages.download.stage import Decoder, make_resizer
cfg = DownloadConfig(resize_mode=mode)
resize = make_resizer(cfg)
decoder = Decoder(cfg, resize)   # the stage's own: one image at a time, on one thread of its own

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def decode(data):
    jpg, w, h, ow, oh, err = resize(io.BytesIO(data)) if raw else decoder(data)
    assert err is None, err
    return ow * oh, len(jpg)

decode(open(small, "rb").read())   # codecs, caches and lazy imports loaded
data = open(path, "rb").read()
gc.collect()
try:
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed heap back to the system: the baseline is what is held
except OSError:
    pass
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # resets VmHWM to the current VmRSS
    reset = True
except OSError:
    reset = False
if trace:
    import tracemalloc
    tracemalloc.start()
# as fetch_rows: each of `threads` threads decodes once, through the one Decoder (raw: in turn, on its own)
lock, done = threading.Lock(), []
def work():
    if raw:
        with lock:
            done.append(decode(data))
    else:
        done.append(decode(data))
started = time.perf_counter()
workers = [threading.Thread(target=work) for _ in range(threads)]
for t in workers:
    t.start()
for t in workers:
    t.join()
assert len(done) == threads
pixels, jpg_bytes = done[0]
seconds = (time.perf_counter() - started) / threads
traced = tracemalloc.get_traced_memory()[1] if trace else None
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"pixels": pixels, "file_bytes": len(data), "baseline": baseline, "peak": peak, "reset": reset,
                  "delta": peak - baseline, "per_pixel": round((peak - baseline) / pixels, 2),
                  "traced_per_pixel": None if traced is None else round(traced / pixels, 2),
                  "seconds": round(seconds, 2), "jpg_bytes": jpg_bytes}))
"""


def _run(code: str, *args: str, timeout: float) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def write_images(kind: str, sizes: list[tuple[int, int, Path]], timeout: float = 300) -> None:
    """Write an image of `kind` at each (width, height, path), in one fresh process."""
    _run(_WRITE, kind.removeprefix(RAW), *(str(v) for size in sizes for v in size), timeout=timeout)


def measure(kind: str, width: int, height: int, resize_mode: str = "keep_ratio", trace: bool = False,
            threads: int = 1, folder: Path | None = None, timeout: float = 300) -> dict:
    """Peak bytes above the baseline of decoding a `width` x `height` image of `kind` (a KINDS name, or
    RAW + name for the Resizer alone) once in each of `threads` threads, one at a time, in a fresh
    process; see the module docstring."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        write_images(kind, [(width, height, big), (64, 48, small)], timeout)
        out = _run(_MEASURE, kind, str(big), str(small), resize_mode, "1" if trace else "0", str(threads),
                   timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    side = int(sys.argv[1]) if len(sys.argv) > 1 else 4999
    kinds = [*KINDS, RAW + "png_rgba", RAW + "png_rgb16"]
    print(f"{side} x {side} ({side * side / 1e6:.1f} Mpx), bytes a stored pixel above the baseline: one decode "
          f"(RSS), one decode for each of 16 threads (as fetch_rows), tracemalloc's peak of one decode")
    print(f"{'kind':<22} {'file MB':>8} {'RSS B/px':>9} {'16 threads':>11} {'traced B/px':>11} {'s':>6}")
    for kind in kinds:
        one = measure(kind, side, side)
        many = measure(kind, side, side, threads=16)["per_pixel"] if not kind.startswith(RAW) else float("nan")
        traced = measure(kind, side, side, trace=True)["traced_per_pixel"]
        print(f"{kind:<22} {one['file_bytes'] / 1e6:8.1f} {one['per_pixel']:9.2f} {many:11.2f} {traced:11.2f} "
              f"{one['seconds']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
