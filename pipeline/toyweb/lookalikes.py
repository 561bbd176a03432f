"""Pictures that look alike but are not the same, and near copies of each: the labelled set near dedup is
measured on (bench/dedup.py, tests/test_dedup.py).

Its look is its own, not the toy web's (the pipeline must hold on webs it was not built around): a
family's base picture, then variants a person would call other pictures — the object in another
colour, at another place, in another size or shape, on another background; an icon with one part
recoloured, reshaped or the whole turned; a gradient turned or recoloured; text rewritten, recoloured or
moved; a near-uniform image in another colour; a smooth "photo" from another seed. Every picture then
gets near copies as the web re-publishes them: cropped 1-3% per side (half of them), resized to 50-95%,
brightness nudged by up to 8% (a third), re-encoded at JPEG quality 40-90.
"""
from __future__ import annotations

import colorsys
import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

SHAPES = ("ellipse", "rect", "star", "polygon", "ring", "bar")


@dataclass(frozen=True)
class Lookalike:
    picture: int      # the picture shown: a near copy has its original's id
    family: str       # product | icon | gradient | text | uniform | photo
    variant: str      # "base", or how the picture differs from its family's base
    copy: str         # "" for the picture as published, else how the copy was made ("crop,scale0.71,q40")
    jpeg: bytes


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    return tuple(round(c * 255) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _colour(rng: random.Random):
    return _hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.35, 1.0))


def _other_colour(rng: random.Random, c):
    """Another hue (70%), or the same hue much darker or lighter. A grey has no hue to turn (turning it gave
    the same grey back: a 'recolour' identical to its base); it is always made darker or lighter (the
    random draws stay the same, so the rest of a set does not change)."""
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in c))
    if rng.random() < 0.7:
        turn = rng.uniform(0.12, 0.88)
        if s >= 0.05:
            return _hsv(h + turn, s, v)
    return _hsv(h, s, v * 0.55 if v > 0.6 else min(1.0, v * 1.8))


def _background(rng: random.Random):
    if rng.random() < 0.6:  # white-ish, as product shots
        g = rng.randint(235, 255)
        return (g, g, g)
    return _hsv(rng.random(), rng.uniform(0, 0.4), rng.uniform(0.2, 1.0))


def _canvas(rng: random.Random) -> tuple[int, int]:
    short = rng.randint(80, 400)
    ratio = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    return (round(short * ratio), short) if ratio >= 1 else (short, round(short / ratio))


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour, sides=5, angle=0.0):
    if shape == "ellipse":
        draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=colour)
    elif shape == "rect":
        draw.rectangle([cx - r, cy - r * 0.6, cx + r, cy + r * 0.6], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, round(r / 3)))
    elif shape == "bar":
        draw.rectangle([cx - r, cy - r * 0.2, cx + r, cy + r * 0.2], fill=colour)
    else:  # star or polygon
        points = sides * 2 if shape == "star" else sides
        radius = [r, r * 0.45] if shape == "star" else [r]
        draw.polygon([(cx + radius[k % len(radius)] * math.cos(angle + 2 * math.pi * k / points),
                       cy + radius[k % len(radius)] * math.sin(angle + 2 * math.pi * k / points))
                      for k in range(points)], fill=colour)


# --- families: make(rng) -> params; render(params) -> image; variants(params, rng) -> [(name, params)]

def _product(rng):
    return {"size": _canvas(rng), "bg": _background(rng), "shape": rng.choice(SHAPES), "colour": _colour(rng),
            "x": rng.uniform(0.2, 0.8), "y": rng.uniform(0.2, 0.8), "r": rng.uniform(0.08, 0.22),
            "sides": rng.randint(3, 7), "angle": rng.uniform(0, 2 * math.pi)}


def _render_product(p):
    img = Image.new("RGB", p["size"], p["bg"])
    w, h = p["size"]
    _shape(ImageDraw.Draw(img), p["shape"], p["x"] * w, p["y"] * h, p["r"] * min(w, h), p["colour"],
           p["sides"], p["angle"])
    return img


def _product_variants(p, rng):
    dx = rng.choice((-1, 1)) * rng.uniform(0.12, 0.3)
    moved = dict(p, x=p["x"] + dx) if 0.15 <= p["x"] + dx <= 0.85 else dict(p, x=p["x"] - dx)
    bg = _hsv(rng.random(), 0.3, 0.8) if p["bg"][0] >= 235 and p["bg"][0] == p["bg"][2] else (245, 245, 245)
    return [("recolour", dict(p, colour=_other_colour(rng, p["colour"]))), ("moved", moved),
            ("resized", dict(p, r=p["r"] * rng.choice((1.5, 1 / 1.5)))),
            ("reshaped", dict(p, shape=rng.choice([s for s in SHAPES if s != p["shape"]]))),
            ("background", dict(p, bg=bg))]


def _icon(rng):
    side = rng.randint(64, 256)
    slots = rng.sample(range(9), rng.randint(2, 4))  # parts on a 3x3 grid: none hides another
    return {"size": (side, side), "bg": _background(rng),
            "parts": [(rng.choice(SHAPES), _colour(rng), 0.2 + 0.3 * (s % 3), 0.2 + 0.3 * (s // 3),
                       rng.uniform(0.08, 0.14)) for s in slots]}


def _render_icon(p):
    img = Image.new("RGB", p["size"], p["bg"])
    draw, (w, h) = ImageDraw.Draw(img), p["size"]
    for shape, colour, x, y, r in p["parts"]:
        _shape(draw, shape, x * w, y * h, r * w, colour)
    return img


def _icon_variants(p, rng):
    parts = p["parts"]
    k = rng.randrange(len(parts))
    shape, colour, x, y, r = parts[k]
    recoloured = parts[:k] + [(shape, _other_colour(rng, colour), x, y, r)] + parts[k + 1:]
    reshaped = parts[:k] + [(rng.choice([s for s in SHAPES if s != shape]), colour, x, y, r)] + parts[k + 1:]
    turned = [(s, c, 1 - py, px, pr) for s, c, px, py, pr in parts]  # a quarter turn
    return [("recolour", dict(p, parts=recoloured)), ("reshaped", dict(p, parts=reshaped)),
            ("turned", dict(p, parts=turned))]


def _gradient(rng):
    return {"size": _canvas(rng), "a": _colour(rng), "b": _colour(rng), "angle": rng.uniform(0, 2 * math.pi),
            "radial": rng.random() < 0.3, "cx": rng.uniform(0.3, 0.7), "cy": rng.uniform(0.3, 0.7)}


def _render_gradient(p):
    w, h = p["size"]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if p["radial"]:
        t = np.hypot(xx / w - p["cx"], yy / h - p["cy"]) / 0.71
    else:
        t = ((xx / w - 0.5) * math.cos(p["angle"]) + (yy / h - 0.5) * math.sin(p["angle"])) / 0.71 + 0.5
    t = np.clip(t, 0, 1)[..., None]
    a, b = np.array(p["a"], np.float32), np.array(p["b"], np.float32)
    return Image.fromarray((a * (1 - t) + b * t).round().astype(np.uint8))


def _gradient_variants(p, rng):
    if p["radial"]:
        turned = dict(p, cx=1 - p["cx"] if abs(p["cx"] - 0.5) > 0.12 else p["cx"] + 0.25, cy=1 - p["cy"])
    else:
        turned = dict(p, angle=p["angle"] + rng.choice((-1, 1)) * rng.uniform(0.8, 2.4))
    return [("turned", turned), ("recolour", dict(p, b=_other_colour(rng, p["b"]))),
            ("recolour_other_end", dict(p, a=_other_colour(rng, p["a"]))), ("radial", dict(p, radial=not p["radial"]))]


def _text(rng):
    lines = [[rng.randint(2, 9) for _ in range(rng.randint(2, 6))] for _ in range(rng.randint(2, 6))]
    return {"size": _canvas(rng), "bg": _background(rng), "lines": lines, "top": rng.uniform(0.05, 0.3),
            "ink": _hsv(rng.random(), rng.uniform(0, 0.8), rng.uniform(0, 0.4))}


def _render_text(p):
    img = Image.new("RGB", p["size"], p["bg"])
    draw, (w, h) = ImageDraw.Draw(img), p["size"]
    unit, line_height = w / 60, h / 10
    for i, words in enumerate(p["lines"]):  # words of slanted strokes, like handwriting at a distance
        x, y = w * 0.05, h * p["top"] + i * line_height * 1.2
        for letters in words:
            for _ in range(letters):
                draw.line([(x, y), (x + unit * 0.6, y + line_height * 0.7)], fill=p["ink"],
                          width=max(1, round(unit / 3)))
                x += unit
            x += unit * 1.5
            if x > w * 0.95:
                break
    return img


def _text_variants(p, rng):
    return [("rewritten", dict(p, lines=_text(rng)["lines"])),
            ("recolour", dict(p, ink=_hsv(rng.random(), rng.uniform(0.7, 1), rng.uniform(0.5, 0.9)))),
            ("moved", dict(p, top=p["top"] + 0.25 if p["top"] < 0.3 else p["top"] - 0.2))]


def _uniform(rng):
    return {"size": _canvas(rng), "c": _colour(rng) if rng.random() < 0.6 else _background(rng), "seed": rng.random()}


def _render_uniform(p):
    w, h = p["size"]
    noise = np.random.default_rng(int(p["seed"] * 2**31)).normal(0, 1.5, (h, w, 1))
    return Image.fromarray(np.clip(np.array(p["c"], np.float32) + noise, 0, 255).round().astype(np.uint8))


def _uniform_variants(p, rng):
    return [("recolour", dict(p, c=_other_colour(rng, p["c"]), seed=rng.random()))]


def _photo(rng):
    return {"size": _canvas(rng), "seed": rng.random(), "tint": _colour(rng)}


def _render_photo(p):
    w, h = p["size"]
    cells = np.random.default_rng(int(p["seed"] * 2**31)).uniform(0, 255, (6, 6, 3)).astype(np.uint8)
    img = Image.fromarray(cells).resize((w, h), Image.Resampling.BICUBIC)
    return Image.blend(img, Image.new("RGB", (w, h), p["tint"]), 0.3)


def _photo_variants(p, rng):
    return [("other", dict(p, seed=rng.random()))]


FAMILIES = {"product": (_product, _render_product, _product_variants, 4.0),
            "icon": (_icon, _render_icon, _icon_variants, 2.0),
            "gradient": (_gradient, _render_gradient, _gradient_variants, 1.0),
            "text": (_text, _render_text, _text_variants, 1.0),
            "uniform": (_uniform, _render_uniform, _uniform_variants, 0.5),
            "photo": (_photo, _render_photo, _photo_variants, 1.0)}


def _jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def near_copy(img: Image.Image, rng: random.Random) -> tuple[str, bytes]:
    """(how, JPEG bytes): the picture re-published, as the web does."""
    how = []
    w, h = img.size
    if rng.random() < 0.5:
        img = img.crop((round(rng.uniform(0.01, 0.03) * w), round(rng.uniform(0.01, 0.03) * h),
                        w - round(rng.uniform(0.01, 0.03) * w), h - round(rng.uniform(0.01, 0.03) * h)))
        how.append("crop")
    scale = rng.uniform(0.5, 0.95)
    img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.Resampling.BICUBIC)
    how.append(f"scale{scale:.2f}")
    if rng.random() < 0.3:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.92, 1.08))
        how.append("brightness")
    quality = rng.choice((40, 60, 75, 90))
    how.append(f"q{quality}")
    return ",".join(how), _jpeg(img, quality)


def generate(bases: int, seed: int = 0, copies: int = 1,
             families: tuple[str, ...] = tuple(FAMILIES)) -> list[Lookalike]:
    """`bases` base pictures (family drawn by weight), their variants and `copies` near copies of every
    picture, in a seeded random order (the first of a picture's copies to come is the one kept)."""
    rng = random.Random(f"vlp-lookalikes:{seed}")
    weights = [FAMILIES[f][3] for f in families]
    out, picture = [], 0
    for _ in range(bases):
        family = rng.choices(families, weights)[0]
        make, render, variants, _ = FAMILIES[family]
        base = make(rng)
        for variant, params in [("base", base)] + variants(base, rng):
            img = render(params)
            out.append(Lookalike(picture, family, variant, "", _jpeg(img, rng.choice((85, 90, 95)))))
            for _ in range(copies):
                how, data = near_copy(img, rng)
                out.append(Lookalike(picture, family, variant, how, data))
            picture += 1
    rng.shuffle(out)
    return out
