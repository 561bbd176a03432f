"""The scan phase's side of the dedup, in each prefilter scan task: a unit's samples (or eval images)
hashed into the exact and band partitions, and their signatures kept for the verifier."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data import neardup
from stages.prefilter.dedup.common import BAND, EXACT, Settings
from pipeline.fsutil import atomic_write_parquet
from pipeline.shuffle import partition_of, write_partitioned


def signature_digests(sigs: list[bytes]) -> np.ndarray:
    """64 bits of SipHash (pandas' C hash, the one URL dedup uses) of each signature: two candidates with
    equal digests have the same signature (the same pixels in other bytes) and are copies without the
    verifier (a false match: ~2^-64 a pair)."""
    values = np.empty(len(sigs), object)
    values[:] = sigs
    return pd.util.hash_array(values, hash_key="vlp-signature-01", categorize=False)


_HEX = np.full(256, -1, np.int64)


_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)


_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def hex_prefix(hashes: pa.Array) -> np.ndarray:
    """The first 15 hex digits (60 bits) of each hash, as integers."""
    digits = _HEX[np.frombuffer("".join(pc.utf8_slice_codeunits(hashes, 0, 15).to_pylist()).encode(), np.uint8)]
    if len(digits) != 15 * len(hashes) or (digits < 0).any():
        raise ValueError("dedup: an exact hash is not a hex digest of at least 15 digits")
    return digits.reshape(-1, 15) @ (np.int64(16) ** np.arange(14, -1, -1, dtype=np.int64))


def write_signatures(root: Path, unit: str, nodes: np.ndarray, sigs: list[bytes | None], items: list[str] | None = None,
                     benchmark: str | None = None) -> None:
    """A unit's scan file with only what the join reads: its nodes (ascending) and their signatures,
    and for an eval unit the name of each image (`items`) and of its benchmark, which a drop it causes
    reports. prefilter's web scan writes the same path with its verdicts and keys too (SCAN)."""
    columns = {"node": nodes, "signature": pa.array(sigs, pa.binary())}
    if items is not None:
        columns |= {"item": pa.array(items, pa.string()), "benchmark": pa.array([benchmark] * len(items), pa.string())}
    atomic_write_parquet(root / "scan" / f"{unit}.parquet", pa.table(columns))


def write_partitions(root: Path, unit: str, nodes: np.ndarray, exact: list[str | None], sigs: list[bytes | None],
                     settings: Settings) -> None:
    """Hash a shard's (or an eval shard's) kept samples (those with an `exact` hash) into the exact and
    band partitions. Their signatures stay in the unit's own scan file (`scan/<unit>.parquet`, node and
    signature columns, written by the caller): only pairs that need the verifier read them."""
    P = settings.partitions
    rows = np.flatnonzero(np.array([e is not None for e in exact], bool))
    exact_col = pa.array([exact[i] for i in rows], pa.string())
    write_partitioned(root / "exact" / f"{unit}.parquet", pa.table([exact_col, nodes[rows]], schema=EXACT),
                      partition_of(hex_prefix(exact_col), P), P)
    if not settings.searches_near:
        return
    with_sig = np.array([i for i in rows if sigs[i] is not None], np.int64)
    picked = [sigs[i] for i in with_sig]
    owner, keys, simhash = neardup.lsh_arrays(neardup.signature_matrix(picked))
    words = simhash.view("<u8")
    digest = signature_digests(picked)
    head = neardup.signature_matrix(picked)[:, :4].copy().view("<u4").ravel() if picked else np.zeros(0, np.uint32)
    band = pa.table([keys.astype(np.int32), nodes[with_sig[owner]], words[owner, 0], words[owner, 1], digest[owner],
                     head[owner]], schema=BAND)
    write_partitioned(root / "band" / f"{unit}.parquet", band, partition_of(keys, P), P)
