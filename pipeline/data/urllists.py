"""Readers for URL lists in the formats the real datasets ship, normalised to one table.

Every list becomes columns `url`, `caption` (None when absent or not UTF-8), `caption_error`
("not_utf8" or None), `source` and `source_row`. A list that cannot be used fails early, before any
download starts, with the file, the columns found and the columns expected.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import UrlListConfig
from pipeline.errors import InputError

# Real column names of each known dataset (url, caption).
KNOWN_COLUMNS = {"laion": ("URL", "TEXT"), "sbu": ("image_urls", "captions")}
SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("caption_error", pa.string()),
                    ("source", pa.string()), ("source_row", pa.int64())])


def source_name(spec: UrlListConfig) -> str:
    return spec.name or Path(spec.path).name


def read_url_list(spec: UrlListConfig) -> pa.Table:
    path = Path(spec.path)
    if not path.is_file():
        raise InputError(f"{path}: URL list not found")
    try:
        if spec.format == "cc3m":
            urls, captions, errors = _read_cc3m(path)
        else:
            urls, captions, errors = _read_columns(spec, path)
    except InputError:
        raise
    except (OSError, pa.ArrowException, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read as {spec.format}: {err}") from None
    if not urls:
        raise InputError(f"{path}: the URL list is empty")
    if not any(u is not None and u[:8].lower().startswith(("http://", "https://")) for u in urls):
        # Every row would be refused: this is no URL list (binary garbage, the wrong format or column).
        sample = next((u for u in urls if u), "")[:60]
        raise InputError(f"{path}: no row holds an http(s) URL (first value: {sample!r}); is it a {spec.format} "
                         f"list, and is the url column right?")
    n = len(urls)
    return pa.table({"url": urls, "caption": captions, "caption_error": errors or [None] * n,
                     "source": [source_name(spec)] * n, "source_row": list(range(n))}, schema=SCHEMA)


def _read_cc3m(path: Path):
    """CC3M's file: `caption<TAB>url` per line and no header. Bytes that are not UTF-8 are kept as a
    counted defect of that caption, not a crash."""
    urls, captions, errors = [], [], []
    with open(path, "rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            caption, tab, url = line.rpartition(b"\t")
            if not tab:  # no tab: the line is a URL at best; its caption is missing
                caption, url = b"", line
            text, error = _caption(caption)
            captions.append(text)
            errors.append(error)
            urls.append(url.decode("utf-8", errors="replace").strip())
    if urls and urls[0].lower() == "url":  # a header someone added: not a sample
        del urls[0], captions[0], errors[0]
    return urls, captions, errors


def _columns_for(spec: UrlListConfig) -> tuple[str, str]:
    url_col, caption_col = KNOWN_COLUMNS.get(spec.format, ("url", "caption"))
    return spec.url_col or url_col, spec.caption_col or caption_col


def _read_columns(spec: UrlListConfig, path: Path):
    url_col, caption_col = _columns_for(spec)
    fmt = spec.format
    if fmt in ("laion", "parquet"):
        found = pq.read_schema(path).names
        _check_columns(path, fmt, found, url_col, caption_col)
        table = pq.read_table(path, columns=[url_col, caption_col])
        captions, errors = _texts(table.column(caption_col))
        return _strings(table.column(url_col)), captions, errors
    if fmt in ("csv", "tsv"):
        opts = pacsv.ParseOptions(delimiter="," if fmt == "csv" else "\t")
        table = pacsv.read_csv(path, parse_options=opts,
                               convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
        _check_columns(path, fmt, table.column_names, url_col, caption_col)
        captions, errors = _texts(table.column(caption_col))
        return _strings(table.column(url_col)), captions, errors
    if fmt == "jsonl":
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return _from_records(path, fmt, records, url_col, caption_col)
    data = json.loads(path.read_text())  # json and sbu
    if isinstance(data, dict):  # SBU's layout: parallel lists
        _check_columns(path, fmt, list(data), url_col, caption_col)
        urls, captions = data[url_col], data[caption_col]
        if not isinstance(urls, list) or not isinstance(captions, list) or len(urls) != len(captions):
            raise InputError(f"{path}: {url_col!r} and {caption_col!r} must be lists of equal length")
        return [_str(u) for u in urls], [_str(c) for c in captions], None
    if isinstance(data, list):
        return _from_records(path, fmt, data, url_col, caption_col)
    raise InputError(f"{path}: expected a JSON object of lists or a list of records")


def _from_records(path, fmt, records, url_col, caption_col):
    found = sorted({k for r in records[:1000] if isinstance(r, dict) for k in r})
    if records:
        _check_columns(path, fmt, found, url_col, caption_col)
    urls, captions = [], []
    for r in records:
        r = r if isinstance(r, dict) else {}
        urls.append(_str(r.get(url_col)))
        captions.append(_str(r.get(caption_col)))
    return urls, captions, None


def _check_columns(path: Path, fmt: str, found, url_col: str, caption_col: str) -> None:
    missing = [c for c in (url_col, caption_col) if c not in found]
    if missing:
        raise InputError(
            f"{path}: {fmt} list lacks column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, found)) or 'none'}; expected url column {url_col!r} and caption "
            f"column {caption_col!r} (set url_col / caption_col in data.inputs to name others)")


def _strings(column: pa.ChunkedArray) -> list:
    return [_str(v) for v in column.to_pylist()]


def _texts(column: pa.ChunkedArray) -> tuple[list, list]:
    """Captions and their defects: a binary column's bytes are decoded as UTF-8 (not written as "b'...'"),
    and bytes that are not UTF-8 become a counted `not_utf8` caption, as in CC3M's file."""
    pairs = [_caption(v) if isinstance(v, bytes) else (_str(v), None) for v in column.to_pylist()]
    return [text for text, _ in pairs], [error for _, error in pairs]


def _caption(raw: bytes) -> tuple[str | None, str | None]:
    """(caption, defect): UTF-8 text, or None and "not_utf8"."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, "not_utf8"


def _str(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):  # a binary URL column: UTF-8, else no URL at all
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else str(value)
