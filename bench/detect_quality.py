"""Bench: detection quality on the default simulation over 3 seeds, beside the two baselines providers have today
(a per-key volume alert, PRADA), scored on the same logs in the same run; exchanges each campaign is served before a
scheduled detection run finds it; and the robustness curves (each evasion knob turned, 3 seeds per point).

Every simulation carries the four benign look-alike populations (`guard simulate --lookalikes`: batch pipelines over
several accounts, evaluation harnesses, classrooms, agent frameworks), drawn with look-alike seeds 100 + seed: the
detector was developed on simulation seed 11 with look-alike seed 900 only (TUNING_SEEDS), never on these. The
false-positive rate is reported per benign population. Detection runs twice per seed: with the held-out slice of the
log as its benign reference (the default) and with a trusted benign log (a benign-only simulation, seed 500 + seed).
Then the held-out referee: a second generator written apart from the simulator (bench/_traffic2.py: its own phrasing,
languages, populations and campaign styles), 3 seeds.

    python bench/detect_quality.py                    # 3 seeds at scale 0.025 (7 days) + robustness; ~20 min on 2 cores
    python bench/detect_quality.py --quick            # 1 seed at scale 0.01 (4 days), no robustness; ~1 min
    python bench/detect_quality.py --no-robustness

Prints one JSON line {"bench": "detect_quality", ...}, writes bench/results/detect_quality.json and (with
robustness) bench/results/detect_robustness.md / .json, which docs/guard.md quotes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _traffic2  # bench/ is the script's directory, so on sys.path

from alambic.guard import detect, robustness, score, simulate

RESULTS = Path(__file__).parent / "results"
TUNING_SEEDS = {"seed": 11, "lookalike_seed": 900, "traffic2_seed": 900}  # what the detector was developed on
KEEP = ("recall", "precision", "benign_fpr", "false_positives", "campaign_recall", "benign_fpr_by_population")


def _brief(d: dict) -> dict:
    out = {k: d[k] for k in KEEP if k in d} | {"for_review": d.get("for_review")}
    out["per_campaign_recall"] = {k: float(x) for k, x in d["per_campaign_recall"].items()}
    return out


def one_seed(root: Path, seed: int, scale: float, days: float, replay_hours: float) -> dict:
    assert seed != TUNING_SEEDS["seed"] and 100 + seed != TUNING_SEEDS["lookalike_seed"]
    common = {"scale": scale, "days": days, "release_day": min(4.5, days - 2.5), "format": "parquet"}
    sim = simulate.run(simulate.SimulateConfig(out=str(root / "sim"), seed=seed, lookalikes=list(simulate.LOOKALIKES),
                                               lookalike_seed=100 + seed, **common))  # fmt: skip
    log = sim["files"]["parquet"]
    res = detect.run(detect.DetectConfig(logs=[log], out=str(root / "det")))
    s = score.run(score.ScoreConfig(labels=sim["labels"], detected=str(root / "det"), logs=[log],
                                    replay_hours=replay_hours))  # fmt: skip
    # The same log judged against a trusted benign log (a provider's known-good traffic: here a benign-only draw).
    ref = simulate.run(simulate.SimulateConfig(out=str(root / "ref"), seed=500 + seed, campaigns=[], **common))
    res_t = detect.run(detect.DetectConfig(logs=[log], out=str(root / "det_t"), reference=[ref["files"]["parquet"]]))
    s_t = score.run(score.ScoreConfig(labels=sim["labels"], detected=str(root / "det_t")))["detector"]
    d, v, p = s["detector"], s["volume_baseline"], s["prada_baseline"]
    keep = ("recall", "precision", "benign_fpr", "false_positives")
    return {
        "seed": seed,
        "lookalike_seed": 100 + seed,
        "events": sim["events"],
        "benign_accounts": sim["benign_accounts"] + sum(sim["lookalike_accounts"].values()),
        "lookalike_accounts": sim["lookalike_accounts"],
        "campaign_accounts": sim["campaign_accounts"],
        "detector": {k: d[k] for k in (*keep, "campaign_recall", "ari", "member_coverage")}
        | {"per_campaign_recall": {k: float(x) for k, x in d["per_campaign_recall"].items()},
           "benign_fpr_by_population": d["benign_fpr_by_population"], "for_review": d.get("for_review"),
           "calibration": res["calibration"]},
        "detector_trusted_reference": _brief(s_t) | {"calibration": res_t["calibration"]},
        "volume_baseline": {k: v[k] for k in keep} | {"per_day": v["per_day"]},
        "prada_baseline": {k: p[k] for k in keep} | {"delta": p["delta"]},
        "exchanges_before_detection": d["exchanges_before_detection"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one seed, scale 0.01, 4 days, no robustness")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--replay-hours", type=float, default=6.0, help="detection schedule for exchanges-before-detection")
    ap.add_argument("--no-robustness", action="store_true")
    args = ap.parse_args()
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    scale, days = (0.01, 4.0) if args.quick else (0.025, 7.0)
    t0 = time.time()
    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one_seed(Path(tmp), seed, scale, days, args.replay_hours))
    held_out = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            g = _traffic2.generate(Path(tmp) / "t2", seed=seed)
            det = detect.run(detect.DetectConfig(logs=[g["log"]], out=str(Path(tmp) / "det")))
            d = score.run(score.ScoreConfig(labels=g["labels"], detected=str(Path(tmp) / "det")))["detector"]
            held_out.append({"seed": seed, "events": g["events"], "populations": g["kinds"], **_brief(d),
                             "threshold": det["calibration"]["threshold"]})  # fmt: skip
    line = {"bench": "detect_quality", "quick": args.quick, "scale": scale, "days": days,
            "tuning_seeds": TUNING_SEEDS, "seeds": runs, "independent_generator": held_out}  # fmt: skip
    every = [r["detector"] for r in runs] + [r["detector_trusted_reference"] for r in runs] + held_out
    pops = [p for d in every for p in d["benign_fpr_by_population"].values()]
    worst = {
        "recall_min": min(d["recall"] for d in every),
        "benign_fpr_max": max(d["benign_fpr"] for d in every),
        "population_fpr_max": max(p["fpr"] for p in pops),
        "campaign_recall_min": min(d["campaign_recall"] for d in every),
        "volume_recall_max": max(r["volume_baseline"]["recall"] for r in runs),
        "prada_recall_max": max(r["prada_baseline"]["recall"] for r in runs),
        "prada_fpr_min": min(r["prada_baseline"]["benign_fpr"] for r in runs),
    }
    line["summary"] = worst | {"target_met": worst["recall_min"] >= 0.95 and worst["benign_fpr_max"] <= 0.001
                               and worst["population_fpr_max"] <= 0.001
                               and worst["campaign_recall_min"] == 1.0}  # fmt: skip
    if not (args.quick or args.no_robustness):
        with tempfile.TemporaryDirectory() as tmp:
            robustness.run(robustness.RobustnessConfig(out=tmp, seeds=seeds))
            shutil.copy(Path(tmp) / "robustness.md", RESULTS / "detect_robustness.md")
            shutil.copy(Path(tmp) / "robustness.json", RESULTS / "detect_robustness.json")
        line["robustness"] = str(RESULTS / "detect_robustness.md")
    line["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("detect_quality_quick.json" if args.quick else "detect_quality.json")).write_text(
        json.dumps(line, indent=1) + "\n"
    )
    print(json.dumps(line))


if __name__ == "__main__":
    main()
