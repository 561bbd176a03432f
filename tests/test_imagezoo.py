"""Images written by real encoders (tests/imagezoo.py) through prepare_image and img2dataset's Resizer,
configured as stages/download/stage.py's fetch_rows configures it: every format Pillow decodes is kept upright,
in its colours, transparency on white; a format with no decoder installed fails with a named reason;
nothing raises anything but FetchFailed.

`python tests/test_imagezoo.py` prints each zoo file's outcome with and without prepare_image.
"""
from __future__ import annotations

import io
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from imagezoo import HEIGHT, WIDTH, build_zoo, expected_quadrants, zoo_files
from stages.download.config import DownloadConfig
from pipeline.data.fetch import FetchFailed
from pipeline.data.images import image_size
from pipeline.data.images import PLUGINS, prepare_image
from stages.download.stage import make_resizer
from webguard import png_bomb

CFG = DownloadConfig(image_size=64)
TOLERANCE = 24   # per channel, on a quadrant's mean: JPEG (and lossy WebP/AVIF/HEIC) at quality >= 90 stays well within
FILES = zoo_files()
# what cv2 reads right as it is: prepare_image hands these bytes on untouched
FAST = {"jpeg_baseline.jpg", "jpeg_progressive.jpg", "jpeg_grey.jpg", "jpeg_orientation_1.jpg", "mpo.jpg",
        "png_rgb.png", "png_grey.png", "png_interlaced.png", "webp_lossy.webp", "webp_lossless.webp"}


RESIZE = make_resizer(CFG)   # as fetch_rows builds it
RESIZING = threading.Lock()   # the Resizer swaps the process's stdout/stderr: one at a time, as fetch_rows does


def download(data: bytes, prepare: bool = True) -> bytes:
    """The stored JPEG of `data`, as the download stage makes it (with prepare_image, or as before it:
    the header check, then the raw bytes to the Resizer); raises FetchFailed."""
    if prepare:
        data, width, height = prepare_image(data, CFG.max_image_area)
    else:
        width, height = image_size(data, CFG.max_image_area)
    with RESIZING:
        jpg, w, h, original_w, original_h, err = RESIZE(io.BytesIO(data))
    if err is not None:
        raise FetchFailed("decode_error" if "decoding" in err.lower() else "other_error", err)
    assert (original_w, original_h) == (width, height), "prepare_image's size is not what the Resizer decoded"
    return jpg


def quadrant_means(jpg: bytes) -> tuple[tuple[int, int], list[tuple[int, int, int]]]:
    """(size, mean RGB of the middle half of each quadrant: TL, TR, BL, BR) of a stored JPEG."""
    with Image.open(io.BytesIO(jpg)) as img:
        pixels = np.asarray(img.convert("RGB"), np.float64)
        size = img.size
    h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
    means = []
    for row in (0, 1):
        for col in (0, 1):
            q = pixels[row * h + h // 4: row * h + 3 * h // 4, col * w + w // 4: col * w + 3 * w // 4]
            means.append(tuple(int(round(v)) for v in q.reshape(-1, 3).mean(axis=0)))
    return size, means


def problems(name: str, prepare: bool = True) -> str | None:
    """What is wrong with zoo file `name` once downloaded (None: as expected)."""
    data, entry = FILES[name]
    try:
        jpg = download(data, prepare)
    except FetchFailed as err:
        return None if err.reason == entry["expect"] else f"failed: {err.reason}: {err}"
    if entry["expect"] != "kept":
        return f"kept, expected {entry['expect']}"
    size, means = quadrant_means(jpg)
    # keep_ratio, resize_only_if_bigger: the short side goes from 80 to 64
    want_size = (WIDTH * CFG.image_size // HEIGHT, CFG.image_size)
    if size != want_size:
        return f"stored {size[0]} x {size[1]}, expected {want_size[0]} x {want_size[1]} (turned)"
    worst = max(abs(a - b) for got, want in zip(means, expected_quadrants(entry)) for a, b in zip(got, want))
    if worst > TOLERANCE:
        return f"quadrants {means}, expected {expected_quadrants(entry)} (off by {worst})"
    return None


def test_zoo_is_written_with_its_manifest(tmp_path):
    manifest = build_zoo(tmp_path)
    assert sorted(manifest) == sorted(FILES) == sorted(p.name for p in tmp_path.iterdir())
    expected = {"kept", "decode_error", "unsupported_format"}
    assert all(entry["expect"] in expected for entry in manifest.values())
    # every format the issue names is there (HEIC where pillow-heif, its only writer, is installed)
    formats = {entry["format"] for entry in manifest.values()}
    assert {"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF"} <= formats
    assert {f"jpeg_orientation_{o}.jpg" for o in range(2, 9)} <= set(manifest)


@pytest.mark.parametrize("name", sorted(FILES))
def test_zoo_file_is_kept_upright_in_its_colours(name):
    assert problems(name) is None, problems(name)
    data, entry = FILES[name]
    if entry["expect"] == "kept":
        out, width, height = prepare_image(data, CFG.max_image_area)
        assert (width, height) == (WIDTH, HEIGHT)   # as displayed
        assert (out is data) == (name in FAST), "fast path taken for the wrong files"
        if name not in FAST:
            assert out[:2] == b"BM"


def test_every_format_pillow_decodes_is_kept():
    """AVIF: Pillow >= 11.3 decodes it itself; HEIC: kept with pillow-heif installed."""
    kept = {entry["format"] for _, entry in FILES.values() if entry["expect"] == "kept"}
    assert {"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"} <= kept
    from PIL import features

    if features.check("avif"):
        assert FILES["avif.avif"][1]["expect"] == "kept"


def test_the_checks_see_what_raw_bytes_get_wrong():
    """Without prepare_image (the header check, then the bytes straight to the Resizer, as before), cv2's
    IMREAD_UNCHANGED ignores EXIF orientation: the checks above catch every one of those."""
    turned = [f"jpeg_orientation_{o}.jpg" for o in range(2, 9)] + ["mpo_orientation_6.jpg",
                                                                   "png_orientation_6.png", "webp_orientation_6.webp"]
    assert all(problems(name, prepare=False) is not None for name in turned)
    # 16-bit PNG: the JPEG encoder takes 16-bit values as 8-bit ones, and they saturate to white
    assert all(problems(f"png_16bit_{kind}.png", prepare=False) is not None for kind in ("grey", "rgb", "rgba"))
    assert problems("jpeg_baseline.jpg", prepare=False) is None


def test_transparency_is_matted_as_img2dataset_does():
    """Every (colour, alpha) pair composites to img2dataset's round(c * a/255 + 255 - a): white under
    fully transparent pixels, and bit for bit what its matting gives an 8-bit RGBA image."""
    c, a = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([c, 255 - c, (c * 7) % 256, a], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out, _, _ = prepare_image(buf.getvalue(), CFG.max_image_area)
    with Image.open(io.BytesIO(out)) as img:
        ours = np.asarray(img.convert("RGB")).astype(int)
    pixels = rgba.astype(np.float64)
    alpha = pixels[:, :, 3, np.newaxis]
    theirs = np.rint((alpha / 255 * pixels[..., :3] + 255 - alpha).clip(0, 255)).astype(int)   # img2dataset's resizer
    assert np.array_equal(ours, theirs)
    assert (ours[a == 0] == 255).all()


def test_a_format_without_its_decoder_fails_with_a_named_reason(monkeypatch):
    """With the plugin missing (its opener taken out of Pillow's registry), HEIC/AVIF fail as
    unsupported_format, naming the plugin to install; not a decode_error, not an exception."""
    for name, fmt in (("heic.heic", "HEIF"), ("avif.avif", "AVIF")):
        if name not in FILES:
            continue
        with monkeypatch.context() as patch:
            patch.setattr(Image, "ID", [i for i in Image.ID if i != fmt])
            patch.delitem(Image.OPEN, fmt, raising=False)
            with pytest.raises(FetchFailed) as caught:
                prepare_image(FILES[name][0], CFG.max_image_area)
        assert caught.value.reason == "unsupported_format"
        assert PLUGINS[fmt].split()[0] in str(caught.value)


def test_the_area_is_checked_before_any_decode():
    started = time.monotonic()
    with pytest.raises(FetchFailed) as caught:
        prepare_image(png_bomb(), CFG.max_image_area)   # 12000 x 12000 RGBA in a few hundred KB
    assert caught.value.reason == "image_too_large"
    for name, (data, entry) in FILES.items():
        if entry["expect"] == "kept":
            with pytest.raises(FetchFailed) as caught:
                prepare_image(data, WIDTH * HEIGHT - 1)
            assert caught.value.reason == "image_too_large", name
    assert time.monotonic() - started < 5


def test_broken_bytes_fail_as_decode_errors():
    data = FILES["png_rgba.png"][0]
    for broken in (data[:len(data) // 2], data[:60], b"", b"GIF89a" + b"\0" * 20):
        with pytest.raises(FetchFailed) as caught:
            prepare_image(broken, CFG.max_image_area)
        assert caught.value.reason == "decode_error"


def test_threads_get_what_one_thread_gets():
    """The downloader calls prepare_image from its 32 threads at once."""
    names = sorted(n for n, (_, e) in FILES.items() if e["expect"] == "kept")
    alone = {n: prepare_image(FILES[n][0], CFG.max_image_area) for n in names}
    got, errors = {}, []

    def work(i: int) -> None:
        try:
            for n in names[i % len(names):] + names[:i % len(names)]:
                got[(i, n)] = prepare_image(FILES[n][0], CFG.max_image_area)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(got[(i, n)] == alone[n] for i in range(32) for n in names)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(f"{'file':28} {'expect':18} {'without prepare_image':55} with prepare_image")
    for name in FILES:
        before, after = problems(name, prepare=False), problems(name)
        print(f"{name:28} {FILES[name][1]['expect']:18} {before or 'ok':55} {after or 'ok'}")
