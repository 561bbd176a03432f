"""What every stage gets besides its own config: where to write and which inputs it reads."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.runs import RunDir, StageDir


@dataclass(frozen=True)
class StageContext:
    run: RunDir
    out: StageDir
    fingerprint: str
    input_fingerprints: tuple[str, ...]
    seed: int
