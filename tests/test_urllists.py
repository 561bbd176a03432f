"""Each real list format is read; each bad list fails early with the file and the columns."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import UrlListConfig
from pipeline.data.urllists import check_url_list, count_rows, iter_url_batches, read_url_list
from pipeline.data.urlpolicy import refusal
from pipeline.errors import InputError

BASE = ["url", "caption", "caption_error", "source", "source_row"]   # without the list's numbers


def test_toyweb_lists_in_every_real_format(toyweb):
    by_format = {s.format: read_url_list(s) for s in toyweb.inputs}
    assert set(by_format) == {"laion", "cc3m", "sbu"}
    assert sum(t.num_rows for t in by_format.values()) == 240
    cc3m = by_format["cc3m"].to_pylist()
    # CC3M's real file has no header: its first line is a sample
    truth = pq.read_table(toyweb.truth).to_pylist()
    assert cc3m[0]["url"] == truth[80]["url"]
    for row in by_format["laion"].to_pylist() + by_format["sbu"].to_pylist():
        assert row["url"].startswith("http://127.0.0.1:")


def test_cc3m_without_header_and_with_bad_bytes(tmp_path):
    path = tmp_path / "Train_GCC-training.tsv"
    path.write_bytes(b"a dog on a sofa\thttp://e.com/1.jpg\n\xff\xfe broken\thttp://e.com/2.jpg\n"
                     b"http://e.com/3.jpg\n\thttp://e.com/4.jpg\n")
    rows = read_url_list(UrlListConfig(path=str(path), format="cc3m")).to_pylist()
    assert [r["url"] for r in rows] == [f"http://e.com/{i}.jpg" for i in range(1, 5)]
    assert rows[0]["caption"] == "a dog on a sofa" and rows[0]["caption_error"] is None
    assert rows[1]["caption"] is None and rows[1]["caption_error"] == "not_utf8"
    assert rows[2]["caption"] == "" and rows[3]["caption"] == ""
    assert [r["source_row"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["source"] == "Train_GCC-training.tsv"


def test_sbu_object_of_lists_and_list_of_records(tmp_path):
    a = tmp_path / "sbu.json"
    a.write_text(json.dumps({"image_urls": ["http://e.com/1.jpg", "http://e.com/2.jpg"], "captions": ["x y", None],
                             "user_ids": ["u1", "u2"]}))
    b = tmp_path / "sbu-records.json"
    b.write_text(json.dumps([{"image_urls": "http://e.com/1.jpg", "captions": "x y"}]))
    assert read_url_list(UrlListConfig(path=str(a), format="sbu")).column("caption").to_pylist() == ["x y", None]
    assert read_url_list(UrlListConfig(path=str(b), format="sbu")).num_rows == 1


@pytest.mark.parametrize("fmt, body", [
    ("csv", "url,caption\nhttp://e.com/1.jpg,a cat\n"),
    ("tsv", "url\tcaption\nhttp://e.com/1.jpg\ta cat\n"),
    ("jsonl", '{"url": "http://e.com/1.jpg", "caption": "a cat"}\n'),
    ("json", '[{"url": "http://e.com/1.jpg", "caption": "a cat"}]'),
])
def test_generic_formats(tmp_path, fmt, body):
    path = tmp_path / f"list.{fmt}"
    path.write_text(body)
    rows = read_url_list(UrlListConfig(path=str(path), format=fmt)).select(BASE).to_pylist()
    assert rows == [{"url": "http://e.com/1.jpg", "caption": "a cat", "caption_error": None,
                     "source": f"list.{fmt}", "source_row": 0}]


def test_laion_parquet_missing_columns_names_file_found_and_expected(tmp_path):
    path = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"url": ["http://e.com/1.jpg"], "caption": ["x"]}), path)
    with pytest.raises(InputError) as err:
        read_url_list(UrlListConfig(path=str(path), format="laion"))
    text = str(err.value)
    assert str(path) in text and "lacks column(s) 'URL', 'TEXT'" in text
    assert "found 'url', 'caption'" in text and "url_col / caption_col" in text
    # naming the columns fixes it
    ok = read_url_list(UrlListConfig(path=str(path), format="laion", url_col="url", caption_col="caption"))
    assert ok.num_rows == 1


@pytest.mark.parametrize("fmt, name, body, message", [
    ("laion", "empty.parquet", None, "the URL list is empty"),
    ("cc3m", "empty.tsv", b"", "the URL list is empty"),
    ("laion", "garbage.parquet", b"not parquet at all", "cannot read as laion"),
    ("sbu", "bad.json", b"{not json", "cannot read as sbu"),
    ("sbu", "uneven.json", b'{"image_urls": ["a", "b"], "captions": ["x"]}', "lists of equal length"),
    ("csv", "nocol.csv", b"link,text\nhttp://e.com/1.jpg,x\n", "found 'link', 'text'"),
])
def test_bad_lists(tmp_path, fmt, name, body, message):
    path = tmp_path / name
    if body is None:
        pq.write_table(pa.table({"URL": pa.array([], pa.string()), "TEXT": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(body)
    with pytest.raises(InputError, match=message) as err:
        read_url_list(UrlListConfig(path=str(path), format=fmt))
    assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="URL list not found"):
        read_url_list(UrlListConfig(path=str(tmp_path / "nope.tsv"), format="cc3m"))


@pytest.mark.parametrize("url, allowed, reason", [
    ("https://example.com/a.jpg", (), None),
    ("http://93.184.216.34/a.jpg", (), None),
    ("http://127.0.0.1:8000/a.jpg", (), "url_private_address"),
    ("http://127.0.0.1:8000/a.jpg", ("127.0.0.1",), None),
    ("http://127.0.0.2/a.jpg", ("127.0.0.1",), "url_private_address"),
    ("http://localhost/a.jpg", (), "url_private_address"),
    ("http://10.1.2.3/a.jpg", (), "url_private_address"),
    ("http://192.168.0.10/a.jpg", (), "url_private_address"),
    ("http://169.254.169.254/latest/meta-data", (), "url_private_address"),
    ("http://[::1]/a.jpg", (), "url_private_address"),
    ("http://[::ffff:10.0.0.1]/a.jpg", (), "url_private_address"),
    ("http://printer.local/a.jpg", (), "url_private_address"),
    ("ftp://example.com/a.jpg", (), "url_scheme_refused"),
    ("file:///etc/passwd", (), "url_scheme_refused"),
    ("data:image/png;base64,AAAA", (), "url_scheme_refused"),
    ("", (), "url_missing"),
    (None, (), "url_missing"),
    ("http://example.com:99999/a.jpg", (), "url_malformed"),
])
def test_url_policy(url, allowed, reason):
    assert refusal(url, frozenset(allowed)) == reason


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
@pytest.mark.parametrize("fmt", ["cc3m", "tsv", "jsonl"])
def test_compressed_lists_stream_in_batches(tmp_path, fmt, suffix):
    """A compressed list reads as the plain one, in batches whose source_row counts on across them."""
    n = 2_500
    if fmt == "cc3m":
        body = "".join(f"caption {i}\thttp://e.com/{i}.jpg\n" for i in range(n))
    elif fmt == "tsv":
        body = "url\tcaption\n" + "".join(f"http://e.com/{i}.jpg\tcaption {i}\n" for i in range(n))
    else:
        body = "".join(json.dumps({"url": f"http://e.com/{i}.jpg", "caption": f"caption {i}"}) + "\n" for i in range(n))
    plain, packed = tmp_path / f"list.{fmt}", tmp_path / f"list.{fmt}{suffix}"
    plain.write_text(body)
    with pa.CompressedOutputStream(str(packed), "gzip" if suffix == ".gz" else "zstd") as out:
        out.write(body.encode())
    batches = list(iter_url_batches(UrlListConfig(path=str(packed), format=fmt, name="l"), batch_rows=1_000))
    assert len(batches) >= 3 and max(b.num_rows for b in batches) <= 1_000
    rows = pa.concat_tables(batches).select(BASE).to_pylist()
    assert rows == read_url_list(UrlListConfig(path=str(plain), format=fmt, name="l")).select(BASE).to_pylist()
    assert [r["source_row"] for r in rows] == list(range(n))
    assert rows[7] == {"url": "http://e.com/7.jpg", "caption": "caption 7", "caption_error": None, "source": "l",
                       "source_row": 7}
    assert count_rows(UrlListConfig(path=str(packed), format=fmt)) == n


def test_csv_caption_that_is_not_utf8_is_a_counted_defect(tmp_path):
    path = tmp_path / "list.csv"
    path.write_bytes(b"url,caption\nhttp://e.com/1.jpg,ok\nhttp://e.com/2.jpg,\xff\xfe bad\n")
    rows = read_url_list(UrlListConfig(path=str(path), format="csv")).to_pylist()
    assert [(r["caption"], r["caption_error"]) for r in rows] == [("ok", None), (None, "not_utf8")]


def test_the_check_reads_only_the_first_batch(tmp_path):
    """check_url_list is the driver's cheap test: a list whose first rows hold URLs passes it (a later bad
    row is the planning task's to report); a list of no URLs fails it, naming the file."""
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"URL": ["http://e.com/1.jpg"] * 10, "TEXT": ["x"] * 10}), path)
    check_url_list(UrlListConfig(path=str(path), format="laion"))
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"URL": ["not a url"] * 10, "TEXT": ["x"] * 10}), bad)
    with pytest.raises(InputError, match="none of its first 10 rows holds an http"):
        check_url_list(UrlListConfig(path=str(bad), format="laion"))
    assert count_rows(UrlListConfig(path=str(path), format="laion")) == 10


def test_a_lists_numbers_stream_as_float_columns(tmp_path):
    """LAION's similarity/punsafe/pwatermark/WIDTH/HEIGHT by default; other formats name theirs, and a
    named column that is not there fails the list; a value that is no number is null."""
    laion = tmp_path / "part.parquet"
    pq.write_table(pa.table({"URL": ["http://e.com/1.jpg", "http://e.com/2.jpg"], "TEXT": ["a b", "c d"],
                             "punsafe": [0.25, None], "WIDTH": [640, 320], "extra": ["x", "y"]}), laion)
    rows = read_url_list(UrlListConfig(path=str(laion), format="laion")).to_pylist()
    assert [(r["punsafe"], r["width"], r["similarity"]) for r in rows] == [(0.25, 640.0, None), (None, 320.0, None)]
    csv = tmp_path / "list.csv"
    csv.write_text("url,caption,clip\nhttp://e.com/1.jpg,a b,0.31\nhttp://e.com/2.jpg,c d,\n")
    rows = read_url_list(UrlListConfig(path=str(csv), format="csv", columns={"similarity": "clip"})).to_pylist()
    assert [r["similarity"] for r in rows] == [0.31, None]
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text('{"url": "http://e.com/1.jpg", "caption": "a b", "nsfw": "high"}\n')
    assert read_url_list(UrlListConfig(path=str(jsonl), format="jsonl", columns={"punsafe": "nsfw"})).to_pylist()[0]["punsafe"] is None
    with pytest.raises(InputError, match="'clip2'"):
        read_url_list(UrlListConfig(path=str(csv), format="csv", columns={"similarity": "clip2"}))


@pytest.mark.parametrize("fmt, suffix, quoted", [("csv", "", False), ("csv", "", True), ("tsv", ".gz", False)])
def test_a_row_longer_than_a_read_block_is_read_with_the_rest(tmp_path, fmt, suffix, quoted):
    """One 5 MB caption (pyarrow's streaming reader failed the whole list on it: "straddling object straddles
    two block boundaries") is read like any row: every row in comes out, in order, the planning task's
    shard inputs included."""
    from stages.download.listplan import input_name, plan_list

    sep = "," if fmt == "csv" else "\t"
    huge = "x" * (5 << 20)
    rows = [("http://e.com/1.jpg", "a cat"), ("http://e.com/2.jpg", "a dog"),
            ("http://e.com/3.jpg", f'"{huge}"' if quoted else huge), ("http://e.com/4.jpg", "a cow"),
            ("http://e.com/5.jpg", "a hen")]
    body = (f"url{sep}caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in rows)).encode()
    path = tmp_path / f"list.{fmt}{suffix}"
    if suffix:
        with pa.CompressedOutputStream(str(path), "gzip") as out:
            out.write(body)
    else:
        path.write_bytes(body)
    spec = UrlListConfig(path=str(path), format=fmt)
    check_url_list(spec)
    got = read_url_list(spec).to_pylist()
    assert [(r["url"], r["source_row"]) for r in got] == [(u, i) for i, (u, _) in enumerate(rows)]
    assert [r["caption"] for r in got] == ["a cat", "a dog", huge, "a cow", "a hen"]
    assert count_rows(spec) == 5
    import dataclasses

    assert plan_list(dataclasses.asdict(spec), 0, str(tmp_path), samples_per_shard=2) == [2, 2, 1]
    planned = pq.read_table(tmp_path / input_name(0))
    assert planned.column("url").to_pylist() == [u for u, _ in rows]


def test_a_line_past_the_row_limit_is_an_error_naming_it(tmp_path, monkeypatch):
    from pipeline.data import urllists

    monkeypatch.setattr(urllists, "MAX_ROW_BYTES", 3 << 20)
    path = tmp_path / "list.csv"
    huge = "x" * (4 << 20)
    path.write_text(f"url,caption\nhttp://e.com/1.jpg,a\n\nhttp://e.com/2.jpg,{huge}\nhttp://e.com/3.jpg,c\n")
    with pytest.raises(InputError) as err:
        read_url_list(UrlListConfig(path=str(path), format="csv"))
    assert str(path) in str(err.value) and "line 4 is longer than 3 MiB" in str(err.value)
    assert "MAX_ROW_BYTES" in str(err.value) and "straddl" not in str(err.value)
