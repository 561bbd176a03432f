"""Readers for URL lists in the formats the real datasets ship, streamed in record batches.

Every list becomes batches of one table schema: `url`, `caption` (None when absent or not UTF-8),
`caption_error` ("not_utf8" or None), `source` and `source_row`. Nothing reads a whole list into memory
except a JSON document (SBU's file, `json`), which cannot be parsed in pieces; CSV/TSV/JSONL/CC3M files
compressed with gzip, bz2, lz4 or zstd (by extension) are decompressed as they stream.

`check_url_list` is the cheap test the driver makes before anything is fetched (the file is there, in
its format, with its columns, and its first batch holds URLs); the download's planning tasks stream the
whole list with `iter_url_batches` (stages/download/listplan.py).
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.config import UrlListConfig

from pipeline.configbase import LIST_FIELDS
from pipeline.errors import InputError
from pipeline.storage import arrow, as_path, input_stream

# Real column names of each known dataset (url, caption).
KNOWN_COLUMNS = {"laion": ("URL", "TEXT"), "sbu": ("image_urls", "captions")}
LAION_COLUMNS = {"similarity": "similarity", "punsafe": "punsafe", "pwatermark": "pwatermark",
                 "width": "WIDTH", "height": "HEIGHT"}
SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("caption_error", pa.string()),
                    ("source", pa.string()), ("source_row", pa.int64())] + [(f, pa.float64()) for f in LIST_FIELDS])
BATCH_ROWS = 65_536
TEXT_BLOCK = 8 << 20     # bytes of a line-oriented list read at once
CSV_PIECE = TEXT_BLOCK // 4   # bytes of a CSV/TSV list pyarrow parses at once (more, for a longer line)
MAX_ROW_BYTES = 64 << 20      # a CSV/TSV line longer than this is an error naming it, not a piece to parse
_URL = r"(?i)^https?://"


def source_name(spec: UrlListConfig) -> str:
    return spec.name or as_path(spec.path).name


def check_url_list(spec: UrlListConfig) -> None:
    """Fail now, before any download, if the list is missing, unreadable in its format, lacks its
    columns, is empty, or its first batch holds no http(s) URL (binary garbage, the wrong column)."""
    first = next(iter(iter_url_batches(spec, check_urls=False)), None)
    _check_urls(as_path(spec.path), spec, first)


def read_url_list(spec: UrlListConfig) -> pa.Table:
    """The whole list as one table (small lists and tests; the download streams it)."""
    return pa.Table.from_batches([b for t in iter_url_batches(spec) for b in t.to_batches()], SCHEMA)


def count_rows(spec: UrlListConfig) -> int:
    """Rows of a list: a parquet file's metadata, else one streamed pass (memory: one batch)."""
    if spec.format in ("laion", "parquet") and as_path(spec.path).is_file():
        name, filesystem = arrow(as_path(spec.path))
        return pq.ParquetFile(name, filesystem=filesystem).metadata.num_rows
    return sum(t.num_rows for t in iter_url_batches(spec, check_urls=False))


def iter_url_batches(spec: UrlListConfig, batch_rows: int = BATCH_ROWS, check_urls: bool = True) -> Iterator[pa.Table]:
    """The list in tables of at most about `batch_rows` rows, `source_row` counting from 0 across them.
    Raises InputError (file, format, what is wrong) for a list that cannot be used."""
    path = as_path(spec.path)
    if not path.is_file():
        raise InputError(f"{path}: URL list not found")
    rows, any_url, name = 0, False, source_name(spec)
    try:
        for urls, captions, errors, *more in _READERS.get(spec.format, _read_json)(spec, path, batch_rows):
            errors = errors if errors is not None else pa.nulls(len(urls), pa.string())
            fields = more[0] if more else {}
            for start in range(0, len(urls), batch_rows):   # a CSV reader's batches are blocks of bytes
                n = min(batch_rows, len(urls) - start)
                table = pa.table({"url": urls.slice(start, n), "caption": captions.slice(start, n),
                                  "caption_error": errors.slice(start, n),
                                  "source": pa.array([name], pa.string()).take(np.zeros(n, dtype=np.int32)),
                                  "source_row": pa.array(np.arange(rows, rows + n, dtype=np.int64)),
                                  **{f: fields[f].slice(start, n) if f in fields else pa.nulls(n, pa.float64())
                                     for f in LIST_FIELDS}}, schema=SCHEMA)
                any_url = any_url or (check_urls and pc.any(pc.match_substring_regex(table["url"], _URL)).as_py())
                rows += n
                yield table
    except InputError:
        raise
    except (OSError, pa.ArrowException, ValueError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read as {spec.format}: {err}") from None
    if rows == 0:
        raise InputError(f"{path}: the URL list is empty")
    if check_urls and not any_url:
        raise InputError(f"{path}: no row holds an http(s) URL; is it a {spec.format} list, and is the url column right?")


def _check_urls(path: Path, spec: UrlListConfig, first: pa.Table | None) -> None:
    if first is None:
        raise InputError(f"{path}: the URL list is empty")
    if not pc.any(pc.match_substring_regex(first["url"], _URL)).as_py():
        sample = next((u for u in first["url"].to_pylist() if u), "")[:60]
        raise InputError(f"{path}: none of its first {first.num_rows} rows holds an http(s) URL (first value: "
                         f"{sample!r}); is it a {spec.format} list, and is the url column right?")


def _columns_for(spec: UrlListConfig) -> tuple[str, str]:
    url_col, caption_col = KNOWN_COLUMNS.get(spec.format, ("url", "caption"))
    return spec.url_col or url_col, spec.caption_col or caption_col


def list_columns(spec: UrlListConfig, found: list[str]) -> dict[str, str]:
    """{field: the list's column} of the LIST_FIELDS a list carries: `columns` as configured (each must be
    there), else for `laion` those of LAION's columns the file has."""
    if spec.columns:
        missing = sorted(c for c in spec.columns.values() if c not in found)
        if missing:
            raise InputError(f"{spec.path}: columns {', '.join(map(repr, missing))} (data.inputs columns) are not "
                             f"in the list; found {', '.join(map(repr, found))}")
        return dict(spec.columns)
    return {f: c for f, c in LAION_COLUMNS.items() if c in found} if spec.format == "laion" else {}


def _numbers(batch, columns: dict[str, str]) -> dict[str, pa.Array]:
    """The list's numeric columns as float64 (a value that is no number becomes null)."""
    out = {}
    for field, col in columns.items():
        column = batch.column(col)
        try:
            out[field] = column.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            out[field] = pa.array([_number(v) for v in column.to_pylist()], pa.float64())
    return out


def _number(value) -> float | None:
    try:
        return float(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _read_parquet(spec: UrlListConfig, path: Path, batch_rows: int):
    url_col, caption_col = _columns_for(spec)
    name, filesystem = arrow(path)
    file = pq.ParquetFile(name, filesystem=filesystem)
    _check_columns(path, spec.format, file.schema_arrow.names, url_col, caption_col)
    numbers = list_columns(spec, file.schema_arrow.names)
    for batch in file.iter_batches(batch_size=batch_rows, columns=list(dict.fromkeys([url_col, caption_col, *numbers.values()]))):
        captions, errors = _texts(batch.column(caption_col))
        yield _urls(batch.column(url_col)), captions, errors, _numbers(batch, numbers)


def _read_delimited(spec: UrlListConfig, path: Path, batch_rows: int):
    """CSV/TSV, parsed by pyarrow in pieces we cut at line ends. pyarrow's streaming reader cuts the
    bytes into blocks itself and fails the whole list on a row longer than its block ("straddling object
    straddles two block boundaries"): one caption of a few MB lost every row of the file. A piece here
    holds whole lines, however long (up to MAX_ROW_BYTES), and pyarrow reads each piece as one block.
    A line end inside quotes ends the row, as it did with pyarrow's reader (newlines_in_values off)."""
    url_col, caption_col = _columns_for(spec)
    parse = pacsv.ParseOptions(delimiter="," if spec.format == "csv" else "\t")
    with input_stream(path) as stream:
        pieces = _line_pieces(stream, path)
        first = next(pieces, b"")
        end = first.find(b"\n") + 1 or len(first)
        # the header alone names the columns (and drops a UTF-8 byte order mark)
        found = pacsv.read_csv(pa.BufferReader(first[:end]), parse_options=parse).column_names
        _check_columns(path, spec.format, found, url_col, caption_col)
        numbers = list_columns(spec, found)
        # Captions as bytes: a caption that is not UTF-8 is a counted defect of its row, not a failed list.
        columns = list(dict.fromkeys([url_col, caption_col, *numbers.values()]))
        convert = pacsv.ConvertOptions(strings_can_be_null=True, include_columns=columns,
                                       column_types={url_col: pa.binary(), caption_col: pa.binary()})
        for piece in itertools.chain([first[end:]], pieces):
            if not piece or piece.isspace():
                continue
            read = pacsv.ReadOptions(column_names=found, block_size=len(piece) + 1)   # the piece is one block
            table = pacsv.read_csv(pa.BufferReader(piece), read_options=read, parse_options=parse,
                                   convert_options=convert)
            for batch in table.combine_chunks().to_batches():
                captions, errors = _texts(batch.column(caption_col))
                yield _urls(batch.column(url_col)), captions, errors, _numbers(batch, numbers)


def _line_pieces(stream, path: Path) -> Iterator[bytes]:
    """A text stream in pieces of about CSV_PIECE bytes, each ending at a line end (but the last); a line
    longer than that is one piece. A line over MAX_ROW_BYTES is an InputError naming it."""
    held: list[bytes] = []   # the bytes since the last line end
    held_bytes = lines = 0   # lines: line ends before `held`, for the message
    while block := stream.read(CSV_PIECE):
        cut = block.rfind(b"\n") + 1
        if not cut:
            held.append(block)
            held_bytes += len(block)
            if held_bytes > MAX_ROW_BYTES:
                raise InputError(f"{path}: line {lines + 1} is longer than {MAX_ROW_BYTES >> 20} MiB (a URL list's "
                                 "row is a few hundred bytes); remove or fix that line (the limit is MAX_ROW_BYTES "
                                 "in pipeline/data/urllists.py)")
            continue
        piece = b"".join([*held, block[:cut]])
        lines += piece.count(b"\n")
        held, held_bytes = [block[cut:]], len(block) - cut
        yield piece
    if held_bytes:
        yield b"".join(held)


def _lines(path: Path) -> Iterator[list[bytes]]:
    """Lines of a (possibly compressed) text file, in blocks, without their line ends."""
    with input_stream(path) as stream:
        rest = b""
        while block := stream.read(TEXT_BLOCK):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            yield [line.rstrip(b"\r") for line in lines]
        if rest:
            yield [rest.rstrip(b"\r")]


def _read_cc3m(spec: UrlListConfig, path: Path, batch_rows: int):
    """CC3M's file: `caption<TAB>url` per line and no header. Bytes that are not UTF-8 are kept as a
    counted defect of that caption, not a crash."""
    first = True
    for block in _lines(path):
        for start in range(0, len(block), batch_rows):
            urls, captions, errors = [], [], []
            for line in block[start:start + batch_rows]:
                caption, tab, url = line.rpartition(b"\t")
                if not tab:  # no tab: the line is a URL at best; its caption is missing
                    caption, url = b"", line
                text, error = _caption(caption)
                captions.append(text)
                errors.append(error)
                urls.append(url.decode("utf-8", errors="replace").strip())
            if first and urls and urls[0].lower() == "url":  # a header someone added: not a sample
                del urls[0], captions[0], errors[0]
            first = False
            yield pa.array(urls, pa.string()), pa.array(captions, pa.string()), pa.array(errors, pa.string())


def _read_jsonl(spec: UrlListConfig, path: Path, batch_rows: int):
    url_col, caption_col = _columns_for(spec)
    checked = False
    for block in _lines(path):
        records = [json.loads(line) for line in block if line.strip()]
        if records and not checked:
            _check_record_columns(path, spec.format, records, url_col, caption_col)
            checked = True
        for start in range(0, len(records), batch_rows):
            yield _from_records(records[start:start + batch_rows], url_col, caption_col, spec.columns)


def _read_json(spec: UrlListConfig, path: Path, batch_rows: int):
    """json and sbu: one JSON document, parsed whole (by the planning task, not the driver)."""
    url_col, caption_col = _columns_for(spec)
    with input_stream(path) as stream:
        data = json.loads(stream.read())
    if isinstance(data, dict):  # SBU's layout: parallel lists
        _check_columns(path, spec.format, list(data), url_col, caption_col)
        urls, captions = data[url_col], data[caption_col]
        if not isinstance(urls, list) or not isinstance(captions, list) or len(urls) != len(captions):
            raise InputError(f"{path}: {url_col!r} and {caption_col!r} must be lists of equal length")
        for start in range(0, len(urls), batch_rows):
            yield (pa.array([_str(u) for u in urls[start:start + batch_rows]], pa.string()),
                   pa.array([_str(c) for c in captions[start:start + batch_rows]], pa.string()), None)
    elif isinstance(data, list):
        if data:
            _check_record_columns(path, spec.format, data, url_col, caption_col)
        for start in range(0, len(data), batch_rows):
            yield _from_records(data[start:start + batch_rows], url_col, caption_col, spec.columns)
    else:
        raise InputError(f"{path}: expected a JSON object of lists or a list of records")


_READERS = {"laion": _read_parquet, "parquet": _read_parquet, "csv": _read_delimited, "tsv": _read_delimited,
            "cc3m": _read_cc3m, "jsonl": _read_jsonl}


def _from_records(records: list, url_col: str, caption_col: str, columns: dict[str, str] | None = None):
    urls, captions, numbers = [], [], {f: [] for f in columns or {}}
    for r in records:
        r = r if isinstance(r, dict) else {}
        urls.append(_str(r.get(url_col)))
        captions.append(_str(r.get(caption_col)))
        for field, col in (columns or {}).items():
            numbers[field].append(_number(r.get(col)))
    return (pa.array(urls, pa.string()), pa.array(captions, pa.string()), None,
            {f: pa.array(v, pa.float64()) for f, v in numbers.items()})


def _check_record_columns(path: Path, fmt: str, records: list, url_col: str, caption_col: str) -> None:
    found = sorted({k for r in itertools.islice(records, 1000) if isinstance(r, dict) for k in r})
    _check_columns(path, fmt, found, url_col, caption_col)


def _check_columns(path: Path, fmt: str, found, url_col: str, caption_col: str) -> None:
    missing = [c for c in (url_col, caption_col) if c not in found]
    if missing:
        raise InputError(
            f"{path}: {fmt} list lacks column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, found)) or 'none'}; expected url column {url_col!r} and caption "
            f"column {caption_col!r} (set url_col / caption_col in data.inputs to name others)")


def _urls(column: pa.Array) -> pa.Array:
    """A URL column as strings: a binary column's values decoded as UTF-8 (else no URL at all)."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            return pa.array([_str(v) for v in column.to_pylist()], pa.string())
    return pa.array([_str(v) for v in column.to_pylist()], pa.string())


def _texts(column: pa.Array) -> tuple[pa.Array, pa.Array | None]:
    """Captions and their defects: a binary column's bytes are decoded as UTF-8 (not written as "b'...'"),
    and bytes that are not UTF-8 become a counted `not_utf8` caption, as in CC3M's file."""
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        try:
            return column.cast(pa.string()), None   # all valid UTF-8: the fast path
        except pa.ArrowInvalid:
            pairs = [_caption(v) if v is not None else (None, None) for v in column.to_pylist()]
            return pa.array([t for t, _ in pairs], pa.string()), pa.array([e for _, e in pairs], pa.string())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string()), None
    return pa.array([_str(v) for v in column.to_pylist()], pa.string()), None


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
