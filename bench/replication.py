"""Miniature replication of MiniLLM (Gu et al., ICLR 2024) and GKD (Agarwal et al., ICLR 2024) on the skill suite.

Question: do reverse KL and on-policy distillation beat SFT and forward KL for a small student of the demo teacher?

Design (all runs sequential, one torch thread, `nice`, because the box has 2 shared cores):
- data: the demo teacher's greedy interactions with top-5 logprobs (`alambic collect`), reduced to the three
  short-answer skills (arithmetic, list_ops, string_ops) so a step and an on-policy sample are cheap;
- a shared warm start: one `tiny` student (148k parameters, 1/8.7 of the teacher) trained with `sft` for
  `--warm-steps` (chained stages, lr `--warm-lr`). Both papers distil into students that were first fine-tuned on
  the data (MiniLLM's SFT initialisation, GKD's supervised-FT students); a student from scratch at this budget gets
  ~0 accuracy with every loss (docs/train.md, first attempt), which ranks nothing;
- from it, the same `--steps`, lr, batch (16 sequences, no packing: on_policy cannot pack) for each arm:
  `sft` (teacher text), `forward_kl` and `reverse_kl` on the stored top-5 (+ tail bucket), and `on_policy`
  (GKD: λ = 0.5 of steps on the student's own samples, reverse KL, scored with the local teacher's full logits);
  seeds 0 and 1 (data order, split and sampling; the warm start is shared);
- greedy accuracy on `--n-eval` held-out prompts per skill (`tasks.generate(..., "test", seed=0)`, the same
  prompts for every student and the teacher), with a Wilson 95% interval per run and paired exact tests between
  arms; beside it continuous measures (answer char-F, forward token KL, the teacher's NLL of the student's replies),
  since exact match is near the floor for a student this small.

    python bench/replication.py [--steps N] [--warm-steps N ...] [--seeds 0 1] [--n-eval 50] [--no-train]
Re-running skips the trainings and evaluations already in `--work` (default runs/replication); `--no-train` reports
the finished runs only.
Prints one JSON line and writes bench/results/replication.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SKILLS = ["arithmetic", "list_ops", "string_ops"]
TEACHER = "models/demo-teacher"
ARMS = {
    "sft": [],
    "forward_kl": [],  # stored top-k
    "reverse_kl": [],  # stored top-k
    "on_policy": ["--teacher", TEACHER, "--divergence", "reverse_kl", "--on-policy-lambda", "0.5"]
    + ["--gen-max-tokens", "64"],
}
RESULTS = Path(__file__).parent / "results" / "replication.json"


def subset(src: Path, dst: Path) -> None:
    """Keep the interactions of SKILLS only (shorter sequences: cheaper steps and on-policy samples)."""
    if dst.exists():
        return
    with src.open() as f, dst.open("w") as out:
        for line in f:
            if json.loads(line)["meta"]["skill"] in SKILLS:
                out.write(line)


def train(out: Path, data: Path, student: str, loss: str, extra: list[str], steps: int, lr: float, seed: int) -> None:
    if (out / "manifest.json").exists():
        return
    student, *student_args = student.split()  # "prune:DIR --ratio 0.25": a student spec with its flags
    cmd = [
        "nice", "-n", "10", sys.executable, "-m", "alambic.cli", "train", "--data", str(data), "--student", student,
        *student_args,
        "--tokenizer", TEACHER, "--loss", loss, *extra, "--steps", str(steps), "--batch-size", "16", "--lr", str(lr),
        "--no-packing", "--eval-every", "0", "--heldout-n", "0", "--threads", "1", "--seed", str(seed),
        "--out", str(out),
    ]  # fmt: skip
    print(" ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def lcs_f1(a: str, b: str) -> float:
    """Character-level ROUGE-L F1 (longest common subsequence), MiniLLM's main metric at character granularity.

    Hand-written (a 10-line DP) because the ROUGE packages split on words and drop symbols, and these replies are
    digits, operators and single letters; partial credit ranks students whose exact-match accuracy is all ~0.
    """
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    return 2 * lcs / (len(a) + len(b))


def teacher_nll(teacher, examples, replies: list[str]) -> float:
    """Mean per-token NLL the teacher gives the student's own greedy replies: the reverse direction (does the
    student generate what the teacher finds likely?) that MiniLLM's reverse KL targets; token_kl is the forward one."""
    import torch

    from alambic.train import data

    model, tok = teacher.model, teacher.tokenizer
    pairs = enumerate(zip(examples, replies, strict=True))
    recs = [{"id": str(i), "prompt": ex.messages, "completion": r} for i, (ex, r) in pairs]
    encoded = data.encode_all(tok, recs, None, None, 4096)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(encoded), 32):
            rows = [[i] for i in range(start, min(start + 32, len(encoded)))]
            b = data.collate(encoded, rows, tok.pad_token_id or 0, with_topk=False)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            labels = b["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            mask = labels >= 0
            total, count = total + float(nll[mask].sum()), count + int(mask.sum())
    return total / count


def evaluate(model_dir: str, cache: Path, n: int) -> dict:
    """On the shared held-out prompts: greedy exact-match accuracy per skill (Wilson 95% interval on the mean),
    character ROUGE-L F1 against the worked solution, token KL(teacher || student) on the teacher's greedy replies
    (forward) and the teacher's NLL of the student's greedy replies (reverse). Cached beside the run."""
    if cache.exists():
        return json.loads(cache.read_text())
    import torch
    from scipy.stats import binomtest

    from alambic import tasks
    from alambic.evaluate import Item, Local, token_kl
    from alambic.modeling import chat_generate

    torch.set_num_threads(1)
    t0 = time.time()
    examples = tasks.generate(SKILLS, n, "test", seed=0)
    msgs = [ex.messages for ex in examples]
    teacher = Local(TEACHER)
    t_cache = cache.parent / "teacher_replies.json"
    if not t_cache.exists():
        t_cache.write_text(json.dumps(chat_generate(teacher.model, teacher.tokenizer, msgs, max_new_tokens=64)))
    t_replies = json.loads(t_cache.read_text())
    student = teacher if model_dir == TEACHER else Local(model_dir)
    # 64 new tokens: the longest teacher completion for these skills is 47.
    replies = chat_generate(student.model, student.tokenizer, msgs, max_new_tokens=64)
    acc = tasks.accuracy(examples, replies)
    hits = round(acc["mean"] * n * len(SKILLS))
    ci = binomtest(hits, n * len(SKILLS)).proportion_ci(method="wilson")
    res = {k: round(v, 4) for k, v in acc.items()} | {"mean_ci95": [round(float(ci.low), 4), round(float(ci.high), 4)]}
    for skill in SKILLS:
        f1 = [lcs_f1(r, ex.solution) for ex, r in zip(examples, replies, strict=True) if ex.skill == skill]
        res[f"rougeL_{skill}"] = round(statistics.mean(f1), 4)
    res["rougeL"] = round(statistics.mean(res[f"rougeL_{s}"] for s in SKILLS), 4)
    items = [Item(ex.messages, ex.reference, ex.skill, tasks.get(ex.skill)) for ex in examples]
    # The same on the final answer alone (the shared "Answer:" scaffold no longer earns credit).
    answer_f1 = [lcs_f1(str(it.answer(r) or ""), it.reference) for it, r in zip(items, replies, strict=True)]
    res["answer_charF"] = round(statistics.mean(answer_f1), 4)
    res["token_kl_fwd"] = round(token_kl(student, teacher, items, t_replies, [None] * len(items)), 4)
    res["teacher_nll_of_student"] = round(teacher_nll(teacher, examples, replies), 4)
    same = [it.answer(r) == it.answer(t) for it, r, t in zip(items, replies, t_replies, strict=True)]
    res["answer_agreement"] = round(statistics.mean(same), 4)
    res["correct"] = [int(it.correct(r)) for it, r in zip(items, replies, strict=True)]  # for the paired test
    res["eval_s"] = round(time.time() - t0, 1)
    cache.write_text(json.dumps(res))
    return res


def final_metrics(run: Path) -> dict:
    m = json.loads((run / "manifest.json").read_text())
    return {"val_nll": m["final"].get("val_nll"), "train_s": round(m["train_seconds"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/replication/data.jsonl", help="interactions with stored top-k logprobs")
    ap.add_argument("--work", default="runs/replication")
    ap.add_argument("--warm-steps", type=int, nargs="*", default=[500, 1000], help="sft warm-start stages, chained "
                    "(none: every arm starts from --student itself)")
    ap.add_argument("--student", default="preset:tiny", help="the student every arm (or the warm start) starts from, "
                    "with its flags: e.g. 'prune:models/demo-teacher --ratio 0.25'")
    ap.add_argument("--out", default=str(RESULTS), help="results file")
    ap.add_argument("--warm-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--n-eval", type=int, default=50)
    ap.add_argument("--no-train", action="store_true", help="evaluate and report the finished runs only")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data3.jsonl"
    subset(Path(args.data), data)

    t0 = time.time()
    (work / "eval2").mkdir(exist_ok=True)
    rows: dict = {"teacher": evaluate(TEACHER, work / "eval2" / "teacher.json", args.n_eval)}
    # The warm start is a chain of sft runs (stage i starts from stage i-1; its seed i varies the batch order), so a
    # warm start found too weak can be extended without redoing it.
    student = args.student
    for i, steps in enumerate(args.warm_steps):
        warm = work / ("warm" if i == 0 else f"warm{i + 1}")
        train(warm, data, student, "sft", [], steps, args.warm_lr, i)
        rows[f"warm_stage{i + 1}"] = evaluate(str(warm), work / "eval2" / f"{warm.name}.json", args.n_eval)
        rows[f"warm_stage{i + 1}"] |= final_metrics(warm)
        student = str(warm)
    runs = []
    for seed in args.seeds:  # every arm's seed 0 first, so a cut-short grid still compares all arms
        for loss, extra in ARMS.items():
            out = work / f"{loss}-s{seed}"
            if args.no_train and not (out / "manifest.json").exists():
                continue
            train(out, data, student, loss, extra, args.steps, args.lr, seed)
            res = evaluate(str(out), work / "eval2" / f"{loss}-s{seed}.json", args.n_eval)
            runs.append({"loss": loss, "seed": seed} | res | final_metrics(out))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    summary = {}
    for loss in ARMS:
        means = [r["mean"] for r in runs if r["loss"] == loss]
        if not means:
            continue
        summary[loss] = {
            "mean": round(statistics.mean(means), 4),
            "per_seed": means,
            "half_range": round((max(means) - min(means)) / 2, 4),
        } | {
            k: round(statistics.mean(r[k] for r in runs if r["loss"] == loss), 4)
            for k in [*SKILLS, "answer_charF", "token_kl_fwd", "teacher_nll_of_student"]
        }
    # Paired exact tests (McNemar, as a binomial test on the discordant pairs) between every two arms, over the
    # (seed, prompt) pairs: every arm answered the same prompts, which overlapping per-run intervals ignore.
    from scipy.stats import binomtest

    paired = {}
    arms = list(summary)
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            pairs = [
                (x, y)
                for ra in runs
                if ra["loss"] == a
                for rb in runs
                if rb["loss"] == b and rb["seed"] == ra["seed"]
                for x, y in zip(ra["correct"], rb["correct"], strict=True)
            ]
            wins, losses = sum(x > y for x, y in pairs), sum(x < y for x, y in pairs)
            p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
            paired[f"{a} vs {b}"] = {"a_only_right": wins, "b_only_right": losses, "p": round(float(p), 4)}
    for r in [*runs, *rows.values()]:
        r.pop("correct", None)
    report = {
        "bench": "replication",
        "student": args.student,
        "skills": SKILLS,
        "n_eval_per_skill": args.n_eval,
        "warm_steps": args.warm_steps,
        "warm_lr": args.warm_lr,
        "steps": args.steps,
        "lr": args.lr,
        "batch_size": 16,
        "packing": False,
        "seeds": args.seeds,
        "runs_missing": [
            f"{k}-s{s}" for s in args.seeds for k in ARMS if not (work / f"{k}-s{s}" / "manifest.json").exists()
        ],
        "arms": {"sft": "teacher text", "forward_kl": "stored top-5 + tail", "reverse_kl": "stored top-5 + tail"}
        | {"on_policy": " ".join(ARMS["on_policy"])},
        "reference": rows,
        "runs": runs,
        "summary": summary,
        "paired_tests": paired,
        "train_s_total": round(sum(r["train_s"] for r in [*runs, *rows.values()] if "train_s" in r), 1),
        "this_invocation_wall_s": round(time.time() - t0, 1),
    }
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("bench", "steps", "summary")}))


if __name__ == "__main__":
    main()
