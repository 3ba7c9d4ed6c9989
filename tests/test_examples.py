"""Every example config under examples/ is valid for every verb it has a section for (no drift from the code)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from alambic.collect import CollectConfig
from alambic.evaluate import EvaluateConfig
from alambic.loop import LoopConfig
from alambic.train.trainer import TrainConfig

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
VERBS = {"collect": CollectConfig, "train": TrainConfig, "evaluate": EvaluateConfig, "loop": LoopConfig}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_resolves(path):
    data = tomllib.loads(path.read_text())
    sections = [k for k, v in data.items() if isinstance(v, dict)]
    assert sections and set(sections) <= set(VERBS), sections
    for verb in sections:
        cfg = VERBS[verb].resolve(path, section=verb)  # raises on an unknown key or a bad value
        for key, value in data[verb].items():
            assert getattr(cfg, key) == value, (verb, key)
