"""`alambic evaluate`: the student beside its teacher on the same held-out prompts.

Three questions, each answered for both models in the same run on the same machine:
- how good: task accuracy per skill with a 95% Wilson interval;
- how faithful: agreement of the final answers, and the held-out token KL(teacher || student) on the teacher's own
  replies where the teacher's distribution is known (a local teacher: full logits; an endpoint: its top-k logprobs);
- how much smaller and faster: parameters, size on disk, generation tokens/s and latency, and their ratios.

Either side is a local model (an HF directory or a .gguf) or an OpenAI-compatible endpoint (an http(s) URL).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from pydantic import Field, field_validator
from scipy.stats import binomtest

from . import __version__, tasks
from .collect import read_prompt_file
from .config import Config
from .tasks.base import last_answer


class EvaluateConfig(Config):
    """Settings of a side-by-side evaluation."""

    student: str = Field(..., description="student: HF model directory, .gguf file, or http(s)://…/v1 endpoint",
                         json_schema_extra={"positional": True})
    teacher: str = Field(..., description="teacher: HF model directory, .gguf file, or http(s)://…/v1 endpoint")
    student_model: str = Field("", description="endpoint student: model name ('' = the first one listed)")
    teacher_model: str = Field("", description="endpoint teacher: model name ('' = the first one listed)")
    student_api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the student endpoint's key")
    teacher_api_key_env: str = Field("OPENAI_API_KEY", description="env var holding the teacher endpoint's key")
    prompts: str | None = Field(None, description="prompt file with a `reference` per row (.jsonl/.csv/.parquet); "
                                                  "default: the built-in skills' held-out split")
    grader: str = Field("exact", description="grader for prompt-file rows without their own `grader`: "
                                             "exact, numeric, json or regex")
    skills: list[str] = Field(default_factory=lambda: list(tasks.SKILLS), description="built-in skills to evaluate")
    n: int = Field(100, gt=0, description="held-out prompts per built-in skill")
    seed: int = Field(0, description="seed of the held-out prompts")
    max_tokens: int = Field(200, gt=0, description="max new tokens per reply (greedy decoding)")
    batch_size: int = Field(64, gt=0, description="local models: prompts generated together")
    concurrency: int = Field(16, gt=0, description="endpoints: requests in flight at once")
    latency_prompts: int = Field(8, ge=0, description="prompts answered one at a time to measure latency")
    kl: bool = Field(True, description="measure held-out token KL(teacher || student) where possible")
    out: str = Field("runs/evaluate", description="output folder: evaluation.json and replies.jsonl")
    threads: int = Field(0, ge=0, description="torch CPU threads (0: torch's default)")

    @field_validator("grader")
    @classmethod
    def _check_grader(cls, v: str) -> str:
        if v not in GRADERS:
            raise ValueError(f"unknown grader; choose one of {', '.join(GRADERS)}")
        return v


# --- graders for user prompt files -----------------------------------------------------------------------------------
# Built-in skills grade themselves (tasks.Skill.grade); a user's file picks one of these per row or for all rows.


def _norm(s: str) -> str:
    return " ".join(s.split()).strip().strip(".").lower()


def _number(s: str | None) -> float | None:
    nums = re.findall(r"-?\d+(?:[.,]\d+)*", s or "")
    try:
        return float(nums[-1].replace(",", "")) if nums else None
    except ValueError:
        return None


def _json(s: str | None):
    if s is None:
        return None
    start = min((i for i in (s.find("{"), s.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(s[start:])[0]
    except json.JSONDecodeError:
        return None


# name -> (extract(reply) -> comparable answer, match(answer, reference) -> bool)
GRADERS: dict[str, tuple[Callable[[str], object], Callable[[object, str], bool]]] = {
    "exact": (lambda text: last_answer(text), lambda a, ref: a is not None and _norm(a) == _norm(ref)),
    "numeric": (lambda text: _number(last_answer(text)),
                lambda a, ref: a is not None and _number(ref) is not None
                and math.isclose(a, _number(ref), rel_tol=1e-6, abs_tol=1e-9)),
    "json": (lambda text: _json(text), lambda a, ref: a is not None and a == _json(ref)),
    "regex": (lambda text: last_answer(text), lambda a, ref: a is not None and re.search(ref, a) is not None),
}


@dataclass
class Item:
    """One held-out prompt: its messages, reference, and how to grade a reply to it."""

    messages: list[dict]
    reference: str
    group: str  # skill name, or the prompt file's `skill` column, or "all"
    skill: tasks.Skill | None = None  # a built-in skill grades itself; else `grader` does
    grader: str = "exact"

    def answer(self, reply: str):
        return self.skill.extract(reply) if self.skill else GRADERS[self.grader][0](reply)

    def correct(self, reply: str) -> bool:
        if self.skill:
            return self.skill.grade(reply, self.reference)
        return GRADERS[self.grader][1](self.answer(reply), self.reference)


def load_items(cfg: EvaluateConfig) -> list[Item]:
    if not cfg.prompts:
        return [Item(ex.messages, ex.reference, ex.skill, tasks.get(ex.skill))
                for ex in tasks.generate(cfg.skills, cfg.n, "test", seed=cfg.seed)]
    items = []
    for i, p in enumerate(read_prompt_file(cfg.prompts)):
        if "reference" not in p.meta:
            raise ValueError(f"{cfg.prompts}: row {i + 1} has no `reference` column; evaluate needs the right answer "
                             "for every prompt")
        grader = p.meta.get("grader", cfg.grader)
        if grader not in GRADERS:
            raise ValueError(f"{cfg.prompts}: row {i + 1}: unknown grader {grader!r}; use one of {', '.join(GRADERS)}")
        skill = p.meta.get("skill")
        builtin = tasks.SKILLS.get(skill) if skill and "grader" not in p.meta else None
        items.append(Item(p.messages, str(p.meta["reference"]), str(skill or "all"), builtin, grader))
    return items


# --- the two sides ---------------------------------------------------------------------------------------------------


@dataclass
class Answers:
    replies: list[str]
    completion_tokens: int
    seconds: float
    latencies: list[float] = field(default_factory=list)


class Local:
    """A model on this machine: greedy, batched generation (transformers)."""

    def __init__(self, path: str):
        from .modeling import load, n_params, resolve_model_path

        self.path = path
        self.model, self.tokenizer = load(path)
        self.model.eval()
        folder, gguf = resolve_model_path(path)
        files = [folder / gguf] if gguf else [f for f in folder.iterdir()
                                              if f.suffix in (".safetensors", ".bin", ".gguf", ".pt")]
        self.info = {"kind": "local", "path": path, "parameters": n_params(self.model),
                     "size_bytes": sum(f.stat().st_size for f in files)}

    def answer(self, conversations: list[list[dict]], max_tokens: int, batch_size: int) -> Answers:
        from .modeling import chat_generate

        t = time.perf_counter()
        replies = chat_generate(self.model, self.tokenizer, conversations, max_new_tokens=max_tokens,
                                batch_size=batch_size)
        seconds = time.perf_counter() - t
        tokens = sum(len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in replies)  # + end
        return Answers(replies, tokens, seconds)

    def latency(self, conversations: list[list[dict]], max_tokens: int) -> list[float]:
        from .modeling import chat_generate

        out = []
        for conv in conversations:
            t = time.perf_counter()
            chat_generate(self.model, self.tokenizer, [conv], max_new_tokens=max_tokens, batch_size=1)
            out.append(time.perf_counter() - t)
        return out


class Endpoint:
    """An OpenAI-compatible chat endpoint (alambic serve, vLLM, a provider's API)."""

    def __init__(self, url: str, model: str = "", api_key: str = ""):
        self.url = url.rstrip("/")
        self.key = api_key  # never written anywhere: only the header carries it
        self.model = model
        self.info = {"kind": "endpoint", "base_url": self.url, "parameters": None, "size_bytes": None}

    def _client(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        return httpx.AsyncClient(base_url=self.url, timeout=300, headers=headers)

    async def _model_name(self, c: httpx.AsyncClient) -> str:
        if not self.model:
            r = await c.get("/models")
            if r.status_code != 200:
                raise RuntimeError(f"{self.url}/models answered {r.status_code}: {r.text[:200]}; check the URL and "
                                   "the API key, or give the model name")
            self.model = r.json()["data"][0]["id"]
        self.info["model"] = self.model
        return self.model

    async def _ask(self, conversations, max_tokens, concurrency, top_logprobs: int = 0):
        sem = asyncio.Semaphore(concurrency)
        async with self._client() as c:
            model = await self._model_name(c)

            async def one(messages):
                body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
                if top_logprobs:
                    body |= {"logprobs": True, "top_logprobs": top_logprobs}
                async with sem:
                    t = time.perf_counter()
                    r = await c.post("/chat/completions", json=body)
                    if r.status_code != 200:
                        raise RuntimeError(f"{self.url} answered {r.status_code}: {r.text[:300]}")
                    return r.json(), time.perf_counter() - t

            return await asyncio.gather(*(one(m) for m in conversations))

    def answer(self, conversations, max_tokens: int, concurrency: int, top_logprobs: int = 0):
        t = time.perf_counter()
        got = asyncio.run(self._ask(conversations, max_tokens, concurrency, top_logprobs))
        seconds = time.perf_counter() - t
        replies = [j["choices"][0]["message"]["content"] or "" for j, _ in got]
        tokens = sum((j.get("usage") or {}).get("completion_tokens", 0) for j, _ in got)
        answers = Answers(replies, tokens, seconds, [dt for _, dt in got])
        logprobs = [((j["choices"][0].get("logprobs") or {}).get("content")) for j, _ in got]
        return answers, logprobs

    def latency(self, conversations, max_tokens: int) -> list[float]:
        answers, _ = self.answer(conversations, max_tokens, concurrency=1)
        return answers.latencies


def side(spec: str, model: str, key_env: str):
    if spec.startswith(("http://", "https://")):
        return Endpoint(spec, model, os.environ.get(key_env, ""))
    return Local(spec)


# --- fidelity: held-out token KL -------------------------------------------------------------------------------------


@torch.no_grad()
def token_kl(student: Local, teacher, items: list[Item], teacher_replies: list[str], teacher_logprobs,
             batch_size: int = 32) -> float | None:
    """Mean KL(teacher || student) per token of the teacher's own held-out replies.

    A local teacher gives its full next-token distribution; an endpoint teacher its top-k logprobs, compared over
    the k tokens plus a tail bucket (as `alambic train` does). None when the two tokenizers differ.
    """
    from .train import data, losses

    if not isinstance(student, Local):
        return None
    local_teacher = isinstance(teacher, Local)
    if local_teacher and not data.same_tokenizer(student.tokenizer, teacher.tokenizer):
        return None
    table = None if local_teacher else data.token_table(student.tokenizer)
    records = [{"id": str(i), "prompt": it.messages, "completion": reply, "logprobs": lps}
               for i, (it, reply, lps) in enumerate(zip(items, teacher_replies, teacher_logprobs, strict=True))]
    try:
        examples = data.encode_all(student.tokenizer, records, table, 20 if table else None, 4096)
    except data.TokenizerMismatch:
        return None
    total, count = 0.0, 0
    pad = student.tokenizer.pad_token_id or 0
    for start in range(0, len(examples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(examples))))
        batch = data.collate(examples, [[i] for i in chunk], pad, with_topk=table is not None)
        ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
        s_logits = student.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        mask = labels >= 0
        if not local_teacher:
            # Only tokens the endpoint reported logprobs for: the template's closing tokens after a reply are
            # not the teacher's measured distribution (training may treat them as certain; a metric may not).
            for r, i in enumerate(chunk):
                start = examples[i].prompt_len + len(teacher_logprobs[i] or [])
                mask[r, start:] = False
        mask = mask[:, 1:]
        if local_teacher:
            t_logits = teacher.model(input_ids=ids, attention_mask=attn).logits[:, :-1]
            s_logits, t_logits = data.align_vocab(s_logits, t_logits)
            kl = losses.forward_kl(s_logits, mask, teacher_logits=t_logits)
        else:
            # k + 1 buckets, not the training loss's spread tail: a measurement, a lower bound of the true KL that
            # assumes nothing of the teacher's tail (0 for a student with the teacher's weights)
            kl = losses.forward_kl(s_logits, mask, teacher_ids=batch["top_ids"][:, 1:],
                                   teacher_logprobs=batch["top_lp"][:, 1:], tail="bucket")
        n = int(mask.sum())
        total, count = total + kl.item() * n, count + n
    return total / count if count else None


# --- the evaluation --------------------------------------------------------------------------------------------------


def wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return round(ci.low, 4), round(ci.high, 4)


def accuracy_table(items: list[Item], replies: list[str]) -> dict[str, dict]:
    hits: dict[str, list[bool]] = {}
    for it, r in zip(items, replies, strict=True):
        hits.setdefault(it.group, []).append(it.correct(r))
    table = {g: {"accuracy": sum(h) / len(h), "ci95": wilson(sum(h), len(h)), "n": len(h)} for g, h in hits.items()}
    table["mean"] = {"accuracy": sum(t["accuracy"] for t in table.values()) / len(table), "n": len(items)}
    return table


def _speed(a: Answers, latencies: list[float]) -> dict:
    return {"tokens_per_s": round(a.completion_tokens / a.seconds, 1) if a.seconds else None,
            "completion_tokens": a.completion_tokens, "seconds": round(a.seconds, 2),
            "latency_p50_s": round(statistics.median(latencies), 4) if latencies else None}


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def run(cfg: EvaluateConfig, log: Callable[[str], None] = lambda _: None) -> dict:
    """Evaluate student and teacher; write evaluation.json and replies.jsonl to `cfg.out`; return the results."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for name, spec in (("student", cfg.student), ("teacher", cfg.teacher)):
        if not spec.startswith(("http://", "https://")) and not Path(spec).exists():
            raise FileNotFoundError(f"{name} {spec!r} not found: give an HF model directory, a .gguf file or an "
                                    "http(s)://…/v1 endpoint")
    items = load_items(cfg)
    if not items:
        raise ValueError("no prompts to evaluate")
    convs = [it.messages for it in items]
    results: dict[str, dict] = {}
    replies: dict[str, list[str]] = {}
    teacher_lps = [None] * len(items)
    models = {}
    for name, spec, model, key_env in (("teacher", cfg.teacher, cfg.teacher_model, cfg.teacher_api_key_env),
                                       ("student", cfg.student, cfg.student_model, cfg.student_api_key_env)):
        log(f"{name}: loading {spec}")
        m = models[name] = side(spec, model, key_env)
        log(f"{name}: answering {len(items)} held-out prompts")
        if isinstance(m, Local):
            a = m.answer(convs, cfg.max_tokens, cfg.batch_size)
        else:
            want_lps = 20 if (name == "teacher" and cfg.kl) else 0
            a, lps = m.answer(convs, cfg.max_tokens, cfg.concurrency, top_logprobs=want_lps)
            if want_lps:
                teacher_lps = lps
        lat = m.latency(convs[: cfg.latency_prompts], cfg.max_tokens) if cfg.latency_prompts else []
        replies[name] = a.replies
        results[name] = {**m.info, "accuracy": accuracy_table(items, a.replies), "speed": _speed(a, lat)}
    t_ans = [it.answer(r) for it, r in zip(items, replies["teacher"], strict=True)]
    s_ans = [it.answer(r) for it, r in zip(items, replies["student"], strict=True)]
    # Same final answer; where neither reply has one, the same reply (identical models always agree).
    agree = [ta == sa if (ta is not None or sa is not None) else tr.strip() == sr.strip()
             for ta, sa, tr, sr in zip(t_ans, s_ans, replies["teacher"], replies["student"], strict=True)]
    kl = None
    if cfg.kl and (isinstance(models["teacher"], Local) or any(teacher_lps)):
        log("fidelity: held-out token KL(teacher || student)")
        kl = token_kl(models["student"], models["teacher"], items, replies["teacher"], teacher_lps)
    t, s = results["teacher"], results["student"]
    t_mean, s_mean = t["accuracy"]["mean"]["accuracy"], s["accuracy"]["mean"]["accuracy"]
    summary = {
        "kind": "alambic.evaluate",
        "alambic_version": __version__,
        "prompts": cfg.prompts or f"built-in skills, {cfg.n} held-out prompts each (seed {cfg.seed})",
        "n": len(items),
        "teacher": t,
        "student": s,
        "fidelity": {"agreement": round(sum(agree) / len(agree), 4), "token_kl": None if kl is None else round(kl, 4)},
        "ratios": {
            "accuracy_kept": _ratio(s_mean, t_mean),
            "parameters": _ratio(s["parameters"], t["parameters"]),
            "size_on_disk": _ratio(s["size_bytes"], t["size_bytes"]),
            "speedup_tokens_per_s": _ratio(s["speed"]["tokens_per_s"], t["speed"]["tokens_per_s"]),
            "latency": _ratio(s["speed"]["latency_p50_s"], t["speed"]["latency_p50_s"]),
        },
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n")
    with open(out / "replies.jsonl", "w") as f:
        for it, tr, sr, ag in zip(items, replies["teacher"], replies["student"], agree, strict=True):
            f.write(json.dumps({"group": it.group, "prompt": it.messages, "reference": it.reference,
                                "teacher": tr, "teacher_correct": it.correct(tr),
                                "student": sr, "student_correct": it.correct(sr), "agree": ag}) + "\n")
    return summary


__all__ = ["GRADERS", "EvaluateConfig", "Item", "run"]
