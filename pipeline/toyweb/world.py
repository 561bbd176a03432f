"""The toy world: every item of the toy web is a pure function of (world seed, index).

Nothing is stored: the list generator and the HTTP server each call `ToyWorld.item(index)` and agree
on the scene, the caption, the noise and the fault, so the web scales to millions of URLs.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from pipeline.toyweb.config import ToyWebConfig

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230),
    "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (250, 140, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "grey": (128, 128, 128), "striped": None}
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
CHOICES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES,
           "position": POSITIONS, "background": tuple(BACKGROUNDS)}

TEMPLATES = (
    "a {size} {colour} {shape} on the {position} of a {background} background",
    "{size} {colour} {shape}, {position}, {background} backdrop",
    "photo of a {size} {colour} {shape} at the {position} against a {background} background",
    "there is a {colour} {shape} ({size}) in the {position} on {background}",
)
BOILERPLATE = ("IMG_2931.JPG", "click to enlarge", "image", "stock photo", "DSC_0042",
               "untitled-3.png", "photo", "thumbnail")
NOISE_KINDS = ("mismatched", "boilerplate", "wrong_attribute", "empty_or_garbage")
HOST, LIMITED_HOST = "127.0.0.1", "127.0.0.2"   # the toy web, and its rate-limited host (server.py)
FAULT_KINDS = ("not_found", "slow", "truncated", "corrupt", "html", "huge", "noai")
HUGE_SIDE = 4096


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


@dataclass(frozen=True)
class Item:
    """One URL of the toy web and everything true about it."""
    index: int
    split: str                 # web | eval | seed
    scene: Scene               # what the image shows
    width: int
    height: int
    render_index: int          # whose pixels: self, or the earlier item this one duplicates
    near_duplicate: bool       # re-rendered with a small change
    caption: str | None        # text as published (None: bytes that are not UTF-8)
    noise: str                 # "none" or one of NOISE_KINDS
    fault: str                 # "none" or one of FAULT_KINDS
    duplicate_of: int          # -1, or the earlier index whose image this one repeats
    eval_leak: bool = False    # a web URL serving a picture of the eval split (render_index is the eval item)


def _pick(rng: random.Random, rates: dict[str, float]) -> str:
    """Draw one kind by its rate; "none" with the remaining probability."""
    u = rng.random()
    for kind, rate in rates.items():
        if u < rate:
            return kind
        u -= rate
    return "none"


def describe(scene: Scene, rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(**scene.attributes())


class ToyWorld:
    def __init__(self, cfg: ToyWebConfig):
        self.cfg = cfg
        self.noise_rates = {k: getattr(cfg.noise, k) for k in NOISE_KINDS}
        self.fault_rates = {k: getattr(cfg.faults, k) for k in FAULT_KINDS}

    @property
    def total(self) -> int:
        return self.cfg.num_urls + self.cfg.eval_size + self.cfg.seed_size

    def split_of(self, index: int) -> str:
        if index < self.cfg.num_urls:
            return "web"
        return "eval" if index < self.cfg.num_urls + self.cfg.eval_size else "seed"

    def _rng(self, index: int, purpose: str) -> random.Random:
        # Seeding with a string hashes it with SHA-512: stable across processes and Python runs.
        return random.Random(f"vlp-toyweb:{self.cfg.world_seed}:{index}:{purpose}")

    def scene(self, index: int) -> Scene:
        rng = self._rng(index, "scene")
        return Scene(**{a: rng.choice(CHOICES[a]) for a in ATTRIBUTES})

    def size(self, index: int) -> tuple[int, int]:
        """(width, height): a short side in [min_side, max_side] and a common aspect ratio, in either
        orientation; a few banners are far wider (or taller) than any photo."""
        rng = self._rng(index, "size")
        short = rng.randint(self.cfg.min_side, self.cfg.max_side)
        ratio = 4.0 if rng.random() < self.cfg.banner_share else rng.choice(self.cfg.aspect_ratios)
        long = round(short * ratio)
        return (long, short) if rng.random() < 0.5 else (short, long)

    def host(self, index: int) -> str:
        """The host serving a URL: the rate-limited one for `rate_limited_share` of the web (own rng: no
        other draw changes with the share)."""
        limited = self.split_of(index) == "web" and self.cfg.rate_limited_share > 0 \
            and self._rng(index, "host").random() < self.cfg.rate_limited_share
        return LIMITED_HOST if limited else HOST

    def list_scores(self, item: Item) -> dict[str, float]:
        """The scores a LAION list gives a row: a CLIP similarity that is lower for a caption that does not
        describe the picture, but overlapping (a real CLIP score is a noisy witness), a small NSFW
        probability, and a watermark probability. Own rng: nothing else changes with them."""
        rng = self._rng(item.index, "list-scores")
        described = item.noise in ("none", "wrong_attribute")
        similarity = rng.gauss(0.33 if described else 0.25, 0.04)
        return {"similarity": round(similarity, 4), "punsafe": round(rng.random() ** 8, 4),
                "pwatermark": round(rng.random() ** 3, 4)}

    def is_flat(self, index: int) -> bool:
        """Whether the picture has a flat background with no texture (decided per picture)."""
        return self._rng(index, "style").random() < self.cfg.flat_share

    def item(self, index: int) -> Item:
        if not 0 <= index < self.total:
            raise IndexError(index)
        split = self.split_of(index)
        rng = self._rng(index, "item")
        render_index, near, dup = index, False, -1
        if split == "web" and index > 0:
            u = rng.random()
            if u < self.cfg.exact_duplicates + self.cfg.near_duplicates:
                dup = rng.randrange(index)
                # Follow a duplicate of a duplicate back to the picture it shows.
                render_index, near = self.item(dup).render_index, u >= self.cfg.exact_duplicates
        leak = split == "web" and self.cfg.eval_leaks > 0 and self._rng(index, "leak").random() < self.cfg.eval_leaks
        if leak:  # contamination: the very picture of an eval item, or a near copy of it (own rng: no other
            # item changes when the rate does)
            pick = self._rng(index, "leak-of")
            render_index, near, dup = self.cfg.num_urls + pick.randrange(self.cfg.eval_size), pick.random() < 0.5, -1
        scene = self.scene(render_index)
        width, height = self.size(render_index)
        if near:  # the same picture re-published smaller (and re-encoded, see render)
            scale = rng.uniform(0.75, 0.95)
            width, height = max(8, round(width * scale)), max(8, round(height * scale))
        noise = _pick(rng, self.noise_rates) if split == "web" else "none"
        fault = _pick(rng, self.fault_rates) if split == "web" else "none"
        if fault == "huge":
            width = height = HUGE_SIDE
        return Item(index=index, split=split, scene=scene, width=width, height=height,
                    render_index=render_index, near_duplicate=near,
                    caption=self._caption(scene, noise, rng), noise=noise, fault=fault, duplicate_of=dup,
                    eval_leak=leak)

    def _caption(self, scene: Scene, noise: str, rng: random.Random) -> str | None:
        if noise == "mismatched":
            other = scene
            while other == scene:
                other = Scene(**{a: rng.choice(CHOICES[a]) for a in ATTRIBUTES})
            return describe(other, rng)
        if noise == "boilerplate":
            return rng.choice(BOILERPLATE)
        if noise == "wrong_attribute":
            attr = rng.choice(ATTRIBUTES)
            wrong = rng.choice([v for v in CHOICES[attr] if v != getattr(scene, attr)])
            return describe(Scene(**{**scene.attributes(), attr: wrong}), rng)
        if noise == "empty_or_garbage":
            kind = rng.randrange(3)
            if kind == 0:
                return ""
            if kind == 1:
                return " ".join("".join(rng.choice("qxzjkvwy") for _ in range(rng.randint(2, 6)))
                                for _ in range(rng.randint(1, 4)))
            return None  # not UTF-8: written as raw bytes where the format allows it
        return describe(scene, rng)

    # --- pixels -------------------------------------------------------------------------------

    def render(self, item: Item) -> bytes:
        """JPEG bytes of the item's image (deterministic: same item, same bytes)."""
        rng = self._rng(item.render_index, "pixels")
        w, h = self.size(item.render_index) if item.fault != "huge" else (item.width, item.height)
        scene = item.scene
        bg = BACKGROUNDS[scene.background]
        img = Image.new("RGB", (w, h), bg or (235, 235, 235))
        draw = ImageDraw.Draw(img)
        # Low-contrast blobs give every picture its own texture, as real photos have: without them two
        # scenes with the same attributes look alike to a perceptual hash and dedup would merge them.
        # Textured pictures get low-contrast blobs, as photos have texture; flat ones (product shots, icons)
        # get none, so two flat pictures of alike scenes differ only in the object: the hard case for dedup.
        base = bg or (235, 235, 235)
        for _ in range(0 if self.is_flat(item.render_index) else rng.randint(4, 7)):
            bx, by = rng.uniform(0, w), rng.uniform(0, h)
            rx, ry = rng.uniform(0.1, 0.4) * w, rng.uniform(0.1, 0.4) * h
            tone = rng.randint(-35, 35)
            draw.ellipse([bx - rx, by - ry, bx + rx, by + ry], fill=tuple(max(0, min(255, c + tone)) for c in base))
        if bg is None:  # striped: dark diagonal stripes with a random phase and spacing
            step = max(4, min(w, h) // rng.randint(5, 9))
            phase = rng.randrange(step)
            for x in range(-h - step + phase, w + h, step):
                draw.line([(x, 0), (x + h, h)], fill=(70, 70, 70), width=max(1, step // 3))
        side = min(w, h) * (0.28 if scene.size == "small" else 0.6) * rng.uniform(0.9, 1.1)
        cx, cy = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
                  "bottom": (0.5, 0.75), "centre": (0.5, 0.5)}[scene.position]
        cx = (cx + rng.uniform(-0.06, 0.06)) * w
        cy = (cy + rng.uniform(-0.06, 0.06)) * h
        colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
        _draw_shape(draw, scene.shape, cx, cy, side / 2, colour)
        quality = 90
        if item.near_duplicate:  # re-published: maybe cropped a little, resized and re-encoded
            near = self._rng(item.index, "near")
            if near.random() < 0.5:
                left, top = near.uniform(0, 0.03) * w, near.uniform(0, 0.03) * h
                right, bottom = w - near.uniform(0, 0.03) * w, h - near.uniform(0, 0.03) * h
                img = img.crop((round(left), round(top), round(right), round(bottom)))
            img = img.resize((item.width, item.height), Image.Resampling.BICUBIC)
            quality = near.choice((70, 78, 85))
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)
        return out.getvalue()


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "cross":
        t = r / 3
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
