"""Work a thread does ahead of its consumer, without Ray: the CapFilt actors' decoding and the training
loader's batches (pipeline/data/loader.py) both overlap with the model this way."""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator


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
