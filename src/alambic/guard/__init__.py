"""The provider's side: simulate API traffic, detect distillation campaigns in it, and score the detector.

Stages (each a `Config` subclass plus `run(cfg) -> dict`): `simulate`, `detect`, `score`, `robustness`.
"""
