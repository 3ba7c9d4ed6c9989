"""Benchmark: `alambic train --loss sft` against TRL's `SFTTrainer`, and the size of stored top-k teacher signal.

Both train the same student (the `tiny` preset, saved once so both start from identical weights) on the same
interactions (skill prompts with worked solutions as completions), with the same batch size, sequence cap,
learning rate and packing setting (off), for the same number of steps, each in its own process (so peak memory is
its own). TRL is configured as its docs recommend for a prompt-completion data set (conversational format,
completion-only loss), on CPU in float32; its default gradient checkpointing (a memory-for-speed trade our trainer
does not make) is turned off for the main ratio and measured separately as `trl_default_*`.

tokens/s = steps × batch size × mean sequence length / training-loop seconds (the same expected count for both).
Peak memory: the process's peak RSS, and its growth over the RSS before training (libraries and model loaded).

Then: bytes per completion token of stored top-k logprobs (int32 ids + float16 logprobs, k + 1 slots) for k = 20,
from interactions a local teacher wrote, beside the JSON the interactions file spends on them.

    python bench/train.py [--quick]
Prints one JSON line and writes bench/results/train.json.

    python bench/train.py --replicate TEACHER_DIR [--quick]
A miniature of the MiniLLM / GKD comparison instead: the teacher served over HTTP, interactions collected from it
(sampled, top-20 logprobs) for the three short-answer skills, then equal `tiny` students trained with sft,
forward_kl and reverse_kl on the stored top-20, and on_policy (λ = 0.5, reverse KL, student samples scored by the
served teacher through `echo`), two seeds each; held-out greedy accuracy per skill.
Writes bench/results/train_replication.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import publish  # bench/ is the script's directory, so on sys.path

BATCH, MAX_LEN, LR = 16, 512, 1e-3


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(work: Path, n: int) -> dict:
    """The student's starting weights and the interactions; returns the mean sequence length in tokens."""
    from alambic import tasks
    from alambic.modeling import build_model, char_tokenizer, n_params
    from alambic.teacher import encode

    tok = char_tokenizer()
    student = build_model("tiny", tok, seed=0)
    student.save_pretrained(work / "student0")
    tok.save_pretrained(work / "student0")
    examples = tasks.generate(["arithmetic", "string_ops", "list_ops"], n, "train", seed=0)
    with open(work / "interactions.jsonl", "w") as f:
        for i, ex in enumerate(examples):
            f.write(
                json.dumps(
                    {"id": str(i), "prompt": ex.messages, "completion": ex.solution, "meta": {"skill": ex.skill}}
                )
                + "\n"
            )
    lengths = [min(len(encode(tok, ex.messages, ex.solution)[0]), MAX_LEN) for ex in examples]
    return {"examples": len(examples), "mean_len": statistics.mean(lengths), "params": n_params(student)}


def child_ours(work: Path, steps: int) -> dict:
    from alambic.train.trainer import TrainConfig, run

    base = rss_mb()
    m = run(
        TrainConfig(
            data=[str(work / "interactions.jsonl")],
            out=str(work / "ours"),
            student=str(work / "student0"),
            loss="sft",
            steps=steps,
            batch_size=BATCH,
            max_len=MAX_LEN,
            lr=LR,
            warmup=0,
            val_fraction=0,
            eval_every=0,
            heldout_n=0,
            save_every=0,
            packing=False,
        )
    )
    return {"loop_s": m["loop_s"], "rss_before_mb": base, "peak_mb": peak_mb(), "final_loss": m["final"]["loss"]}


def child_trl(work: Path, steps: int, checkpointing: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (work / "interactions.jsonl").read_text().splitlines()]
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]
    )
    tok = AutoTokenizer.from_pretrained(work / "student0")
    model = AutoModelForCausalLM.from_pretrained(work / "student0")
    cfg = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        max_length=MAX_LEN,
        packing=False,
        gradient_checkpointing=checkpointing,
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        logging_steps=max(1, steps // 4),
        dataloader_drop_last=True,
        seed=0,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    base = rss_mb()
    t = time.time()
    out = trainer.train()
    return {"loop_s": time.time() - t, "rss_before_mb": base, "peak_mb": peak_mb(), "final_loss": out.training_loss}


def spawn(kind: str, work: Path, steps: int, threads: int) -> dict:
    r = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--work",
            str(work),
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def topk_size(work: Path, k: int = 20, n: int = 8) -> dict:
    """Bytes/token of stored top-k as training tensors vs. as JSON in the interactions file."""
    from alambic import collect
    from alambic.modeling import build_model, char_tokenizer
    from alambic.train import data as D

    tok = char_tokenizer()
    build_model("test", tok, seed=0).save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    out = work / "topk.jsonl"
    collect.run(
        collect.CollectConfig(
            backend="hf",
            model=str(work / "teacher"),
            task=["arithmetic"],
            n=n,
            max_tokens=48,
            temperature=1.0,
            top_logprobs=k,
            store=str(work / "c.sqlite"),
            out=str(out),
        )
    )
    records, _ = D.read_interactions([str(out)])
    ex = D.encode_all(tok, records, D.token_table(tok), k, MAX_LEN)
    n_tok = sum(len(r["logprobs"]) for r in records)
    json_bytes = sum(len(json.dumps(r["logprobs"])) for r in records)
    return {
        "k": k,
        "topk_bytes_per_token": round(D.topk_bytes_per_token(ex), 1),
        "target_bytes_per_token": 8 * k,
        "json_bytes_per_token": round(json_bytes / max(n_tok, 1), 1),
    }


def replicate(teacher: str, quick: bool) -> dict:
    """See the module docstring: same data, same student shape, same steps; only the loss changes."""
    from alambic import collect
    from alambic.serve import ServeConfig, serve_in_thread
    from alambic.train.trainer import TrainConfig, run

    n, steps, seeds = (60, 60, [0]) if quick else (300, 300, [0, 1])
    skills = ["arithmetic", "list_ops", "string_ops"]  # the short-answer skills: replies of at most ~50 tokens
    losses = {
        "sft": {},
        "forward_kl": {},
        "reverse_kl": {},
        "on_policy": {"divergence": "reverse_kl", "on_policy_lambda": 0.5, "gen_max_tokens": 64},
    }
    results: dict = {
        "bench": "train_replication",
        "teacher": teacher,
        "skills": skills,
        "prompts_per_skill": n,
        "steps": steps,
        "batch_size": 32,
    }
    with tempfile.TemporaryDirectory() as tmp, serve_in_thread(ServeConfig(model=teacher, port=0)) as url:
        work = Path(tmp)
        t = time.time()
        m = collect.run(
            collect.CollectConfig(
                base_url=url + "/v1",
                n=n,
                task=skills,
                temperature=1.0,
                seed=0,
                max_tokens=96,
                top_logprobs=20,
                store=str(work / "c.sqlite"),
                out=str(work / "interactions.jsonl"),
            )
        )
        results["collect"] = {"records": m["records"], "seconds": round(time.time() - t, 1)}
        for loss, extra in losses.items():
            for seed in seeds:
                t = time.time()
                cfg = TrainConfig(
                    data=[str(work / "interactions.jsonl")],
                    out=str(work / f"{loss}-{seed}"),
                    student="preset:tiny",
                    tokenizer=teacher,
                    teacher_url=url + "/v1" if loss == "on_policy" else None,
                    loss=loss,
                    steps=steps,
                    batch_size=32,
                    lr=3e-3,
                    warmup=20,
                    eval_every=0,
                    heldout_n=20 if quick else 60,
                    save_every=0,
                    seed=seed,
                    **extra,
                )
                man = run(cfg)
                results.setdefault(loss, []).append(
                    {"seed": seed, "seconds": round(time.time() - t, 1), **man["final"]}
                )
        results["mean_heldout_acc"] = {
            loss: round(statistics.mean(r["heldout_acc"]["mean"] for r in results[loss]), 3) for loss in losses
        }
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a run under a minute")
    ap.add_argument("--replicate", metavar="TEACHER_DIR", help="run the miniature replication instead")
    ap.add_argument("--child", choices=["ours", "trl", "trl_default"])
    ap.add_argument("--work")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in both trainers (0: torch's default)")
    args = ap.parse_args()
    if args.child:
        import logging

        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        logging.disable(logging.WARNING)
        work = Path(args.work)
        res = (
            child_ours(work, args.steps)
            if args.child == "ours"
            else child_trl(work, args.steps, checkpointing=args.child == "trl_default")
        )
        print(json.dumps(res))
        return
    if args.replicate:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        result = replicate(args.replicate, args.quick)
        publish("train_replication", result)
        return

    steps = 15 if args.quick else 150
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = prepare(work, 100 if args.quick else 600)
        tokens = steps * BATCH * info["mean_len"]
        runs = {
            kind: spawn(kind, work, steps, args.threads)
            for kind in ("ours", "trl", *(() if args.quick else ("trl_default",)))
        }
        size = topk_size(work)
    result = {
        "bench": "train",
        "quick": args.quick,
        "steps": steps,
        "batch_size": BATCH,
        "packing": False,
        "threads": args.threads or "default",
        "student_params": info["params"],
        "mean_seq_len": round(info["mean_len"], 1),
    }
    for kind, r in runs.items():
        result[f"{kind}_tokens_per_s"] = round(tokens / r["loop_s"], 1)
        result[f"{kind}_peak_rss_mb"] = round(r["peak_mb"], 1)
        result[f"{kind}_train_rss_growth_mb"] = round(r["peak_mb"] - r["rss_before_mb"], 1)
        result[f"{kind}_final_loss"] = round(r["final_loss"], 4)
    result["ratio_tokens_per_s_vs_trl"] = round(runs["trl"]["loop_s"] / runs["ours"]["loop_s"], 2)
    if "trl_default" in runs:
        result["ratio_tokens_per_s_vs_trl_default"] = round(runs["trl_default"]["loop_s"] / runs["ours"]["loop_s"], 2)
    result.update(size)
    publish("train", result)


if __name__ == "__main__":
    main()
