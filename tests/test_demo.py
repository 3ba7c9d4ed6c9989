"""The demo end to end on a tiny model: serve over HTTP (watermarked), evaluate, collect through several keys, guard,
train a student, evaluate it beside the teacher, test it and a control student for the watermark, report."""

import json

from typer.testing import CliRunner

from alambic import tasks
from alambic.cli import app
from alambic.demo import DemoConfig, run
from alambic.guard import watermark as W


def test_demo_pipeline_on_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(teacher=str(tiny_model_dir), out=str(out), n_eval=2, n_collect=6, max_tokens=12, n_keys=3,
                     guard_scale=0.002, guard_reference_scale=0.004, student="preset:test", train_steps=4,
                     train_batch=4, n_control=30, control_steps=2, provenance_n=3)
    # A fixed key (the demo keeps a key file it finds). The untrained teacher's greedy text has only a handful of
    # distinct (context, token) pairs (4 in the control here), so with a fresh random key per run the control came
    # out > 60% green by chance now and then; under this key: marked 21 pairs, p = 2.3e-13; control 0.25 green.
    W.write_key(out / "watermark.key", key="alambic-demo-test-key-fedcba9876543210")
    result = run(cfg)
    n_skills = len(tasks.SKILLS)
    acc = result["teacher_accuracy"]
    assert set(acc) == set(tasks.SKILLS) | {"mean"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert result["collect"]["records"] == n_skills * 6 and result["collect"]["requests_sent"] == n_skills * 6
    # The access log has the evaluation and the collection, spread over the demo's keys, and no key material.
    events = [json.loads(line) for line in (out / "access.jsonl").read_text().splitlines()]
    assert len(events) >= n_skills * (2 + 6)
    assert {e["account_id"] for e in events} >= {"acct_demo_0", "acct_demo_1", "acct_demo_2", "acct_demo_3"}
    keys = [line.split()[0] for line in (out / "api_keys.txt").read_text().splitlines()]
    wm_key = json.loads((out / "watermark.key").read_text())["key"]
    assert (out / "watermark.key").stat().st_mode & 0o777 == 0o600
    written = [f for f in out.rglob("*") if f.is_file() and f.suffix in (".json", ".jsonl", ".md", ".html")]
    for f in written:
        text = f.read_text()
        assert not any(k in text for k in keys) and wm_key not in text, f
    g = result["guard"]
    assert g["demo_accounts"] == 3 and g["benign_accounts"] > 0
    # A group for review, when guard links the keys without flagging them, holds every one of them.
    assert g["demo_for_review"] is None or g["demo_for_review"]["accounts"] >= 3
    # The threshold comes from the provider's trusted reference log, not from the log under test.
    assert g["reference"].startswith("trusted log") and g["reference_accounts"] > 0 and g["threshold"] is not None
    # The student was trained on the collection and evaluated beside the teacher; the report shows both.
    student = json.loads((out / "student" / "manifest.json").read_text())
    assert student["counts"]["steps"] == 4 and student["signal"] == "topk"
    ev = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert ev["n"] == 2 * n_skills
    assert ev["ratios"]["parameters"] == result["student"]["parameters"] / ev["teacher"]["parameters"]
    # The collection was served watermarked and the control's data was not (the untrained teacher is near-uniform,
    # so the bias decides nearly every token); both students were tested for the key.
    def green(file):
        return W.score(W.WatermarkScoreConfig(input=str(file), key_file=str(out / "watermark.key"),
                                              tokenizer=str(tiny_model_dir)))

    marked, clean = green(out / "collect" / "interactions.jsonl"), green(out / "control" / "interactions.jsonl")
    assert marked["p_value"] < 1e-6 and marked["green_fraction"] > 0.6 > clean["green_fraction"]
    prov = result["provenance"]
    assert prov["key"] == W.fingerprint(wm_key.encode()) and prov["control_records"] == 30  # naming only
    for name in ("student", "control"):
        assert 0 <= prov[name]["p_value"] <= 1 and prov[name]["null_check"]["keys"] == 100
        assert json.loads((out / "provenance" / name / "provenance.json").read_text())["key"] == prov["key"]
    assert set(prov["teacher_accuracy"]) == {"clean", "watermarked"}
    assert set(result["stages"]) >= {"teacher_eval_http", "collect", "guard", "train", "evaluate", "control",
                                      "provenance"}
    page = (out / "report" / "report.html").read_text()
    assert "Accuracy per skill" in page and "Provenance" in page and "Guard" in page and "Watermark provenance" in page
    # A re-run pays for nothing: the same key, so the collections come from the cache; no student is trained again.
    control = json.loads((out / "control" / "student" / "manifest.json").read_text())
    again = run(cfg.model_copy(update={"guard": False}))
    assert again["collect"]["requests_sent"] == 0 and again["collect"]["from_cache"] == n_skills * 6
    assert json.loads((out / "student" / "manifest.json").read_text()) == student
    assert json.loads((out / "control" / "student" / "manifest.json").read_text()) == control
    assert again["provenance"]["key"] == prov["key"]


def test_demo_missing_teacher_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "not found" in res.output and "make teacher" in res.output


def test_demo_cli_prints_summary(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(app, ["demo", "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "d"),
                                   "--n-eval", "1", "--n-collect", "2", "--max-tokens", "8", "--no-guard",
                                   "--no-watermark",
                                   "--train-steps", "2", "--train-batch", "2"])  # the default student: pruned
    assert res.exit_code == 0, res.output
    for shown in ("held-out accuracy", "collected from", "pruned from", "student vs teacher", "report:",
                  "demo finished"):
        assert shown in res.output, shown
    made = json.loads((tmp_path / "d" / "student" / "manifest.json").read_text())["student"]
    assert made["kind"] == "prune" and made["ratio_requested"] == 0.25 and made["parameters_ratio"] <= 0.25
    assert not (tmp_path / "d" / "watermark.key").exists() and not (tmp_path / "d" / "provenance").exists()


def test_demo_unknown_profile_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--profile", "gpt5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "profile" in res.output and "smollm2" in res.output
