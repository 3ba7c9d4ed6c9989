"""alambic evaluate: consistent numbers (a model against itself agrees fully), graders, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alambic import evaluate, tasks
from alambic.evaluate import GRADERS, EvaluateConfig

DEMO_TEACHER = Path(__file__).resolve().parents[1] / "models" / "demo-teacher"


def test_model_against_itself_agrees_fully(tmp_path):
    """Student = teacher (the shipped demo teacher, which gets many right): equal accuracy, agreement 1, KL 0."""
    cfg = EvaluateConfig(student=str(DEMO_TEACHER), teacher=str(DEMO_TEACHER), n=4, latency_prompts=2,
                         out=str(tmp_path / "ev"))
    r = evaluate.run(cfg)
    t, s = r["teacher"]["accuracy"], r["student"]["accuracy"]
    assert t == s
    assert set(t) == set(tasks.SKILLS) | {"mean"}
    assert t["mean"]["accuracy"] > 0.3  # the demo teacher answers most of these; a broken grader would give 0
    lo, hi = s["arithmetic"]["ci95"]
    assert lo <= s["arithmetic"]["accuracy"] <= hi
    assert r["fidelity"]["agreement"] == 1.0
    assert r["fidelity"]["token_kl"] == pytest.approx(0.0, abs=1e-6)
    assert r["ratios"]["parameters"] == 1.0 and r["ratios"]["accuracy_kept"] == 1.0
    assert r["student"]["speed"]["tokens_per_s"] > 0 and r["student"]["speed"]["latency_p50_s"] > 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "replies.jsonl").read_text().splitlines()]
    n = 4 * len(tasks.SKILLS)
    assert len(rows) == n and all(x["agree"] and x["teacher"] == x["student"] for x in rows)
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["n"] == n


def test_endpoint_teacher_local_student(tiny_server, tiny_model_dir, tmp_path, monkeypatch):
    """The teacher over real HTTP (its top-k logprobs give the KL), the same weights local as the student."""
    monkeypatch.setenv("TEST_TEACHER_KEY", tiny_server.keys["alice"])
    cfg = EvaluateConfig(student=str(tiny_model_dir), teacher=tiny_server.base_url + "/v1",
                         teacher_api_key_env="TEST_TEACHER_KEY", skills=["string_ops", "list_ops"], n=3,
                         max_tokens=12, latency_prompts=1, out=str(tmp_path / "ev"))
    r = evaluate.run(cfg)
    assert r["teacher"]["kind"] == "endpoint" and r["teacher"]["model"] == tiny_server.model
    assert r["fidelity"]["agreement"] == 1.0
    assert r["fidelity"]["token_kl"] == pytest.approx(0.0, abs=1e-3)  # logprobs travel as JSON floats
    assert r["ratios"]["parameters"] is None  # an endpoint's size is unknown, so no made-up ratio


def test_wrong_key_names_the_problem(tiny_server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_TEACHER_KEY", "sk-wrong")
    cfg = EvaluateConfig(student=str(tiny_model_dir), teacher=tiny_server.base_url + "/v1", n=1,
                         teacher_api_key_env="TEST_TEACHER_KEY", out=str(tmp_path / "ev"))
    with pytest.raises(RuntimeError, match="401"):
        evaluate.run(cfg)


@pytest.mark.parametrize("grader,reply,reference,ok", [
    ("exact", "Let me see.\nAnswer: Paris.", "paris", True),
    ("exact", "Answer: Lyon", "Paris", False),
    ("numeric", "so the total is 1,234.0", "1234", True),
    ("numeric", "Answer: 12", "13", False),
    ("json", 'Sure: {"b": 2, "a": [1]} done', '{"a": [1], "b": 2}', True),
    ("json", '{"a": 1', '{"a": 1}', False),
    ("regex", "Answer: 2026-12-01", r"^\d{4}-\d{2}-\d{2}$", True),
    ("regex", "Answer: tomorrow", r"^\d{4}", False),
])
def test_graders(grader, reply, reference, ok):
    extract, match = GRADERS[grader]
    assert match(extract(reply), reference) is ok


def test_prompt_file_with_graders_and_bad_rows(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "2+2?", "reference": "4", "grader": "numeric"}) + "\n"
                    + json.dumps({"prompt": "Capital of France?", "reference": "Paris", "skill": "geo"}) + "\n")
    items = evaluate.load_items(EvaluateConfig(student="s", teacher="t", prompts=str(good)))
    assert [i.grader for i in items] == ["numeric", "exact"] and [i.group for i in items] == ["all", "geo"]
    assert items[0].correct("It is 4.") and not items[1].correct("Answer: Rome")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match="no `reference`"):
        evaluate.load_items(EvaluateConfig(student="s", teacher="t", prompts=str(bad)))
    with pytest.raises(ValueError, match="unknown grader"):
        EvaluateConfig(student="s", teacher="t", grader="fuzzy")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="student .* not found"):
        evaluate.run(EvaluateConfig(student=str(tmp_path / "nope"), teacher=str(DEMO_TEACHER), n=1))
