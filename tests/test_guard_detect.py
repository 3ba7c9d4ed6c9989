"""guard: simulate -> detect -> score end to end on a small simulation, plus the bad-input and statistics contracts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from alambic.guard import detect, score, simulate


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    summary = simulate.run(simulate.SimulateConfig(out=str(out), scale=0.01, days=4, release_day=2.5, format="both"))
    return out, summary


def test_end_to_end_meets_targets(sim, tmp_path):
    out, summary = sim
    assert summary["events"] > 10_000 and set(summary["campaign_accounts"]) == set(simulate.PLAYBOOKS)
    res = detect.run(detect.DetectConfig(logs=[str(out / "access.parquet")], out=str(tmp_path)))
    assert res["malformed"] == {} and res["signals_skipped"] == {}
    s = score.run(score.ScoreConfig(labels=str(out / "labels.jsonl"), detected=str(tmp_path)))["detector"]
    assert s["recall"] >= 0.9, s
    assert s["benign_fpr"] <= 0.002, s  # 2000 benign accounts: at most ~4 false positives
    assert s["campaign_recall"] == 1.0, s  # every playbook found, the low-and-slow one included
    # What a reviewer is shown (flagged, or linked and listed for review) includes every flagged campaign account.
    r = s["for_review"]
    assert s["recall"] - 1e-4 <= r["recall_with_review"] <= 1
    assert r["recall_with_review"] >= s["recall"] + r["campaign"] / sum(summary["campaign_accounts"].values()) - 1e-3
    campaigns = json.loads((tmp_path / "campaigns.json").read_text())
    assert all(c["evidence"] and c["q_value"] <= 0.01 for c in campaigns)
    acc = pq.read_table(tmp_path / "accounts.parquet").to_pydict()
    assert all(0 <= p <= 1 for p in acc["p_value"]) and all(0 <= q <= 1 for q in acc["q_value"])
    assert all(e for e, f in zip(acc["evidence"], acc["flagged"], strict=True) if f)
    assert "# Distillation campaigns" in (tmp_path / "report.md").read_text()
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and all(f'id="{c["id"]}"' in html for c in campaigns)
    assert "<script" not in html and "src=" not in html  # self-contained, nothing fetched


def test_missing_required_field_is_named(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text('{"request_id": "r1", "account_id": "a"}\n{"request_id": "r2", "account_id": "b"}\n')
    with pytest.raises(detect.LogError, match="ts"):
        detect.run(detect.DetectConfig(logs=[str(log)], out=str(tmp_path / "d")))


def test_unreadable_parquet_is_a_clear_error(tmp_path):
    log = tmp_path / "a.parquet"
    log.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(detect.LogError, match="not a readable Parquet file"):
        detect.run(detect.DetectConfig(logs=[str(log)], out=str(tmp_path / "d")))


def _lines(n: int, **extra) -> list[str]:
    rows = []
    for i in range(n):
        ts = f"2026-03-02T{i % 24:02d}:{i % 60:02d}:00Z" if i % 2 else 1772409600 + i * 60  # ISO or epoch seconds
        rows.append(json.dumps({"ts": ts, "request_id": f"r{i}", "account_id": f"a{i % 7}", **extra}))
    return rows


def test_malformed_lines_counted_not_fatal(tmp_path):
    log = tmp_path / "a.jsonl"
    lines = _lines(60, prompt="Explain step by step: 2 + 2")
    lines[3] = "{not json"
    lines[10] = '["a list"]'
    lines[20] = json.dumps({"ts": "yesterday-ish", "account_id": "a1"})
    log.write_text("\n".join(lines) + "\n")
    res = detect.run(detect.DetectConfig(logs=[str(log)], out=str(tmp_path / "d")))
    assert sum(res["malformed"].values()) == 3
    assert res["events"] == 57
    assert {e["line"] for e in res["malformed_examples"]} >= {4, 11, 21}


def test_signal_skipped_and_named_when_field_absent(tmp_path):
    log = tmp_path / "a.jsonl"
    log.write_text("\n".join(_lines(80, prompt="Reverse 1 2 3", n_messages=1)) + "\n")
    res = detect.run(detect.DetectConfig(logs=[str(log)], out=str(tmp_path / "d")))
    for name, field in [("payment", "payment_fp"), ("ip_prefix", "ip"), ("pivot", "model"), ("logprobs", "logprobs")]:
        assert field in res["signals_skipped"][name]
    assert "elicit_share" in res["signals_used"] and "single_turn" in res["signals_used"]
    assert "payment" in (tmp_path / "d" / "report.md").read_text()


def test_bh_matches_hand_computation():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted: 0.005, 0.01, 0.03, 0.04, 0.5 -> p*m/rank: 0.025, 0.025, 0.05, 0.05, 0.5 (then running min from the top)
    expected = np.array([0.025, 0.05, 0.05, 0.025, 0.5])
    np.testing.assert_allclose(detect.bh(p), expected)
    assert (detect.bh(np.array([0.2, 0.9, 1.0])) <= 1).all()
    assert set(np.flatnonzero(detect.bh(p) <= 0.05)) == {0, 1, 2, 3}


def test_robust_z_uses_the_bulk():
    x = np.r_[np.zeros(95), np.full(5, 10.0)]
    z = detect.robust_z(x + np.linspace(0, 0.1, 100))
    assert z[:95].max() < 3 < z[95:].min()


def test_small_heavy_campaign_among_small_benign_accounts_flags_no_benign(tmp_path):
    """The demo's shape: two days of mostly tiny benign accounts, plus a few keys sending thousands of templated
    skill prompts with logprobs. Shrinking tiny accounts towards the pooled rate (which that campaign inflates) once
    flagged ~1% of the benign accounts; none may be flagged, and the keys must form one campaign."""
    from alambic import tasks

    sim = simulate.run(simulate.SimulateConfig(out=str(tmp_path / "b"), scale=0.004, days=2, campaigns=[], seed=1))
    prompts = [ex.prompt for ex in tasks.generate(None, 2400, "train", seed=0)]  # the demo's prompts are distinct
    rows = []
    for k in range(4):
        for i in range(600):
            ts = f"2026-03-03T23:{(i // 60) % 60:02d}:{i % 60:02d}.{k:03d}Z"
            rows.append(json.dumps({
                "ts": ts, "account_id": f"acct_bulk_{k}", "api_key_id": f"key_bulk_{k}", "ip": "203.0.113.7",
                "user_agent": "python-httpx/0.28.1", "model": "teacher-x",
                "prompt": prompts[i * 4 + k],
                "n_messages": 1, "max_tokens": 160, "temperature": 0.0, "logprobs_requested": True,
            }))  # fmt: skip
    (tmp_path / "bulk.jsonl").write_text("\n".join(rows) + "\n")
    res = detect.run(
        detect.DetectConfig(logs=[sim["files"]["jsonl"], str(tmp_path / "bulk.jsonl")], out=str(tmp_path / "d"))
    )
    acc = pq.read_table(tmp_path / "d" / "accounts.parquet", columns=["account_id", "flagged", "campaign"]).to_pylist()
    bulk = [a for a in acc if a["account_id"].startswith("acct_bulk_")]
    benign_flagged = [a["account_id"] for a in acc if a["flagged"] and not a["account_id"].startswith("acct_bulk_")]
    assert res["accounts"] > 500 and benign_flagged == []
    assert all(a["flagged"] for a in bulk) and len({a["campaign"] for a in bulk}) == 1


@pytest.mark.slow
def test_exchanges_before_detection_replayed_in_time_order(tmp_path):
    """Detection re-run every 24 h on the log so far: each campaign's exchanges served before the run that found it,
    checked against a count made here from the log and the labels."""
    sim = simulate.run(simulate.SimulateConfig(out=str(tmp_path / "s"), scale=0.004, days=3, release_day=1.5,
                                               format="parquet", seed=2))  # fmt: skip
    log = sim["files"]["parquet"]
    detect.run(detect.DetectConfig(logs=[log], out=str(tmp_path / "d")))
    res = score.run(score.ScoreConfig(labels=sim["labels"], detected=str(tmp_path / "d"), logs=[log], replay_hours=24))
    replay = res["detector"]["exchanges_before_detection"]["campaigns"]
    assert set(replay) == set(simulate.PLAYBOOKS)
    events = pq.read_table(log, columns=["ts", "account_id"]).to_pydict()
    label = {json.loads(x)["account_id"]: json.loads(x)["label"] for x in open(sim["labels"])}
    for camp, r in replay.items():
        assert r["served"] is not None, (camp, r)  # every campaign is found by the end of the window
        cut = np.datetime64(r["detected_at"].rstrip("Z"), "ms")
        mine = sum(label[a] == camp and np.datetime64(t.replace(tzinfo=None), "ms") < cut
                   for t, a in zip(events["ts"], events["account_id"], strict=True))  # fmt: skip
        assert r["served"] == mine and r["total"] == sim["campaign_events"][camp] and 0 < r["served"] <= r["total"]
    # Found before the end of the window, not only with hindsight: the first daily run already sees most campaigns.
    assert sum(r["share_served"] < 1 for r in replay.values()) >= 3, replay


def test_template_keys_match_the_plain_sql_minhash():
    """_head_keys (masking per distinct word, hashing per distinct shingle) gives the keys of the plain SQL MinHash."""
    import duckdb

    heads = ["Add 41 and 7 for Alice", "Add 3 and 950 for Bob", "one", "", "a  Bob b", "tab\tCarol 12x", "Zed  ",
             "Explain the reasoning behind this step by step as if you had written it yourself please"]  # fmt: skip
    con = duckdb.connect()
    con.execute("CREATE TABLE ev AS SELECT unnest($1::VARCHAR[]) AS head", [heads])
    got = {r["head"]: (r["k0"], r["k1"], r["k2"]) for r in detect._head_keys(con).to_pylist()}
    mh = ", ".join(f"list_min(list_transform(sh, lambda s: hash(s, {j}))) AS h{j}" for j in range(12))
    want = con.execute(f"""
        WITH m AS (SELECT head, string_split({detect._mask_sql("head")}, ' ') AS w FROM ev),
        s AS (SELECT head, CASE WHEN len(w) > 1
                 THEN list_transform(range(1, len(w)), lambda i: w[i] || ' ' || w[i + 1]) ELSE w END AS sh FROM m),
        h AS (SELECT head, {mh} FROM s)
        SELECT head, hash(h0, h1, h2, h3), hash(h4, h5, h6, h7), hash(h8, h9, h10, h11) FROM h
    """).fetchall()  # fmt: skip
    assert got == {r[0]: tuple(r[1:]) for r in want}
    assert got[heads[0]] == got[heads[1]]  # digits and capitalised names are masked: one template


def _community(rows: list[list[int]]):
    from scipy import sparse

    r = [i for i, arts in enumerate(rows) for _ in arts]
    c = [a for arts in rows for a in arts]
    return sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), max(c) + 1))


def test_split_separates_campaigns_joined_by_a_few_accounts():
    # Two campaigns (own templates 0-2 and 3-4) and a shared camouflage cell (5) that 3 accounts of each act on.
    a = [[0, 1, 2]] * 27 + [[0, 1, 2, 5]] * 3
    b = [[3, 4]] * 17 + [[3, 4, 5]] * 3
    part = detect.split_community(_community(a + b), resolution=1.0, max_bridge=0.25)
    assert len(set(part[:30])) == 1 and len(set(part[30:])) == 1 and part[0] != part[30]


def test_split_keeps_one_campaign_whole():
    # One campaign whose accounts each use a few of its templates, cards shared by 3 accounts: no cut to find.
    rng = np.random.default_rng(0)
    rows = [sorted({*rng.choice(5, 2, replace=False).tolist(), 5 + i // 3}) for i in range(40)]
    assert set(detect.split_community(_community(rows), resolution=1.0, max_bridge=0.25)) == {0}


def test_campaign_settings_apply_and_bad_ones_are_named():
    books = simulate.playbooks(["low_slow.accounts=25000", "hydra.mix=0.7", "agentic.templates=agent,code,cot"])
    assert books["low_slow"].accounts == 25000 and books["hydra"].mix == 0.7
    assert books["agentic"].templates == ["agent", "code", "cot"] and simulate.PLAYBOOKS["hydra"].mix == 0.5
    for bad, named in [("low_slow.acounts=5", "FIELD one of"), ("hydra.mix=lots", "not a float"),
                       ("hydra.schedule=burst", "waves, steady"), ("nope.rate=3", "NAME one of")]:  # fmt: skip
        with pytest.raises(ValueError, match=named):
            simulate.SimulateConfig(campaign=[bad])


def _batch_rows(n_acc: int, extract: bool, seed: int = 0) -> list[str]:
    """One organisation's batch job over `n_acc` accounts: one shared template, machine-paced, 24/7, single turn,
    shared card and system prompt. With `extract`, the same accounts instead ask for reasoning traces over a sweep of
    capabilities (arithmetic, programs, tool calls, string and list tasks), with logprobs and long completions."""
    from alambic import tasks

    rng = np.random.default_rng(seed)
    payloads = [ex.prompt for ex in tasks.generate(None, 500, "train", seed=seed)]
    rows = []
    for k in range(n_acc):
        for i in range(400):
            t = 1772409600 + 2 * 86400 * (i + rng.random() * 0.2) / 400  # two days, evenly paced
            if extract:
                prompt = (
                    "Think through the following carefully, showing every intermediate step before the final "
                    f"answer. Problem: {payloads[(i * n_acc + k) % len(payloads)]} (variant {i * n_acc + k})"
                )
            else:
                prompt = (
                    f"Classify this support ticket as billing, bug or other. Ticket {rng.integers(10**5, 10**6)}: "
                    + " ".join(
                        rng.choice(["login", "refund", "slow", "crash", "invoice", "charged", "twice", "app"], 8)
                    )
                )
            rows.append(json.dumps({
                "ts": float(t), "account_id": f"acct_batch_{k}", "api_key_id": f"key_batch_{k}",
                "ip": f"198.51.100.{k + 2}", "user_agent": "python-requests/2.32.3", "payment_fp": "pm_org",
                "system_prompt_hash": "sys_org", "model": "alambic-m1", "prompt": prompt, "n_messages": 1,
                "max_tokens": 4096 if extract else 64, "temperature": 0.0, "logprobs_requested": extract,
                "completion_tokens": int(rng.integers(600, 1500)) if extract else int(rng.integers(1, 5)),
            }))  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def background(tmp_path_factory):
    out = tmp_path_factory.mktemp("bg")
    return simulate.run(simulate.SimulateConfig(out=str(out), scale=0.01, days=2, release_day=1, campaigns=[],
                                                seed=3, format="parquet"))  # fmt: skip


@pytest.mark.parametrize("extract", [False, True])
def test_batch_job_over_accounts_is_for_review_until_it_extracts(background, tmp_path, extract):
    """Issue 16: one organisation's batch job (shared template, card, system prompt; high volume, regular, single
    turn) is coordination, not extraction: reported for review, never flagged. The same accounts eliciting reasoning
    traces over a sweep of capabilities, with logprobs, are a campaign."""
    (tmp_path / "batch.jsonl").write_text("\n".join(_batch_rows(12, extract)) + "\n")
    res = detect.run(detect.DetectConfig(logs=[background["files"]["parquet"], str(tmp_path / "batch.jsonl")],
                                         out=str(tmp_path / "d")))  # fmt: skip
    acc = pq.read_table(tmp_path / "d" / "accounts.parquet").to_pylist()
    batch = [a for a in acc if a["account_id"].startswith("acct_batch_")]
    others = [a["account_id"] for a in acc if a["flagged"] and not a["account_id"].startswith("acct_batch_")]
    assert others == [] and len(batch) == 12
    if extract:
        assert all(a["flagged"] for a in batch) and len({a["campaign"] for a in batch}) == 1
    else:
        assert not any(a["flagged"] for a in batch) and res["flagged_accounts"] == 0
        assert all(a["review"] for a in batch) and len({a["review_group"] for a in batch}) == 1
        review = json.loads((tmp_path / "d" / "review.json").read_text())
        assert review[0]["status"] == "review" and review[0]["purpose_score_median"] <= res["calibration"]["threshold"]
    # The appeal view: every piece of evidence with its share, for each account in a group.
    appeals = [json.loads(x) for x in (tmp_path / "d" / "appeals.jsonl").read_text().splitlines()]
    mine = [a for a in appeals if a["account_id"].startswith("acct_batch_")]
    assert len(mine) == 12 and all(a["status"] == ("flagged" if extract else "review") for a in mine)
    for a in mine:
        assert {e["kind"] for e in a["evidence"]} == {"purpose", "link"}
        assert abs(sum(abs(e["share"]) for e in a["evidence"]) - 1) < 0.01
        assert {"elicit_share", "logprobs", "coverage"} <= {e["evidence"] for e in a["evidence"]}
    html = (tmp_path / "d" / "report.html").read_text()
    assert "Appeal view" in html and f'id="appeal-{mine[0]["account_id"]}"' in html
    assert "expected benign false-positive rate" in (tmp_path / "d" / "report.md").read_text()


def test_threshold_from_a_trusted_reference_log(background, tmp_path):
    """With a known-benign log, the threshold is its (1 - target_fpr) quantile and the report states the benign FPR
    expected there; a reference lacking the fields is named, not silently used."""
    ref = simulate.run(simulate.SimulateConfig(out=str(tmp_path / "ref"), scale=0.02, days=2, release_day=1,
                                               campaigns=[], seed=9, format="parquet"))  # fmt: skip
    (tmp_path / "batch.jsonl").write_text("\n".join(_batch_rows(8, True)) + "\n")
    res = detect.run(detect.DetectConfig(logs=[background["files"]["parquet"], str(tmp_path / "batch.jsonl")],
                                         out=str(tmp_path / "d"), reference=[ref["files"]["parquet"]],
                                         target_fpr=0.002))  # fmt: skip
    c = res["calibration"]
    assert c["reference"].startswith("trusted log") and c["reference_accounts"] > 500
    assert c["expected_benign_fpr"] <= 0.002 < c["expected_benign_fpr_upper95"] < 0.02
    assert res["flagged_accounts"] == 8 and not c["reference_too_small"]
    with pytest.raises(detect.LogError, match="not found"):
        detect.run(detect.DetectConfig(logs=[str(tmp_path / "batch.jsonl")], out=str(tmp_path / "e"),
                                       reference=[str(tmp_path / "missing.jsonl")]))  # fmt: skip


def test_lookalikes_are_benign_and_leave_the_rest_unchanged(tmp_path):
    cfg = {"scale": 0.002, "days": 2, "release_day": 1, "format": "parquet", "seed": 4}
    plain = simulate.run(simulate.SimulateConfig(out=str(tmp_path / "a"), **cfg))
    looks = simulate.run(simulate.SimulateConfig(out=str(tmp_path / "b"), lookalikes=list(simulate.LOOKALIKES), **cfg))
    assert (
        looks["campaign_events"] == plain["campaign_events"]
        and set(looks["lookalike_accounts"]) == set(simulate.LOOKALIKES)
        and all(v > 0 for v in looks["lookalike_accounts"].values())
    )
    labels = [json.loads(x) for x in open(looks["labels"])]
    assert {x["kind"] for x in labels if x["label"] == "benign"} >= set(simulate.LOOKALIKES)
    with pytest.raises(ValueError, match="unknown look-alike"):
        simulate.SimulateConfig(lookalikes=["call_centre"])
