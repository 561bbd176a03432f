"""The sample json of the web stages (`{key}.json` in download's and prefilter's shards, `origin` in
CapFilt's): every key is in every sample, with one JSON type, and no value is null.

Why so strict: readers infer the json's schema from a few samples and cast the rest to it. Hugging Face
`datasets` (`load_dataset("webdataset", ...)`) infers it from the first five samples of the first tar:
a key that is null there and a string later fails the load ("Couldn't cast array of type string to
null"), a key absent there is silently dropped from every later sample, an int there truncates a later
float. So: a caption with no error has `caption_error` "" (not null, not absent); a missing caption is
""; `list` (the URL list's own numbers) always holds every field of LIST_FIELDS as a float, NaN where
the list has no value (Python's json, pandas, pyarrow, duckdb and `datasets` read NaN; strict JSON
parsers do not).
"""
from __future__ import annotations

import json

import math

from pipeline.configbase import LIST_FIELDS

IMAGE_FIELDS = ("width", "height", "original_width", "original_height", "sha256")


def listed_numbers(row: dict) -> dict[str, float]:
    """`list`: every LIST_FIELDS field of a list row (or of an older sample's `list`), a float, NaN if none."""
    out = {}
    for field in LIST_FIELDS:
        value = row.get(field)
        out[field] = math.nan if value is None else float(value)
    return out


def is_missing(value) -> bool:
    """A `list` number the URL list did not give (NaN; None or absent in a json an older vlp wrote)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def fetched_json(base: dict, caption: str | None, caption_error: str | None, image: dict, listed: dict,
                 stage: str) -> dict:
    """The json of a sample the fetching stage `stage` keeps: `base` (key, url, source, source_row), the
    caption and its error ("" for none), the image's sizes and the original bytes' sha256 (`image`), the
    list's numbers."""
    return {**base, "caption": caption or "", "caption_error": caption_error or "",
            **{k: image[k] for k in IMAGE_FIELDS}, "round": 0, "stage": stage,
            "list": listed_numbers(listed)}


def stable(meta: dict) -> dict:
    """A json download wrote, with the optional keys of older vlp versions (null `caption_error` and
    `caption`, `list` absent or holding only the list's non-null numbers) in the fixed form above; what
    prefilter passes on, so its shards are stable even over shards an older download committed."""
    return {**meta, "caption": meta.get("caption") or "", "caption_error": meta.get("caption_error") or "",
            "list": listed_numbers(meta.get("list") or {})}


def parse(data: bytes | None) -> dict:
    """A sample's json member as a dict: {} when it is absent, not JSON, not UTF-8 or not an object."""
    try:
        value = json.loads(data) if data else {}
    except ValueError:   # UnicodeDecodeError is one
        return {}
    return value if isinstance(value, dict) else {}
