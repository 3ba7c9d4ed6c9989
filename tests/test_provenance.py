"""`guard provenance` end to end: suspects as a local model directory and as an OpenAI-compatible endpoint."""

from __future__ import annotations

import json

import pytest

from alambic import tasks
from alambic.guard import provenance as P
from alambic.guard import watermark as W
from alambic.serve import ServeConfig, serve_in_thread

KEY = "provenance-test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prov") / "wm.key"
    W.write_key(path, W.WatermarkParams(context_width=1, gamma=0.25, delta=4.0), key=KEY)
    return path


def cfg(suspect, key_file, out, **kw) -> P.ProvenanceConfig:
    return P.ProvenanceConfig(suspect=str(suspect), key_file=str(key_file), n=4, max_tokens=32, threads=1,
                              out=str(out), **kw)


def test_endpoint_serving_our_watermarked_outputs_is_caught(tiny_model_dir, key_file, tmp_path):
    """A suspect endpoint that passes our watermarked outputs on: tiny p-value, the true key ranks first."""
    serve = ServeConfig(model=str(tiny_model_dir), port=0, watermark_key_file=str(key_file), threads=1)
    with serve_in_thread(serve) as url:
        r = P.run(cfg(url + "/v1", key_file, tmp_path, tokenizer=str(tiny_model_dir)))
    assert r["tokens_scored"] > 100 and r["p_value"] < 1e-8
    assert r["null_check"]["true_key_rank"] == 1 and r["null_check"]["keys"] == 100
    assert r["generation"]["records"] == 4 * len(tasks.SKILLS) and r["generation"]["errors"] == 0
    assert json.loads((tmp_path / "provenance.json").read_text())["p_value"] == r["p_value"]
    assert KEY not in (tmp_path / "provenance.json").read_text() + (tmp_path / "config.json").read_text()


def test_clean_local_model_passes_and_null_is_uniform(tiny_model_dir, key_file, tmp_path):
    """The tiny model never saw our watermark: no evidence, and 100 random keys give uniform p-values.

    The suspect samples without a seed, so both p-values below are uniform draws when the code is right: each check
    fails by chance once in 1,000 runs (at 0.01 this test failed CI once), while a biased score or a broken null
    gives p-values far below 1e-3 with this many pairs and keys."""
    r = P.run(cfg(tiny_model_dir, key_file, tmp_path, data=[]))
    assert r["p_value"] > 1e-3
    null = r["null_check"]
    assert null["ks_p_value"] > 1e-3 and null["false_positive_rate"] <= 0.05
    assert r["duplicates"] + r["in_prompt"] + r["tokens_scored"] == r["positions"]


def test_bad_suspects_are_named(key_file, tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        P.run(cfg("http://127.0.0.1:9/v1", key_file, tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a local model path"):
        P.run(cfg(tmp_path / "nope", key_file, tmp_path))


@pytest.mark.slow
def test_student_distilled_from_watermarked_teacher_is_radioactive(tiny_model_dir, key_file, tmp_path):
    """The whole path on tiny models: a teacher with entropy to spare (the untrained tiny model, sampled) serves
    watermarked answers, `collect` gathers them, `train` distils a student from them, and provenance on the student
    (its own samples, on prompts it never saw) finds the watermark; scoring the same samples with 100 random keys
    does not."""
    from alambic import collect
    from alambic.train.trainer import TrainConfig, run

    serve = ServeConfig(model=str(tiny_model_dir), port=0, watermark_key_file=str(key_file), threads=1)
    with serve_in_thread(serve) as url:
        collect.run(collect.CollectConfig(base_url=url + "/v1", task=list(tasks.SKILLS), n=40, temperature=1.0,
                                          max_tokens=48, store=str(tmp_path / "cache.sqlite"),
                                          out=str(tmp_path / "marked.jsonl")))
    student = tmp_path / "student"
    run(TrainConfig(data=[str(tmp_path / "marked.jsonl")], out=str(student), student="preset:test",
                    tokenizer=str(tiny_model_dir), steps=80, batch_size=16, lr=3e-3, eval_every=0, heldout_n=0,
                    save_every=0, threads=1))
    # A low temperature keeps the student to the choices it learned best (a measured choice: p ~1e-5 at 1.0).
    r = P.run(cfg(student, key_file, tmp_path / "prov", temperature=0.3))
    assert r["p_value"] < 1e-6 and r["null_check"]["true_key_rank"] == 1
    assert r["null_check"]["false_positive_rate"] <= 0.05
