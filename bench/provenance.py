"""Bench: watermark radioactivity on the demo teacher, end to end through the real paths.

1. The demo teacher is served by `alambic serve` with and without a watermark key; its held-out accuracy is graded
   both ways (the watermark's cost).
2. Training data: the same train prompts collected by `alambic collect` from both servers (greedy, top-5 logprobs,
   as the demo collects); mixtures with 100%, 50%, 10% and 0% (the clean control) of the answers watermarked.
3. A tiny student is distilled on each mixture (`alambic train`, `--loss` below).
4. `guard provenance` on each student, prompted with held-out prompts of `--skills` (default naming, the skill where
   the teacher has choices for the watermark to steer, as the demo tests): p-value and tokens scored; on each,
   >= 100 random keys (KS test, FPR).
5. Speed: tokens scored per second (cached green lists vs recomputing them for every pair, side by side) and the
   wall time of the smallest provenance run that reaches p < 1e-6 on the 100% student.

    python bench/provenance.py                          # full (~75 min on 2 busy cores)
    python bench/provenance.py --quick                  # fewer prompts and steps; figures are weaker
    python bench/provenance.py --teacher DIR --name provenance   # another teacher (e.g. a new demo teacher)
    python bench/provenance.py --demo-run runs/demo             # also: time to p < 1e-6 on the demo's own student

Stages write to --root (default runs/bench-provenance) and are reused on a re-run (delete it to start over).
Prints one JSON line {"bench": "provenance", ...} and writes bench/results/provenance.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
from _results import publish  # bench/ is the script's directory, so on sys.path

from alambic import collect, tasks
from alambic.demo import DEMO_TEACHER, ask, teacher_id
from alambic.guard import provenance as P
from alambic.guard import watermark as W
from alambic.serve import ServeConfig, serve_in_thread

FRACTIONS = (1.0, 0.5, 0.1, 0.0)


def teacher_stage(root: Path, teacher: str, key_file: Path | None, n_eval: int, n_train: int, temperature: float,
                  max_tokens: int) -> dict:
    """Held-out accuracy and the collected training set of the teacher served with `key_file` (None: clean)."""
    name = "watermarked" if key_file else "clean"
    out = root / "teacher" / name
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    heldout = tasks.generate(None, n_eval, "test", seed=0)
    cfg = ServeConfig(model=teacher, port=0, threads=1,
                      watermark_key_file=str(key_file) if key_file else None)
    with serve_in_thread(cfg) as url:
        replies = ask(url, [ex.messages for ex in heldout], max_tokens, 32)
        t0 = time.time()
        m = collect.run(collect.CollectConfig(
            base_url=url + "/v1", teacher_id=f"{teacher_id(teacher)}:{name}", task=list(tasks.SKILLS),
            n=n_train, max_tokens=max_tokens, temperature=temperature, top_logprobs=5, concurrency=32,
            store=str(out / "cache.sqlite"), out=str(out / "interactions.jsonl")))
    result = {"heldout_accuracy": tasks.accuracy(heldout, replies), "collect_records": m["records"],
              "collect_s": round(time.time() - t0, 1), "interactions": str(out / "interactions.jsonl")}
    done.write_text(json.dumps(result, indent=2))
    return result


def mixture(root: Path, wm_file: str, clean_file: str, fraction: float) -> Path:
    """The clean answers with a random `fraction` of the prompts answered by the watermarked teacher instead."""
    path = root / "data" / f"mix-{int(100 * fraction)}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    wm = {json.dumps(r["prompt"]): r for r in map(json.loads, Path(wm_file).read_text().splitlines())}
    clean = [json.loads(line) for line in Path(clean_file).read_text().splitlines()]
    rng = random.Random(0)
    rows = [wm[json.dumps(r["prompt"])] if rng.random() < fraction else r for r in clean]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def student(root: Path, teacher: str, data: Path, loss: str, steps: int) -> Path:
    from alambic.train.trainer import TrainConfig, run

    out = root / "students" / f"{data.stem}-{loss}"
    if (out / "manifest.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    run(TrainConfig(data=[str(data)], out=str(out), student="preset:tiny", tokenizer=teacher, loss=loss,
                    steps=steps, batch_size=16, lr=3e-3, max_len=320, packing=True, eval_every=0, heldout_n=0,
                    save_every=0, threads=1))  # the demo's recipe
    return out


def provenance(root: Path, teacher: str, model: Path, key_file: Path, n: int, samples: int, skills: list[str],
               data: list[str] | None = None, null_keys: int = 100, tag: str = "", temperature: float = 1.0,
               max_tokens: int = 200) -> dict:
    out = root / "provenance" / f"{model.name}{tag}-t{temperature}"
    cfg = P.ProvenanceConfig(suspect=str(model), key_file=str(key_file), tokenizer=teacher, task=skills, n=n,
                             samples=samples, temperature=temperature, max_tokens=max_tokens,
                             null_keys=null_keys, threads=1, data=data or [], out=str(out))
    return P.run(cfg)


def scoring_speed(teacher: str, key_file: Path, files: list[str]) -> dict:
    """Tokens scored per second over the given interactions, with the per-context cache and without it."""
    key, params = W.load_key(key_file)
    tok = W.load_tokenizer(teacher)
    seqs = [s for f in files for s in W.encode(tok, W.read_texts(f))]
    figures = {}
    for name, cache in (("cached", 65536), ("uncached", 0)):
        wm = W.Watermark(key, params, len(tok), cache_size=cache)
        t0 = time.perf_counter()
        sel = W.select(seqs, params.context_width, dedup=False, exclude_prompt=False)  # every position: the worst case
        W.score_pairs(wm, sel)
        figures[name] = round(len(sel.pairs) / (time.perf_counter() - t0))
    return {"tokens_scored_per_s": figures["cached"], "tokens_scored_per_s_uncached": figures["uncached"],
            "ratio_vs_uncached": round(figures["cached"] / figures["uncached"], 2)}


def time_to_detect(root: Path, teacher: str, model: Path, key_file: Path, sizes: list[int], samples: int,
                   skills: list[str], temperature: float, max_tokens: int) -> dict:
    """The smallest of `sizes` (prompts per skill) whose cold provenance run (generation + scoring, null check off)
    gives p < 1e-6, and its wall time."""
    tried = []
    for n in sizes:
        shutil.rmtree(root / "provenance" / f"{model.name}-ttd{n}-t{temperature}", ignore_errors=True)
        t0 = time.time()
        r = provenance(root, teacher, model, key_file, n, samples, skills, null_keys=0, tag=f"-ttd{n}",
                       temperature=temperature, max_tokens=max_tokens)
        tried.append({"n_per_skill": n, "p_value": r["p_value"], "tokens_scored": r["tokens_scored"],
                      "wall_s": round(time.time() - t0, 1)})
        if r["p_value"] < 1e-6:
            return {"reached": True, **tried[-1], "tried": tried}
    return {"reached": False, "tried": tried}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small run: fewer prompts and steps")
    ap.add_argument("--root", default="runs/bench-provenance", help="folder of the stages' outputs (reused)")
    ap.add_argument("--teacher", default=str(DEMO_TEACHER), help="teacher model directory (default: the demo's)")
    ap.add_argument("--collect-temperature", type=float, default=0.0, help="teacher sampling temperature (0: greedy, "
                    "as the demo collects)")
    ap.add_argument("--steps", type=int, default=None, help="student optimiser steps (default: 500, quick 100)")
    ap.add_argument("--train-prompts", type=int, default=None, help="training prompts per skill (default: 400, quick "
                    "100)")
    ap.add_argument("--provenance-prompts", type=int, default=None, help="provenance prompts per skill (default: "
                    "100, quick 20)")
    ap.add_argument("--max-tokens", type=int, default=200, help="max tokens per teacher answer and suspect completion")
    ap.add_argument("--loss", default="forward_kl", help="student loss: forward_kl (top-5 logprobs) or sft")
    ap.add_argument("--context-width", type=int, default=W.DEFAULT_CONTEXT_WIDTH)
    ap.add_argument("--gamma", type=float, default=W.DEFAULT_GAMMA)
    ap.add_argument("--delta", type=float, default=W.DEFAULT_DELTA)
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the suspect students")
    ap.add_argument("--skills", nargs="+", default=["naming"], help="skills whose held-out prompts the suspects are "
                    "tested on (default naming: the one where the teacher has choices to mark, as in the demo)")
    ap.add_argument("--demo-run", default=None, help="an `alambic demo` run folder (e.g. runs/demo): also time the "
                    "smallest provenance run that reaches p < 1e-6 on its student, under its key")
    ap.add_argument("--name", default=None, help="results name (bench/results/NAME.json; default provenance for "
                    "the demo teacher, provenance_DIR for another)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_eval, n_train, steps, n_prov, samples = (20, 100, 100, 20, 2) if args.quick else (100, 400, 500, 100, 2)
    steps, n_train, n_prov = args.steps or steps, args.train_prompts or n_train, args.provenance_prompts or n_prov
    teacher = args.teacher
    params = W.WatermarkParams(args.context_width, args.gamma, args.delta)
    prefix = "" if teacher == str(DEMO_TEACHER) else Path(teacher).name + "-"
    root = Path(args.root) / (f"{prefix}k{params.context_width}-g{params.gamma}-d{params.delta}-n{n_train}-s{steps}"
                              + ("-quick" if args.quick else ""))  # students are reused: a new size, a new folder
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "watermark.key"
    if not key_file.exists():
        W.write_key(key_file, params)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.time()

    wm_teacher = teacher_stage(root, teacher, key_file, n_eval, n_train, args.collect_temperature, args.max_tokens)
    clean_teacher = teacher_stage(root, teacher, None, n_eval, n_train, args.collect_temperature, args.max_tokens)
    curve, null = [], None
    models = {}
    for f in FRACTIONS:
        models[f] = student(root, teacher, mixture(root, wm_teacher["interactions"], clean_teacher["interactions"], f),
                            args.loss, steps)
    for f in FRACTIONS:
        r = provenance(root, teacher, models[f], key_file, n_prov, samples, args.skills, temperature=args.temperature,
                       max_tokens=args.max_tokens)
        rf = provenance(root, teacher, models[f], key_file, n_prov, samples, args.skills,
                        data=[wm_teacher["interactions"]],
                        null_keys=0, tag="-filtered", temperature=args.temperature, max_tokens=args.max_tokens)
        curve.append({"watermarked_fraction": f, "p_value": r["p_value"], "z": r["z"],
                      "tokens_scored": r["tokens_scored"], "green_fraction": r["green_fraction"],
                      "p_value_filtered": rf["p_value"], "tokens_scored_filtered": rf["tokens_scored"],
                      "null_ks_p_value": r["null_check"]["ks_p_value"],
                      "null_fpr": r["null_check"]["false_positive_rate"],
                      "true_key_rank": r["null_check"]["true_key_rank"],
                      "p_by_tokens": r["p_by_tokens"], "p_by_tokens_filtered": rf["p_by_tokens"]})
        if f == 0.0:
            null = r["null_check"]
    speed = scoring_speed(teacher, key_file, [wm_teacher["interactions"], clean_teacher["interactions"]])
    ttd = time_to_detect(root, teacher, models[1.0], key_file, [5, 20] if args.quick else [10, 30, 100], samples,
                         args.skills, args.temperature, args.max_tokens)
    if args.demo_run:  # the demo's own student, under the demo's own key (`alambic demo` writes both)
        demo = Path(args.demo_run)
        ttd_demo = time_to_detect(root, teacher, demo / "student", demo / "watermark.key", [5, 10, 25, 100], samples,
                                  args.skills, args.temperature, args.max_tokens)
    line = {
        "bench": "provenance", "quick": args.quick, "teacher": teacher,
        "collect_temperature": args.collect_temperature, "loss": args.loss, "student_steps": steps,
        "train_prompts": len(tasks.SKILLS) * n_train, "provenance_skills": args.skills,
        "provenance_prompts": len(args.skills) * n_prov, "samples_per_prompt": samples,
        "suspect_temperature": args.temperature,
        "context_width": params.context_width, "gamma": params.gamma, "delta": params.delta,
        "teacher_accuracy_clean": round(clean_teacher["heldout_accuracy"]["mean"], 4),
        "teacher_accuracy_watermarked": round(wm_teacher["heldout_accuracy"]["mean"], 4),
        "teacher_accuracy_by_skill": {"clean": clean_teacher["heldout_accuracy"],
                                      "watermarked": wm_teacher["heldout_accuracy"]},
        "curve": curve, "control_null_check": null, **speed, "time_to_p_1e-6": ttd,
        **({"time_to_p_1e-6_demo_student": ttd_demo} if args.demo_run else {}),
        "wall_s": round(time.time() - t_start, 1),
    }
    path = publish(args.name or ("provenance" if teacher == str(DEMO_TEACHER) else f"provenance_{Path(teacher).name}"),
                   line)
    plot_curve(curve, path.with_suffix(".png"))


def plot_curve(curve: list[dict], path: Path) -> None:
    """The contamination curve: p-value against (context, token) pairs scored, one line per watermarked share."""
    import matplotlib.pyplot as plt

    from alambic.report import p_value_plot

    fig = p_value_plot([(f"{100 * c['watermarked_fraction']:.0f}% watermarked", c["p_by_tokens"], None)
                        for c in curve])
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
