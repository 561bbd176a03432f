"""Webdataset shards -> training batches, split across ranks and loader workers, resumable exactly.

Training is counted in steps, and each rank's stream is endless: in epoch e the shards are permuted
with (seed, e); when there are at least as many shards as streams (ranks x loader workers) each
stream reads every n-th shard of that order, otherwise every stream reads all shards and keeps every
n-th sample. Samples are shuffled within a shard. So an *epoch* is one pass of all streams over all
shards; ranks never wait for one another at an epoch boundary, and with uneven shards a rank may
start its next epoch a little earlier than another.

Every batch says which stream produced it and how many raw samples (bad ones included) that stream had
consumed through it; a checkpoint keeps those counts, and a resumed stream skips that many raw samples
without decoding them, so training continues with exactly the next samples. Shards are read with
`read_input_shard`: a sample with no image or caption never enters a stream (pretrain's driver counts
the seed set's), no member we do not own is handed on, and a cut shard is an InputError naming it.
"""
from __future__ import annotations

import io
import logging
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from pipeline.data.shards import ShardCheck, read_input_shard
from pipeline.storage import as_path
from pipeline.threads import prefetched

log = logging.getLogger("vlp")


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[str, ...]
    rank: int
    world: int
    seed: int
    batch_size: int
    image_size: int
    max_text_len: int
    tokenizer_dir: str
    augment: bool = True
    num_workers: int = 0
    caption_prefix: str = ""
    """Text put before every caption (the captioner's prompt)."""
    holdout: float = 0.0
    """Share of samples left out of the stream, chosen by key (see `in_holdout`), e.g. for calibration."""


def in_holdout(key: str, share: float) -> bool:
    """Whether a sample belongs to the held-out `share`: a hash of its key, so the same samples on every
    rank, every run and every reader."""
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") < share * 2 ** 32


class _RateLimitedLog:
    def __init__(self, every: float = 10.0):
        self.every, self.last, self.suppressed = every, 0.0, 0

    def warn(self, msg: str, *args) -> None:
        now = time.time()
        if now - self.last >= self.every:
            extra = f" (+{self.suppressed} similar)" if self.suppressed else ""
            log.warning(msg + extra, *args)
            self.last, self.suppressed = now, 0
        else:
            self.suppressed += 1


class ShardStream(torch.utils.data.IterableDataset):
    def __init__(self, spec: StreamSpec, skip: dict[int, int] | None = None):
        super().__init__()
        self.spec = spec
        self.skip = dict(skip or {})
        self._tok = None

    def _stream_id(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker, workers

    def raw_samples(self, worker: int, workers: int):
        """Endless (epoch, raw sample) sequence of one stream, before any decoding."""
        s = self.spec
        streams, me = s.world * workers, s.rank * workers + worker
        epoch = 0
        while True:
            order = sorted(s.shards, key=lambda p: as_path(p).name)
            random.Random(f"{s.seed}:{epoch}").shuffle(order)
            by_shard = len(order) >= streams
            mine = order[me::streams] if by_shard else order
            counter = 0
            for shard in mine:
                # a sample with no image or caption (the seed set is the user's) is not in the stream at all,
                # nor is a member we do not own; pretrain's driver counted them (stages/pretrain/stage.py)
                samples = list(read_input_shard(as_path(shard), ShardCheck()))
                # seeded by the shard name, not its path: a copied or moved run shuffles the same way
                random.Random(f"{s.seed}:{epoch}:{as_path(shard).name}").shuffle(samples)
                for sample in samples:
                    if s.holdout and in_holdout(sample["__key__"], s.holdout):
                        continue
                    if by_shard or counter % streams == me:
                        yield sample
                    counter += 1
            epoch += 1

    def __iter__(self):
        from pipeline.data.tokenizer import load_tokenizer

        s = self.spec
        worker, workers = self._stream_id()
        tok = load_tokenizer(s.tokenizer_dir)
        bad = _RateLimitedLog()
        consumed, bad_count = 0, 0
        images, captions = [], []
        for sample in self.raw_samples(worker, workers):
            consumed += 1
            if consumed <= self.skip.get(worker, 0):
                continue  # resuming: these were trained on before the checkpoint
            try:
                # one RNG per sample position: the same crop whether or not the run was resumed
                rng = np.random.default_rng([s.seed, s.rank, worker, consumed]) if s.augment else None
                images.append(decode_image(sample["jpg"], s.image_size, rng))
                captions.append(s.caption_prefix + sample["txt"].decode("utf-8"))
            except Exception as err:  # noqa: BLE001 (a bad sample is counted and skipped)
                bad_count += 1
                if len(images) > len(captions):
                    images.pop()
                bad.warn("skipping bad sample %s: %s", sample.get("__key__"), err)
                continue
            if len(images) == s.batch_size:
                enc = tok(captions, padding="max_length", truncation=True, max_length=s.max_text_len,
                          return_tensors="pt")
                yield {"images": torch.stack(images), "ids": enc["input_ids"], "mask": enc["attention_mask"],
                       "worker": worker, "consumed": consumed, "bad": bad_count}
                images, captions = [], []


MEAN = np.array([0.5, 0.5, 0.5], dtype=np.float32)
STD = np.array([0.5, 0.5, 0.5], dtype=np.float32)


def decode_image(data: bytes, size: int, rng: np.random.Generator | None) -> torch.Tensor:
    """JPEG bytes -> normalised [3, size, size]. Augmentation is a mild random crop (90-100% of the
    area, no flips: captions say left and right)."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if rng is not None:
            w, h = img.size
            scale = rng.uniform(0.9, 1.0) ** 0.5
            cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x, y, x + cw, y + ch))
        img = img.resize((size, size), Image.Resampling.BICUBIC)
        arr = (np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def make_loader(spec: StreamSpec, skip: dict[int, int] | None = None, prefetch: int = 0):
    """The batches of `spec`'s stream. `prefetch` > 0 with no loader workers: a thread of this process
    prepares that many batches ahead, in the same order (one producer: the same batches, bit for bit).
    Decoding and tokenising 64 samples took ~30 ms, ~15% of a demo step, in series with the model; PIL,
    the Rust tokenizer and torch's kernels release the GIL, so the next batch is made while a step trains
    or while a rank waits for the other at an all-reduce (docs/architecture.md, "pretrain")."""
    # Loader workers start from a fork server, not by forking this process: it is a Ray worker (or driver)
    # with Ray's threads and gRPC channels, and a fork of it once left a child hung on a futex while the
    # parent's Ray core died on a corrupted pubsub reply ("publisher_id is empty"), ending pytest silently.
    context = "forkserver" if spec.num_workers else None
    loader = torch.utils.data.DataLoader(ShardStream(spec, skip), batch_size=None, num_workers=spec.num_workers,
                                         persistent_workers=False, multiprocessing_context=context)
    if not prefetch or spec.num_workers:
        return loader
    # transformers is imported here, not first in the thread: its lazy imports fail ("cannot import name
    # 'AutoTokenizer'") when two threads import it at once, as the caller may be doing
    from transformers import AutoTokenizer  # noqa: F401

    return prefetched(loader, prefetch)
