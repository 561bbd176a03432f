"""The near-duplicate signature, its candidate keys and the pairwise verification, on pictures drawn here;
and the caption language identifier."""
import io
import math

import pytest
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.data import language, neardup
from pipeline.toyweb import lookalikes


def picture(colour=(220, 30, 30), x=0.3, y=0.5, r=0.15, bg=(245, 245, 245), size=(200, 150), shape="ellipse"):
    """A flat background with one small object: the case a grey 64-bit hash merges."""
    img = Image.new("RGB", size, bg)
    w, h = size
    box = [x * w - r * h, y * h - r * h, x * w + r * h, y * h + r * h]
    draw = ImageDraw.Draw(img)
    draw.ellipse(box, fill=colour) if shape == "ellipse" else draw.rectangle(box, fill=colour)
    return img


def republished(img, crop=(0.02, 0.0, 0.01, 0.03), scale=0.7, quality=60, brightness=1.0):
    """The same picture as the web re-publishes it: cropped a little, smaller, brighter, re-encoded."""
    w, h = img.size
    left, top, right, bottom = crop
    img = img.crop((round(left * w), round(top * h), w - round(right * w), h - round(bottom * h)))
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    img = ImageEnhance.Brightness(img).enhance(brightness)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return Image.open(io.BytesIO(out.getvalue()))


def sig(img):
    return neardup.decode(neardup.signature(img))


def match(a, b):
    return neardup.near_copy_distance(sig(a), sig(b), 0.08)


def test_signature_is_compact_and_keeps_shape_and_mean_colour():
    data = neardup.signature(picture(size=(240, 120)))
    assert len(data) == neardup.SIZE <= 1400
    s = neardup.decode(data)
    assert s.aspect == pytest.approx(math.log(2), abs=1 / 32)
    assert abs(s.mean[0] - 230) < 15 and s.information > neardup.MIN_INFORMATION
    y, cb, cr = s.detail   # the detail thumbnail keeps the aspect; chroma at half its resolution
    assert y.shape == (28, 54) and cb.shape == cr.shape == (14, 27)
    assert abs(float(y.max()) - 245) <= 9 and float(y.min()) < 120   # the background and the red object
    with pytest.raises(ValueError):
        neardup.decode(data[:-1])


def test_detail_shape_fits_its_bytes_at_any_aspect():
    for width, height in [(1, 1), (4, 3), (3, 4), (16, 9), (4, 1), (1, 4), (40, 1), (1, 40), (1000, 999)]:
        w, h = neardup.detail_shape(width, height)
        assert neardup.DETAIL_SIDES[0] <= min(w, h) and max(w, h) <= neardup.DETAIL_SIDES[1]
        assert w * h <= neardup.DETAIL_PIXELS and (w // 2) * (h // 2) <= 2 * neardup.DETAIL_CHROMA_BYTES
        assert (w >= h) == (width >= height) or width == height


def test_a_picture_and_its_copies_match():
    base = picture()
    assert match(base, base) == 0.0
    for copy in (republished(base), republished(base, crop=(0, 0.03, 0.03, 0), scale=0.5, quality=40),
                 republished(base, crop=(0.0, 0.0, 0.0, 0.0), brightness=1.07)):
        assert match(base, copy) is not None and match(copy, base) is not None


@pytest.mark.parametrize("other", [
    dict(colour=(30, 170, 50)),                    # the same object in another colour (same grey level, nearly)
    dict(colour=(250, 140, 20)),                   # a close hue: orange for red
    dict(x=0.6),                                   # at another place
    dict(r=0.22),                                  # larger
    dict(bg=(128, 128, 128)),                      # on another background
    dict(size=(150, 200)),                         # in another frame
])
def test_distinct_but_similar_pictures_do_not_match(other):
    base = picture()
    assert match(base, picture(**other)) is None
    assert match(republished(base), picture(**other)) is None


@pytest.mark.parametrize("r", [0.08, 0.1])
def test_a_small_shape_swap_is_another_picture(r):
    """A small ellipse and a small box, same colour, same place, on a flat background: their band-limited
    thumbnails agree (within near_max_distance: the same low frequencies), their detail does not. The
    ellipse's re-published copies, cropped and re-encoded, still match it."""
    ellipse, box = picture(r=r, x=0.4), picture(r=r, x=0.4, shape="rect")
    a, b = sig(ellipse), sig(box)
    assert min(neardup.compare(a, b), neardup.compare(b, a)).distance < 0.08   # the coarse test alone merges them
    assert match(ellipse, box) is None and match(box, ellipse) is None
    assert match(republished(ellipse), box) is None and match(box, republished(ellipse)) is None
    for copy in (republished(ellipse), republished(ellipse, crop=(0.03, 0.0, 0.0, 0.02), quality=40),
                 republished(ellipse, crop=(0.0, 0.0, 0.0, 0.0), scale=0.5, brightness=0.93)):
        assert match(ellipse, copy) is not None and match(copy, ellipse) is not None


def test_detail_differences_name_what_differs():
    base = picture(r=0.1, x=0.4)
    a = sig(base)
    for other, test in [(picture(r=0.1, x=0.4, shape="rect"), "luma"), (faint_pattern(base), "smooth")]:
        b = sig(other)
        c = min(neardup.compare(a, b), neardup.compare(b, a))
        d = neardup.detail_differences(a, b, c.crop_x, c.crop_y)
        assert not d.copy and getattr(d, test) > 1, (test, d)
    b = sig(republished(base))
    c = neardup.compare(a, b)
    assert neardup.detail_differences(a, b, c.crop_x, c.crop_y).copy


def faint_pattern(img, delta=-16):
    """The picture with a faint shape drawn into its background (16 grey levels darker)."""
    img = img.copy()
    w, h = img.size
    shade = tuple(v + delta for v in img.getpixel((1, 1)))
    ImageDraw.Draw(img).ellipse([0.55 * w, 0.1 * h, 0.95 * w, 0.6 * h], fill=shade)
    return img


def test_a_faint_pattern_added_is_another_picture():
    base = picture()
    assert match(base, faint_pattern(base)) is None and match(republished(base), faint_pattern(base)) is None
    assert match(faint_pattern(base), republished(faint_pattern(base))) is not None


def test_blanks_match_their_copies_and_nothing_else():
    """A near-uniform image has no coarse signature to speak of; a blank (no detail at all) is its colour."""
    flat = Image.new("RGB", (120, 90), (200, 180, 40))
    s = sig(flat)
    assert s.information < neardup.MIN_INFORMATION and s.blank
    keys = neardup.candidate_keys(neardup.signature(flat))
    assert keys and keys == neardup.candidate_keys(neardup.signature(flat))  # a pure function
    copy = republished(flat)
    assert set(keys) & set(neardup.candidate_keys(neardup.signature(copy)))
    assert match(flat, copy) is not None and match(copy, flat) is not None
    assert match(flat, Image.new("RGB", (120, 90), (200, 170, 40))) is None   # another colour
    assert match(flat, Image.new("RGB", (90, 120), (200, 180, 40))) is None   # another shape
    tiny = picture(r=0.02)   # a dot: too little for the coarse signature, too much for a blank
    assert sig(tiny).information < neardup.MIN_INFORMATION and not sig(tiny).blank
    assert neardup.candidate_keys(neardup.signature(tiny)) == [] and match(tiny, tiny) is None
    assert match(flat, tiny) is None
    keys = neardup.candidate_keys(neardup.signature(picture()))
    assert len(keys) == neardup.BANDS == len({k >> neardup.BAND_BITS for k in keys})
    assert keys == neardup.candidate_keys(neardup.signature(picture()))  # a pure function


def test_index_finds_what_verification_accepts():
    """The LSH candidates lose few pairs that pairwise verification would accept, and never add one."""
    items = lookalikes.generate(12, seed=3)
    signatures = [neardup.signature(Image.open(io.BytesIO(x.jpeg))) for x in items]
    index, stored, brute_hits, index_hits = neardup.NearDuplicateIndex(0.08), [], 0, 0
    for s in signatures:
        brute = [i for i, t in enumerate(stored)
                 if neardup.near_copy_distance(neardup.decode(s), neardup.decode(t), 0.08) is not None]
        found = index.find(s)
        assert found is None or found in brute
        brute_hits, index_hits = brute_hits + bool(brute), index_hits + (found is not None)
        if found is None:
            index.add(s)
            stored.append(s)
    assert brute_hits >= 10 and index_hits >= 0.9 * brute_hits


@pytest.mark.parametrize("text, other", [
    ("a small red circle on the left of a grey background", False),
    ("beautiful sunset over the ocean with boats", False),
    ("ein kleiner roter Kreis links auf grauem Hintergrund", True),
    ("un petit cercle rouge à gauche sur un fond gris", True),
    ("un pequeño círculo rojo a la izquierda sobre un fondo gris", True),
    ("灰色背景左侧的一个红色小圆圈", True),
    ("маленький красный круг слева на сером фоне", True),
    ("der Hund", False),   # two words: the identifier cannot tell, the caption stays
    ("red circle", False),
])
def test_language_identifier(text, other):
    assert language.in_other_language(text, ("en",), 0.7) is other
    assert {"en", "de", "fr", "es", "zh", "ru", "ja"} <= language.known_languages()


def test_lsh_of_a_batch_is_lsh_of_each():
    """Scan tasks hash a shard's signatures at once; the keys must not depend on the batch (or on the
    number of workers that cut the data into batches)."""
    import io

    from PIL import Image

    from pipeline.data import neardup
    from pipeline.toyweb import lookalikes

    sigs = [neardup.signature(Image.open(io.BytesIO(x.jpeg))) for x in lookalikes.generate(6, seed=5)]
    sigs += [neardup.signature(Image.new("RGB", (64, 48), (250, 250, 250))),
             neardup.signature(Image.new("RGB", (64, 64), (128, 120, 128)))]
    batch = neardup.lsh_many(sigs)
    assert batch == [neardup.lsh_many([s])[0] for s in sigs]
    assert any(len(keys) == neardup.BANDS for keys, _ in batch) and any(len(keys) == 16 for keys, _ in batch)


def test_a_signature_is_a_near_copy_of_itself():
    """stages/prefilter/dedup/band.py takes equal signatures for copies without verifying them: that is the rule's answer
    for every image that has candidate keys."""
    import io

    from PIL import Image

    from pipeline.data import neardup
    from pipeline.toyweb import lookalikes

    for x in lookalikes.generate(2, seed=7)[:12]:
        sig = neardup.signature(Image.open(io.BytesIO(x.jpeg)))
        if neardup.candidate_keys(sig):
            s = neardup.decode(sig)
            assert neardup.near_copy_distance(s, s, 0.0) is not None, x.family
