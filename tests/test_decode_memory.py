"""A download task asks Ray for one decode's memory (stages/download/stage.py, `task_memory`): a large RGBA
PNG decoded once for each of 16 threads, through the stage's Decoder as fetch_rows's threads do, must
peak within DECODE_BYTES_PER_PIXEL a stored pixel above the process's baseline. When each fetch thread
decoded in turn under a lock, each kept its largest decode in its own malloc arena: 75 bytes a pixel
here, over the 64 then budgeted (stages/download/stage.py, `Decoder`). A memory bound, not a timing: ~10 s, in fresh processes
(tests/decode_memory.py, which measures every format the budget was set from).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from decode_memory import measure
from stages.download.stage import DECODE_BYTES_PER_PIXEL

SIDE = 2500      # 6.25 Mpx: large enough that the decode dwarfs the process's noise, small enough to be fast
THREADS = 16     # glibc makes up to 8 arenas a core: two cores give each of these threads its own


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="the peak is read from /proc (Linux)")
def test_a_large_rgba_decode_in_every_fetch_thread_stays_within_the_decode_budget(tmp_path):
    got = measure("png_rgba", SIDE, SIDE, threads=THREADS, folder=tmp_path, timeout=120)
    assert got["pixels"] == SIDE * SIDE
    assert got["delta"] <= DECODE_BYTES_PER_PIXEL * got["pixels"], (
        f"{got['per_pixel']} bytes a pixel over the baseline, {DECODE_BYTES_PER_PIXEL} budgeted: {got}")
