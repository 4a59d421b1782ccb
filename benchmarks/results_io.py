"""What the benchmark scripts share: writing their results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, results: dict[str, Any]) -> None:
    """Write `results` as indented JSON to `path` (its folder made if missing), and say so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
