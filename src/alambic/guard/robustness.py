"""Robustness curves: detector recall and benign false-positive rate as each evasion knob is turned.

For each knob (`paraphrase`, `jitter`, `benign_mix`, `rotation`), value and seed, simulate with that knob set (others
at their defaults), detect, score. Writes every row (`out`/robustness.json) and a Markdown table over seeds
(`out`/robustness.md: mean and range of recall, worst false-positive rate, per-campaign recall, and which campaigns
were lost at which seed) that docs/guard.md includes.
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
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="seeds per point")


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
                             "recall_with_review": d.get("for_review", {}).get("recall_with_review", d["recall"]),
                             "benign_fpr": d["benign_fpr"], "campaign_recall": d["campaign_recall"],
                             "per_campaign_recall": {k: float(x) for k, x in d["per_campaign_recall"].items()},
                             "found": sorted(c for c, ids in d["found"].items() if ids)})  # fmt: skip
    (out / "robustness.md").write_text(table(rows))
    (out / "robustness.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    return {"points": len(rows), "table": str(out / "robustness.md")}


def table(rows: list[dict]) -> str:
    """One line per (knob, value): recall mean [min-max] over seeds, mean share of campaign accounts flagged or put
    for review, worst benign FPR, campaigns found (worst seed), mean recall per campaign, and the campaigns not found
    with the seeds where they were lost."""
    camps = list(simulate.PLAYBOOKS)
    lines = [
        "| knob | value | recall mean [min-max] | flagged or for review | benign FPR max | campaigns found (worst) | "
        + " | ".join(camps)
        + " | lost (seed) |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(camps) + "---|",
    ]
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault((r["knob"], r["value"]), []).append(r)
    for (knob, value), rs in points.items():
        rec = [r["recall"] for r in rs]
        seen = [r.get("recall_with_review", r["recall"]) for r in rs]
        per = [sum(r["per_campaign_recall"].get(c, 0) for r in rs) / len(rs) for c in camps]
        lost = [f"{c} ({r['seed']})" for r in rs for c in camps if c not in r["found"]]
        lines.append(
            f"| {knob} | {value} | {sum(rec) / len(rec):.3f} [{min(rec):.2f}-{max(rec):.2f}] | "
            f"{sum(seen) / len(seen):.3f} | "
            f"{max(r['benign_fpr'] for r in rs):.4f} | {min(r['campaign_recall'] for r in rs):.2f} | "
            + " | ".join(f"{x:.2f}" for x in per)
            + f" | {', '.join(lost) or '-'} |"
        )
    return "\n".join(lines) + "\n"
