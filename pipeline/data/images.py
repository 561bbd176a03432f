"""Downloaded bytes made fit for img2dataset's Resizer: upright, one frame, 8-bit, no alpha left.

img2dataset's Resizer decodes with cv2.imdecode(IMREAD_UNCHANGED), which takes the stored pixels as
they are: it ignores the EXIF orientation (a phone photo comes out on its side or mirrored), leaves
16-bit PNGs 16-bit (the JPEG encoder then takes the values as 8-bit ones: near white), reads a TIFF's
alpha premultiplied (img2dataset's matting then darkens what is half transparent), and knows no HEIC
(tests/test_imagezoo.py shows each). `prepare_image` reads the header with Pillow (lazily: the area
check comes before any pixel is decoded) and
  - hands the bytes on unchanged where cv2 decodes them right as they are (JPEG in RGB or grey with no
    orientation to apply; 8-bit RGB or grey PNG without transparency, orientation or animation; WebP
    without alpha, orientation or animation): the common case costs one header parse and gives the
    pixels it gave before;
  - otherwise decodes with Pillow: the first frame of an animation, EXIF orientation applied
    (ImageOps.exif_transpose), CMYK/YCbCr/palette/16-bit converted to 8-bit RGB (grey stays grey),
    transparency composited on white the way img2dataset's alpha matting does it
    (round(c * a/255 + 255 - a), bit for bit), and hands on a lossless re-encoding that cv2 decodes
    fast (`REENCODE`).
Pillow decodes AVIF itself (Pillow >= 11.3 built with libavif); HEIC/HEIF needs pillow-heif, and
pillow-avif-plugin stands in for an older Pillow. Those installed are registered once, at import (the
downloader's threads import this module before they start; the import lock makes it happen once).
Bytes of a format with no decoder here fail as `unsupported_format`, naming the plugin to install;
so do EPS files (`REFUSED`: Pillow would run Ghostscript on them).

Memory: one decode through prepare_image and the Resizer peaks at 25 bytes a stored pixel at worst
(lossy WebP with alpha; RGBA PNG 17, AVIF 21, CMYK JPEG 11; tests/decode_memory.py at 4999 x 4999,
Pillow 13, OpenCV 4.14; BENCHMARKS.md), under the 36 a pixel the download stage budgets for it
(`DECODE_BYTES_PER_PIXEL`). img2dataset's float64 matting, 76 bytes a pixel on an RGBA PNG, no longer
runs: the Resizer gets RGB or grey only. Call it where the Resizer runs, one image at a time and on one
thread: stages/download/stage.py's Decoder says why (glibc's per-thread malloc arenas).
"""
from __future__ import annotations

import io
import threading
import warnings

from PIL import Image, ImageOps

from pipeline.data.fetch import FetchFailed

ORIENTATION = 0x0112
WHITE = 255
# The lossless format the slow path hands to the Resizer: BMP is raw pixels, the cheapest to write and
# for cv2 to read. 512 x 384 RGB, Pillow write + cv2 read: BMP 0.2 ms, PPM 0.25, TIFF 0.46, PNG at
# compress_level 0 12.7 (Pillow still filters every row); 2048 x 1536: BMP 6.7, PPM 5.5, PNG-0 200.
REENCODE = "BMP"

# ISO-BMFF brands (the ftyp box) of the formats a plugin decodes, to name them when none is installed
_ISOBMFF_AVIF = {b"avif", b"avis"}
_ISOBMFF_HEIF = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1", b"mif2"}
# Formats Pillow opens but that are not decoded here, and why
REFUSED = {"EPS": "not decoded: Pillow renders PostScript by running Ghostscript on it"}
PLUGINS = {"AVIF": "pillow-avif-plugin (or Pillow >= 11.3 built with libavif)", "HEIF": "pillow-heif",
           "JPEG XL": "pillow-jxl-plugin"}

_registering = threading.Lock()
_registered: dict[str, str] = {}   # format -> what decodes it here ("Pillow", "pillow-heif", ...)


def register_plugins() -> dict[str, str]:
    """Register the decoders of the optional formats that are installed, once (thread-safe); returns
    {format: what decodes it} for AVIF and HEIF (absent: no decoder here)."""
    with _registering:
        if _registered.get("done"):
            return {k: v for k, v in _registered.items() if k != "done"}
        Image.init()   # every built-in plugin now, not lazily from many threads at once
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
            _registered["HEIF"] = f"pillow-heif {pillow_heif.__version__}"
        except ImportError:
            pass
        if "AVIF" in Image.OPEN:
            _registered["AVIF"] = f"Pillow {Image.__version__}"
        else:
            try:
                import pillow_avif  # noqa: F401 (registers itself)

                _registered["AVIF"] = f"pillow-avif-plugin {pillow_avif.__version__}"
            except ImportError:
                pass
        _registered["done"] = "yes"
        return {k: v for k, v in _registered.items() if k != "done"}


register_plugins()


def open_image(data: bytes, max_image_area: float) -> Image.Image:
    """The image of `data`, opened lazily (its header read, no pixel decoded) and checked: raises
    FetchFailed "image_too_large" over `max_image_area` pixels (a 140 KB PNG can claim 12000 x 12000),
    "unsupported_format" for a format with no decoder here, "decode_error" for what is no image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise FetchFailed("image_too_large", str(err)) from None
    except Exception as err:  # noqa: BLE001 (PIL raises many kinds for bytes that are not an image)
        if (fmt := _sniff_unsupported(data)) is not None:
            raise FetchFailed("unsupported_format", f"{fmt} image, and no decoder for it is installed: "
                                                    f"install {PLUGINS[fmt]}") from None
        raise FetchFailed("decode_error", f"Image decoding error: {type(err).__name__}: {err}") from None
    width, height = img.size
    if width * height > max_image_area:
        img.close()
        raise FetchFailed("image_too_large", f"{width} x {height} pixels > max_image_area {max_image_area:.0f}")
    return img


def check_header(prefix: bytes, max_image_area: float) -> bool:
    """Whether the first bytes of a body hold an image header within `max_image_area` pixels: True once
    they do; FetchFailed "image_too_large" once they claim more (the rest of the body is not fetched);
    False while the header is incomplete or the bytes are no image yet (the whole body decides then)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a cut TIFF/EXIF block warns "Corrupt EXIF data": expected here
            open_image(prefix, max_image_area).close()
    except FetchFailed as err:
        if err.reason != "image_too_large":
            return False   # a header cut short reads as no image (decode_error) until it is whole
        raise FetchFailed(err.reason, f"{err} (from the header, after {len(prefix):,} bytes)") from None
    return True


def image_size(data: bytes, max_image_area: float) -> tuple[int, int]:
    """(width, height) from the image's header, without decoding its pixels (see open_image)."""
    with open_image(data, max_image_area) as img:
        return img.size


def prepare_image(data: bytes, max_image_area: float) -> tuple[bytes, int, int]:
    """(bytes for img2dataset's Resizer, width, height as displayed) of a downloaded image.

    Raises FetchFailed: "image_too_large" for an image of more than `max_image_area` pixels (read from
    the header, nothing decoded), "unsupported_format" for a format with no decoder installed (HEIC
    without pillow-heif, ...), "decode_error" for what is no image or a broken one.

    Cost, one thread on this repo's 2-core dev machine (Pillow 13.0, OpenCV 4.14), medians: the fast
    path is the header parse, 0.04 ms for a 512 x 384 JPEG (open_image; the Resizer then
    takes 2.4 ms). The slow path for a 512 x 384 RGBA PNG takes 8.3 ms (Pillow's PNG decode 7.3,
    matting 1, BMP 0.2) and the Resizer 1.6 ms on its BMP: 9.9 ms in all against 15.7 ms for the
    Resizer on the PNG as it is (its float64 matting is slow); 2048 x 1536: 174 ms against 203.
    """
    with open_image(data, max_image_area) as img:
        if img.format in REFUSED:
            raise FetchFailed("unsupported_format", f"{img.format} image: {REFUSED[img.format]}")
        width, height = img.size
        if _cv2_reads_as_is(img, data):
            return data, width, height
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                rgb = _upright_8bit(img)
            buf = io.BytesIO()
            rgb.save(buf, REENCODE)
        except Exception as err:  # noqa: BLE001 (truncated data, a decoder missing, a mode with no conversion)
            text = f"{type(err).__name__}: {err}"
            if "decoder" in text and "not available" in text:
                raise FetchFailed("unsupported_format", f"{img.format} image: {text}") from None
            raise FetchFailed("decode_error", f"Image decoding error: {text}") from None
        return buf.getvalue(), rgb.width, rgb.height


def _cv2_reads_as_is(img: Image.Image, data: bytes) -> bool:
    """Whether cv2.imdecode(IMREAD_UNCHANGED) gives these bytes' displayed picture in 8-bit RGB or grey,
    judged from the header alone."""
    if img.format in ("JPEG", "MPO"):   # MPO: a phone's JPEG with more pictures after it; cv2 reads the first
        # getexif is parsed from the APP1 segment Pillow read with the header (it also reads XMP's orientation)
        return img.mode in ("RGB", "L") and img.getexif().get(ORIENTATION, 1) == 1
    if img.format == "WEBP":   # parsed whole at open (libwebp's demuxer): EXIF, XMP and frames are known
        return img.mode == "RGB" and not img.is_animated and img.getexif().get(ORIENTATION, 1) == 1
    if img.format == "PNG":
        # IHDR is the first chunk: bit depth at byte 24, colour type at 25 (0 grey, 2 RGB). Pillow's
        # getexif would decode a PNG to look for eXIf after the pixels: one before them, or XMP, or
        # animation control (acTL), all in the header, send it the slow way.
        return (data[24] == 8 and data[25] in (0, 2) and "transparency" not in img.info
                and "exif" not in img.info and "XML:com.adobe.xmp" not in img.info
                and not getattr(img, "is_animated", False))
    return False


def _upright_8bit(img: Image.Image) -> Image.Image:
    """The first frame, orientation applied, as 8-bit RGB or L with transparency composited on white."""
    img.seek(0)
    ImageOps.exif_transpose(img, in_place=True)   # decodes; reads EXIF (and XMP) orientation in any format
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit_grey(img)
    alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    grey = img.mode in ("1", "L", "LA", "La")
    if not alpha:
        return img if img.mode in ("RGB", "L") else img.convert("L" if grey else "RGB")
    over = img.convert("LA" if grey and "transparency" not in img.info else "RGBA")
    canvas = Image.new("L", over.size, WHITE) if over.mode == "LA" else Image.new("RGB", over.size, (WHITE,) * 3)
    # c * a/255 + 255 * (255 - a)/255, rounded: img2dataset's matting, in Pillow's 8-bit blend
    canvas.paste(over.convert(canvas.mode), mask=over.getchannel("A"))
    return canvas


def _to_8bit_grey(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit "I") grey to 8-bit by its high byte, as Pillow reads 16-bit RGB; PIL's own
    convert("L") clips everything over 255 to white instead."""
    import numpy as np

    pixels = np.asarray(img)
    if img.mode == "F":
        out = np.clip(pixels, 0, 255)
    elif img.mode == "I":
        out = np.clip(pixels, 0, 65535) >> 8
    else:   # I;16 (uint16 in either byte order)
        out = pixels >> 8
    return Image.fromarray(out.astype(np.uint8), "L")


def _sniff_unsupported(data: bytes) -> str | None:
    """The format named by the bytes' signature when it is one a plugin decodes, else None."""
    if data[4:8] == b"ftyp" and len(data) >= 16:
        size = int.from_bytes(data[:4], "big")
        brands = {data[8:12]} | {data[i:i + 4] for i in range(16, min(size, len(data), 256) - 3, 4)}
        if brands & _ISOBMFF_AVIF:
            return "AVIF"
        if brands & _ISOBMFF_HEIF:
            return "HEIF"
    if data[:2] == b"\xff\x0a" or data[:12] == b"\x00\x00\x00\x0cJXL \r\n\x87\n":
        return "JPEG XL"
    return None
