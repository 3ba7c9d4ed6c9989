"""`alambic train` end to end on tiny models: interactions collected over HTTP from the tiny teacher, every loss path,
students (preset, HF directory + LoRA, pruned), tokenizer checks, resume after SIGKILL, two processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alambic import collect
from alambic.collect import CollectConfig
from alambic.config import ConfigError
from alambic.modeling import build_model, char_tokenizer
from alambic.serve import ServeConfig, serve_in_thread
from alambic.teacher import encode
from alambic.train import data as D
from alambic.train.losses import LOSSES
from alambic.train.students import keep_layers
from alambic.train.trainer import TrainConfig, run

K = 4  # top-k logprobs collected


@pytest.fixture(scope="module")
def interactions(tiny_server, tmp_path_factory) -> Path:
    """Interactions collected from the tiny teacher over HTTP, sampled (temperature 1), with top-4 logprobs."""
    folder = tmp_path_factory.mktemp("interactions")
    os.environ["TEST_TRAIN_KEYS"] = tiny_server.keys["alice"]
    cfg = CollectConfig(
        base_url=tiny_server.base_url + "/v1",
        api_key_env="TEST_TRAIN_KEYS",
        task=["string_ops", "arithmetic"],
        n=32,
        max_tokens=16,
        temperature=1.0,
        seed=1,
        top_logprobs=K,
        store=str(folder / "cache.sqlite"),
        out=str(folder / "interactions.jsonl"),
    )
    assert collect.run(cfg)["records"] == 64
    return folder / "interactions.jsonl"


def config(interactions: Path, out: Path, tokenizer: Path, **kw) -> TrainConfig:
    base = dict(
        data=[str(interactions)],
        out=str(out),
        student="preset:test",
        tokenizer=str(tokenizer) if tokenizer else None,
        steps=12,
        batch_size=8,
        lr=3e-3,
        warmup=2,
        eval_every=0,
        heldout_n=0,
        save_every=0,
        val_fraction=0.15,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]


def val_drop(out: Path) -> tuple[float, float]:
    points = [p for p in curve(out) if "val_loss" in p]
    return points[0]["val_loss"], points[-1]["val_loss"]


def test_sft_end_to_end_saves_reloads_and_serves(interactions, tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    m = run(config(interactions, out, tiny_model_dir, heldout_n=2, eval_every=6))
    first, last = val_drop(out)
    assert last < first
    assert m["signal"] == "labels" and m["counts"]["steps"] == 12 and m["student"]["parameters"] < 30_000
    assert set(m["final"]["heldout_acc"]) == {"string_ops", "arithmetic", "mean"}
    assert json.loads((out / "alambic_config.json").read_text())["loss"] == "sft"
    assert not (out / "checkpoint").exists()
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, nothing of ours
    assert model.config.num_hidden_layers == 2
    with serve_in_thread(ServeConfig(model=str(out), port=0)) as url:
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=30,
            json={"model": out.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


def test_forward_kl_on_stored_topk_with_packing(interactions, tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    m = run(config(interactions, out, tiny_model_dir, loss="forward_kl", packing=True, max_len=256, batch_size=4))
    first, last = val_drop(out)
    assert last < first
    assert m["signal"] == "topk" and m["counts"]["train_rows"] < m["counts"]["train_examples"]  # rows were packed
    assert m["topk_bytes_per_token"] <= 8 * K  # (k + 1) × (int32 id + float16 logprob)


def test_examples_cut_by_max_len_are_reported(interactions, tiny_model_dir, tmp_path, caplog):
    # The fixture's completions are sampled (some are empty), so give every record a known 40-character answer.
    records = [json.loads(line) for line in interactions.read_text().splitlines()]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "logprobs"} | {"completion": "ab" * 20})
                            + "\n" for r in records))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    longest_prompt = max(encode(tok, r["prompt"], "")[1].count(-100) for r in records)  # masked: the prompt
    with caplog.at_level("WARNING", logger="alambic.train.trainer"):
        run(config(data, tmp_path / "whole", tiny_model_dir, steps=1, batch_size=1, max_len=longest_prompt + 60))
        assert "--max-len" not in caplog.text
        run(config(data, tmp_path / "cut", tiny_model_dir, steps=1, batch_size=1, max_len=longest_prompt + 10))
    assert f"reach --max-len {longest_prompt + 10}" in caplog.text


def test_reverse_kl_on_local_teacher_logits(interactions, tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    m = run(config(interactions, out, None, teacher=str(tiny_model_dir), loss="reverse_kl"))
    first, last = val_drop(out)
    assert last < first and m["signal"] == "logits"


def test_capture_qkv_stops_the_pass_at_its_layer(tiny_model_dir):
    """A teacher that gives only relations stops after the layer's projections: the same Q/K/V, no output head."""
    from alambic.train.trainer import capture_qkv

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    heads = []
    model.lm_head.register_forward_hook(lambda *_: heads.append(1))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad(), capture_qkv(model, 0) as full:
        model(input_ids=ids, use_cache=False)
    assert len(heads) == 1
    with torch.no_grad(), capture_qkv(model, 0, stop=True) as early:
        model(input_ids=ids, use_cache=False)
    assert len(heads) == 1 and len(early) == 3  # the head did not run again
    assert all(torch.equal(a, b) for a, b in zip(full, early, strict=True))


def test_relation_loss_on_a_pruned_student(interactions, tiny_model_dir, tmp_path):
    """--relation-weight: a pruned student (narrower than its teacher) learns the teacher's attention relations
    beside its logits, on packed rows; without a local teacher it is a clear error."""
    kw = dict(student=f"prune:{tiny_model_dir}", ratio=0.5, loss="forward_kl", packing=True, max_len=256,
              batch_size=4, steps=20)
    with pytest.raises(ValueError, match="--teacher"):
        run(config(interactions, tmp_path / "no_teacher", tiny_model_dir, relation_weight=1.0, **kw))
    losses = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"w{w}"
        m = run(config(interactions, out, None, teacher=str(tiny_model_dir), relation_weight=w, **kw))
        losses[w] = [p["loss"] for p in curve(out) if "loss" in p]
        assert m["signal"] == "logits"
    assert losses[1.0][0] > losses[0.0][0]  # the relation term is in the training loss
    assert losses[1.0][-1] < losses[1.0][0]
    # stored top-k for the logits, the teacher run only for its relations, on the first 10 of 20 steps
    rel = dict(relation_teacher=str(tiny_model_dir), relation_weight=1.0, relation_steps=10)
    for name, extra in (("topk", {}), ("topk_rel", rel | dict(relation_dtype="bfloat16")),
                        ("topk_rel_f32", rel | dict(relation_dtype="float32"))):
        out = tmp_path / name
        m = run(config(interactions, out, tiny_model_dir, **kw, **extra))
        losses[name] = [p["loss"] for p in curve(out) if "loss" in p]
        assert m["signal"] == "topk"
    assert losses["topk_rel"][0] > losses["topk"][0]
    # that teacher's pass in bfloat16 (the default where the device has it) gives the same relation targets, to
    # within bfloat16's precision
    assert losses["topk_rel"][0] == pytest.approx(losses["topk_rel_f32"][0], rel=1e-2)


def test_on_policy_with_http_and_local_teacher(interactions, tiny_model_dir, tiny_server, tmp_path):
    common = dict(loss="on_policy", on_policy_lambda=1.0, steps=3, gen_max_tokens=8, batch_size=4)
    m = run(
        config(
            interactions,
            tmp_path / "http",
            tiny_model_dir,
            teacher_url=tiny_server.base_url + "/v1",
            teacher_api_key_env="TEST_TRAIN_KEYS",
            divergence="forward_kl",
            **common,
        )
    )
    assert m["counts"]["on_policy_steps_this_session"] == 3 and m["signal"] == "topk"
    assert all(p["on_policy"] for p in curve(tmp_path / "http") if "loss" in p)
    m = run(config(interactions, tmp_path / "local", None, teacher=str(tiny_model_dir), **common))
    assert m["counts"]["on_policy_steps_this_session"] == 3 and m["divergence"] == "jsd"
    with pytest.raises(ValueError, match="teacher"):
        run(config(interactions, tmp_path / "none", tiny_model_dir, **common))


def test_padded_vocab_is_truncated(interactions, tiny_model_dir, tmp_path):
    s, t = D.align_vocab(torch.zeros(2, 3, 100), torch.zeros(2, 3, 116))
    assert s.shape[-1] == t.shape[-1] == 100
    padded = tmp_path / "padded-teacher"  # the same tokenizer, the embedding matrix padded past it
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(char_tokenizer()) + 16)
    model.save_pretrained(padded)
    char_tokenizer().save_pretrained(padded)
    m = run(config(interactions, tmp_path / "student", tiny_model_dir, teacher=str(padded), loss="jsd", steps=2))
    assert m["signal"] == "logits"


def _letterless_tokenizer(folder: Path):
    """The char tokenizer without its letters (saved to `folder`): a different tokenizer from the teacher's."""
    char_tokenizer().save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    kept = [t for t in spec["model"]["vocab"] if not t.isalpha()]  # special tokens come first: their ids stay
    spec["model"]["vocab"] = {t: i for i, t in enumerate(kept)}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return AutoTokenizer.from_pretrained(folder)


def test_different_tokenizer_with_logit_loss_says_use_sft(interactions, tiny_model_dir, tmp_path):
    other = tmp_path / "other"
    build_model("test", _letterless_tokenizer(other)).save_pretrained(other)
    with pytest.raises(D.TokenizerMismatch, match="sft"):  # stored top-k
        run(config(interactions, tmp_path / "a", None, student=str(other), loss="forward_kl"))
    with pytest.raises(D.TokenizerMismatch, match="sft"):  # local teacher logits
        run(
            config(
                interactions, tmp_path / "b", None, student=str(other), teacher=str(tiny_model_dir), loss="reverse_kl"
            )
        )
    run(config(interactions, tmp_path / "c", None, student=str(other), loss="sft", steps=2))  # text always works


def test_prune_student_keeps_fewer_layers_and_loads(interactions, tmp_path):
    assert keep_layers(12, 6) == [0, 2, 4, 7, 9, 11] and keep_layers(4, 2) == [0, 3]
    teacher = tmp_path / "teacher"
    tok = char_tokenizer()
    build_model("tiny", tok).save_pretrained(teacher)  # 3 layers, MLP width 160
    tok.save_pretrained(teacher)
    out = tmp_path / "student"
    m = run(config(interactions, out, None, student=f"prune:{teacher}", layers=2, width=64, steps=3))
    assert m["student"]["layers"] == [0, 2]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.intermediate_size == 64
    with pytest.raises(ValueError, match="layers"):
        run(config(interactions, tmp_path / "x", None, student=f"prune:{teacher}", layers=9))


def test_lora_student_is_merged_on_save(interactions, tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    m = run(config(interactions, out, None, student=str(tiny_model_dir), lora_r=4, lr=1e-2, steps=4))
    assert m["student"]["lora_r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert set(base) == set(tuned)  # no adapter weights left: a plain model
    assert any(not torch.equal(base[k], tuned[k]) for k in base)


def test_padded_topk_slots_are_empty_buckets():
    """A position reporting fewer than k alternatives (slots at -inf, ids repeated) loses nothing."""
    torch.manual_seed(0)
    s = torch.randn(1, 3, 11, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(1, 3, 11, dtype=torch.float64), -1)
    ids = t.topk(2, -1).indices  # (1, 3, 2)
    lp = t.gather(-1, ids)
    pad_ids = torch.cat([ids, ids[..., :1].expand(-1, -1, 2)], -1)
    pad_lp = torch.cat([lp, torch.full((1, 3, 2), float("-inf"), dtype=torch.float64)], -1)
    mask = torch.ones(1, 3, dtype=torch.bool)
    for name, tail in itertools.product(("forward_kl", "reverse_kl", "jsd"), ("spread", "bucket")):
        a = LOSSES[name](s, mask, teacher_ids=ids, teacher_logprobs=lp, tail=tail)
        b = LOSSES[name](s, mask, teacher_ids=pad_ids, teacher_logprobs=pad_lp, tail=tail)
        assert torch.allclose(a, b)
        (grad,) = torch.autograd.grad(b, s)
        assert torch.isfinite(grad).all()


def test_bad_inputs_are_clear(interactions, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig.resolve(loss="distil")
    with pytest.raises(FileNotFoundError, match="collect"):
        run(config(tmp_path / "missing.jsonl", tmp_path / "o", tiny_model_dir))
    with pytest.raises(ValueError, match="tokenizer"):
        run(config(interactions, tmp_path / "o", None))
    (tmp_path / "o" / "checkpoint").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint" / "trainer_state.json").write_text("{}")
    with pytest.raises(FileExistsError, match="resume"):
        run(config(interactions, tmp_path / "o", tiny_model_dir))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(out).state_dict()


def test_ema_saves_the_average_and_resumes_it(interactions, tiny_model_dir, tmp_path):
    """--ema: training itself is unchanged, the saved weights are the average (not the last step's), and a run
    stopped after a checkpoint and resumed saves the same average as one that ran through (the average is in the
    checkpoint, not restarted from the resumed weights). --min-lr 0: the last step's learning rate is 0."""
    kw = dict(loss="forward_kl", packing=True, max_len=256, batch_size=4, min_lr=0.0, threads=1)
    plain, avg = tmp_path / "plain", tmp_path / "ema"
    run(config(interactions, plain, tiny_model_dir, **kw))
    run(config(interactions, avg, tiny_model_dir, ema=0.8, **kw))
    losses = [[p["loss"] for p in curve(o) if "loss" in p] for o in (plain, avg)]
    assert losses[0] == losses[1] and curve(plain)[-1]["lr"] == 0.0
    w_plain, w_avg = _weights(plain), _weights(avg)
    assert any(not torch.equal(w_plain[k], w_avg[k]) for k in w_plain)

    class Stop(Exception):
        pass

    def stop_at_10(point):
        if point["step"] == 10:
            raise Stop

    resumed = tmp_path / "resumed"
    with pytest.raises(Stop):
        run(config(interactions, resumed, tiny_model_dir, ema=0.8, save_every=6, **kw), progress=stop_at_10)
    m = run(config(interactions, resumed, tiny_model_dir, ema=0.8, save_every=6, resume=True, **kw))
    assert m["resumed_from_step"] == 6
    w_res = _weights(resumed)
    assert all(torch.allclose(w_avg[k], w_res[k], atol=1e-6) for k in w_avg)


def _toml(cfg: TrainConfig, path: Path) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in cfg.model_dump(exclude_none=True).items()]
    path.write_text("[train]\n" + "\n".join(lines) + "\n")
    return path


def test_resume_after_sigkill_ends_at_the_same_step(interactions, tiny_model_dir, tmp_path):
    out = tmp_path / "student"
    cfg = config(interactions, out, tiny_model_dir, steps=300, save_every=10, threads=1)
    toml = _toml(cfg, tmp_path / "train.toml")
    cmd = [sys.executable, "-m", "alambic.train", "--config", str(toml)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 120
    while not (state.exists() and json.loads(state.read_text())["step"] >= 20) and time.time() < deadline:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 20 <= killed_at < 300 and not (out / "manifest.json").exists()
    subprocess.run([*cmd, "--resume"], check=True, stderr=subprocess.DEVNULL, timeout=300)
    m = json.loads((out / "manifest.json").read_text())
    assert m["resumed_from_step"] >= killed_at and m["counts"]["steps"] == 300
    steps = [p["step"] for p in curve(out) if "loss" in p]
    assert steps[-1] == 300 and steps == sorted(set(steps))  # no step logged twice, none past the end


@pytest.mark.slow
def test_accelerate_two_processes(interactions, tiny_model_dir, tmp_path):
    """`accelerate launch` with two CPU processes (gloo): the same command, the global batch split between them."""
    out = tmp_path / "student"
    toml = _toml(config(interactions, out, tiny_model_dir, steps=6, threads=1), tmp_path / "train.toml")
    accelerate = Path(sys.executable).parent / "accelerate"
    # `--cpu` alone starts one process; torchrun's launcher with ACCELERATE_USE_CPU starts two on gloo.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "alambic.train",
           "--config", str(toml)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"}
    subprocess.run(cmd, check=True, timeout=240, capture_output=True, env=env)
    m = json.loads((out / "manifest.json").read_text())
    assert m["processes"] == 2 and m["counts"]["steps"] == 6
    AutoModelForCausalLM.from_pretrained(out)


def test_parquet_input_and_order_free_split(interactions, tmp_path):
    records, _ = D.read_interactions([str(interactions)])
    collect.write_interactions(tmp_path / "i.parquet", records)  # nested fields as JSON strings, as collect writes
    again, hashes = D.read_interactions([str(tmp_path / "i.parquet")])
    assert again[0]["logprobs"] == records[0]["logprobs"] and list(hashes) == [str(tmp_path / "i.parquet")]
    train, val = D.split(records, 0.2, seed=0)
    train2, val2 = D.split(records[::-1], 0.2, seed=0)
    assert {r["id"] for r in val} == {r["id"] for r in val2} and 0 < len(val) < len(train)
