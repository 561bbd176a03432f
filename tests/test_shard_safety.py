"""Shards hold data, not code; checkpoints load no code; the smaller guards of the security review:
URL lists that are not URL lists, binary caption columns, the job's shell command, the token file."""
from __future__ import annotations

import os
import pickle
import random
import stat
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import UrlListConfig
from pipeline.data.shards import write_shard
from pipeline.data.urllists import read_url_list
from pipeline.errors import InputError
from stages.pretrain.train.checkpoints import restore_rng, rng_state, safe_loads
from webguard import jpeg


class Payload:
    """Unpickling this creates a file: the stand-in for running an attacker's code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def planted_shard(path: Path, marker: Path) -> None:
    """A download-like shard whose second sample carries a pickled `.pyd` member."""
    samples = [{"__key__": f"k{i}", "jpg": jpeg(), "txt": b"a red circle", "json": b"{}"} for i in range(2)]
    samples[1]["pyd"] = pickle.dumps(Payload(marker))
    write_shard(path, samples)


def test_prefilter_writes_only_its_own_members(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.prefilter.dedup import common as dedup
    from stages.prefilter.stage import write_shard_task

    marker = tmp_path / "pwned"
    planted_shard(tmp_path / "in.tar", marker)
    # what the scan and dedup passes leave for the write task: both samples kept, nothing dropped
    root = tmp_path / "out" / "dedup"
    (root / "scan").mkdir(parents=True)
    (root / "decisions").mkdir()
    pq.write_table(pa.table({"key": ["k0", "k1"], "node": [0, 1], "outcome": ["kept", "kept"], "reason": [None, None],
                             "error": [None, None], "signature": [b"sig", b"sig"]}, schema=dedup.SCAN),
                   root / "scan" / "0.parquet")
    pq.write_table(pa.table({"node": pa.array([], pa.int64()), "reason": pa.array([], pa.string())}),
                   root / "decisions" / "0.parquet")
    stats = write_shard_task(str(tmp_path / "in.tar"), str(tmp_path / "out"), "00000.tar", 0, str(root))
    assert stats["members_dropped"] == {"pyd": 1} and stats["accounting"]["samples_kept"] == 2
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        assert sorted({m.name.split(".", 1)[1] for m in tar}) == ["jpg", "json", "txt"]
    assert not marker.exists()


def test_the_readme_loader_never_unpickles(tmp_path):
    import webdataset as wds

    marker = tmp_path / "pwned"
    planted_shard(tmp_path / "planted.tar", marker)
    # the README's line, on a shard someone else wrote
    ds = wds.WebDataset(str(tmp_path / "planted.tar"), shardshuffle=False).decode(
        "pil", only=["jpg", "txt", "json"]).to_tuple("jpg", "txt", "json")
    assert len(list(ds)) == 2 and not marker.exists()
    # what the README used to say runs the planted code: the test above can fail
    list(wds.WebDataset(str(tmp_path / "planted.tar"), shardshuffle=False).decode("pil"))
    assert marker.exists()


def test_checkpoint_files_load_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"rng": Payload(marker)}, tmp_path / "rank-0.pt")
    with safe_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "rank-0.pt", weights_only=False)   # as DeepSpeed's own loaders ask
    assert not marker.exists()


def test_rng_state_round_trips_as_plain_tensors(tmp_path):
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    random.random(), np.random.normal(), torch.rand(1), torch.rand(1, generator=generator)  # move every state
    torch.save(rng_state(generator), tmp_path / "rank-0.pt")
    expected = (random.random(), np.random.normal(), float(torch.rand(1)), float(torch.rand(1, generator=generator)))
    random.seed(9), np.random.seed(9), torch.manual_seed(9), generator.manual_seed(9)
    with safe_loads():
        restore_rng(torch.load(tmp_path / "rank-0.pt"), generator)
    assert (random.random(), np.random.normal(), float(torch.rand(1)), float(torch.rand(1, generator=generator))) \
        == expected


def test_binary_garbage_is_no_url_list(tmp_path):
    garbage = tmp_path / "cc3m.tsv"
    garbage.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(20000)))
    with pytest.raises(InputError, match="no row holds an http"):
        read_url_list(UrlListConfig(path=str(garbage), format="cc3m"))


def test_a_binary_caption_column_is_decoded_not_stringified(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["http://example.com/a.jpg", "http://example.com/b.jpg"],
                             "caption": pa.array([b"a red circle", b"\xff\xfe not utf-8"], pa.binary())}), path)
    table = read_url_list(UrlListConfig(path=str(path), format="parquet"))
    assert table.column("caption").to_pylist() == ["a red circle", None]
    assert table.column("caption_error").to_pylist() == [None, "not_utf8"]


def test_the_job_command_quotes_the_run_directory(tmp_path):
    from cluster.jobs import job_entrypoint

    marker = tmp_path / "pwned"
    run_root = tmp_path / f"run$(touch {marker})`touch {marker}`"   # never created: cd fails
    command = job_entrypoint(run_root, ["run", "x.yaml"], tmp_path / ".submitted-1")
    code = tmp_path / "working_dir"   # as Ray unpacks the job's code: the command copies it first
    code.mkdir()
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30, cwd=code,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 2 and "is not visible from the head node" in done.stdout
    assert str(run_root) in done.stdout and not marker.exists()
    assert not list(tmp_path.glob("vlp-job-code-*")), "the private copy of the code is removed at exit"


def test_the_local_token_file_is_its_owners_only(tmp_path, monkeypatch):
    from cluster.auth import secure_local_token

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "ray" / "auth_token"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    path = secure_local_token()
    assert os.environ["RAY_AUTH_MODE"] == "token" and stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text()
    assert len(token) == 64
    path.chmod(0o644)   # as Ray 2.60 writes it
    assert secure_local_token() == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token   # tightened, not replaced


def test_the_job_upload_leaves_secrets_out():
    from cluster.jobs import EXCLUDES

    for name in (".env", "*.pem", "*.key", "id_rsa*", ".aws", ".ssh", "auth_token"):
        assert name in EXCLUDES
