"""alambic report: every section renders from a run directory; a bad run directory is a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alambic import report
from alambic.report import ReportConfig


def _acc(values: dict[str, float]) -> dict:
    out = {k: {"accuracy": v, "ci95": [max(0, v - 0.1), min(1, v + 0.1)], "n": 10} for k, v in values.items()}
    out["mean"] = {"accuracy": sum(values.values()) / len(values), "n": 10 * len(values)}
    return out


def make_run(root: Path) -> Path:
    """A run directory in the layout `alambic demo` writes (numbers made up; the report must show them)."""
    (root / "collect").mkdir(parents=True)
    (root / "student").mkdir()
    (root / "evaluate").mkdir()
    (root / "loop").mkdir()
    (root / "collect" / "manifest.json").write_text(json.dumps({
        "teacher": {"backend": "openai", "teacher_id": "demo:teacher:abc", "model": "demo-teacher",
                    "base_url": "http://127.0.0.1:1/v1"},
        "capability": "top_logprobs", "started_at": "2026-12-01T00:00:00Z", "ended_at": "2026-12-01T00:01:00Z",
        "records": 5000, "requests_sent": 4321, "prompt_tokens": 10, "completion_tokens": 20, "spent_usd": 0.5,
        "errors": 0, "retries": 3}))
    (root / "student" / "manifest.json").write_text(json.dumps({
        "loss": "forward_kl", "signal": "topk", "counts": {"steps": 20, "tokens_seen": 1000}, "train_seconds": 9.5,
        "student": {"parameters": 1234}, "data": {"interactions.jsonl": "f" * 64}}))
    (root / "student" / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in [
        {"step": 0, "val_loss": 4.0}, {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0, "val_loss": 2.5,
                                                                  "heldout_acc": {"mean": 0.4}}]))
    ev = {"n": 20, "prompts": "built-in", "teacher": {"accuracy": _acc({"a": 0.9, "b": 0.7}), "parameters": 8000,
                                                       "size_bytes": 32000,
                                                       "speed": {"tokens_per_s": 100.0, "latency_p50_s": 0.5}},
          "student": {"accuracy": _acc({"a": 0.8, "b": 0.6}), "parameters": 1000, "size_bytes": 4000,
                      "speed": {"tokens_per_s": 400.0, "latency_p50_s": 0.2}},
          "fidelity": {"agreement": 0.75, "token_kl": 0.12},
          "ratios": {"accuracy_kept": 0.875, "parameters": 0.125, "size_on_disk": 0.125,
                     "speedup_tokens_per_s": 4.0, "latency": 0.4}}
    (root / "evaluate" / "evaluation.json").write_text(json.dumps(ev))
    (root / "loop" / "loop.json").write_text(json.dumps({
        "teacher_accuracy": 0.8, "summary": "targeted beats uniform at 200 queries",
        "curves": {"targeted": [{"queries": 100, "accuracy": 0.3}, {"queries": 200, "accuracy": 0.55}],
                   "uniform": [{"queries": 100, "accuracy": 0.3}, {"queries": 200, "accuracy": 0.45}]}}))
    (root / "manifest.json").write_text(json.dumps({
        "guard": {"demo_accounts": 4, "benign_accounts": 100, "demo_found_as_campaign": True,
                  "demo_accounts_flagged": 4, "benign_flagged": 1},
        "provenance": {"key": "wm_0123456789ab", "context_width": 1, "gamma": 0.25, "delta": 2.0,
                       "skills": ["naming"], "control_records": 600, "control_steps": 100,
                       "teacher_accuracy": {"clean": 0.74, "watermarked": 0.71},
                       "student": {"p_value": 3.2e-12, "z": 7.1, "tokens_scored": 412, "green_fraction": 0.41,
                                   "p_by_tokens": [{"tokens_scored": 16, "p_value": 0.02},
                                                   {"tokens_scored": 412, "p_value": 3.2e-12}],
                                   "null_check": {"keys": 100, "true_key_rank": 1, "ks_p_value": 0.43, "alpha": 0.01,
                                                  "false_positive_rate": 0.01}},
                       "control": {"p_value": 0.6, "z": -0.3, "tokens_scored": 398, "green_fraction": 0.24,
                                   "p_by_tokens": [{"tokens_scored": 16, "p_value": 0.5},
                                                   {"tokens_scored": 398, "p_value": 0.6}],
                                   "null_check": {"keys": 100, "true_key_rank": 57, "ks_p_value": 0.81,
                                                  "alpha": 0.01, "false_positive_rate": 0.0}}},
        "stages": {"collect": 60.0, "train": 9.5}}))
    return root


def test_report_renders_every_section(tmp_path):
    run_dir = make_run(tmp_path / "run")
    r = report.run(ReportConfig(run_dir=str(run_dir)))
    assert r["sections"] == ["Summary", "Accuracy per skill", "Smaller and faster", "Training",
                             "Quality against teacher queries", "Provenance", "Guard: the provider's view",
                             "Watermark provenance", "Run time"]
    page = Path(r["html"]).read_text()
    assert page.count("<svg") == 4  # accuracy, training, loop and watermark curves: inline, no external files
    assert not re.search(r'src="(?!data:)', page)  # self-contained
    for shown in ("87.5%", "demo:teacher:abc", "5,000", "targeted beats uniform", "55.0%", "found",
                  "1 of 101", "57 of 101", "74.0%", "71.0%", "wm_0123456789ab"):
        assert shown in page, shown
    md = Path(r["markdown"]).read_text()
    assert "| p-value | 3.2e-12 | 0.6 |" in md  # the watermarked student beside the clean control
    assert "| a | 90.0% | 80.0% |" in md and "![Accuracy per skill](accuracy.png)" in md
    assert (Path(r["markdown"]).parent / "accuracy.png").stat().st_size > 1000


def test_partial_run_shows_what_it_has(tmp_path):
    run_dir = make_run(tmp_path / "run")
    for f in ("loop/loop.json", "evaluate/evaluation.json", "manifest.json"):
        (run_dir / f).unlink()
    r = report.run(ReportConfig(run_dir=str(run_dir), out=str(tmp_path / "rep")))
    assert r["sections"] == ["Training", "Provenance"]


def test_bad_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run directory .* not found"):
        report.run(ReportConfig(run_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no alambic run"):
        report.run(ReportConfig(run_dir=str(tmp_path / "empty")))
    (tmp_path / "broken" / "evaluate").mkdir(parents=True)
    (tmp_path / "broken" / "evaluate" / "evaluation.json").write_text("{not json")
    with pytest.raises(ValueError, match="evaluation.json"):
        report.run(ReportConfig(run_dir=str(tmp_path / "broken")))
