"""The demo end to end on a tiny model: serve over HTTP, evaluate, collect through several keys, guard, train a
student, evaluate it beside the teacher, report."""

import json

from typer.testing import CliRunner

from alambic.cli import app
from alambic.demo import DemoConfig, run


def test_demo_pipeline_on_tiny_model(tiny_model_dir, tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig(teacher=str(tiny_model_dir), out=str(out), n_eval=2, n_collect=6, max_tokens=12, n_keys=3,
                     guard_scale=0.002, student="preset:test", train_steps=4, train_batch=4)
    result = run(cfg)
    acc = result["teacher_accuracy"]
    assert set(acc) == {"arithmetic", "tool_call", "list_ops", "string_ops", "program", "mean"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert result["collect"]["records"] == 5 * 6 and result["collect"]["requests_sent"] == 30
    # The access log has the evaluation and the collection, spread over the demo's keys, and no key material.
    events = [json.loads(line) for line in (out / "access.jsonl").read_text().splitlines()]
    assert len(events) >= 10 + 30
    assert {e["account_id"] for e in events} >= {"acct_demo_0", "acct_demo_1", "acct_demo_2", "acct_demo_3"}
    keys = [line.split()[0] for line in (out / "api_keys.txt").read_text().splitlines()]
    for f in [out / "access.jsonl", out / "manifest.json", out / "collect" / "interactions.jsonl"]:
        text = f.read_text()
        assert not any(k in text for k in keys)
    g = result["guard"]
    assert g["demo_accounts"] == 3 and g["benign_accounts"] > 0
    # The student was trained on the collection and evaluated beside the teacher; the report shows both.
    student = json.loads((out / "student" / "manifest.json").read_text())
    assert student["counts"]["steps"] == 4 and student["signal"] == "topk"
    ev = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert ev["n"] == 10 and ev["ratios"]["parameters"] == result["student"]["parameters"] / ev["teacher"]["parameters"]
    assert set(result["stages"]) >= {"teacher_eval_http", "collect", "guard", "train", "evaluate"}
    page = (out / "report" / "report.html").read_text()
    assert "Accuracy per skill" in page and "Provenance" in page and "Guard" in page
    # A re-run pays for nothing: the collection comes from the cache, the same student is not trained again.
    again = run(cfg.model_copy(update={"guard": False}))
    assert again["collect"]["requests_sent"] == 0 and again["collect"]["from_cache"] == 30
    assert json.loads((out / "student" / "manifest.json").read_text()) == student


def test_demo_missing_teacher_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "not found" in res.output and "make teacher" in res.output


def test_demo_cli_prints_summary(tiny_model_dir, tmp_path):
    res = CliRunner().invoke(app, ["demo", "--teacher", str(tiny_model_dir), "--out", str(tmp_path / "d"),
                                   "--n-eval", "1", "--n-collect", "2", "--max-tokens", "8", "--no-guard",
                                   "--student", "preset:test", "--train-steps", "2", "--train-batch", "2"])
    assert res.exit_code == 0, res.output
    for shown in ("held-out accuracy", "collected from", "student vs teacher", "report:", "demo finished"):
        assert shown in res.output, shown


def test_demo_unknown_profile_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--profile", "gpt5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "profile" in res.output and "smollm2" in res.output
