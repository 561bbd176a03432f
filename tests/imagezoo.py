"""An image zoo written by real encoders, for the download stage's decode path (tests/test_imagezoo.py).

Every file shows one source picture: 120 x 80 pixels, four flat quadrants of strong colours that all
differ (also in grey), so each of the 8 rotations/flips of EXIF orientation and a wrong frame of an
animation show as a wrong colour in some quadrant (and a 90-degree turn also as a wrong shape). Each
file is written by a real encoder: Pillow (JPEG, MPO, PNG, GIF, WebP, BMP, TIFF, EPS, and AVIF where
Pillow has it, else libavif through OpenCV), libpng through OpenCV (16-bit RGB/RGBA PNG, which Pillow
cannot write), pypng (interlaced PNG, which neither can write) and pillow-heif (HEIC: left out where it
is not installed, having no other writer). Files with an EXIF orientation are stored turned so that
applying the orientation gives the source picture back; animations hold the source picture as their
first frame and the picture turned half round after it; files with transparency have the bottom-right
quadrant fully transparent (black underneath) and, where alpha has levels, the top-right one half
transparent.

`build_zoo(folder)` writes the files and returns the manifest {filename: {"format", "expect", ...}}:
"expect" is "kept", or the reason the download stage counts for that file (e.g. "decode_error");
"grey" says the picture is stored in grey; "alpha" is "none", "cut" (transparent bottom-right) or
"levels" (also the half-transparent top-right). `expected_quadrants(entry)` gives the colours (RGB,
top-left, top-right, bottom-left, bottom-right) that a file must show after decoding, with transparency
composited on white.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 120, 80
# top-left, top-right, bottom-left, bottom-right: red, green, blue, yellow; in grey (ITU-R 601): 90, 142, 49,
# 214. No channel at 0 or 255 alone: a decoder that saturates (16-bit taken as 8-bit) shows.
QUADRANTS = ((230, 30, 30), (60, 200, 60), (30, 30, 200), (240, 230, 60))
HALF_ALPHA = 128
ORIENTATION = 0x0112

# EXIF orientation o says how the stored pixels must be turned for display (EXIF 2.3, tag 274):
# 2 mirror left-right, 3 turn 180, 4 mirror top-bottom, 5 mirror along the main diagonal (transpose),
# 6 turn 90 clockwise, 7 mirror along the other diagonal (transverse), 8 turn 90 counter-clockwise.
# The file stores the inverse of that turn applied to the source picture.
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,     # stored turned 90 counter-clockwise; display turns it clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,    # stored turned 90 clockwise; display turns it counter-clockwise
}


def source_picture(alpha: str = "none") -> Image.Image:
    """The zoo's picture, RGB, or RGBA when `alpha` is "cut" or "levels"."""
    pixels = np.zeros((HEIGHT, WIDTH, 4), np.uint8)
    h, w = HEIGHT // 2, WIDTH // 2
    for (row, col), colour in zip(((0, 0), (0, 1), (1, 0), (1, 1)), QUADRANTS):
        pixels[row * h:(row + 1) * h, col * w:(col + 1) * w] = (*colour, 255)
    if alpha == "none":
        return Image.fromarray(pixels[..., :3], "RGB")
    pixels[h:, w:] = (0, 0, 0, 0)               # fully transparent, black underneath
    if alpha == "levels":
        pixels[:h, w:, 3] = HALF_ALPHA
    return Image.fromarray(pixels, "RGBA")


def grey_picture(alpha: str = "none") -> Image.Image:
    """The picture in grey: L, or LA with the same transparency as source_picture(alpha)."""
    grey = source_picture().convert("L")
    if alpha == "none":
        return grey
    return Image.merge("LA", (grey, source_picture(alpha).getchannel("A")))


def expected_quadrants(entry: dict) -> list[tuple[int, int, int]]:
    """The RGB colour of each quadrant (TL, TR, BL, BR) once decoded and composited on white."""
    alpha = entry.get("alpha", "none")
    colours = []
    for i, colour in enumerate(QUADRANTS):
        if entry.get("grey"):
            colour = (Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0)),) * 3   # as stored
        a = 255
        if alpha != "none" and i == 3:
            a = 0
        elif alpha == "levels" and i == 1:
            a = HALF_ALPHA
        colours.append(tuple(round(c * a / 255 + 255 - a) for c in colour))
    return colours


def _pil(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _palette(cut: bool = False) -> Image.Image:
    """The picture as a palette image: index i is quadrant i's colour, index 4 black; with `cut`, the
    bottom-right quadrant holds index 4 (to be marked transparent)."""
    indices = np.zeros((HEIGHT, WIDTH), np.uint8)
    h, w = HEIGHT // 2, WIDTH // 2
    indices[:h, w:], indices[h:, :w], indices[h:, w:] = 1, 2, 4 if cut else 3
    img = Image.fromarray(indices, "P")
    img.putpalette([c for colour in (*QUADRANTS, (0, 0, 0)) for c in colour])
    return img


def _png_16bit_cv2(img: Image.Image) -> bytes:
    """16 bits a channel (value x 257), written by libpng through OpenCV: Pillow writes no 48/64-bit PNG."""
    import cv2

    pixels = np.asarray(img).astype(np.uint16) * 257
    order = cv2.COLOR_RGBA2BGRA if img.mode == "RGBA" else cv2.COLOR_RGB2BGR
    ok, buf = cv2.imencode(".png", cv2.cvtColor(pixels, order))
    assert ok
    return buf.tobytes()


def _png_interlaced(img: Image.Image) -> bytes:
    """Adam7-interlaced 8-bit RGB, written by pypng: Pillow and OpenCV write no interlaced PNG."""
    import png   # pypng

    buf = io.BytesIO()
    png.Writer(img.width, img.height, greyscale=False, alpha=False, bitdepth=8, interlace=True).write_array(
        buf, np.asarray(img).reshape(-1).tolist())
    data = buf.getvalue()
    assert data[28] == 1, "pypng wrote no interlaced PNG"
    return data


def _animation(fmt: str, first: Image.Image, **params) -> bytes:
    second = first.transpose(Image.Transpose.ROTATE_180)
    return _pil(first, fmt, save_all=True, append_images=[second], duration=100, loop=0, **params)


def _avif(img: Image.Image) -> tuple[bytes, str]:
    """AVIF from Pillow's own encoder (Pillow >= 11.3 built with libavif) or, without it, from libavif
    through OpenCV; also which wrote it."""
    from PIL import features

    if features.check("avif"):
        return _pil(img, "AVIF", quality=90), "Pillow"
    import cv2

    ok, buf = cv2.imencode(".avif", cv2.cvtColor(np.asarray(img), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_AVIF_QUALITY, 90])
    assert ok, "neither Pillow nor OpenCV writes AVIF here"
    return buf.tobytes(), "OpenCV"


def _heic(img: Image.Image) -> bytes | None:
    """HEIC from pillow-heif (libheif + x265), or None where pillow-heif is not installed."""
    try:
        import pillow_heif
    except ImportError:
        return None
    heif = pillow_heif.from_pillow(img)
    buf = io.BytesIO()
    heif.save(buf, quality=90)
    return buf.getvalue()


def _decodable(data: bytes) -> bool:
    """Whether Pillow (with the plugins pipeline.data.images registers) decodes these bytes."""
    import pipeline.data.images  # noqa: F401 (registers the plugins that are installed)

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def zoo_files() -> dict[str, tuple[bytes, dict]]:
    """{filename: (bytes, manifest entry)} of every zoo file."""
    rgb, rgba_cut, rgba_levels = source_picture(), source_picture("cut"), source_picture("levels")
    grey = grey_picture()
    files: dict[str, tuple[bytes, dict]] = {}

    def add(name: str, data: bytes, fmt: str, expect: str = "kept", **entry) -> None:
        files[name] = (data, {"format": fmt, "expect": expect, "grey": False, "alpha": "none"} | entry)

    # JPEG
    add("jpeg_baseline.jpg", _pil(rgb, "JPEG", quality=95), "JPEG")
    add("jpeg_progressive.jpg", _pil(rgb, "JPEG", quality=95, progressive=True), "JPEG")
    add("jpeg_cmyk.jpg", _pil(rgb.convert("CMYK"), "JPEG", quality=95), "JPEG")   # Adobe APP14, inverted CMYK
    add("jpeg_grey.jpg", _pil(grey, "JPEG", quality=95), "JPEG", grey=True)
    add("jpeg_orientation_1.jpg", _pil(rgb, "JPEG", quality=95, exif=_exif(1)), "JPEG")
    for o, turn in STORE_FOR_ORIENTATION.items():
        add(f"jpeg_orientation_{o}.jpg", _pil(rgb.transpose(turn), "JPEG", quality=95, exif=_exif(o)), "JPEG")
    # MPO: a JPEG with more pictures after it (phones write them); the first is the picture
    second = rgb.transpose(Image.Transpose.ROTATE_180)
    add("mpo.jpg", _pil(rgb, "MPO", quality=95, save_all=True, append_images=[second]), "MPO")
    add("mpo_orientation_6.jpg", _pil(rgb.transpose(STORE_FOR_ORIENTATION[6]), "MPO", quality=95, exif=_exif(6),
                                      save_all=True, append_images=[second]), "MPO")
    # PNG
    add("png_rgb.png", _pil(rgb, "PNG"), "PNG")
    add("png_grey.png", _pil(grey, "PNG"), "PNG", grey=True)
    add("png_palette.png", _pil(_palette(), "PNG"), "PNG")
    add("png_palette_transparent.png", _pil(_palette(cut=True), "PNG", transparency=4), "PNG", alpha="cut")
    add("png_rgba.png", _pil(rgba_levels, "PNG"), "PNG", alpha="levels")
    # tRNS colour key: the bottom-right quadrant's black is the transparent colour
    add("png_rgb_colour_key.png", _pil(rgba_cut.convert("RGB"), "PNG", transparency=(0, 0, 0)), "PNG", alpha="cut")
    add("png_grey_colour_key.png", _pil(rgba_cut.convert("RGB").convert("L"), "PNG", transparency=0), "PNG",
        grey=True, alpha="cut")
    add("png_grey_alpha.png", _pil(grey_picture("levels"), "PNG"), "PNG", grey=True, alpha="levels")
    add("png_16bit_grey.png", _pil(Image.fromarray(np.asarray(grey).astype(np.uint16) * 257), "PNG"), "PNG",
        grey=True)
    add("png_16bit_rgb.png", _png_16bit_cv2(rgb), "PNG")
    add("png_16bit_rgba.png", _png_16bit_cv2(rgba_levels), "PNG", alpha="levels")
    add("png_interlaced.png", _png_interlaced(rgb), "PNG")
    add("png_orientation_6.png", _pil(rgb.transpose(STORE_FOR_ORIENTATION[6]), "PNG", exif=_exif(6)), "PNG")
    add("png_animated.png", _animation("PNG", rgb), "PNG")
    # GIF
    add("gif_static.gif", _pil(_palette(), "GIF"), "GIF")
    add("gif_transparent.gif", _pil(_palette(cut=True), "GIF", transparency=4), "GIF", alpha="cut")
    add("gif_animated.gif", _animation("GIF", _palette()), "GIF")
    # WebP
    add("webp_lossy.webp", _pil(rgb, "WEBP", quality=90), "WEBP")
    add("webp_lossless.webp", _pil(rgb, "WEBP", lossless=True), "WEBP")
    add("webp_lossless_alpha.webp", _pil(rgba_levels, "WEBP", lossless=True), "WEBP", alpha="levels")
    add("webp_lossy_alpha.webp", _pil(rgba_levels, "WEBP", quality=90, alpha_quality=100), "WEBP",
        alpha="levels")
    add("webp_orientation_6.webp", _pil(rgb.transpose(STORE_FOR_ORIENTATION[6]), "WEBP", quality=90,
                                        exif=_exif(6)), "WEBP")
    add("webp_animated.webp", _animation("WEBP", rgb, lossless=True), "WEBP")
    # BMP, TIFF
    add("bmp_rgb.bmp", _pil(rgb, "BMP"), "BMP")
    add("bmp_palette.bmp", _pil(_palette(), "BMP"), "BMP")
    add("tiff_rgb.tif", _pil(rgb, "TIFF", compression="tiff_lzw"), "TIFF")
    add("tiff_cmyk.tif", _pil(rgb.convert("CMYK"), "TIFF"), "TIFF")
    add("tiff_rgba.tif", _pil(rgba_levels, "TIFF", compression="tiff_deflate"), "TIFF", alpha="levels")
    # AVIF, HEIC: kept where a decoder is installed, else the named reason
    avif, writer = _avif(rgb)
    add("avif.avif", avif, "AVIF", "kept" if _decodable(avif) else "unsupported_format", writer=writer)
    if (heic := _heic(rgb)) is not None:
        add("heic.heic", heic, "HEIF", "kept" if _decodable(heic) else "unsupported_format")
    # PostScript: Pillow would run Ghostscript to draw it
    add("eps.eps", _pil(rgb, "EPS"), "EPS", "unsupported_format")
    # not an image
    add("not_an_image.html", b"<!doctype html><html><body>sign in</body></html>", "HTML", "decode_error")
    add("jpeg_truncated_header.jpg", _pil(rgb, "JPEG", quality=95)[:200], "JPEG", "decode_error")
    return files


def build_zoo(folder: Path) -> dict[str, dict]:
    """Write the zoo into `folder`; returns the manifest {filename: {"format", "expect", "grey", "alpha"}}."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (data, entry) in zoo_files().items():
        (folder / name).write_bytes(data)
        manifest[name] = entry
    return manifest
