"""URL lists are cut into shard inputs by Ray tasks; the driver keeps (shard, file, row group, rows)."""
import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import UrlListConfig
from pipeline.data.listplan import INPUTS, PLAN, plan_shards, read_shard_input
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
