"""`alambic loop`: rounds of collect → train → evaluate under one teacher budget, spending each round's queries
where the student is weakest.

Each round, the student's error per skill is measured on probe prompts (train split, never collected, never the
held-out test prompts), and the round's new teacher queries are split across skills in proportion to that error
(with a floor, so no skill is starved). The first round has no student yet and splits evenly. The same rounds with
an even split every time ("uniform") are the baseline, run side by side at the same budget and seeds; both curves,
held-out accuracy against teacher queries, go to loop/loop.json and into the report.

The student is trained from scratch each round on everything collected so far (or, with --warm-start, the previous
round's student is trained on), for the same number of steps in both arms, so the curves differ only in which
prompts the teacher was asked. Collection goes through `alambic collect` and its cache: a prompt asked once is never
paid for again, by either arm or a re-run.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field, field_validator

from . import __version__, collect, tasks
from .config import Config

ARMS = ("targeted", "uniform")


class LoopConfig(Config):
    """Settings of a budgeted collect → train → evaluate loop."""

    teacher: str = Field(..., description="teacher model directory (served on 127.0.0.1) or an http(s)://…/v1 "
                                          "endpoint", json_schema_extra={"positional": True})
    api_key_env: str = Field("OPENAI_API_KEY", description="endpoint teacher: env var holding its API key")
    budget: int = Field(1500, gt=0, description="total teacher queries per arm (all rounds)")
    rounds: int = Field(3, gt=0, description="collect → train → evaluate rounds")
    skills: list[str] = Field(default_factory=lambda: list(tasks.SKILLS), description="skills to distil")
    arms: list[str] = Field(default_factory=lambda: list(ARMS), description="targeted and/or uniform allocation")
    seeds: list[int] = Field(default_factory=lambda: [0, 1], description="seeds (prompts, init, data order)")
    floor: float = Field(0.05, ge=0, lt=1, description="smallest share of a round's queries any skill gets")
    student: str = Field("preset:tiny", description="student: preset:NAME, prune:DIR or an HF model directory")
    layers: int | None = Field(None, gt=0, description="prune: student: decoder layers of DIR to keep")
    width: int | None = Field(None, gt=0, description="prune: student: MLP channels to keep")
    ratio: float | None = Field(None, gt=0, le=1, description="prune: student: parameter budget x DIR (e.g. 0.25; "
                                "picks hidden, heads and MLP width, as `alambic train --ratio`)")
    tokenizer: str | None = Field(None, description="student tokenizer directory (default: the teacher's)")
    loss: str = Field("forward_kl", description="training loss (see `alambic train --help`)")
    steps: int = Field(300, gt=0, description="student optimiser steps per round")
    warm_start: bool = Field(False, description="each round continues the previous round's student (on everything "
                             "collected so far) instead of starting again from --student")
    lr: float = Field(3e-3, gt=0, description="student peak learning rate")
    batch_size: int = Field(16, gt=0, description="student packed rows per step")
    top_logprobs: int = Field(5, ge=0, le=20, description="teacher top-k logprobs to collect (0: text only)")
    max_tokens: int = Field(200, gt=0, description="max tokens per teacher answer")
    n_probe: int = Field(30, gt=0, description="probe prompts per skill for the allocation")
    n_test: int = Field(50, gt=0, description="held-out test prompts per skill for the curves")
    concurrency: int = Field(32, gt=0, description="teacher requests in flight")
    out: str = Field("runs/loop", description="run folder; the curves go to OUT/loop/loop.json")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")

    @field_validator("arms")
    @classmethod
    def _check_arms(cls, v: list[str]) -> list[str]:
        if not v or any(a not in ARMS for a in v):
            raise ValueError(f"arms must be a non-empty subset of {', '.join(ARMS)}")
        return v


def allocate(n: int, errors: dict[str, float], floor: float = 0.0) -> dict[str, int]:
    """Split `n` queries over skills in proportion to their error, each share at least `floor` (no errors at all:
    evenly). Largest-remainder rounding, so the counts sum to exactly `n`."""
    if not errors:
        raise ValueError("allocate needs at least one skill")
    if floor * len(errors) > 1:
        raise ValueError(f"floor {floor} x {len(errors)} skills exceeds the whole budget; lower --floor")
    total = sum(errors.values())
    shares = {k: floor + (1 - floor * len(errors)) * (v / total if total > 0 else 1 / len(errors))
              for k, v in errors.items()}
    raw = {k: n * s for k, s in shares.items()}
    counts = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def _write_prompts(path: Path, pools: dict[str, list[tasks.Example]], counts: dict[str, int]) -> None:
    with open(path, "w") as f:
        for skill, n in counts.items():
            for ex in pools[skill][:n]:
                f.write(json.dumps({"messages": ex.messages, "skill": skill, "reference": ex.reference,
                                    "split": "train", "source": f"skill:{skill}"}) + "\n")


def run_arm(cfg: LoopConfig, arm: str, seed: int, base_url: str, keys_file: str | None, teacher_id: str | None,
            log: Callable[[str], None]) -> list[dict]:
    """One arm at one seed: its curve, a point per round."""
    from .modeling import load
    from .teacher import skill_accuracy
    from .train import trainer

    folder = Path(cfg.out) / "loop" / f"{arm}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    per_round = [cfg.budget // cfg.rounds + (1 if r < cfg.budget % cfg.rounds else 0) for r in range(cfg.rounds)]
    pools = {s: tasks.get(s).generate(cfg.budget, "train", seed=seed) for s in cfg.skills}
    probe_pool = {s: tasks.get(s).generate(cfg.n_probe + cfg.budget, "train", seed=seed + 7919) for s in cfg.skills}
    test = tasks.generate(cfg.skills, cfg.n_test, "test", seed=seed)
    counts = dict.fromkeys(cfg.skills, 0)
    curve: list[dict] = []
    errors: dict[str, float] | None = None
    for r, n_new in enumerate(per_round):
        new = allocate(n_new, errors, cfg.floor) if (arm == "targeted" and errors) else \
            allocate(n_new, dict.fromkeys(cfg.skills, 1.0))
        counts = {s: counts[s] + new[s] for s in cfg.skills}
        prompts = folder / f"round{r}-prompts.jsonl"
        _write_prompts(prompts, pools, counts)
        log(f"{arm} seed {seed} round {r + 1}/{cfg.rounds}: collecting {sum(counts.values())} prompts {counts}")
        got = collect.run(collect.CollectConfig(
            base_url=base_url, api_keys_file=keys_file, api_key_env=cfg.api_key_env if not keys_file else "",
            teacher_id=teacher_id, prompts=str(prompts), max_tokens=cfg.max_tokens, top_logprobs=cfg.top_logprobs,
            concurrency=cfg.concurrency, store=str(Path(cfg.out) / "cache.sqlite"),
            out=str(folder / f"round{r}" / "interactions.jsonl")))
        log(f"{arm} seed {seed} round {r + 1}: training the student")
        teacher_dir = None if cfg.teacher.startswith(("http://", "https://")) else cfg.teacher
        trainer.run(trainer.TrainConfig(
            data=[got["output"]], out=str(folder / f"round{r}" / "student"),
            **({"student": str(folder / f"round{r - 1}" / "student")} if cfg.warm_start and r else
               {"student": cfg.student, "layers": cfg.layers, "width": cfg.width, "ratio": cfg.ratio}),
            tokenizer=cfg.tokenizer or teacher_dir, loss=cfg.loss if cfg.top_logprobs else "sft", steps=cfg.steps,
            lr=cfg.lr, batch_size=cfg.batch_size, warmup=min(30, cfg.steps // 10), packing=True, eval_every=0,
            heldout_n=0, save_every=0, seed=seed, threads=cfg.threads, val_fraction=0.0))
        model, tok = load(folder / f"round{r}" / "student")
        model.eval()
        acc = skill_accuracy(model, tok, test, cfg.max_tokens)
        probe = []
        for s in cfg.skills:  # prompts of the train split that this arm has not collected
            asked = {ex.prompt for ex in pools[s][: counts[s]]}
            probe += [ex for ex in probe_pool[s] if ex.prompt not in asked][: cfg.n_probe]
        probe_acc = skill_accuracy(model, tok, probe, cfg.max_tokens)
        errors = {s: 1 - probe_acc[s] for s in cfg.skills}
        curve.append({"round": r + 1, "queries": sum(counts.values()), "counts": counts,
                      "requests_sent": got["requests_sent"], "accuracy": acc["mean"], "per_skill": acc,
                      "probe_error": errors})
        log(f"{arm} seed {seed} round {r + 1}: held-out accuracy {acc['mean']:.3f}")
    return curve


def compare(curves: dict[str, list[dict]], n: int, seeds: list[int]) -> tuple[list[int], str]:
    """Targeted minus uniform at each budget, with the gap's standard error (added to the targeted points), the
    budgets where targeted is ahead, and a one-line summary. `n`: graded answers behind each point (n_test x skills
    x seeds); the error is computed as if the arms were graded on independent prompts (they share them, so this
    overstates it)."""
    if not {"targeted", "uniform"} <= set(curves):
        return [], ""
    for p, u in zip(curves["targeted"], curves["uniform"], strict=True):
        p["gap_vs_uniform"] = round(p["accuracy"] - u["accuracy"], 4)
        p["gap_se"] = round(math.sqrt((p["accuracy"] * (1 - p["accuracy"]) + u["accuracy"] * (1 - u["accuracy"])) / n),
                            4)
    wins = [p["queries"] for p in curves["targeted"] if p["gap_vs_uniform"] > 0]
    gaps = "; ".join(f"{p['queries']} queries: {100 * p['gap_vs_uniform']:+.1f} points (standard error "
                     f"{100 * p['gap_se']:.1f})" for p in curves["targeted"])
    head = (f"targeted allocation beats uniform at {', '.join(map(str, wins))} teacher queries" if wins else
            "targeted allocation does not beat uniform at any budget here")
    return wins, f"{head} (mean over seeds {seeds}; targeted minus uniform: {gaps})"


def run(cfg: LoopConfig, log: Callable[[str], None] = lambda _: None) -> dict:
    """Both arms over every seed; writes OUT/loop/loop.json (curves averaged over seeds) and returns it."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.budget < cfg.rounds * len(cfg.skills):
        raise ValueError(f"budget {cfg.budget} is too small for {cfg.rounds} rounds over {len(cfg.skills)} skills; "
                         "raise --budget or lower --rounds")
    t0 = time.time()
    out = Path(cfg.out)
    (out / "loop").mkdir(parents=True, exist_ok=True)
    cfg.dump(out / "loop" / "config.json")
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in cfg.arms}
    teacher_acc: list[float] = []

    def teacher_accuracy(base_url: str, api_key: str) -> None:
        """The teacher on each seed's held-out test prompts: the ceiling the curves are drawn against."""
        from .evaluate import Endpoint

        for seed in cfg.seeds:
            test = tasks.generate(cfg.skills, cfg.n_test, "test", seed=seed)
            replies = Endpoint(base_url, api_key=api_key).answer([ex.messages for ex in test], cfg.max_tokens,
                                                                 cfg.concurrency)[0].replies
            teacher_acc.append(tasks.accuracy(test, replies)["mean"])
        log(f"teacher held-out accuracy {statistics.mean(teacher_acc):.3f}")

    if cfg.teacher.startswith(("http://", "https://")):
        import os

        teacher_accuracy(cfg.teacher, os.environ.get(cfg.api_key_env, ""))
        for seed in cfg.seeds:
            for arm in cfg.arms:
                runs[arm].append(run_arm(cfg, arm, seed, cfg.teacher, None, None, log))
    else:
        if not Path(cfg.teacher).exists():
            raise FileNotFoundError(f"teacher {cfg.teacher!r} not found: give a model directory or an endpoint URL")
        from .demo import teacher_id
        from .serve import ServeConfig, serve_in_process

        log(f"serving the teacher {cfg.teacher} on 127.0.0.1")
        with serve_in_process(ServeConfig(model=cfg.teacher, port=0)) as url:
            teacher_accuracy(url + "/v1", "")
            for seed in cfg.seeds:
                for arm in cfg.arms:
                    runs[arm].append(run_arm(cfg, arm, seed, url + "/v1", None, teacher_id(cfg.teacher), log))
    curves = {}
    for arm, per_seed in runs.items():
        curves[arm] = [{"round": r + 1, "queries": per_seed[0][r]["queries"],
                        "accuracy": statistics.mean(c[r]["accuracy"] for c in per_seed),
                        "accuracy_sd": statistics.pstdev(c[r]["accuracy"] for c in per_seed),
                        "per_seed": [c[r]["accuracy"] for c in per_seed]} for r in range(cfg.rounds)]
    wins, summary = compare(curves, cfg.n_test * len(cfg.skills) * len(cfg.seeds), cfg.seeds)
    result = {"kind": "alambic.loop", "alambic_version": __version__, "budget": cfg.budget, "rounds": cfg.rounds,
              "seeds": cfg.seeds, "teacher_accuracy": statistics.mean(teacher_acc), "curves": curves, "runs": runs,
              "targeted_wins_at": wins, "summary": summary, "seconds": round(time.time() - t0, 1)}
    (out / "loop" / "loop.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
