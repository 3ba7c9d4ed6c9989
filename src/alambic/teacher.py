"""`alambic teacher train`: make the demo teacher, a small transformer trained on the built-in skill suite.

No model hub is reachable offline and the one pretrained chat model we can install is weak at verifiable
skills, so the demo brings its own teacher. The loop is written out (nanoGPT style): it is short, and the
teacher is trained on ground-truth worked solutions, not distilled, so none of `alambic train` applies.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from pydantic import Field

from . import __version__, tasks
from .config import Config
from .modeling import PRESETS, build_model, char_tokenizer, chat_generate, load, n_params

log = logging.getLogger(__name__)


class TeacherConfig(Config):
    """How the demo teacher is made. Defaults reproduce the shipped checkpoint in models/demo-teacher."""

    out: str = Field("models/demo-teacher", description="output directory (an HF model directory)")
    preset: str = Field("teacher", description=f"model shape, one of: {', '.join(PRESETS)}")
    init: str | None = Field(None, description="continue from this model directory instead of a fresh model")
    skills: list[str] = Field(default_factory=lambda: list(tasks.SKILLS), description="skills to train on")
    n_train: int = Field(20000, gt=0, description="training examples per skill")
    n_eval: int = Field(200, gt=0, description="held-out examples per skill for the final evaluation")
    steps: int = Field(1500, gt=0, description="optimiser steps")
    batch_size: int = Field(16, gt=0, description="packed rows per step")
    seq_len: int = Field(512, gt=8, description="tokens per packed row")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (cosine decay to 10%)")
    warmup: int = Field(100, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay on matrices")
    eval_every: int = Field(150, ge=0, description="steps between quick checks + checkpoints (0: end only)")
    seed: int = Field(0, description="seed for data and initialisation")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")


def encode(tokenizer, messages: list[dict[str, str]], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of a chat plus reply, and labels with every prompt token masked (-100)."""
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    full = messages + [{"role": "assistant", "content": reply}]
    ids = tokenizer.apply_chat_template(full, return_dict=False)
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not extend the prompt when a reply is added; cannot mask prompts")
    return ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]


def packed_batches(data: list[tuple[list[int], list[int]]], seq_len: int, rows: int, rng: random.Random):
    """Endless stream of (input_ids, labels) batches of shape (rows, seq_len): shuffled examples packed end to end.

    Packing wastes no compute on padding and, unlike length-bucketing, mixes every skill into every batch
    (a batch of one skill at a time made the loss oscillate between skills in our first runs). Examples may
    attend to the ones before them in a row; the role tokens tell the model where one ends.
    """
    ids_buf: list[int] = []
    lab_buf: list[int] = []
    n = seq_len * rows
    while True:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in order:
            ids_buf += data[i][0]
            lab_buf += data[i][1]
            if len(ids_buf) >= n:
                ids = torch.tensor(ids_buf[:n]).view(rows, seq_len)
                labels = torch.tensor(lab_buf[:n]).view(rows, seq_len)
                labels[:, 0] = -100  # its context was cut off at the row boundary
                ids_buf, lab_buf = ids_buf[n:], lab_buf[n:]
                yield ids, labels  # (rows, seq_len) each


def lr_factor(step: int, warmup: int, steps: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to `floor` × the peak (teacher and `alambic
    train`)."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def skill_accuracy(model, tokenizer, examples: list[tasks.Example], max_new_tokens: int = 200) -> dict[str, float]:
    """Held-out accuracy per skill under greedy decoding, plus the macro average under 'mean'."""
    replies = chat_generate(model, tokenizer, [ex.messages for ex in examples], max_new_tokens=max_new_tokens)
    return tasks.accuracy(examples, replies)


def run(cfg: TeacherConfig, progress: Callable[[dict], None] | None = None) -> dict:
    """Train the teacher, evaluate it on held-out prompts, save it with its config and manifest."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    rng = random.Random(cfg.seed)
    if cfg.init:
        model, tokenizer = load(cfg.init)
        model.train()
    else:
        tokenizer = char_tokenizer()
        model = build_model(cfg.preset, tokenizer, seed=cfg.seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    train = tasks.generate(cfg.skills, cfg.n_train, "train", seed=cfg.seed)
    data = [encode(tokenizer, ex.messages, ex.solution) for ex in train]
    heldout = tasks.generate(cfg.skills, cfg.n_eval, "test", seed=cfg.seed)
    quick = [ex for i, ex in enumerate(heldout) if i % cfg.n_eval < 20]  # 20 per skill for progress checks

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        return cfg.lr * lr_factor(step, cfg.warmup, cfg.steps)

    curve: list[dict] = []
    stream = packed_batches(data, cfg.seq_len, cfg.batch_size, rng)
    tokens = 0
    model.train()
    for step in range(cfg.steps):
        ids, labels = next(stream)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens += ids.numel()
        if step % 50 == 0 or step == cfg.steps - 1:
            point = {"step": step, "loss": round(loss.item(), 4), "lr": lr_at(step), "tokens": tokens,
                     "elapsed_s": round(time.time() - t0, 1)}
            if cfg.eval_every and step and step % cfg.eval_every == 0:
                model.eval()
                point["heldout_acc"] = skill_accuracy(model, tokenizer, quick)
                save(model, tokenizer, cfg, Path(cfg.out) / "checkpoint", {"step": step, "quick_acc": point})
                model.train()
            curve.append(point)
            log.info("step %d %s", step, point)
            if progress:
                progress(point)

    model.eval()
    acc = skill_accuracy(model, tokenizer, heldout)
    elapsed = time.time() - t0
    manifest = {
        "kind": "alambic.teacher",
        "alambic_version": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} x{torch.get_num_threads()} threads",
        "parameters": n_params(model),
        "train_examples": len(train),
        "train_tokens_seen": tokens,
        "heldout_examples": len(heldout),
        "heldout_accuracy": acc,
        "train_seconds": round(elapsed, 1),
        "command": "alambic teacher train " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in cfg.model_dump(exclude_defaults=True).items()
        ),
    }
    if cfg.init and (Path(cfg.init) / "manifest.json").exists():
        # The model's whole history: the run(s) it continued from, with their commands and times.
        before = json.loads((Path(cfg.init) / "manifest.json").read_text())
        manifest["continued_from"] = {k: before.get(k) for k in ("command", "train_seconds", "train_tokens_seen",
                                                                 "heldout_accuracy", "continued_from")}
        manifest["total_train_seconds"] = round(elapsed + (before.get("total_train_seconds")
                                                           or before.get("train_seconds") or 0), 1)
    out = Path(cfg.out)
    save(model, tokenizer, cfg, out, manifest)
    (out / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in curve))
    return manifest


def save(model, tokenizer, cfg: TeacherConfig, out: Path, manifest: dict) -> None:
    """An HF model directory plus the config and manifest that made it."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    cfg.dump(out / "alambic_config.json")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
