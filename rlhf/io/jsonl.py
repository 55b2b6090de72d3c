"""JSON-lines output files, written atomically (a reader never sees a half-written file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence


def write_jsonl_atomic(path: str, records: Sequence[dict]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, out)
