"""alambic loop: the allocation rule, and both arms end to end on a tiny served teacher at equal budget."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from alambic import loop
from alambic.loop import LoopConfig, allocate
from alambic.modeling import n_params


def test_allocate_follows_error_with_a_floor():
    counts = allocate(100, {"a": 0.0, "b": 0.2, "c": 0.6}, floor=0.1)
    assert sum(counts.values()) == 100
    assert counts["a"] == 10  # the floor: a perfect skill still gets some queries
    assert counts["c"] > counts["b"] > counts["a"]
    assert allocate(10, {"a": 1.0, "b": 1.0, "c": 1.0}) in ({"a": 4, "b": 3, "c": 3}, {"a": 3, "b": 4, "c": 3},
                                                             {"a": 3, "b": 3, "c": 4})
    assert sorted(allocate(7, {"a": 0.0, "b": 0.0}).values()) == [3, 4]  # no error anywhere: even
    with pytest.raises(ValueError, match="floor"):
        allocate(10, {"a": 1.0, "b": 1.0}, floor=0.6)


def test_compare_reports_the_gap_and_its_error():
    curves = {"targeted": [{"queries": 100, "accuracy": 0.3}, {"queries": 200, "accuracy": 0.5}],
              "uniform": [{"queries": 100, "accuracy": 0.3}, {"queries": 200, "accuracy": 0.4}]}
    wins, summary = loop.compare(curves, n=100, seeds=[0, 1])
    assert wins == [200]
    assert curves["targeted"][1]["gap_vs_uniform"] == 0.1
    assert curves["targeted"][1]["gap_se"] == pytest.approx(((0.25 + 0.24) / 100) ** 0.5, abs=1e-4)
    assert "beats uniform at 200" in summary and "+10.0 points (standard error 7.0)" in summary
    assert loop.compare({"targeted": curves["targeted"]}, 100, [0]) == ([], "")


def test_loop_both_arms_equal_budget(tiny_model_dir, tmp_path):
    cfg = LoopConfig(teacher=str(tiny_model_dir), budget=20, rounds=2, skills=["string_ops", "list_ops"], seeds=[0],
                     student="preset:test", steps=2, batch_size=1, max_tokens=8, n_probe=2, n_test=2,
                     top_logprobs=3, out=str(tmp_path / "run"))
    r = loop.run(cfg)
    t, u = r["curves"]["targeted"], r["curves"]["uniform"]
    assert [p["queries"] for p in t] == [p["queries"] for p in u] == [10, 20]
    first_t, first_u = r["runs"]["targeted"][0][0], r["runs"]["uniform"][0][0]
    assert first_t["counts"] == first_u["counts"] == {"string_ops": 5, "list_ops": 5}  # no student yet: even
    assert first_u["requests_sent"] == 0  # the same first round was already paid for by the other arm (cache)
    second = r["runs"]["targeted"][0][1]
    assert sum(second["counts"].values()) == 20 and set(second["probe_error"]) == {"string_ops", "list_ops"}
    assert all(0 <= p["accuracy"] <= 1 for p in t + u)
    saved = json.loads((tmp_path / "run" / "loop" / "loop.json").read_text())
    assert saved["curves"] == r["curves"] and isinstance(saved["summary"], str) and saved["summary"]
    assert 0 <= saved["teacher_accuracy"] <= 1


def test_loop_with_a_student_pruned_from_the_teacher(tiny_model_dir, tmp_path):
    cfg = LoopConfig(teacher=str(tiny_model_dir), budget=4, rounds=1, skills=["string_ops"], seeds=[0],
                     arms=["targeted"], student=f"prune:{tiny_model_dir}", layers=1, steps=1, batch_size=1,
                     max_tokens=8, n_probe=1, n_test=1, top_logprobs=3, out=str(tmp_path / "run"))
    loop.run(cfg)
    student = json.loads((tmp_path / "run" / "loop" / "targeted-seed0" / "round0" / "student" / "config.json")
                         .read_text())
    assert student["num_hidden_layers"] == 1


def test_loop_warm_start_continues_the_previous_rounds_student(tiny_model_dir, tmp_path):
    cfg = LoopConfig(teacher=str(tiny_model_dir), budget=4, rounds=2, skills=["string_ops"], seeds=[0],
                     arms=["targeted"], student="preset:test", warm_start=True, steps=1, batch_size=1,
                     max_tokens=8, n_probe=1, n_test=1, top_logprobs=3, out=str(tmp_path / "run"))
    loop.run(cfg)
    arm = tmp_path / "run" / "loop" / "targeted-seed0"
    first = json.loads((arm / "round0" / "student" / "manifest.json").read_text())["student"]
    second = json.loads((arm / "round1" / "student" / "manifest.json").read_text())["student"]
    assert first["kind"] == "preset"
    assert second["kind"] == "hf" and second["source"] == str(arm / "round0" / "student")


def test_loop_rejects_a_budget_too_small(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        loop.run(LoopConfig(teacher=str(tiny_model_dir), budget=3, rounds=2, out=str(tmp_path)))


def test_loop_passes_the_prune_ratio_to_the_student(tiny_model_dir, tmp_path):
    """`--ratio` reaches the trainer: the round's student has about that share of the teacher's parameters."""
    cfg = LoopConfig(teacher=str(tiny_model_dir), budget=4, rounds=1, skills=["string_ops"], seeds=[0],
                     arms=["targeted"], student=f"prune:{tiny_model_dir}", ratio=0.5, steps=1, batch_size=1,
                     max_tokens=8, n_probe=1, n_test=1, top_logprobs=3, out=str(tmp_path / "run"))
    loop.run(cfg)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "loop" / "targeted-seed0" / "round0" / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert 0.3 < n_params(student) / n_params(teacher) <= 0.5
