"""Score a detection run against ground-truth labels, beside the two baselines providers use today.

Metrics: account precision / recall, benign-account false-positive rate, campaign recall (a true campaign is found
when some detected campaign's majority are its accounts), member coverage per campaign, adjusted Rand index of the
account partition (benign + one cluster per campaign), and exchanges served before first detection (detection
replayed on growing prefixes of the log, every `replay_hours`).

Baselines, scored the same way (each flags accounts, campaigns are not formed):
- `volume`: a per-key volume threshold (requests per API key per day), the rate alert everyone has.
- `prada`: PRADA (Juuti et al., "PRADA: Protecting against DNN Model Stealing Attacks", EuroS&P 2019): per account,
  the minimum distance of each query to the account's previous queries; a Shapiro-Wilk test on those distances
  flags accounts whose distribution is not normal (W < delta). Queries are hashed bags of masked words.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
from pydantic import Field
from scipy.special import comb
from scipy.stats import shapiro

from ..config import Config
from . import detect as det


class ScoreConfig(Config):
    labels: str = Field(..., description="labels.jsonl from `guard simulate`", json_schema_extra={"positional": True})
    detected: str = Field(..., description="output folder of `guard detect`", json_schema_extra={"positional": True})
    logs: list[str] = Field(default_factory=list, description="the access logs (for baselines and replay)")
    out: str | None = Field(None, description="where to write score.json (default: the detect folder)")
    volume_per_day: float = Field(500, description="volume baseline: flag keys above this many requests per day")
    prada_delta: float = Field(0.9, description="PRADA baseline: flag when Shapiro-Wilk W is below this")
    prada_max_queries: int = Field(200, ge=20, description="PRADA baseline: queries per account examined")
    replay_hours: float = Field(0, ge=0, description="replay detection every N hours to time it (0 = off)")


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    s_ij = comb(table, 2).sum()
    s_a, s_b = comb(table.sum(1), 2).sum(), comb(table.sum(0), 2).sum()
    expected = s_a * s_b / comb(len(a), 2)
    top = (s_a + s_b) / 2
    return float((s_ij - expected) / (top - expected)) if top != expected else 1.0


def account_metrics(truth: np.ndarray, flagged: np.ndarray, kind: np.ndarray | None = None) -> dict:
    """Precision, recall, benign FPR; with `kind` (the benign population of each account: regular, pipeline, a
    look-alike's name, ...) also the FPR of each benign population on its own."""
    bad = truth != "benign"
    tp, fp = int((flagged & bad).sum()), int((flagged & ~bad).sum())
    by_kind = {}
    if kind is not None:
        for k in np.unique(kind[~bad]):
            sel = ~bad & (kind == k)
            by_kind[str(k)] = {"accounts": int(sel.sum()), "false_positives": int(flagged[sel].sum()),
                               "fpr": round(float(flagged[sel].mean()), 5)}  # fmt: skip
    return {
        "precision": round(tp / max(1, tp + fp), 4),
        "recall": round(tp / max(1, bad.sum()), 4),
        "benign_fpr": round(fp / max(1, (~bad).sum()), 5),
        "flagged": int(flagged.sum()),
        "false_positives": fp,
        "per_campaign_recall": {c: round(float(flagged[truth == c].mean()), 4) for c in np.unique(truth[bad])},
    } | ({"benign_fpr_by_population": by_kind} if kind is not None else {})


def campaign_metrics(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Campaign recall, member coverage and ARI; `pred` holds a campaign id per account or '' when not flagged."""
    found = {}
    for cid in np.unique(pred[pred != ""]):
        labels, counts = np.unique(truth[pred == cid], return_counts=True)
        major = labels[np.argmax(counts)]
        if major != "benign":
            found.setdefault(major, []).append(str(cid))
    camps = [c for c in np.unique(truth) if c != "benign"]
    coverage = {c: round(float(np.isin(pred[truth == c], found.get(c, [])).mean()), 4) for c in camps}
    return {
        "campaign_recall": round(sum(c in found for c in camps) / max(1, len(camps)), 4),
        "found": {c: found.get(c, []) for c in camps},
        "member_coverage": coverage,
        "ari": round(ari(truth, np.where(pred == "", "benign", pred)), 4),
    }


def _volume_baseline(con, n: int, per_day: float) -> np.ndarray:
    key = "coalesce(api_key_id, CAST(acct AS VARCHAR))"
    rows = con.execute(
        f"SELECT DISTINCT acct FROM (SELECT acct, {key} AS k, floor(t / 86400) AS d, count(*) AS c FROM ev "
        f"GROUP BY 1, 2, 3) WHERE c > {per_day}"
    ).fetchnumpy()
    out = np.zeros(n, bool)
    out[rows["acct"].astype(np.int64)] = True
    return out


def _featurise(prompts: list[str], dim: int = 256) -> np.ndarray:
    x = np.zeros((len(prompts), dim))
    for i, p in enumerate(prompts):
        for w in re.findall(r"[a-z]+|\d+", (p or "").lower()):
            x[i, zlib.crc32(b"0" if w.isdigit() else w.encode()) % dim] += 1  # hash() differs per process
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)


def _prada_baseline(con, n: int, delta: float, max_q: int) -> np.ndarray:
    col = "prompt" if con.execute("SELECT count(prompt) FROM ev").fetchall()[0][0] else "prompt_hash"
    rows = con.execute(
        f"SELECT acct, {col} FROM (SELECT acct, t, {col}, row_number() OVER (PARTITION BY acct ORDER BY t) AS r "
        f"FROM ev) WHERE r <= {max_q} ORDER BY acct, t"
    ).fetchnumpy()
    acct = rows["acct"].astype(np.int64)
    x = _featurise(list(rows[col]))
    out = np.zeros(n, bool)
    starts = np.flatnonzero(np.r_[True, acct[1:] != acct[:-1]])
    ends = np.r_[starts[1:], len(acct)]
    for s, e in zip(starts, ends, strict=True):
        if e - s < 20:  # PRADA needs a growing set of queries before testing
            continue
        v = x[s:e]
        d = np.sqrt(np.maximum(2 - 2 * v @ v.T, 0))  # unit vectors: |a-b|^2 = 2 - 2ab
        mins = np.array([d[i, :i].min() for i in range(1, len(v))])
        if np.ptp(mins) == 0:
            out[acct[s]] = True  # all distances equal: as far from normal as it gets
            continue
        out[acct[s]] = shapiro(mins).statistic < delta
    return out


def run(cfg: ScoreConfig) -> dict:
    t0 = time.time()
    det_dir = Path(cfg.detected)
    acc = pq.read_table(det_dir / "accounts.parquet")
    labels, kinds = {}, {}
    with open(cfg.labels) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                labels[r["account_id"]] = r["label"]
                kinds[r["account_id"]] = r.get("kind") or r["label"]
    ids = acc["account_id"].to_pylist()
    # Accounts with no events in the log cannot be detected: they are left out of every denominator.
    truth = np.array([labels.get(a, "benign") for a in ids])
    kind = np.array([kinds.get(a, "regular") for a in ids])
    flagged = np.asarray(acc["flagged"].to_numpy(zero_copy_only=False), bool)
    pred = np.array([c or "" for c in acc["campaign"].to_pylist()])
    result = {"detector": account_metrics(truth, flagged, kind) | campaign_metrics(truth, pred)}
    if "review" in acc.column_names:  # linked without extraction evidence: for a person to look at, not flagged
        review = np.asarray(acc["review"].to_numpy(zero_copy_only=False), bool)
        benign = truth == "benign"
        found = (flagged | review) & ~benign  # what a reviewer sees: flagged, or linked and put for review
        result["detector"]["for_review"] = {"accounts": int(review.sum()), "benign": int((review & benign).sum()),
                                            "campaign": int((review & ~benign).sum()),
                                            "recall_with_review": round(float(found.sum() / max(1, (~benign).sum())),
                                                                        4)}  # fmt: skip
    if cfg.logs:
        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false; SET TimeZone = 'UTC'")
        det.load(con, det._expand(cfg.logs), None, {f: f for f in ("api_key_id", "prompt", "prompt_hash")})
        order = con.execute("SELECT account_id FROM acc ORDER BY acct").fetchnumpy()["account_id"]
        if list(order) != ids:
            raise ValueError(f"{cfg.logs} are not the logs {det_dir} was computed from (accounts differ)")
        n = len(ids)
        vol = _volume_baseline(con, n, cfg.volume_per_day)
        result["volume_baseline"] = account_metrics(truth, vol) | {"per_day": cfg.volume_per_day}
        prada = _prada_baseline(con, n, cfg.prada_delta, cfg.prada_max_queries)
        result["prada_baseline"] = account_metrics(truth, prada) | {"delta": cfg.prada_delta}
        if cfg.replay_hours > 0:
            result["detector"]["exchanges_before_detection"] = _replay(cfg, con, truth, ids)
        con.close()
    result["seconds"] = round(time.time() - t0, 2)
    out = Path(cfg.out) if cfg.out else det_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "score.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _replay(cfg: ScoreConfig, con, truth: np.ndarray, ids: list[str]) -> dict:
    """Re-run detection on growing prefixes of the log (every `replay_hours`), as a provider running it on a schedule
    would: for each campaign, the exchanges its accounts had been served when the first run that found it ended
    (an upper bound, at the schedule's granularity), out of its total in the log."""
    rows = con.execute("SELECT acct, t FROM ev").fetchnumpy()
    lab = truth[rows["acct"].astype(np.int64)]  # acct i is ids[i] (checked by the caller)
    times = {c: np.sort(rows["t"][lab == c]) for c in np.unique(truth) if c != "benign"}
    t_min, t_max = float(rows["t"].min()), float(rows["t"].max())
    step = cfg.replay_hours * 3600
    cuts = list(np.arange(t_min + step, t_max, step)) + [t_max + 1]  # the last run sees the whole log
    camp_of = dict(zip(ids, truth, strict=True))
    detect_cfg = json.loads((Path(cfg.detected) / "config.json").read_text())
    result: dict[str, dict] = {
        c: {"served": None, "total": len(t), "share_served": None, "detected_at": None, "hours_active": None}
        for c, t in times.items()
    }
    for cut in cuts:
        todo = [c for c, r in result.items() if r["served"] is None]
        if not todo:
            break
        tmp = Path(cfg.detected) / "replay"
        dc = det.DetectConfig(**(detect_cfg | {"out": str(tmp), "until": det._iso(float(cut))}))
        try:
            det.run(dc)
        except det.LogError:  # nothing before this cut yet
            continue
        tab = pq.read_table(tmp / "accounts.parquet", columns=["account_id", "campaign"])
        t = np.array([camp_of.get(a, "benign") for a in tab["account_id"].to_pylist()])
        found = campaign_metrics(t, np.array([c or "" for c in tab["campaign"].to_pylist()]))["found"]
        for c in todo:
            if found.get(c):
                n = int(np.searchsorted(times[c], cut, side="left"))
                result[c] |= {"served": n, "share_served": round(n / max(1, len(times[c])), 4),
                              "detected_at": det._iso(float(cut)),
                              "hours_active": round((cut - times[c][0]) / 3600, 1)}  # fmt: skip
    return {"every_hours": cfg.replay_hours, "campaigns": result}
