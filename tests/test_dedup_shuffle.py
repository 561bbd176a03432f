"""Distributed dedup (stages/prefilter/dedup/) decides as the one-pass rule does, on any number of partitions
and workers: copies of eval images, then exact copies, then near copies of a kept image, in node order."""
import hashlib
import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages.prefilter.dedup import band as dedup_band, common as dedup, phases as dedup_phases, resolve as dedup_resolve
from stages.prefilter.dedup import scan as dedup_scan
from pipeline.executor import RAY
from pipeline.data import neardup
from pipeline.toyweb import lookalikes

SHARDS, PER_SHARD = 4, 40


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def corpus():
    """(web shards: [(exact, signature)], eval shard): lookalike pictures with their near copies,
    exact copies, blanks of a few colours (copies among them), a chain A~B~C, eval leaks."""
    rng = random.Random(3)
    items = [(hashlib.sha256(x.jpeg).hexdigest(), x.jpeg) for x in lookalikes.generate(10, seed=2)]
    items += [items[rng.randrange(len(items))] for _ in range(12)]                 # exact copies
    for grey in (250, 250, 251, 200, 120, 120):                                       # blanks, some copies
        data = _jpeg(Image.new("RGB", (64, 64), (grey, grey, grey)))
        items.append((hashlib.sha256(data + bytes([grey, len(items)])).hexdigest(), data))
    base = Image.new("RGB", (64, 64), (40, 90, 160))
    ImageDraw.Draw(base).ellipse((10, 10, 40, 40), fill=(230, 200, 30))
    for shift in (0, 2, 4):                                                           # a chain of small moves
        moved = Image.new("RGB", (64, 64), (40, 90, 160))
        moved.paste(base.crop((0, 0, 64 - shift, 64)), (shift, 0))
        data = _jpeg(moved)
        items.append((hashlib.sha256(data).hexdigest(), data))
    leaked = items[0]
    items += [leaked, leaked]   # exact copies of a picture an eval image re-encodes: all three are contaminated
    rng.shuffle(items)
    evals = [items[i][1] for i in (1, 5)] + [_jpeg(Image.open(io.BytesIO(items[9][1])), quality=70),
                                             _jpeg(Image.open(io.BytesIO(leaked[1])), quality=70)]
    sign = lambda data: neardup.signature(Image.open(io.BytesIO(data)))  # noqa: E731
    web = [(e, sign(d)) for e, d in items]
    shards = [web[i::SHARDS] for i in range(SHARDS)]
    return shards, [(hashlib.sha256(d).hexdigest(), sign(d)) for d in evals]


def _sequential(shards, evals, s: dedup.Settings) -> dict[int, str]:
    """The reference: one pass in node order, with neardup's index."""
    nodes = [((i << 32) + j, e, sig) for i, shard in enumerate(shards) for j, (e, sig) in enumerate(shard)]
    eval_near = neardup.NearDuplicateIndex(s.decontaminate_max_distance)
    for _, sig in evals:
        eval_near.add(sig)
    eval_exact = {e for e, _ in evals}
    reason = {}
    for node, e, sig in nodes:
        if s.decontaminate and (e in eval_exact or eval_near.find(sig) is not None):
            reason[node] = "eval_contaminated"
    first = {}
    for node, e, _ in nodes:
        if node not in reason:
            if s.exact and e in first:
                reason[node] = "duplicate_exact"
            first.setdefault(e, node)
    near = neardup.NearDuplicateIndex(s.near_max_distance)
    for node, _, sig in nodes:
        if node not in reason:
            if s.near and near.find(sig) is not None:
                reason[node] = "duplicate_near"
            else:
                near.add(sig)
    return reason


def _scan(root, unit: str, nodes: np.ndarray, items, s: dedup.Settings) -> None:
    """What prefilter's scan leaves for the shuffle: the partitions and the unit's signatures."""
    dedup_scan.write_partitions(root, unit, nodes, [e for e, _ in items], [sig for _, sig in items], s)
    dedup_scan.write_signatures(root, unit, nodes, [sig for _, sig in items])


def _distributed(tmp_path, shards, evals, s: dedup.Settings, cpus: float) -> dict[int, str]:
    root = tmp_path / f"dedup-{abs(hash((s, cpus)))}"
    for i, shard in enumerate(shards):
        _scan(root, str(i), (i << 32) + np.arange(len(shard), dtype=np.int64), shard, s)
    if s.decontaminate:
        _scan(root, "eval-0", dedup.EVAL + np.arange(len(evals), dtype=np.int64), evals, s)
    summary = dedup_phases.run_phases(RAY, root, len(shards), s, {"cpus": cpus})
    got = {}
    for i in range(len(shards)):
        got |= dedup.decisions_of(root, i)
    assert summary["dropped"] == len(got)
    if s.near:   # re-encoded copies need the verifier; copies of the same pixels and blanks do not
        assert summary["candidate_pairs"] > 0 and summary["verified_edges"] > 0 and summary["copy_edges"] > 0, summary
    return got


@pytest.mark.parametrize("partitions, cpus", [(1, 2), (3, 1), (8, 1)])
def test_same_decisions_as_one_pass_on_any_partitions_and_workers(tmp_path, corpus, ray_cluster, partitions, cpus):
    shards, evals = corpus
    s = dedup.Settings(partitions, True, True, True, 0.08, 0.1)
    expected = _sequential(shards, evals, s)
    reasons = set(expected.values())
    assert reasons == {"eval_contaminated", "duplicate_exact", "duplicate_near"}, reasons
    assert _distributed(tmp_path, shards, evals, s, cpus) == expected


def test_switches(tmp_path, corpus, ray_cluster):
    shards, evals = corpus
    for s in (dedup.Settings(2, False, True, False, 0.08, 0.1), dedup.Settings(2, True, False, True, 0.08, 0.1),
              dedup.Settings(2, True, False, False, 0.08, 0.1)):
        expected = _sequential(shards, evals, s)
        assert _distributed(tmp_path, shards, evals, s, 1) == expected, s


def test_a_folder_from_the_one_task_resolve_is_redone_past_its_scans(tmp_path, corpus, ray_cluster):
    """A dedup folder left by a vlp before the distributed resolve (exact drops and edges in one row
    group, a `resolve` marker) is resumed: its scans are kept, its later phases run again, and the
    decisions are those of a fresh run."""
    import pyarrow.parquet as pq

    shards, evals = corpus
    s = dedup.Settings(3, True, True, True, 0.08, 0.1)
    expected = _distributed(tmp_path, shards, evals, s, 1)
    root = tmp_path / f"dedup-{abs(hash((s, 1)))}"
    for folder in ("exact_out", "edges"):          # the old layout: one row group a file
        for f in (root / folder).glob("*.parquet"):
            pq.write_table(pq.read_table(f), f)
    (root / "phases-layout.json").unlink()
    for marker in (root / "done").glob("d*-*"):    # decide, decisions: phases the old layout did not have
        marker.unlink()
    (root / "done" / "resolve-all").write_text("{}")
    scans = sorted(m.name for m in (root / "done").glob("scan-*"))
    dedup_phases.run_phases(RAY, root, len(shards), s, {"cpus": 1})
    assert sorted(m.name for m in (root / "done").glob("scan-*")) == scans
    assert not (root / "done" / "resolve-all").exists()
    got = {}
    for i in range(len(shards)):
        got |= dedup.decisions_of(root, i)
    assert got == expected


@pytest.mark.parametrize("picture", [False, True])
def test_a_giant_bucket_is_cut_not_squared(tmp_path, ray_cluster, picture):
    """3,000 copies of one image (a white blank, or a picture) in other bytes share every key: the band
    join cuts each bucket into runs of BUCKET_CAP nodes (counted), instead of ~4.5M pairs; each run
    keeps one copy, and no pair needs the verifier (equal signatures)."""
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    if picture:
        ImageDraw.Draw(image).ellipse((10, 12, 40, 50), fill=(200, 30, 60))
    sig = neardup.signature(image)
    assert neardup.decode(sig).blank != picture
    shards = [[(hashlib.sha256(f"{i}-{j}".encode()).hexdigest(), sig) for j in range(1_000)] for i in range(3)]
    s = dedup.Settings(2, True, True, False, 0.08, 0.1)
    root = tmp_path / "giant"
    for i, shard in enumerate(shards):
        _scan(root, str(i), (i << 32) + np.arange(len(shard), dtype=np.int64), shard, s)
    summary = dedup_phases.run_phases(RAY, root, len(shards), s, {"cpus": 1})
    assert summary["buckets_cut"] > 0 and summary["candidate_pairs"] == 0
    runs = -(-3_000 // dedup_band.BUCKET_CAP)
    assert summary["dropped"] == summary["near"] == 3_000 - runs


def _greedy_in_order(a: np.ndarray, b: np.ndarray) -> set[int]:
    """The greedy rule walked node by node, as prefilter's one pass did."""
    sources: dict[int, list[int]] = {}
    for x, y in zip(a.tolist(), b.tolist()):
        sources.setdefault(y, []).append(x)
    kept, dropped = set(), set()
    for node in sorted(set(a.tolist()) | set(b.tolist())):
        (dropped if any(x in kept for x in sources.get(node, ())) else kept).add(node)
    return dropped


def test_greedy_rounds_decide_as_the_walk_in_node_order():
    """The near rule decided in rounds of arrays: a chain keeps every other node, a clique its smallest,
    and random graphs (long chains, stars, cliques mixed) as the walk in node order does."""
    chain = np.arange(1, 6)
    assert dedup_resolve.greedy_drops(chain[:-1], chain[1:]).tolist() == [2, 4]
    clique = np.array([(x, y) for x in range(10, 14) for y in range(x + 1, 14)])
    assert dedup_resolve.greedy_drops(clique[:, 0], clique[:, 1]).tolist() == [11, 12, 13]
    assert dedup_resolve.greedy_drops(np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == []
    rng = np.random.default_rng(5)
    for trial in range(30):
        n, m = int(rng.integers(5, 300)), int(rng.integers(1, 600))
        x, y = rng.integers(0, n, m), rng.integers(0, n, m)
        x, y = np.minimum(x, y)[x != y], np.maximum(x, y)[x != y]
        x, y = (x << 32) + 7, (y << 32) + 7   # nodes as the shuffle numbers them: far apart, unordered ids
        assert set(dedup_resolve.greedy_drops(x, y).tolist()) == _greedy_in_order(x, y), trial


def test_each_near_drop_names_the_kept_node_it_copies():
    """The keeper of a near drop is a kept source, the closest if several (the smaller node on a tie):
    the chain A~B~C drops B for A and keeps C; in a clique every later node names the first."""
    chain = np.array([0, 1, 2])
    assert [x.tolist() for x in dedup_resolve.greedy_keepers(chain[:-1], chain[1:], np.array([0.01, 0.02]))] == \
        [[1], [0], [0.01]]
    a, b = np.array([10, 10, 10, 11, 11, 12]), np.array([11, 12, 13, 12, 13, 13])
    dropped, keeper, _ = dedup_resolve.greedy_keepers(a, b, np.full(6, 0.03))
    assert dropped.tolist() == [11, 12, 13] and keeper.tolist() == [10, 10, 10]
    # 5 copies both 3 and 4 (kept, distinct): it names the closer; at equal distance, the smaller
    dropped, keeper, distance = dedup_resolve.greedy_keepers(np.array([3, 4]), np.array([5, 5]), np.array([0.05, 0.02]))
    assert (dropped.tolist(), keeper.tolist(), distance.tolist()) == ([5], [4], [0.02])
    assert dedup_resolve.greedy_keepers(np.array([3, 4]), np.array([5, 5]), np.array([0.02, 0.02]))[1].tolist() == [3]
