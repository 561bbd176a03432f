"""Small pieces with exact answers: shard bytes, the rules, the toy world (near dedup: test_neardup.py)."""
import re

import pytest
import webdataset as wds

from pipeline.toyweb.config import ToyWebConfig

from stages.prefilter.config import DEFAULT_BOILERPLATE, PrefilterConfig
from pipeline.data.shards import read_shard, write_shard
from pipeline.toyweb.world import ToyWorld
from pipeline.manifest import Accounting
from stages.download.stage import failure_reason
from stages.prefilter.stage import caption_rule, image_rule


def _samples(n):
    return [{"__key__": f"{i:09d}", "jpg": bytes([i]) * 10, "txt": f"caption {i}".encode(), "json": b"{}"}
            for i in range(n)]


def test_shards_are_byte_reproducible_and_webdataset_readable(tmp_path):
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(a, _samples(5))
    write_shard(b, list(reversed(_samples(5))))  # order of arrival does not matter
    assert a.read_bytes() == b.read_bytes()
    got = list(wds.WebDataset(str(a), shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"{i:09d}" for i in range(5)]
    assert [s["__key__"] for s in read_shard(a)] == [s["__key__"] for s in got]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


CFG = PrefilterConfig()
PATTERNS = [re.compile(p, re.IGNORECASE) for p in DEFAULT_BOILERPLATE]


@pytest.mark.parametrize("txt, meta, reason", [
    (b"a large red circle on the left", {}, None),
    (b"", {}, "caption_empty"),
    (b"   ", {}, "caption_empty"),
    (b"", {"caption_error": "not_utf8"}, "caption_not_utf8"),
    (b"\xff\xfe bad", {}, "caption_not_utf8"),
    (b"cat", {}, "caption_too_short"),
    (b"abc de", {}, None),
    (b"x" * 1001 + b" y", {}, "caption_too_long"),
    (b"IMG_2931.JPG", {}, "caption_boilerplate"),
    (b"click to enlarge this", {}, "caption_boilerplate"),
    (b"stock photo", {}, "caption_boilerplate"),
    (b"untitled-3.png", {}, "caption_boilerplate"),
])
def test_caption_rules(txt, meta, reason):
    assert caption_rule(txt, meta, CFG, PATTERNS) == reason


@pytest.mark.parametrize("w, h, reason", [(64, 64, None), (31, 200, "image_too_small"), (40, 121, "aspect_ratio_too_large"),
                                          (120, 40, None)])
def test_image_rules(w, h, reason):
    assert image_rule(w, h, CFG) == reason


@pytest.mark.parametrize("message, reason", [
    ("Image decoding error", "decode_error"), ("image area too large", "image_too_large"),
    ("image too small", "image_too_small"), ("aspect ratio too large", "aspect_ratio_too_large"),
    ("something new", "other_error"),
])
def test_resizer_failure_reasons(message, reason):
    assert failure_reason(message) == reason


def test_accounting_must_add_up():
    acc = Accounting(samples_in=3, samples_kept=1)
    acc.dropped["x"] += 1
    with pytest.raises(AssertionError, match="3 samples in, but kept \\+ dropped \\+ failed = 2"):
        acc.check("here")
    acc.failed["y"] += 1
    acc.check("here")


def test_toy_world_is_deterministic_and_noisy_at_the_configured_rates():
    cfg = ToyWebConfig(num_urls=4000)
    a, b = ToyWorld(cfg), ToyWorld(cfg)
    assert a.item(123) == b.item(123) and a.render(a.item(123)) == b.render(b.item(123))
    items = [a.item(i) for i in range(4000)]
    noisy = sum(it.noise != "none" for it in items) / 4000
    assert abs(noisy - cfg.noise.total()) < 0.03
    faults = sum(it.fault != "none" for it in items) / 4000
    assert abs(faults - cfg.faults.total()) < 0.02
    clean = [a.item(i) for i in range(4000, 4000 + cfg.eval_size)]
    assert all(it.split == "eval" and it.noise == "none" and it.fault == "none" for it in clean)
    for it in items:
        if it.duplicate_of >= 0:
            assert a.item(it.duplicate_of).render_index == it.render_index


def test_the_tokenizer_reads_a_bounded_seeded_sample_of_captions_and_all_of_a_small_run(tmp_path):
    import collections

    from pipeline.data.shards import write_shard
    from pipeline.data.tokenizer import build_vocab
    from stages.pretrain.stage import sample_captions

    def shards(folder):
        paths = []
        for i in range(5):
            path = folder / f"{i:05d}.tar"
            write_shard(path, [{"__key__": f"{i}{j}", "txt": f"shard {i} caption {j} red circle".encode(),
                                "jpg": b"x"} for j in range(4)])
            paths.append(str(path))
        return paths

    here, moved = shards(tmp_path / "a"), shards(tmp_path / "b")
    seen = []
    few = list(sample_captions(here, 7, seed=3, seen=seen))
    assert len(few) == 7 and seen == [7]
    assert len({c.split()[1] for c in few}) == 2, "whole shards at a time: 7 captions come from 2 shards"
    assert few == list(sample_captions(moved, 7, seed=3)), "a moved run samples the same captions"
    assert few != list(sample_captions(here, 7, seed=4))
    everything = list(sample_captions(here, 1000, seed=3))
    assert collections.Counter(everything) == collections.Counter(
        f"shard {i} caption {j} red circle" for i in range(5) for j in range(4))
    assert build_vocab(everything, 80) == build_vocab(sorted(everything), 80), "the vocabulary ignores order"
