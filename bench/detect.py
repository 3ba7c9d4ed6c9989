"""Bench: detect distillation campaigns in a large synthetic access log (default 16M events, ~24k campaign accounts
among 200k benign), beside the per-key volume baseline. Measures wall time and peak memory of detection.

    python bench/detect.py            # full: scale 1.0 (~16M events); target <= 10 min and <= 12 GiB
    python bench/detect.py --quick    # small run, under a minute

Prints one JSON line {"bench": "detect", ...} and writes bench/results/detect.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from alambic.guard import detect, score, simulate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small run (scale 0.01, 4 days)")
    ap.add_argument("--scale", type=float, default=None, help="simulation scale (1.0 = ~16M events)")
    ap.add_argument("--keep", default=None, help="folder to keep the simulated log in")
    args = ap.parse_args()
    scale = args.scale or (0.01 if args.quick else 1.0)
    days = 4.0 if args.quick else 7.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        t0 = time.time()
        sim = simulate.run(simulate.SimulateConfig(out=str(root / "sim"), scale=scale, days=days,
                                                   release_day=days - 2.5, format="parquet"))  # fmt: skip
        t_sim = time.time() - t0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.time()
        res = detect.run(detect.DetectConfig(logs=[sim["files"]["parquet"]], out=str(root / "detect")))
        t_detect = time.time() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; includes the simulation's peak
        sc = score.run(score.ScoreConfig(labels=sim["labels"], detected=str(root / "detect"),
                                         logs=[] if not args.quick else [sim["files"]["parquet"]]))  # fmt: skip
    d = sc["detector"]
    line = {
        "bench": "detect",
        "quick": args.quick,
        "events": sim["events"],
        "accounts": sim["accounts"],
        "campaign_accounts": sum(sim["campaign_accounts"].values()),
        "simulate_s": round(t_sim, 1),
        "detect_s": round(t_detect, 1),
        "events_per_s": round(sim["events"] / t_detect),
        "peak_rss_gib": round(peak / 2**20, 2),
        "peak_rss_before_detect_gib": round(rss_before / 2**20, 2),
        "recall": d["recall"],
        "benign_fpr": d["benign_fpr"],
        "campaign_recall": d["campaign_recall"],
        "campaigns": res["campaign_sizes"],
    }
    if "volume_baseline" in sc:
        line["volume_baseline_recall"] = sc["volume_baseline"]["recall"]
        line["volume_baseline_fpr"] = sc["volume_baseline"]["benign_fpr"]
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "detect.json").write_text(json.dumps(line, indent=2) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
