"""`alambic demo`: the main job, offline, on the embedded demo teacher, in one command.

Stages: serve the shipped demo teacher over real HTTP on 127.0.0.1 (API keys, access log) → ask it the held-out
skill prompts through the OpenAI-compatible API and grade its answers → collect the student's training set from it
through several API keys with `alambic collect` (cached: a re-run pays for nothing) → the provider's view: does
`guard detect` find that collection among simulated benign users? → train a student of 1/4 of the teacher's
parameters on the collected top-k logprobs (`alambic train`; by default pruned from the teacher, Minitron-style, as
a provider makes its own cheaper model; `--student preset:tiny` is the outside distiller's from-scratch path;
reused on a re-run when data and settings are the same) → `alambic evaluate` student beside teacher → the
watermark's evidence (on by default: the API above served every completion with a green-list watermark under a key
made for the run; a control student is distilled the same way from a small collection of the unwatermarked
teacher; `guard provenance` tests both students for the key) → `alambic report`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from . import __version__, collect, tasks
from .config import Config

DEMO_TEACHER = Path(__file__).resolve().parents[2] / "models" / "demo-teacher"
# The demo's server decodes on every core (at most 8), not serve's default half: while it collects, nothing else
# runs but the collecting client, and on 2 cores that gave 1.2-1.3x the tokens/s (bench/serve.py, all_cores).
SERVE_THREADS = min(8, os.cpu_count() or 1)


class DemoConfig(Config):
    """Settings of the offline demo."""

    profile: Literal["tiny", "smollm2"] = Field(
        "tiny", description="tiny: the embedded demo teacher; smollm2: SmolLM2-135M-Instruct as the teacher (slow; "
                            "every size flag: `alambic demo-smollm2 --help`)")
    teacher: str = Field(str(DEMO_TEACHER), description="teacher model directory to serve")
    out: str = Field("runs/demo", description="run folder for the demo's outputs")
    n_eval: int = Field(100, gt=0, description="held-out prompts per skill")
    concurrency: int = Field(64, gt=0, description="requests in flight at once (and the server's batch size)")
    max_tokens: int = Field(200, gt=0, description="max tokens per teacher answer")
    seed: int = Field(0, description="seed of the held-out prompts")
    n_collect: int = Field(1000, ge=0, description="training prompts per skill to collect from the teacher")
    top_logprobs: int = Field(5, ge=0, le=20, description="top-k teacher logprobs to collect per token")
    n_keys: int = Field(4, ge=1, description="API keys the demo's collection is spread over")
    guard: bool = Field(True, description="mix the demo's traffic into simulated benign traffic and run guard detect")
    guard_scale: float = Field(0.01, gt=0, description="size of the simulated benign population (1.0 = 200k accounts)")
    guard_reference_scale: float = Field(
        0.05, ge=0, description="size of the trusted benign log (another draw of benign users) that calibrates guard's "
        "flag threshold, as a provider supplies with `guard detect --reference` (0: the log's own held-out slice)")
    student: str = Field("prune", description="student to train: `prune` (the provider's own: the teacher pruned "
                         "to --student-ratio of its parameters, Minitron-style, then distilled; needs the teacher's "
                         "weights), `preset:NAME` (an outside distiller's, from scratch: only the API is at hand), or "
                         "any `alambic train --student` spec")
    student_ratio: float = Field(0.25, gt=0, le=1, description="prune: the student's parameter budget × the "
                                 "teacher's (hidden, heads and MLP width shrink together, every layer kept)")
    loss: str = Field("forward_kl", description="distillation loss (see `alambic train --help`)")
    train_steps: int = Field(1000, ge=0, description="student optimiser steps (0: stop after collection)")
    relation_steps: int = Field(
        300, ge=0, description="prune: the student's first N steps also learn the teacher's self-attention relations "
        "(MiniLMv2; white-box, the teacher's weights: 91.1-93.7% kept over 3 runs against 83.7-87.5% without, at "
        "1.3-1.5x the training time)")
    train_lr: float = Field(3e-3, gt=0, description="student peak learning rate")
    train_batch: int = Field(16, gt=0, description="student packed rows per step")
    train_max_len: int = Field(320, gt=8, description="tokens per packed row: just above the longest demo example "
                               "(272), since attention's cost grows with the row (1.3x the tokens/s of 512 here)")
    watermark: bool = Field(True, description="serve the collection watermarked (a key made for the run), distil a "
                            "control student from the unwatermarked teacher, and test both with guard provenance")
    n_control: int = Field(200, gt=0, description="training prompts per provenance skill the control student learns "
                           "from")
    control_steps: int = Field(60, gt=0, description="optimiser steps of the control student")
    provenance_skills: list[str] = Field(["naming"], description="skills whose held-out prompts the students are "
                                         "tested on (naming: where the teacher has a choice to mark)")
    provenance_n: int = Field(100, gt=0, description="provenance prompts per skill, 2 samples each")
    provenance_temperature: float = Field(
        0.3, ge=0, description="sampling temperature of the students' provenance answers: a small student learns "
                               "the teacher's marked preferences only weakly, and a cooler sample shows them "
                               "(at 1.0 its near-uniform letters hid them in our runs)")
    report: bool = Field(True, description="write the HTML/Markdown report")


def teacher_id(folder: str) -> str:
    """A name for the served teacher that is stable across runs (the server's port is not) and changes with its
    weights, so the cache never serves answers of an older teacher."""
    h = hashlib.sha256()
    for f in sorted(Path(folder).glob("*.safetensors")):
        h.update(f.read_bytes())
    return f"demo:{Path(folder).name}:{h.hexdigest()[:16]}"


def ask(url: str, conversations: list[list[dict]], max_tokens: int, concurrency: int, api_key: str = "") -> list[str]:
    """Greedy answers of the server at `url` (as `serve_in_process` gives it), through `evaluate`'s endpoint client."""
    from .evaluate import Endpoint

    return Endpoint(url + "/v1", api_key=api_key).answer(conversations, max_tokens, concurrency)[0].replies


def find_demo_campaign(cfg: DemoConfig, out: Path, demo_accounts: list[str], log: Callable[[str], None]) -> dict:
    """The provider's view: the demo's collection hidden among simulated benign users; does guard find it?"""
    from datetime import UTC, datetime, timedelta

    from .guard import detect, simulate

    days = 2.0
    # The benign window ends just after the demo's own traffic, so both share one timeline.
    start = (datetime.now(UTC) - timedelta(days=days - 0.05)).isoformat().replace("+00:00", "Z")
    log("simulating benign API traffic and mixing in the demo's collection traffic")
    simulate.run(simulate.SimulateConfig(out=str(out / "guard" / "benign"), scale=cfg.guard_scale, days=days,
                                         start=start, campaigns=[], seed=cfg.seed))
    logs = [str(out / "guard" / "benign" / "access.jsonl"), str(out / "access.jsonl")]
    # The provider's trusted reference: benign users it knows (another draw). Two days at guard_scale 0.01 leave the
    # log's own held-out slice too small to resolve a 0.1% false-positive rate (~400 accounts), so the threshold
    # would be its highest score; 0.05 gives ~2,200 reference accounts and the calibrated quantile.
    reference = []
    if cfg.guard_reference_scale:
        simulate.run(simulate.SimulateConfig(out=str(out / "guard" / "reference"), scale=cfg.guard_reference_scale,
                                             days=days, start=start, campaigns=[],
                                             seed=cfg.seed + 1000, format="parquet"))
        reference = [str(out / "guard" / "reference" / "access.parquet")]
    log("running guard detect on the mixed access log")
    result = detect.run(detect.DetectConfig(logs=logs, out=str(out / "guard" / "detect"), reference=reference))
    import pyarrow.parquet as pq

    acc = pq.read_table(out / "guard" / "detect" / "accounts.parquet",
                        columns=["account_id", "flagged", "campaign", "review_group"])
    rows = acc.to_pylist()
    flagged = {r["account_id"] for r in rows if r["flagged"]}
    demo_rows = [r for r in rows if r["account_id"] in demo_accounts]
    demo_campaigns = {r["campaign"] for r in demo_rows if r["campaign"]}
    demo_reviews = {r["review_group"] for r in demo_rows}
    benign_flagged = sorted(a for a in flagged if a not in demo_accounts and not a.startswith("acct_demo_"))
    found = len(demo_campaigns) == 1 and all(r["campaign"] in demo_campaigns for r in demo_rows)
    # Linked as one group but not flagged: the purpose evidence is below the calibrated threshold (issue 16).
    review = None
    if not found and len(demo_reviews) == 1 and None not in demo_reviews:
        group = next(g for g in json.loads((out / "guard" / "detect" / "review.json").read_text())
                     if g["id"] in demo_reviews)
        review = {"group": group["id"], "accounts": group["accounts"], "link_kinds": group["link_kinds"],
                  "purpose_score_median": group["purpose_score_median"]}
    return {"demo_accounts": len(demo_accounts), "demo_accounts_flagged": len(flagged & set(demo_accounts)),
            "demo_found_as_campaign": found, "demo_for_review": review,
            "benign_accounts": len(rows) - len(demo_accounts), "benign_flagged": len(benign_flagged),
            "events": result.get("events"), "campaigns": result.get("campaigns"),
            "threshold": result["calibration"]["threshold"], "reference": result["calibration"]["reference"],
            "reference_accounts": result["calibration"]["reference_accounts"]}


def guard_verdict(g: dict) -> tuple[str, str]:
    """What guard made of the demo's collection (`find_demo_campaign`'s result), in words, and its status: found,
    review or missed. The CLI and the report both say it this way."""
    if g["demo_found_as_campaign"]:
        status, text = "found", "found as one campaign"
    elif (r := g.get("demo_for_review")) is not None:
        status, text = "review", (f"linked as one group for review ({r['group']}: {', '.join(r['link_kinds'])}), "
                                  f"not flagged: median purpose score {r['purpose_score_median']:g} at or below the "
                                  f"threshold {g['threshold']:g}")
    else:
        status, text = "missed", "NOT found as a campaign"
    text += (f"; {g['demo_accounts_flagged']}/{g['demo_accounts']} demo accounts flagged, {g['benign_flagged']} "
             "benign accounts flagged")
    if g.get("threshold") is not None:
        text += (f" (flag threshold {g['threshold']:g}, from {g['reference_accounts']:,} reference accounts: "
                 f"{g['reference']})")
    return status, text


def _same_run(folder: Path, cfg) -> bool:
    """Whether `folder` already holds a finished training run of exactly these settings and data."""
    from .train.data import read_interactions

    try:
        saved = json.loads((folder / "alambic_config.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return saved == json.loads(cfg.model_dump_json()) and manifest.get("data") == read_interactions(cfg.data)[1]


def run(cfg: DemoConfig, log: Callable[[str], None] = lambda _: None,
        progress: Callable[[dict], None] | None = None) -> dict:
    from .serve import ServeConfig, serve_in_process

    if not Path(cfg.teacher).exists():
        raise FileNotFoundError(f"demo teacher {cfg.teacher!r} not found; re-make it with `make teacher`")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.dump(out / "config.json")
    t0 = time.time()
    stages: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        stages[name] = round(time.time() - since, 1)
        return time.time()

    key_file, key_name = watermark_key(out) if cfg.watermark else (None, "")
    heldout = tasks.generate(None, cfg.n_eval, "test", seed=cfg.seed)
    # The demo's own API keys: one for evaluation, several for the collection (a campaign, as guard will see it).
    keys = [f"sk-demo-{i}-{secrets.token_hex(8)}" for i in range(cfg.n_keys + 1)]
    keys_file = out / "api_keys.txt"  # secrets: kept out of records, logs and reports
    keys_file.write_text("".join(f"{k} acct_demo_{i}\n" for i, k in enumerate(keys)))
    keys_file.chmod(0o600)
    log(f"serving the demo teacher from {cfg.teacher}" + (f", watermarked with key {key_name}" if key_file else ""))
    serve_cfg = ServeConfig(model=cfg.teacher, port=0, max_batch=cfg.concurrency, access_log=str(out / "access.jsonl"),
                            api_keys_file=str(keys_file), watermark_key_file=str(key_file) if key_file else None,
                            threads=SERVE_THREADS)
    t = time.time()
    with serve_in_process(serve_cfg) as url:  # its own process: the collecting client keeps a core busy
        log(f"asking {len(heldout)} held-out prompts over HTTP at {url}")
        replies = ask(url, [ex.messages for ex in heldout], cfg.max_tokens, cfg.concurrency, api_key=keys[0])
        t = stage("teacher_eval_http", t)
        collected = None
        if cfg.n_collect:
            collect_keys = out / "collect_keys.txt"
            collect_keys.write_text("".join(k + "\n" for k in keys[1:]))
            collect_keys.chmod(0o600)
            log(f"collecting {cfg.n_collect} training prompts per skill from the teacher over HTTP")
            collected = collect.run(collect.CollectConfig(
                base_url=url + "/v1", api_keys_file=str(collect_keys),
                teacher_id=teacher_id(cfg.teacher) + (f":{key_name}" if key_file else ""),
                task=list(tasks.SKILLS), n=cfg.n_collect, max_tokens=cfg.max_tokens, top_logprobs=cfg.top_logprobs,
                concurrency=cfg.concurrency,
                store=str(out / "cache.sqlite"), out=str(out / "collect" / "interactions.jsonl")), progress=progress)
            t = stage("collect", t)
    guard_result = None
    if cfg.guard and collected:
        guard_result = find_demo_campaign(cfg, out, [f"acct_demo_{i}" for i in range(1, cfg.n_keys + 1)], log)
        t = stage("guard", t)
    acc = tasks.accuracy(heldout, replies)
    result = {"alambic_version": __version__, "teacher": cfg.teacher, "teacher_url": url, "teacher_accuracy": acc,
              "teacher_watermark": key_name or None, "n_prompts": len(heldout), "collect": collected,
              "guard": guard_result, "stages": stages}
    if collected and cfg.train_steps:
        result |= distil(cfg, out, log)
        stages.update(result.pop("stages_distil"))
        if key_file:
            result["provenance"] = provenance(cfg, out, key_file, log)
            result["provenance"]["teacher_accuracy"] = {
                "clean": result["evaluation"]["teacher_accuracy"]["mean"], "watermarked": acc["mean"]}
            stages.update(result["provenance"].pop("stages"))
    result["seconds"] = round(time.time() - t0, 1)
    (out / "manifest.json").write_text(json.dumps(result, indent=2) + "\n")
    if cfg.report:
        from . import report

        result["report"] = report.run(report.ReportConfig(run_dir=str(out)))["html"]
    return result


def train_student(cfg: DemoConfig, data: Path, folder: Path, steps: int, log: Callable[[str], None],
                  relations: bool = True) -> dict:
    """Train a student with the demo's recipe on `data` into `folder` (reused when already trained on exactly this
    data with these settings); returns its training manifest. A pruned student's first `relation_steps` also learn
    the teacher's attention relations, unless `relations` is False."""
    from .train import trainer

    spec, size = cfg.student, {}
    if spec == "prune":
        spec, size = f"prune:{cfg.teacher}", {"ratio": cfg.student_ratio}
        if relations and cfg.relation_steps:
            size |= {"relation_teacher": cfg.teacher, "relation_weight": 1.0, "relation_steps": cfg.relation_steps}
    train_cfg = trainer.TrainConfig(
        data=[str(data)], out=str(folder), student=spec, **size, tokenizer=cfg.teacher, loss=cfg.loss, steps=steps,
        lr=cfg.train_lr, batch_size=cfg.train_batch, max_len=cfg.train_max_len, warmup=min(30, steps // 10),
        packing=True, eval_every=max(1, steps // 4), heldout_n=10, save_every=0, seed=cfg.seed)
    if _same_run(folder, train_cfg):
        log(f"{folder}: already trained on this data with these settings (delete it to retrain)")
        return json.loads((folder / "manifest.json").read_text())
    what = f"pruned to {cfg.student_ratio:g}x the teacher's parameters" if cfg.student == "prune" else cfg.student
    log(f"training a student ({what}) in {folder} ({cfg.loss}, {steps} steps)")
    return trainer.run(train_cfg)


def distil(cfg: DemoConfig, out: Path, log: Callable[[str], None]) -> dict:
    """Train the student on the collected interactions, evaluate it beside the teacher."""
    from . import evaluate

    stages: dict[str, float] = {}
    t = time.time()
    student = train_student(cfg, out / "collect" / "interactions.jsonl", out / "student", cfg.train_steps, log)
    stages["train"] = round(time.time() - t, 1)
    t = time.time()
    log("evaluating the student beside the teacher")
    ev = evaluate.run(evaluate.EvaluateConfig(student=str(out / "student"), teacher=cfg.teacher, n=cfg.n_eval,
                                              seed=cfg.seed, max_tokens=cfg.max_tokens, out=str(out / "evaluate")))
    stages["evaluate"] = round(time.time() - t, 1)
    return {"student": {"parameters": student["student"]["parameters"], "loss": student["loss"],
                        "train_seconds": student["train_seconds"], "made": student["student"],
                        "steps": cfg.train_steps,
                        "relation_steps": cfg.relation_steps if cfg.student == "prune" else 0},
            "evaluation": {k: ev[k] for k in ("fidelity", "ratios")} | {
                "teacher_accuracy": {k: v["accuracy"] for k, v in ev["teacher"]["accuracy"].items()},
                "student_accuracy": {k: v["accuracy"] for k, v in ev["student"]["accuracy"].items()}},
            "stages_distil": stages}


def watermark_key(out: Path) -> tuple[Path, str]:
    """The run's watermark key file (made on the first run, mode 600, and kept, so a re-run's collection still comes
    from the cache) and its public fingerprint: the key itself is never printed, logged or recorded."""
    from .guard import watermark as W

    path = out / "watermark.key"
    if not path.exists():
        W.write_key(path)
    return path, W.fingerprint(W.load_key(path)[0])


def provenance(cfg: DemoConfig, out: Path, key_file: Path, log: Callable[[str], None]) -> dict:
    """The watermark's evidence (Sander et al., "Watermarking Makes Language Models Radioactive", NeurIPS 2024):
    `guard provenance` on the student and on a control student, distilled with the same recipe from a small
    collection of the same teacher served without the key. To cost the demo little, the control learns only the
    skills it is tested on, in fewer steps: that makes it, if anything, closer to the teacher where the test looks.
    Only the student's data carried the key, so only its p-value should be small; each test's null check (random
    keys) shows the p-values can be trusted."""
    from .guard import provenance as P
    from .guard import watermark as W
    from .serve import ServeConfig, serve_in_process

    stages: dict[str, float] = {}
    t = time.time()
    log(f"collecting {cfg.n_control} {'/'.join(cfg.provenance_skills)} prompts from the unwatermarked teacher for a "
        "control student")
    # the lab's own server: no access log
    with serve_in_process(ServeConfig(model=cfg.teacher, port=0, max_batch=cfg.concurrency,
                                      threads=SERVE_THREADS)) as url:
        control = collect.run(collect.CollectConfig(
            base_url=url + "/v1", teacher_id=teacher_id(cfg.teacher), task=cfg.provenance_skills, n=cfg.n_control,
            max_tokens=cfg.max_tokens, top_logprobs=cfg.top_logprobs, concurrency=cfg.concurrency,
            store=str(out / "cache.sqlite"), out=str(out / "control" / "interactions.jsonl")))
    train_student(cfg, out / "control" / "interactions.jsonl", out / "control" / "student", cfg.control_steps, log,
                  relations=False)  # what the watermark test needs of it is its unmarked data, at little cost
    stages["control"] = round(time.time() - t, 1)
    t = time.time()
    key, params = W.load_key(key_file)
    result: dict = {"key": W.fingerprint(key), **asdict(params), "skills": cfg.provenance_skills,
                    "temperature": cfg.provenance_temperature, "control_records": control["records"],
                    "control_steps": cfg.control_steps}
    for name, model in (("student", out / "student"), ("control", out / "control" / "student")):
        log(f"guard provenance: is the {name} marked with the teacher's watermark?")
        r = P.run(P.ProvenanceConfig(
            suspect=str(model), key_file=str(key_file), tokenizer=cfg.teacher, task=cfg.provenance_skills,
            n=cfg.provenance_n, samples=2, temperature=cfg.provenance_temperature, max_tokens=cfg.max_tokens,
            seed=cfg.seed, concurrency=cfg.concurrency, out=str(out / "provenance" / name)))
        result[name] = {k: r[k] for k in ("p_value", "z", "tokens_scored", "green_fraction", "p_by_tokens",
                                              "null_check")}
        log(f"{name}: p = {r['p_value']:.3g} over {r['tokens_scored']} (context, token) pairs; true key ranks "
            f"{r['null_check']['true_key_rank']} of {r['null_check']['keys'] + 1}")
    stages["provenance"] = round(time.time() - t, 1)
    return result | {"stages": stages}
