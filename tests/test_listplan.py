"""URL lists are cut into shard inputs by Ray tasks; the driver keeps (shard, file, row group, rows)."""
import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import UrlListConfig
from stages.download.listplan import INPUTS, PLAN, plan_shards, read_shard_input
from pipeline.data.urllists import read_url_list
from pipeline.errors import StageFailed


def _lists(tmp_path):
    laion = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"URL": [f"http://a.com/{i}.jpg" for i in range(2_500)],
                             "TEXT": [f"a {i}" for i in range(2_500)]}), laion, row_group_size=700)
    cc3m = tmp_path / "cc3m.tsv.gz"
    with gzip.open(cc3m, "wt") as f:
        f.writelines(f"caption {i}\thttp://c.com/{i}.jpg\n" for i in range(1_200))
    return (UrlListConfig(path=str(laion), format="laion"), UrlListConfig(path=str(cc3m), format="cc3m"))


def test_lists_are_cut_per_file_into_numbered_shard_inputs(tmp_path, ray_cluster):
    lists, stage = _lists(tmp_path), tmp_path / "stage"
    shards = plan_shards(stage, lists, samples_per_shard=1_000)
    assert [(s.shard_id, s.rows) for s in shards] == [(0, 1000), (1, 1000), (2, 500), (3, 1000), (4, 200)]
    assert [(s.path, s.row_group) for s in shards] == [("inputs/0000.parquet", g) for g in range(3)] + \
        [("inputs/0001.parquet", g) for g in range(2)]
    # the shards' rows, in shard order, are the lists' rows in order, each list's last shard short
    parts = [row for s in shards for row in read_shard_input(stage, s)]
    assert parts == read_url_list(lists[0]).to_pylist() + read_url_list(lists[1]).to_pylist()
    assert (stage / INPUTS / PLAN).is_file()
    # a resumed download reads the committed plan: the lists are not read again
    for spec in lists:
        (tmp_path / spec.path).unlink()
    assert plan_shards(stage, lists, samples_per_shard=1_000) == shards


def test_a_bad_row_deep_in_a_list_fails_the_planning_with_its_file(tmp_path, ray_cluster):
    bad = tmp_path / "list.csv"
    bad.write_text("url,caption\n" + "".join(f"http://e.com/{i}.jpg,x\n" for i in range(5_000)) + "http://e.com/x.jpg,a,b\n")
    with pytest.raises(StageFailed, match="list.csv: cannot read as csv"):
        plan_shards(tmp_path / "stage", (UrlListConfig(path=str(bad), format="csv"),), samples_per_shard=1_000)
    assert not (tmp_path / "stage" / INPUTS / PLAN).exists()


@pytest.mark.parametrize("partitions", [2, 5])
def test_repeated_urls_are_found_across_lists_whatever_the_partitions(tmp_path, ray_cluster, monkeypatch, partitions):
    """The first row (list order, then row order) of each URL is fetched; every later one names its key.
    The decisions are the same on any number of partitions, and the shuffle's files are gone after."""
    from stages.download import urldedup

    monkeypatch.setattr(urldedup, "partitions_for", lambda size: partitions)
    a = [f"http://e.com/{i % 7}.jpg" for i in range(20)]
    b = [f"http://e.com/{i}.jpg " for i in range(5, 15)]   # trailing whitespace: the same URL
    for name, urls in (("a", a), ("b", b)):
        pq.write_table(pa.table({"url": urls, "caption": ["c"] * len(urls)}), tmp_path / f"{name}.parquet")
    lists = tuple(UrlListConfig(path=str(tmp_path / f"{n}.parquet"), format="parquet") for n in "ab")
    stage = tmp_path / f"stage-{partitions}"
    shards = plan_shards(stage, lists, 6, dedup_urls=True)
    found = {}
    for s in shards:
        rows = read_shard_input(stage, s)
        found.update({(s.list_index, row): key for row, key in urldedup.duplicates_in(
            stage / INPUTS, s.list_index, rows[0]["source_row"], rows[-1]["source_row"]).items()})
    first_key = {0: "000000", 1: "000001", 2: "000002", 3: "000003", 4: "000004", 5: "000005", 6: "000010"}
    expected = {(0, i): first_key[i % 7] for i in range(7, 20)}
    expected.update({(1, i - 5): first_key[i] for i in range(5, 7)})   # b's rows 0, 1: URLs 5, 6 of a
    assert found == expected
    assert sorted(p.name for p in (stage / INPUTS).iterdir()) == ["0000.parquet", "0001.parquet",
                                                                "duplicate-urls.parquet", PLAN]
