"""Bench: detect distillation campaigns in a large synthetic access log (default ~16M events, ~24k campaign accounts
among 200k benign), beside the per-key volume alert providers run today, on the same log in the same run.

    python bench/detect.py            # full: scale 1.0, 7.5 days (>= 16M events); target <= 10 min and <= 12 GiB
    python bench/detect.py --quick    # small run, under a minute

Each stage runs in its own fresh process so its wall time, CPU time and peak RSS (getrusage in that process:
DuckDB's memory is in-process) are its own: `simulate` (the log generator, reported separately), `detect`, and the
`volume` baseline (requests per API key per day over a threshold, one DuckDB query over the same Parquet file).
Detection quality is scored against the simulation's labels for both. Prints one JSON line {"bench": "detect", ...}
and writes bench/results/detect.json (detect_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
from pathlib import Path

from _results import publish  # bench/ is the script's directory, so on sys.path

GIB = 2**20  # ru_maxrss is in KiB on Linux


def _child(fn, args, queue) -> None:
    t0 = time.time()
    out = fn(*args)
    use = resource.getrusage(resource.RUSAGE_SELF)
    queue.put({"result": out, "wall_s": round(time.time() - t0, 1), "cpu_s": round(use.ru_utime + use.ru_stime, 1),
               "peak_rss_gib": round(use.ru_maxrss / GIB, 2)})  # fmt: skip


def measured(fn, *args) -> dict:
    """Run fn(*args) in a fresh spawned process; its result, wall time and peak RSS."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    res = q.get()
    p.join()
    if p.exitcode:
        raise RuntimeError(f"{fn.__name__} failed with exit code {p.exitcode}")
    return res


def simulate_log(out: str, scale: float, days: float, seed: int) -> dict:
    from alambic.guard import simulate

    return simulate.run(simulate.SimulateConfig(out=out, scale=scale, days=days, release_day=days - 2.5, seed=seed,
                                                format="parquet"))  # fmt: skip


def detect_log(log: str, out: str, threads: int, memory_limit: str) -> dict:
    from alambic.guard import detect

    res = detect.run(detect.DetectConfig(logs=[log], out=out, threads=threads, memory_limit=memory_limit))
    keep = ("events", "accounts", "flagged_accounts", "campaigns", "campaign_sizes", "review_accounts", "review_sizes",
            "calibration", "seconds", "stage_seconds")
    return {k: res[k] for k in keep}


def volume_baseline(log: str, per_day: float, threads: int) -> list[str]:
    """The rate alert everyone has: accounts with an API key above `per_day` requests on some day."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false; SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {threads}")
    rows = con.execute(
        f"SELECT DISTINCT account_id FROM (SELECT account_id, api_key_id, date_trunc('day', ts) AS d, count(*) AS c "
        f"FROM read_parquet('{log}') GROUP BY ALL) WHERE c > {per_day}"
    ).fetchall()
    return [r[0] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small run (scale 0.01, 4 days)")
    ap.add_argument("--scale", type=float, default=None, help="simulation scale (1.0 = 200k benign + 24k campaign)")
    ap.add_argument("--days", type=float, default=None, help="simulated days (default 7.5: >= 16M events at scale 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="DuckDB threads for detect and the baseline (0 = all)")
    ap.add_argument("--memory-limit", default="8GB", help="DuckDB memory limit for detect (spills beyond it)")
    ap.add_argument("--volume-per-day", type=float, default=500, help="volume baseline threshold")
    ap.add_argument("--keep", default=None, help="folder to keep the simulated log and detection in")
    args = ap.parse_args()
    scale = args.scale or (0.01 if args.quick else 1.0)
    days = args.days or (4.0 if args.quick else 7.5)

    import numpy as np

    from alambic.guard import score

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        sim = measured(simulate_log, str(root / "sim"), scale, days, args.seed)
        log = sim["result"]["files"]["parquet"]
        det = measured(detect_log, log, str(root / "detect"), args.threads, args.memory_limit)
        vol = measured(volume_baseline, log, args.volume_per_day, args.threads)
        s = score.run(score.ScoreConfig(labels=sim["result"]["labels"], detected=str(root / "detect")))["detector"]
        labels = {}
        with open(sim["result"]["labels"]) as f:
            for line in f:
                r = json.loads(line)
                labels[r["account_id"]] = r["label"]
        import pyarrow.parquet as pq

        ids = pq.read_table(root / "detect" / "accounts.parquet", columns=["account_id"])["account_id"].to_pylist()
    truth = np.array([labels.get(a, "benign") for a in ids])
    vol_flag = np.isin(np.array(ids), np.array(vol["result"], dtype=object))
    v = score.account_metrics(truth, vol_flag)
    r = sim["result"]
    line = {
        "bench": "detect",
        "quick": args.quick,
        "scale": scale,
        "days": days,
        "seed": args.seed,
        "events": r["events"],
        "accounts": r["accounts"],
        "benign_accounts": r["benign_accounts"],
        "campaign_accounts": sum(r["campaign_accounts"].values()),
        "campaign_events": r["campaign_events"],
        "simulate_s": sim["wall_s"],
        "simulate_cpu_s": sim["cpu_s"],
        "simulate_peak_rss_gib": sim["peak_rss_gib"],
        "detect_s": det["wall_s"],
        "detect_cpu_s": det["cpu_s"],
        "detect_stage_s": det["result"]["stage_seconds"],
        "detect_peak_rss_gib": det["peak_rss_gib"],
        "detect_events_per_s": round(r["events"] / det["wall_s"]),
        "volume_baseline_s": vol["wall_s"],
        "volume_baseline_cpu_s": vol["cpu_s"],
        "volume_baseline_peak_rss_gib": vol["peak_rss_gib"],
        "detect_time_vs_volume_baseline": round(det["wall_s"] / max(vol["wall_s"], 1e-9), 1),
        "target_met": det["wall_s"] <= 600 and det["peak_rss_gib"] <= 12,
        "stretch_met": det["wall_s"] <= 300 and det["peak_rss_gib"] <= 8,
        "recall": s["recall"],
        "precision": s["precision"],
        "benign_fpr": s["benign_fpr"],
        "campaign_recall": s["campaign_recall"],
        "per_campaign_recall": {k: float(x) for k, x in s["per_campaign_recall"].items()},
        "ari": s["ari"],
        "campaign_sizes": det["result"]["campaign_sizes"],
        "review_sizes": det["result"]["review_sizes"],
        "calibration": det["result"]["calibration"],
        "volume_baseline_recall": v["recall"],
        "volume_baseline_fpr": v["benign_fpr"],
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores (shared with other jobs)",
        "threads": args.threads,
        "memory_limit": args.memory_limit,
    }
    publish("detect_quick" if args.quick else "detect", line)


if __name__ == "__main__":
    main()
