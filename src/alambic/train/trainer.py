"""`alambic train`: turn teacher interactions into a small student, with every standard distillation loss.

Reads: interactions (JSONL / Parquet from `alambic collect`); optionally a local teacher model (full logits) or an
HTTP teacher (top-k logprobs of student samples, for on-policy distillation).
Writes to `out`: a plain HF model directory (loads with `AutoModelForCausalLM.from_pretrained` and `alambic serve`),
`alambic_config.json` (the resolved config), `manifest.json` (data hashes, teacher identity, student base,
versions, counts, time) and `curve.jsonl` (training curve: loss, validation loss, held-out skill accuracy).

Losses (`loss`), by what the teacher gives:
- `sft`: cross-entropy on the teacher's tokens (sequence-level KD, Kim & Rush, 2016);
- `forward_kl`, `reverse_kl`, `jsd`: on a local teacher's full logits (`teacher`), computed on the fly, else on the
  stored top-k logprobs (the rest of the teacher's mass spread over the other tokens, or one tail bucket: see
  losses.py); plus, with a local teacher's weights, its attention relations (--relation-weight, MiniLMv2);
- `on_policy`: GKD (Agarwal et al., ICLR 2024): with probability `on_policy_lambda` a step trains on completions
  sampled from the student itself for the batch's prompts, scored by the teacher (local: full logits; HTTP:
  `/v1/completions` with `echo` and `logprobs`), with the divergence `divergence`; otherwise on the stored data.
  MiniLLM (Gu et al., ICLR 2024) motivates the same thing: the student learns where it actually goes.

The engine is `accelerate`: it places model, optimiser and data, so `accelerate launch` runs the same command on
several processes (each step's global batch is split between them). Checkpoints (`accelerator.save_state`) every
`save_every` steps; `resume` continues from the last one and ends at the same step, on the same batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import transformers
from pydantic import Field, field_validator
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .. import __version__, tasks
from ..config import Config
from ..modeling import n_params
from ..teacher import encode, lr_factor, skill_accuracy
from . import data as D
from .losses import LOSSES, relation_kl
from .students import Shape, decoder_layers, lora, make_student, merged

log = logging.getLogger(__name__)

TRAIN_LOSSES = [*LOSSES, "on_policy"]
CHECKPOINT = "checkpoint"  # the one checkpoint directory inside `out` (replaced at each save)


class TrainConfig(Config):
    """Settings of a distillation run."""

    # inputs and outputs
    data: list[str] = Field(
        default_factory=lambda: ["runs/collect/interactions.jsonl"],
        description="interactions file(s) from `alambic collect` (.jsonl or .parquet)",
    )
    out: str = Field("runs/train/student", description="output directory (an HF model directory + run records)")
    # the student
    student: str = Field("preset:tiny", description="preset:NAME, prune:TEACHER_DIR, or an HF model directory")
    tokenizer: str | None = Field(None, description="tokenizer directory for a preset student (default: --teacher)")
    ratio: float | None = Field(None, gt=0, le=1, description="prune: parameter budget × the source (e.g. 0.25); "
                                "picks hidden, heads and MLP width, widths first (Minitron)")
    layers: int | None = Field(None, gt=0, description="prune: decoder layers to keep")
    layer_select: Literal["even", "importance"] = Field(
        "even", description="prune: which layers to keep: evenly spaced, or by Block Importance")
    hidden: int | None = Field(None, gt=0, description="prune: hidden (embedding) channels to keep, by importance")
    heads: int | None = Field(None, gt=0, description="prune: attention heads to keep per layer, by importance")
    width: int | None = Field(None, gt=0, description="prune: MLP channels to keep per layer, by importance")
    lora_r: int = Field(0, ge=0, description="LoRA rank (0: train every weight); adapters are merged on save")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_targets: list[str] = Field(default_factory=list, description="LoRA target modules (default: all linear)")
    # the teacher signal
    loss: str = Field("sft", description=f"training loss: {', '.join(TRAIN_LOSSES)}")
    beta: float = Field(0.5, gt=0, lt=1, description="jsd mixture weight β")
    tail: Literal["spread", "bucket"] = Field(
        "spread", description="stored top-k: the teacher's mass outside its top-k spread evenly over the other tokens "
        "(spread), or one tail bucket against the student's whole tail (bucket: lets the student put that mass on "
        "any one token, end-of-text included)")
    teacher: str | None = Field(None, description="local teacher model directory: full logits, computed on the fly")
    teacher_url: str | None = Field(None, description="HTTP teacher base URL (…/v1) to score on-policy samples")
    teacher_model: str = Field("", description="HTTP teacher model name ('' = the first one listed)")
    teacher_api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the HTTP teacher's API key")
    relation_weight: float = Field(
        0.0, ge=0, description="weight of MiniLMv2's self-attention relation loss against the local --teacher (0: off; "
        "white-box: the teacher's queries, keys and values of one layer)")
    relation_teacher: str | None = Field(
        None, description="local model whose attention relations the student learns (default: the local --teacher); "
        "the logits still come from --teacher or the stored top-k, so a teacher run only for its relations")
    relation_steps: int = Field(0, ge=0, description="the relation loss on the first N steps only (0: on every step)")
    relation_layer: int = Field(-1, description="student layer whose relations are distilled (-1: the last), matched "
                                "to the teacher's layer at the same depth")
    relation_dtype: Literal["auto", "bfloat16", "float32"] = Field(
        "auto", description="precision of a teacher pass that gives only relations (its Q/K/V are targets, not "
        "gradients; the relations themselves are float32): auto is bfloat16 autocast where the device computes it "
        "natively (2.5x faster on a CPU with AMX, 10x slower emulated on one without), else float32")
    top_k: int = Field(0, ge=0, le=20, description="top-k logprobs used (0: all stored; 20 asked of an HTTP teacher)")
    on_policy_lambda: float = Field(0.5, ge=0, le=1, description="on_policy: fraction of steps on student samples")
    divergence: str = Field("jsd", description="on_policy: divergence (forward_kl, reverse_kl or jsd)")
    gen_max_tokens: int = Field(128, gt=0, description="on_policy: max tokens sampled per prompt")
    gen_temperature: float = Field(1.0, gt=0, description="on_policy: sampling temperature of the student")
    # data
    max_len: int = Field(512, gt=8, description="max tokens per sequence (and per packed row)")
    packing: bool = Field(False, description="pack several examples per row (no attention across them)")
    val_fraction: float = Field(0.05, ge=0, lt=1, description="share of interactions held out for validation")
    # optimisation
    steps: int = Field(200, gt=0, description="optimiser steps")
    batch_size: int = Field(16, gt=0, description="rows per optimiser step, over all processes")
    grad_accum: int = Field(1, gt=0, description="micro-batches of `batch_size` accumulated per step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (linear warm-up, cosine decay to --min-lr)")
    min_lr: float = Field(0.1, ge=0, le=1, description="learning rate at the last step, × the peak")
    ema: float = Field(0.0, ge=0, lt=1, description="decay of an exponential moving average of the weights, which "
                       "the final validation and the saved model use (0: off, the last step's weights)")
    warmup: int = Field(10, ge=0, description="warm-up steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: none)")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "no", description="accelerate mixed precision: no, fp16 or bf16"
    )
    # bookkeeping
    eval_every: int = Field(50, ge=0, description="steps between validation checks (0: at the end only)")
    heldout_n: int = Field(20, ge=0, description="held-out prompts per skill for greedy accuracy (0: none)")
    save_every: int = Field(100, ge=0, description="steps between checkpoints (0: none)")
    resume: bool = Field(False, description="continue from the checkpoint in `out`")
    seed: int = Field(0, description="seed of initialisation, data order, split and sampling")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, v: str) -> str:
        if v not in TRAIN_LOSSES:
            raise ValueError(f"unknown loss; choose one of {', '.join(TRAIN_LOSSES)}")
        return v

    @field_validator("divergence")
    @classmethod
    def _check_divergence(cls, v: str) -> str:
        if v not in ("forward_kl", "reverse_kl", "jsd"):
            raise ValueError("divergence must be forward_kl, reverse_kl or jsd")
        return v

    @field_validator("data")
    @classmethod
    def _check_data(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one interactions file")
        return v

    @property
    def divergence_name(self) -> str:
        return self.divergence if self.loss == "on_policy" else self.loss


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware (a CPU without AVX512-BF16/AMX emulates them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return False


class _Captured(Exception):
    """Raised by `capture_qkv(stop=True)` once the layer's projections are out: the rest of the pass is not needed."""


@contextlib.contextmanager
def capture_qkv(model, layer: int, stop: bool = False):
    """[queries, keys, values]: the outputs of one decoder layer's q/k/v projections in the forward pass run inside.
    With `stop`, the forward pass ends there (it raises `_Captured`, which this context swallows): a teacher that
    gives only its relations skips the layers above and its output head."""
    attn = decoder_layers(model)[layer].self_attn
    got: dict[str, torch.Tensor] = {}

    def keep(p: str, y: torch.Tensor) -> None:
        got[p] = y
        if stop and len(got) == 3:
            raise _Captured

    hooks = [getattr(attn, f"{p}_proj").register_forward_hook(lambda _m, _a, y, p=p: keep(p, y)) for p in "qkv"]
    out: list[torch.Tensor] = []
    try:
        yield out
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
        out.extend(got[p] for p in "qkv" if p in got)


# --- teacher signal --------------------------------------------------------------------------------------------------


class HttpScorer:
    """Scores token sequences with an OpenAI-compatible `/v1/completions` teacher: `echo` + `logprobs` k and no new
    tokens give each token's top-k logprobs given the ones before it (vLLM and `alambic serve` support this)."""

    def __init__(self, cfg: TrainConfig, table: dict[str, int]) -> None:
        import os

        import httpx

        key = os.environ.get(cfg.teacher_api_key_env, "")
        self.client = httpx.Client(
            base_url=cfg.teacher_url.rstrip("/"), timeout=120, headers={"Authorization": f"Bearer {key}"} if key else {}
        )
        self.k = cfg.top_k or 20
        self.table = table
        self.model = cfg.teacher_model or self.client.get("/models").raise_for_status().json()["data"][0]["id"]

    def _one(self, ids: list[int]) -> dict:
        body = {"model": self.model, "prompt": ids, "echo": True, "logprobs": self.k, "max_tokens": 0}
        reply = self.client.post("/completions", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"teacher scoring failed: HTTP {reply.status_code}: {reply.text[:300]}")
        return reply.json()["choices"][0]["logprobs"]

    def score(self, rows: list[list[int]], starts: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k ids and logprobs (B, width, k + 1) for the tokens of each row from `starts[r]` on (else -inf)."""
        from concurrent.futures import ThreadPoolExecutor

        top_ids = torch.zeros((len(rows), width, self.k + 1), dtype=torch.long)
        top_lp = torch.full((len(rows), width, self.k + 1), float("-inf"))
        with ThreadPoolExecutor(8) as pool:  # concurrent requests: a serving engine batches them
            replies = list(pool.map(self._one, rows))
        for r, (ids, start, lp) in enumerate(zip(rows, starts, replies, strict=True)):
            for t in range(start, len(ids)):
                if self.table.get(lp["tokens"][t]) not in (ids[t], -1):  # -1: a string several ids share
                    raise D.TokenizerMismatch(
                        "the HTTP teacher's tokens are not the student's, so its logprobs cannot be aligned: use a "
                        "teacher on the student's tokenizer, or --loss sft"
                    )
                # The reply's top entries hold the chosen token too (vLLM's shape), so up to k + 1 of them.
                alts = sorted(
                    ((v, self.table.get(s, -1)) for s, v in (lp["top_logprobs"][t] or {}).items()), reverse=True
                )
                alts = [(v, j) for v, j in alts if j >= 0][: self.k + 1]
                for s, (v, j) in enumerate(alts):
                    top_ids[r, t, s], top_lp[r, t, s] = j, v
                top_ids[r, t, len(alts) :] = alts[0][1] if alts else ids[t]
        return top_ids, top_lp


class Signal:
    """Computes the loss of a batch: chooses the teacher signal (labels, local logits, stored or scored top-k)."""

    def __init__(self, cfg: TrainConfig, teacher, scorer: HttpScorer | None, relation_teacher=None) -> None:
        self.cfg, self.teacher, self.scorer, self.relation_teacher = cfg, teacher, scorer, relation_teacher
        self.relation_bf16 = relation_teacher is not None and (cfg.relation_dtype == "bfloat16" or (
            cfg.relation_dtype == "auto" and native_bf16(next(relation_teacher.parameters()).device)))

    def loss(self, model, batch: dict[str, torch.Tensor], name: str, relations: bool = False) -> torch.Tensor:
        """Mean loss `name` over the completion tokens of `batch`; only those positions reach the loss functions.
        With `relations` and a --relation-weight, plus that times the self-attention relation loss against the local
        teacher, over every position (prompt tokens included: they are what attention reads)."""
        if not (relations and self.relation_teacher is not None):
            return self.logit_loss(model, batch, name)
        rt = self.relation_teacher
        n_s, n_t = len(decoder_layers(model)), len(decoder_layers(rt))
        layer = self.cfg.relation_layer % n_s
        t_layer = round(layer * (n_t - 1) / max(1, n_s - 1))
        with capture_qkv(model, layer) as student, capture_qkv(rt, t_layer) as teacher:
            out = self.logit_loss(model, batch, name)  # runs the teacher too when it gives the logits
        if not teacher:  # the logits came from stored top-k (or another teacher): one pass for the relations
            half = torch.autocast(next(rt.parameters()).device.type, dtype=torch.bfloat16, enabled=self.relation_bf16)
            with torch.no_grad(), half, capture_qkv(rt, t_layer, stop=True) as teacher:
                rt(**D.model_inputs(batch))
        rel = relation_kl(student, teacher, D.segments(batch), rt.config.num_attention_heads)
        return out + self.cfg.relation_weight * rel

    def logit_loss(self, model, batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        kw = D.model_inputs(batch)
        logits = model(**kw).logits[:, :-1]  # (B, T-1, V): position t predicts t+1
        labels = batch["labels"][:, 1:]  # (B, T-1)
        keep = labels != D.IGNORE
        s = logits[keep].unsqueeze(0)  # (1, N, V)
        mask = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)  # (1, N)
        if name == "sft":
            return LOSSES["sft"](s, mask, labels=labels[keep].unsqueeze(0))
        if "top_ids" in batch:
            return LOSSES[name](
                s,
                mask,
                teacher_ids=batch["top_ids"][:, 1:][keep].unsqueeze(0).long(),
                teacher_logprobs=batch["top_lp"][:, 1:][keep].unsqueeze(0),
                beta=self.cfg.beta,
                tail=self.cfg.tail,
            )
        if self.teacher is None:
            raise ValueError(f"loss {name!r} needs a local --teacher or interactions with stored logprobs")
        with torch.no_grad():
            t = self.teacher(**kw).logits[:, :-1][keep].unsqueeze(0)  # (1, N, V_t)
        s, t = D.align_vocab(s, t)
        return LOSSES[name](s, mask, teacher_logits=t, beta=self.cfg.beta)

    @torch.no_grad()
    def sample(self, model, tokenizer, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """GKD's on-policy batch: the batch's prompts, completed by the student (sampling), scored by the teacher."""
        labels = batch["labels"]
        starts = [int((row != D.IGNORE).nonzero()[0]) for row in labels]
        prompts = [batch["input_ids"][r, :p].tolist() for r, p in enumerate(starts)]
        width = max(starts)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=labels.device)  # left padded
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=labels.device)
        torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            temperature=self.cfg.gen_temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.cfg.gen_max_tokens,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )[:, width:]  # (B, G)
        model.train(was_training)
        rows = []
        for p, g in zip(prompts, out.tolist(), strict=True):
            if tokenizer.eos_token_id in g:
                g = g[: g.index(tokenizer.eos_token_id) + 1]  # keep the end of turn: the student learns to stop
            rows.append(p + (g or [tokenizer.eos_token_id]))
        examples = [D.Example(ids=r, prompt_len=len(p)) for r, p in zip(rows, prompts, strict=True)]
        new = D.collate(examples, [[i] for i in range(len(examples))], pad, with_topk=False)
        if self.teacher is None:  # an HTTP teacher scores the samples now; a local one does in `loss`
            new["top_ids"], new["top_lp"] = self.scorer.score(rows, starts, new["input_ids"].shape[1])
        return {k: v.to(labels.device) for k, v in new.items()}


# --- helpers ---------------------------------------------------------------------------------------------------------


def teacher_identity(records: list[dict], teacher_dir: str | None, teacher_url: str | None) -> dict:
    seen = {
        json.dumps(
            {k: r.get("teacher", {}).get(k) for k in ("backend", "base_url", "model", "served_model")}, sort_keys=True
        )
        for r in records
    }
    return {"interactions": [json.loads(s) for s in sorted(seen)], "local": teacher_dir, "http": teacher_url}


def check_signal(cfg: TrainConfig, student_tok, teacher_tok, records: list[dict]) -> str:
    """Which teacher signal the stored data are trained on: 'labels', 'logits' (local teacher) or 'topk' (stored
    logprobs); fails early. On-policy distillation from an HTTP teacher with text-only data trains its off-policy
    steps with `sft` (the teacher's tokens are then the only teacher signal there is)."""
    name = cfg.divergence_name
    if cfg.loss == "on_policy" and cfg.teacher is None and cfg.teacher_url is None:
        raise ValueError("on_policy needs a teacher to score the student's samples: --teacher DIR or --teacher-url")
    if cfg.loss == "on_policy" and cfg.packing:
        raise ValueError("on_policy samples completions per prompt and cannot use --packing")
    if name == "sft":
        return "labels"
    if teacher_tok is not None:
        if not D.same_tokenizer(student_tok, teacher_tok):
            raise D.TokenizerMismatch(
                f"loss {name!r} compares token distributions, but the teacher's tokenizer is "
                "not the student's; use --loss sft (text only) or a student on the teacher's "
                "tokenizer"
            )
        return "logits"
    if cfg.loss == "on_policy" and not all(r.get("logprobs") for r in records):
        return "labels"
    return "topk"


def _evaluate(model, signal: Signal, batches: list[dict], name: str, accelerator) -> dict[str, float]:
    """Token-weighted validation loss (`name`) and teacher-token NLL over this process's share, summed over all."""
    sums = torch.zeros(3, device=accelerator.device)  # loss·n, nll·n, n
    model = accelerator.unwrap_model(model)  # processes may hold unequal shares: no DDP collectives in forward
    model.eval()
    with torch.no_grad():
        for b in batches[accelerator.process_index :: accelerator.num_processes]:
            b = {k: v.to(accelerator.device) for k, v in b.items()}
            n = int((b["labels"][:, 1:] != D.IGNORE).sum())
            nll = signal.loss(model, b, "sft")
            obj = nll if name == "sft" else signal.loss(model, b, name)
            sums += torch.tensor([obj.item() * n, nll.item() * n, n], device=sums.device)
    model.train()
    sums = accelerator.reduce(sums, "sum")
    n = max(float(sums[2]), 1.0)
    return {"val_loss": round(float(sums[0]) / n, 4), "val_nll": round(float(sums[1]) / n, 4)}


def _save_model(model, tokenizer, out: Path) -> None:
    plain = merged(model)
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- run -------------------------------------------------------------------------------------------------------------


def run(cfg: TrainConfig, progress: Callable[[dict], None] | None = None) -> dict:
    """Train a student on interactions; save it with its config, manifest and curve. Returns the manifest."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out = Path(cfg.out)
    ckpt = out / CHECKPOINT
    if (ckpt / "trainer_state.json").exists() and not cfg.resume:
        raise FileExistsError(
            f"{str(out)!r} holds a checkpoint of an earlier run; pass --resume to continue it, or choose another --out"
        )
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, dataloader_config=DataLoaderConfiguration(split_batches=True)
    )
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of the {accelerator.num_processes} "
            "processes (it is the global batch)"
        )
    set_seed(cfg.seed)

    # data, student and teacher
    records, hashes = D.read_interactions(cfg.data)
    train_recs, val_recs = D.split(records, cfg.val_fraction, cfg.seed)
    calib = []
    if cfg.student.startswith("prune:"):  # importance is measured on the training prompts
        from transformers import AutoTokenizer

        tok0 = AutoTokenizer.from_pretrained(cfg.student.removeprefix("prune:"))
        calib = [encode(tok0, r["prompt"], r["completion"])[0][: cfg.max_len] for r in train_recs[:64]]
    model, tokenizer, student_info = make_student(
        cfg.student,
        tokenizer_dir=cfg.tokenizer,
        teacher_dir=cfg.teacher,
        shape=Shape(cfg.layers, cfg.hidden, cfg.heads, cfg.width),
        ratio=cfg.ratio,
        layer_select=cfg.layer_select,
        calib=calib,
        seed=cfg.seed,
    )
    teacher = teacher_tok = None
    if cfg.teacher is not None:
        from ..modeling import load

        teacher, teacher_tok = load(cfg.teacher)
        teacher.requires_grad_(False)
    mode = check_signal(cfg, tokenizer, teacher_tok, records)
    relation_teacher = None
    if cfg.relation_weight:
        src = cfg.relation_teacher or cfg.teacher
        if src is None:
            raise ValueError("--relation-weight needs the teacher's weights: --relation-teacher DIR (or a local "
                             "--teacher DIR)")
        if src == cfg.teacher:
            relation_teacher = teacher
        else:
            from ..modeling import load

            relation_teacher, rel_tok = load(src)
            relation_teacher.requires_grad_(False)
            if not D.same_tokenizer(tokenizer, rel_tok):
                raise D.TokenizerMismatch(f"--relation-teacher {src} does not use the student's tokenizer: their "
                                          "positions would not line up")
    val_name = "sft" if mode == "labels" else cfg.divergence_name  # the objective on stored data
    table = D.token_table(tokenizer) if mode == "topk" or cfg.teacher_url else None
    t_enc = time.time()
    train_ex = D.encode_all(tokenizer, train_recs, table if mode == "topk" else None, cfg.top_k or None, cfg.max_len)
    val_ex = D.encode_all(tokenizer, val_recs, table if mode == "topk" else None, cfg.top_k or None, cfg.max_len)
    encode_s = time.time() - t_enc
    if not train_ex:
        raise ValueError("no training examples left (all prompts longer than --max-len?)")
    cut = sum(len(e.ids) == cfg.max_len for e in train_ex)
    if cut:
        log.warning("%d of %d training examples reach --max-len %d and may have been cut short; raise --max-len "
                    "to train on them whole", cut, len(train_ex), cfg.max_len)
    rows = D.rows_for(train_ex, cfg.max_len, cfg.packing)
    if len(rows) < cfg.batch_size:
        raise ValueError(f"only {len(rows)} training rows for --batch-size {cfg.batch_size}; collect more or lower it")
    with_topk = mode == "topk"
    pad = tokenizer.pad_token_id
    val_rows = D.rows_for(val_ex, cfg.max_len, cfg.packing)
    val_batches = [
        D.collate(val_ex, val_rows[i : i + cfg.batch_size], pad, with_topk)
        for i in range(0, len(val_rows), cfg.batch_size)
    ]
    skills = sorted({(r.get("meta") or {}).get("skill") for r in records} & set(tasks.SKILLS))
    heldout = tasks.generate(skills, cfg.heldout_n, "test", seed=cfg.seed) if skills and cfg.heldout_n else []

    if cfg.packing:  # fails on a model class that lets packed examples attend to each other
        for m in (model, teacher) if teacher is not None else (model,):
            diff = D.check_isolation(m, train_ex, pad)
            log.info("packing isolation of %s: max |logit diff| %.2g", type(m).__name__, diff)
    if cfg.lora_r:
        model = lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.train()
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup, cfg.steps, cfg.min_lr))
    model, opt, sched = accelerator.prepare(model, opt, sched)
    if teacher is not None:
        teacher.to(accelerator.device)
    # Polyak averaging (torch's swa_utils): the average of the last ~1/(1 - ema) steps' weights is saved instead of
    # the last step's, which sit wherever the final minibatches left them.
    ema = None
    if cfg.ema:
        ema = AveragedModel(accelerator.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
        accelerator.register_for_checkpointing(ema)

    # resume
    start, tokens, prior_s = 0, 0, 0.0
    curve_path = out / "curve.jsonl"
    if cfg.resume and (ckpt / "trainer_state.json").exists():
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        start, tokens, prior_s = state["step"], state["tokens"], state["elapsed_s"]
        log.info("resuming from step %d", start)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        kept = [
            ln
            for ln in (curve_path.read_text().splitlines() if start and curve_path.exists() else [])
            if json.loads(ln)["step"] < start
        ]
        curve_path.write_text("".join(ln + "\n" for ln in kept))

    sampler = D.StepBatches(len(rows), cfg.batch_size, cfg.steps, start, cfg.seed, cfg.grad_accum)
    loader = torch.utils.data.DataLoader(
        D.RowDataset(rows), batch_sampler=sampler, collate_fn=lambda b: D.collate(train_ex, b, pad, with_topk)
    )
    loader = accelerator.prepare(loader)
    scorer = HttpScorer(cfg, table) if cfg.loss == "on_policy" and cfg.teacher is None else None
    if relation_teacher is not None:
        relation_teacher.to(accelerator.device)
    signal = Signal(cfg, teacher, scorer, relation_teacher)
    unwrapped = accelerator.unwrap_model(model)

    def record(point: dict) -> None:
        if accelerator.is_main_process:
            with open(curve_path, "a") as f:
                f.write(json.dumps(point) + "\n")
            log.info("step %d %s", point["step"], point)
            if progress:
                progress(point)

    def checkpoint(step: int) -> None:
        tmp = out / (CHECKPOINT + ".tmp")
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            state = {"step": step, "tokens": tokens, "elapsed_s": round(prior_s + time.time() - t0, 1)}
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(ckpt, ignore_errors=True)
            tmp.rename(ckpt)  # the old checkpoint is replaced only once the new one is complete
        accelerator.wait_for_everyone()

    def validate(step: int, point: dict) -> None:
        point.update(_evaluate(model, signal, val_batches, val_name, accelerator) if val_batches else {})
        if heldout and accelerator.is_main_process:
            unwrapped.eval()
            point["heldout_acc"] = {k: round(v, 3) for k, v in skill_accuracy(unwrapped, tokenizer, heldout).items()}
            unwrapped.train()
        accelerator.wait_for_everyone()

    if start == 0 and val_batches:
        first = {"step": 0}
        first.update(_evaluate(model, signal, val_batches, val_name, accelerator))
        record(first)
    batches = iter(loader)
    t_loop, tok_loop = time.time(), 0
    on_steps = 0
    for step in range(start, cfg.steps):
        on_policy = cfg.loss == "on_policy" and random.Random(cfg.seed * 7919 + step).random() < cfg.on_policy_lambda
        on_steps += on_policy
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            name = "sft" if mode == "labels" else cfg.divergence_name
            if on_policy:
                name = cfg.divergence_name
                seed = cfg.seed * 1_000_003 + step * 101 + micro * 13 + accelerator.process_index
                batch = signal.sample(unwrapped, tokenizer, batch, seed)
            n = int(batch["attention_mask"].sum())
            tokens += n * accelerator.num_processes
            tok_loop += n * accelerator.num_processes
            sync = accelerator.no_sync(model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                relations = not cfg.relation_steps or step < cfg.relation_steps
                loss = signal.loss(model, batch, name, relations=relations) / cfg.grad_accum
                accelerator.backward(loss)
            total += loss.item()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        last = done == cfg.steps
        if ema is not None:
            ema.update_parameters(unwrapped)
            if last:  # the final validation and the save see the averaged weights
                with torch.no_grad():
                    for p, avg in zip(unwrapped.parameters(), ema.module.parameters(), strict=True):
                        p.copy_(avg)
        if done % 10 == 0 or last or (cfg.eval_every and done % cfg.eval_every == 0):
            point = {
                "step": done,
                "loss": round(total, 4),
                "lr": round(sched.get_last_lr()[0], 6),
                "tokens": tokens,
                "tokens_per_s": round(tok_loop / max(time.time() - t_loop, 1e-9), 1),
                "elapsed_s": round(prior_s + time.time() - t0, 1),
            }
            if grad_norm is not None:
                point["grad_norm"] = round(float(grad_norm), 4)
            if cfg.loss == "on_policy":
                point["on_policy"] = on_policy
            if last or (cfg.eval_every and done % cfg.eval_every == 0):
                validate(done, point)
            record(point)
        if cfg.save_every and done % cfg.save_every == 0 and not last:
            checkpoint(done)

    # save
    loop_s = time.time() - t_loop
    accelerator.wait_for_everyone()
    elapsed = prior_s + time.time() - t0
    final = {}
    if curve_path.exists():
        lines = curve_path.read_text().splitlines()
        final = json.loads(lines[-1]) if lines else {}
    manifest = {
        "kind": "alambic.train",
        "alambic_version": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": __import__("accelerate").__version__,
        "python": platform.python_version(),
        "processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "data": hashes,
        "teacher": teacher_identity(records, cfg.teacher, cfg.teacher_url),
        "student": {
            **student_info,
            "parameters": n_params(merged(unwrapped)) if not cfg.lora_r else n_params(unwrapped.get_base_model()),
            "lora_r": cfg.lora_r,
        },
        "loss": cfg.loss,
        "divergence": cfg.divergence_name,
        "signal": mode,
        "counts": {
            "interactions": len(records),
            "train_examples": len(train_ex),
            "val_examples": len(val_ex),
            "train_rows": len(rows),
            "steps": cfg.steps,
            "tokens_seen": tokens,
            "on_policy_steps_this_session": on_steps,
        },
        "topk_bytes_per_token": round(D.topk_bytes_per_token(train_ex), 2) if with_topk else None,
        "encode_s": round(encode_s, 2),
        "loop_s": round(loop_s, 2),  # this session's steps, validation and checkpoints included
        "tokens_per_s": round(tok_loop / max(loop_s, 1e-9), 1),
        "final": final,
        "train_seconds": round(elapsed, 1),
        "resumed_from_step": start or None,
    }
    if accelerator.is_main_process:
        _save_model(unwrapped, tokenizer, out)
        cfg.dump(out / "alambic_config.json")
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(ckpt, ignore_errors=True)  # the run is complete: its optimiser state is no longer needed
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`python -m alambic.train --config FILE.toml [--name value ...]`, the same settings as `alambic train`.

    This entry exists for `accelerate launch -m alambic.train` and for tests that kill a run mid-way."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m alambic.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="TOML file of TrainConfig settings")
    parser.add_argument("--resume", action="store_true", default=None, help="continue from the checkpoint in out")
    args, rest = parser.parse_known_args(argv)
    overrides: dict = {}
    for flag, value in zip(rest[::2], rest[1::2], strict=False):
        key = flag.lstrip("-").replace("-", "_")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value.split(",") if key in ("data", "lora_targets") else value
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    cfg = TrainConfig.resolve(args.config, section="train", resume=args.resume, **overrides)
    manifest = run(cfg)
    sys.stderr.write(json.dumps({"out": cfg.out, "final": manifest["final"]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
