"""metrics.jsonl: one JSON record per logged training step, appended by rank 0."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """The records of metrics.jsonl; a line torn by a kill mid-write (the last one) is left out."""
    records = []
    for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records
