"""Named points where a test can kill the driver, to prove a kill at exactly that point loses nothing.

`VLP_CRASH_AT=<name>` in the environment makes `crash_point(<name>)` SIGKILL its own process: no
clean-up, no finally blocks, as a power cut or the OOM killer would. Unset (always, outside tests),
a crash point is one dictionary lookup.
"""
from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("VLP_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
