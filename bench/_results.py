"""The benchmark convention in one place: print one JSON line of figures, keep it in bench/results/NAME.json."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def publish(name: str, result: dict) -> Path:
    """Print `result` as one JSON line and write it to bench/results/NAME.json; returns that path."""
    print(json.dumps(result))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
