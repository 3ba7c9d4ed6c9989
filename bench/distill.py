"""Benchmark: the size-retention curve. How much of the teacher's skill does a student keep, at each size?

On the demo's collected data (top-5 logprobs of the shipped demo teacher, 1,000 prompts per skill), students at
about 1/2, 1/4 and 1/8 of the teacher's parameters, pruned from it Minitron-style (`--ratio`: hidden, heads and MLP
width shrink together, every layer kept; Muralidharan et al., 2024), a depth-pruned student at 1/2 (2 of 4
layers) beside them, and the from-scratch `preset:tiny` (0.115x: an outside distiller's start), each distilled with
the demo's recipe (forward KL on the stored top-k with the spread tail, packed rows of 320 tokens; a pruned
student's first 30% of steps also on the teacher's attention relations, `--relation-fraction`) for the same
wall-clock budget on this machine: 20-step probes time each student (with and without the relations), and its step
count is what fits the budget. Each is then
evaluated beside the teacher on held-out prompts (`alambic evaluate`): retention (accuracy kept), agreement, token
KL, tokens/s and latency ratios.

    python bench/distill.py [--quick] [--data INTERACTIONS] [--budget SECONDS] [--n N]
Without --data it collects the demo's data first (`alambic demo --train-steps 0`). Prints one JSON line, writes
bench/results/distill.json and the curve bench/results/distill.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import RESULTS, publish

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "demo-teacher"
STUDENTS = {  # name -> (student spec, extra flags)
    "prune_0.5": (f"prune:{TEACHER}", ["--ratio", "0.5"]),
    "prune_depth_2of4": (f"prune:{TEACHER}", ["--layers", "2"]),
    "prune_0.25": (f"prune:{TEACHER}", ["--ratio", "0.25"]),
    "prune_0.125": (f"prune:{TEACHER}", ["--ratio", "0.125"]),
    "scratch_tiny": ("preset:tiny", ["--tokenizer", str(TEACHER)]),
}


def train(data: Path, out: Path, spec: str, extra: list[str], steps: int, lr: float, threads: int,
          relation_steps: int = 0) -> dict:
    rel = (["--relation-teacher", str(TEACHER), "--relation-weight", "1", "--relation-steps", str(relation_steps)]
           if relation_steps else [])
    cmd = [sys.executable, "-m", "alambic.cli", "train", "--data", str(data), "--student", spec, *extra, *rel,
           "--loss", "forward_kl", "--steps", str(steps), "--lr", str(lr), "--batch-size", "16", "--max-len", "320",
           "--packing", "--warmup", str(min(30, steps // 10)), "--eval-every", "0", "--heldout-n", "0",
           "--save-every", "0", "--threads", str(threads), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="60 s per student, 20 prompts per skill, three students")
    ap.add_argument("--data", type=Path, help="interactions to distil from (default: collect the demo's)")
    ap.add_argument("--budget", type=float, help="training seconds per student (default 240; quick 60)")
    ap.add_argument("--n", type=int, help="held-out prompts per skill (default 100; quick 20)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--relation-fraction", type=float, default=0.3,
                    help="pruned students: the first fraction of the steps also on the teacher's attention relations "
                         "(the demo's 300 of 1,000; 0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-distill")
    args = ap.parse_args()
    budget = args.budget or (60 if args.quick else 240)
    n = args.n or (20 if args.quick else 100)
    names = ["prune_0.5", "prune_0.25", "scratch_tiny"] if args.quick else list(STUDENTS)
    data = args.data
    if data is None:
        data = args.work / "demo" / "collect" / "interactions.jsonl"
        if not data.exists():
            subprocess.run([sys.executable, "-m", "alambic.cli", "demo", "--out", str(args.work / "demo"),
                            "--train-steps", "0", "--no-guard", "--no-report"], check=True, capture_output=True)
    from alambic import evaluate

    rows = []
    for name in names:
        spec, extra = STUDENTS[name]
        t = time.time()
        probe = train(data, args.work / f"{name}-probe", spec, extra, 20, args.lr, args.threads)
        per_step = probe["loop_s"] / 20
        fraction = args.relation_fraction if spec.startswith("prune:") else 0.0  # relations need the teacher's weights
        if fraction:  # a relation step costs more: time one too, and split the budget as the steps will be
            with_rel = train(data, args.work / f"{name}-probe-rel", spec, extra, 20, args.lr, args.threads, 20)
            per_step = fraction * with_rel["loop_s"] / 20 + (1 - fraction) * per_step
        steps = max(20, int(budget / per_step))
        relation_steps = round(fraction * steps)
        m = train(data, args.work / name, spec, extra, steps, args.lr, args.threads, relation_steps)
        ev = evaluate.run(evaluate.EvaluateConfig(student=str(args.work / name), teacher=str(TEACHER), n=n,
                                                  out=str(args.work / name / "evaluate")))
        r = ev["ratios"]
        rows.append({
            "student": name, "made": m["student"], "parameters": m["student"]["parameters"],
            "parameters_ratio": r["parameters"], "steps": steps, "relation_steps": relation_steps,
            "train_s": m["loop_s"],
            "tokens_per_s_train": m["tokens_per_s"],
            "teacher_mean": ev["teacher"]["accuracy"]["mean"]["accuracy"],
            "student_mean": ev["student"]["accuracy"]["mean"]["accuracy"],
            "student_by_skill": {k: v["accuracy"] for k, v in ev["student"]["accuracy"].items() if k != "mean"},
            "accuracy_kept": r["accuracy_kept"], "agreement": ev["fidelity"]["agreement"],
            "token_kl": ev["fidelity"]["token_kl"], "speedup_tokens_per_s": r["speedup_tokens_per_s"],
            "latency_ratio": r["latency"], "wall_s": round(time.time() - t, 1)})
    result = {"bench": "distill", "quick": args.quick, "budget_s": budget, "n_per_skill": n, "lr": args.lr,
              "relation_fraction": args.relation_fraction,
              "threads": args.threads, "data": str(data), "students": rows}
    plot(rows, RESULTS / ("distill_quick.png" if args.quick else "distill.png"))
    publish("distill_quick" if args.quick else "distill", result)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for kind, marker, label in (("prune", "o", "pruned from the teacher, then distilled"),
                                ("preset", "s", "from scratch (preset), distilled")):
        pts = sorted((r["parameters_ratio"], 100 * r["accuracy_kept"], r["student"]) for r in rows
                     if r["made"]["kind"] == kind)
        if pts:
            ax.plot([p[0] for p in pts if "depth" not in p[2]], [p[1] for p in pts if "depth" not in p[2]],
                    marker=marker, label=label)
            for x, y, name in pts:
                if "depth" in name:
                    ax.plot([x], [y], marker="x", color="C3", linestyle="", label="depth-pruned (2 of 4 layers)")
    ax.axhline(90, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("student parameters / teacher parameters")
    ax.set_ylabel("teacher's held-out accuracy kept (%)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("size-retention at an equal training budget", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
