"""Threads of a process. `prefetched`: work a thread does ahead of its consumer, without Ray (the CapFilt
actors' decoding and the training loader's batches, pipeline/data/loader.py, overlap with the model this
way). `cpu_threads`: how many threads torch computes on while a task runs, from the CPUs it was given."""
from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from typing import Iterable, Iterator


def pin_cpu_threads(cpus: float) -> int:
    """Compute on `cpus` threads (at least 1) from now on in this process: an actor's, which is its own.

    Set by the executor, not left to the process: Ray runs a task in a pooled worker whose torch keeps the
    thread count of the first task it ran (a 1-CPU evaluate task before CapFilt left 2-CPU fine-tunes on
    one thread, and their bits depended on that history). torch is not imported for this: code that
    imports it later reads the count from OMP_NUM_THREADS, set here too."""
    threads = max(1, int(cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    return threads


@contextlib.contextmanager
def cpu_threads(cpus: float) -> Iterator[int]:
    """`pin_cpu_threads` inside the block (a task's call), the previous count after it. Where torch was
    first imported inside the block it keeps the block's count, having none before. Not for concurrent
    callers in one process: the count is the process's."""
    env = os.environ.get("OMP_NUM_THREADS")
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield pin_cpu_threads(cpus)
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env
        if torch is not None:
            torch.set_num_threads(before)


def prefetched(items: Iterable, depth: int) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead of the consumer (decode overlapping inference).
    An error in the producer is raised in the consumer, at the item it would have been; a consumer that
    stops early stops the producer at its next item."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        """Wait for room, unless the consumer has gone; False then."""
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as err:  # noqa: BLE001 (handed to the consumer, which raises it)
            put(("error", err))

    thread = threading.Thread(target=produce, name="vlp-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
