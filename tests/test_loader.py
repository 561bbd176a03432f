"""The training input pipeline and the tokenizer: splits, exact resume, bad samples, vocabulary."""

import pytest
import torch

from pipeline.data.loader import ShardStream, StreamSpec
from pipeline.data.shards import encode_json, write_shard
from pipeline.data.tokenizer import build_vocab, load_tokenizer, train_tokenizer
from pipeline.errors import InputError

CAPTIONS = ["a large red circle on the left", "small blue square, top, striped backdrop",
            "photo of a small green cross at the bottom"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(CAPTIONS * 10, 120, folder)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """5 shards of 7 samples; sample 3 of shard 2 is not an image."""
    from PIL import Image
    import io

    folder = tmp_path_factory.mktemp("shards")
    paths = []
    for s in range(5):
        samples = []
        for i in range(7):
            buf = io.BytesIO()
            Image.new("RGB", (20, 30), (s * 40, i * 30, 100)).save(buf, "JPEG")
            jpg = b"not a jpeg" if (s, i) == (2, 3) else buf.getvalue()
            samples.append({"__key__": f"{s:05d}{i:04d}", "jpg": jpg, "txt": CAPTIONS[i % 3].encode(),
                            "json": encode_json({"s": s, "i": i})})
        path = folder / f"{s:05d}.tar"
        write_shard(path, samples)
        paths.append(str(path))
    return tuple(paths)


def _spec(shards, tokenizer_dir, rank=0, world=1, **kw):
    return StreamSpec(shards=shards, rank=rank, world=world, seed=3, batch_size=4, image_size=16, max_text_len=12,
                      tokenizer_dir=str(tokenizer_dir), **kw)


def _keys(stream, n_raw):
    return [s["__key__"] for _, s in zip(range(n_raw), stream.raw_samples(0, 1))]


def test_tokenizer_vocabulary_is_real_and_deterministic(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok) == len(build_vocab(CAPTIONS * 10, 120)) <= 120
    assert tok.convert_ids_to_tokens(tok("a large red circle")["input_ids"]) == ["[CLS]", "a", "large", "red", "circle", "[SEP]"]
    again = tmp_path / "again"
    train_tokenizer(CAPTIONS * 10, 120, again)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    with pytest.raises(InputError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_a_word_of_one_caption_is_spelled_in_pieces_not_given_a_row_to_memorise(tmp_path):
    captions = CAPTIONS * 10 + ["qwzqkj kkzw", "a red kkzw"]   # one-off noise; "kkzw" twice
    tok = train_tokenizer(captions, 120, tmp_path / "tok")
    assert len(tok) < 120, "the budget has room: the word is left out by its count, not by the budget"
    pieces = tok.convert_ids_to_tokens(tok("qwzqkj kkzw")["input_ids"])
    assert pieces == ["[CLS]", "q", "##w", "##z", "##q", "##k", "##j", "kkzw", "[SEP]"]
    assert "qwzqkj" in build_vocab(captions, 120, min_count=1), "min_count 1 keeps every word that fits"


def test_ranks_split_the_shards_without_overlap(shards, tokenizer_dir):
    epoch = [set(_keys(ShardStream(_spec(shards, tokenizer_dir, rank=r, world=2)), 14)) for r in range(2)]
    # 5 shards over 2 ranks: one rank reads 3 shards (21 samples), the other 2 (14) in epoch 0
    assert not epoch[0] & epoch[1]
    # fewer shards than streams: every stream reads all shards and keeps every n-th sample
    few = shards[:1]
    split = [_keys(ShardStream(_spec(few, tokenizer_dir, rank=r, world=3)), 2) for r in range(3)]
    assert len({k for part in split for k in part}) == 6


def test_batches_count_bad_samples_and_resume_exactly(shards, tokenizer_dir):
    stream = ShardStream(_spec(shards, tokenizer_dir))
    batches = [b for _, b in zip(range(12), iter(stream))]
    assert all(b["images"].shape == (4, 3, 16, 16) and b["ids"].shape == (4, 12) for b in batches)
    assert batches[-1]["bad"] >= 1, "the broken image was counted"
    # resume after batch 5 from the recorded position: the same next batches, bit for bit
    resumed = ShardStream(_spec(shards, tokenizer_dir), skip={0: batches[4]["consumed"]})
    again = [b for _, b in zip(range(7), iter(resumed))]
    for a, b in zip(batches[5:], again):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["ids"], b["ids"])
        assert a["consumed"] == b["consumed"]


def test_epochs_reshuffle_and_cover_every_sample(shards, tokenizer_dir):
    keys = _keys(ShardStream(_spec(shards, tokenizer_dir)), 70)
    first, second = keys[:35], keys[35:]
    assert sorted(first) == sorted(second) and len(set(first)) == 35
    assert first != second, "a new epoch, a new order"


def test_loader_workers_share_a_rank_without_overlap(shards, tokenizer_dir):
    from pipeline.data.loader import make_loader

    loader = make_loader(_spec(shards, tokenizer_dir, num_workers=2))
    batches = [b for _, b in zip(range(6), loader)]
    assert {b["worker"] for b in batches} == {0, 1}
    # each worker's position only grows, and it is what a checkpoint stores per worker
    for w in (0, 1):
        positions = [b["consumed"] for b in batches if b["worker"] == w]
        assert positions == sorted(positions)


def test_prefetch_yields_the_same_batches_and_raises_the_producers_error(shards, tokenizer_dir):
    from pipeline.data.loader import make_loader
    from pipeline.threads import prefetched

    spec = _spec(shards, tokenizer_dir, rank=1, world=2)
    plain, ahead = iter(make_loader(spec, {0: 3})), make_loader(spec, {0: 3}, prefetch=2)
    assert not isinstance(ahead, torch.utils.data.DataLoader)
    for _ in range(12):   # past an epoch's end: the same images, ids, masks and counts, in the same order
        a, b = next(plain), next(ahead)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    ahead.close()

    def broken():
        yield 1
        raise InputError("shard 7 is cut")

    items = prefetched(broken(), 2)
    assert next(items) == 1
    with pytest.raises(InputError, match="shard 7 is cut"):
        next(items)
    assert list(prefetched(iter([1, 2, 3]), 1)) == [1, 2, 3]
