"""Robustness curves: detector recall and benign false-positive rate as each evasion knob is turned.

For each knob (`paraphrase`, `jitter`, `benign_mix`, `rotation`) and value, simulate with that knob set (others at
their defaults), detect, score. Returns the rows and writes them as a Markdown table (`out`/robustness.md) that
docs/guard.md includes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pydantic import Field

from ..config import Config
from . import detect, score, simulate


class RobustnessConfig(Config):
    out: str = Field("runs/guard-robustness", description="output folder", json_schema_extra={"positional": True})
    knobs: list[str] = Field(default_factory=lambda: ["paraphrase", "jitter", "benign_mix", "rotation"],
                             description="evasion knobs of SimulateConfig to turn")  # fmt: skip
    values: list[float] = Field(default_factory=lambda: [0.0, 0.3, 0.6, 0.9], description="knob values to try")
    scale: float = Field(0.01, gt=0, description="simulation scale per point")
    days: float = Field(4.0, description="simulated days per point")
    seeds: list[int] = Field(default_factory=lambda: [0], description="seeds averaged per point")


def run(cfg: RobustnessConfig) -> dict:
    rows = []
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for knob in cfg.knobs:
        for v in cfg.values:
            for seed in cfg.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    sim = simulate.run(simulate.SimulateConfig(
                        out=f"{tmp}/sim", scale=cfg.scale, days=cfg.days, release_day=cfg.days - 1.5, seed=seed,
                        format="parquet", **{knob: min(v, 0.9) if knob == "benign_mix" else v}))  # fmt: skip
                    detect.run(detect.DetectConfig(logs=[sim["files"]["parquet"]], out=f"{tmp}/det"))
                    d = score.run(score.ScoreConfig(labels=sim["labels"], detected=f"{tmp}/det"))["detector"]
                rows.append({"knob": knob, "value": v, "seed": seed, "recall": d["recall"],
                             "benign_fpr": d["benign_fpr"], "campaign_recall": d["campaign_recall"],
                             "per_campaign_recall": d["per_campaign_recall"]})  # fmt: skip
    lines = [
        "| knob | value | recall | benign FPR | campaigns found | hydra | low_slow |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pc = r["per_campaign_recall"]
        lines.append(f"| {r['knob']} | {r['value']} | {r['recall']:.3f} | {r['benign_fpr']:.4f} | "
                     f"{r['campaign_recall']:.2f} | {pc.get('hydra', 0):.2f} | "
                     f"{pc.get('low_slow', 0):.2f} |")  # fmt: skip
    (out / "robustness.md").write_text("\n".join(lines) + "\n")
    (out / "robustness.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return {"points": len(rows), "table": str(out / "robustness.md")}
