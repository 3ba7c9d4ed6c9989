"""Synthetic API access logs: a hard benign population plus distillation campaigns, with ground-truth labels.

The campaign playbooks model a model provider's public disclosures (Feb-Jun 2026): ~24,000 fraudulent accounts
and >16M exchanges across (1) a small chain-of-thought / rubric-grading campaign on synchronized accounts with shared
payment methods, (2) an agentic-reasoning / tool-use / coding campaign over hundreds of accounts and several access
paths, (3) proxy "hydra" networks mixing distillation with resold ordinary traffic that moved half their traffic to a
new model within 24 h of its release, and (4) a later low-and-slow campaign (~26 requests per account per day) that
no per-key rate limit can see. Each playbook is one `Playbook` in `PLAYBOOKS`; the evasion knobs (`paraphrase`,
`jitter`, `benign_mix`, `rotation`) turn every campaign at once so robustness curves can be drawn.

The benign population is hard on purpose: heavy-tailed volumes, diurnal cycles, many topics, multi-turn sessions,
power users, legitimate single-account batch pipelines (templated, 24/7, high volume), company accounts that share
payment, office IP prefix and an internal app's system prompt, families sharing a card, carrier-grade NAT prefixes
shared by thousands, and popular SDK user agents. Some benign users ask for step-by-step reasoning or rubric grading.

Everything is vectorised: per-event columns are numpy arrays, prompt text is assembled by pyarrow compute from piece
tables, and the log is written in row groups, so 16M events (`scale=1`) is a matter of minutes, not hours.
Outputs in `out/`: access.parquet and/or access.jsonl, labels.jsonl (account_id, label, kind), config.json,
manifest.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args, get_type_hints

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from ..config import Config

DAY = 86400.0


class SimulateConfig(Config):
    out: str = Field("runs/guard-sim", description="output folder", json_schema_extra={"positional": True})
    scale: float = Field(
        0.025, gt=0, description="1.0 = 200k benign + ~24k campaign accounts, ~16M events; 0.025 runs in seconds"
    )
    days: float = Field(7.0, gt=0.5, description="length of the simulated window in days")
    start: str = Field("2026-03-02T00:00:00Z", description="start of the window (ISO-8601 UTC)")
    seed: int = Field(0, description="random seed")
    format: Literal["jsonl", "parquet", "both"] = Field("jsonl", description="log format: jsonl, parquet or both")
    campaigns: list[str] = Field(
        default_factory=lambda: list(PLAYBOOKS), description="campaign playbooks to include (see PLAYBOOKS)"
    )
    release_day: float = Field(4.5, description="day (from start) a new model is released; campaigns may pivot to it")
    paraphrase: float = Field(0.2, ge=0, le=1, description="evasion: template paraphrase diversity, 0 (fixed) to 1")
    jitter: float = Field(0.1, ge=0, le=1, description="evasion: share of campaign timing drawn from human rhythms")
    benign_mix: float = Field(0.0, ge=0, le=0.9, description="evasion: extra share of ordinary traffic mixed in")
    rotation: float = Field(0.0, ge=0, le=1, description="evasion: share of campaign accounts with their own IP/card")
    lookalikes: list[str] = Field(
        default_factory=list,
        description="benign look-alike populations to add (see LOOKALIKES): batch_pipeline, "
        "eval_harness, classroom, agent_framework; labelled benign, their kind named",
    )
    lookalike_seed: int | None = Field(
        None,
        description="seed of the look-alike populations (default: derived from seed); keep it apart from "
        "the seeds a detector was tuned on",
    )
    prompt_text: bool = Field(True, description="write prompt text; False writes only prompt_hash (text withheld)")
    campaign: list[str] = Field(
        default_factory=list,
        description="per-campaign settings NAME.FIELD=VALUE, e.g. low_slow.accounts=25000 or hydra.mix=0.7 (fields of "
        "Playbook; lists comma-separated)",
    )

    @field_validator("lookalikes")
    @classmethod
    def _known_lookalikes(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in LOOKALIKES]
        if unknown:
            raise ValueError(f"unknown look-alike population(s) {unknown}; known: {', '.join(LOOKALIKES)}")
        return v

    @field_validator("campaign")
    @classmethod
    def _known_settings(cls, v: list[str]) -> list[str]:
        playbooks(v)  # raises, naming the bad setting
        return v


@dataclass
class Playbook:
    """One campaign's operating profile (per-account numbers at scale 1)."""

    accounts: int  # at scale 1.0
    min_accounts: int  # floor when scaled down, so every campaign exists in small simulations
    rate: float  # requests per account per day
    schedule: Literal["waves", "steady"]  # waves: accounts fire together on one template; steady: spread evenly
    templates: list[str]  # template families (keys of TEMPLATES)
    payloads: list[str]  # skill names whose prompts fill the templates
    accounts_per_card: int  # accounts sharing one payment fingerprint (1 = every account its own)
    ip_pool: Literal["datacenter", "proxy", "residential"]
    paths: int = 1  # access paths: each its own user agent, system prompt and IP pool
    user_agents: list[str] = field(default_factory=lambda: ["python-httpx/0.27.0"])
    mix: float = 0.0  # share of resold ordinary traffic mixed in
    pivot: float = 0.0  # share of traffic moved to the new model within 24 h of its release
    logprobs: float = 0.0
    max_tokens: int = 4096
    wave_every_h: float = 2.0


PLAYBOOKS: dict[str, Playbook] = {
    # (1) ~150k exchanges: synchronized accounts, shared payment methods, CoT elicitation and rubric grading.
    "cot_rubric": Playbook(
        accounts=150, min_accounts=12, rate=140, schedule="waves", templates=["cot", "rubric"],
        payloads=["arithmetic", "program"], accounts_per_card=12, ip_pool="datacenter", wave_every_h=2.0,
    ),
    # (2) >3.4M exchanges over hundreds of accounts and several access paths: agentic reasoning, tool use, coding.
    "agentic": Playbook(
        accounts=400, min_accounts=12, rate=600, schedule="waves", templates=["agent", "code"],
        payloads=["tool_call", "program", "list_ops"], accounts_per_card=3, ip_pool="datacenter", paths=3,
        user_agents=["openai-python/1.54.3", "node-fetch/1.0", "agent-runner/2.1"], logprobs=0.3, wave_every_h=1.0,
    ),
    # (3) >13M through hydra proxy networks mixing distillation with resold traffic; pivots to a new model in 24 h.
    "hydra": Playbook(
        accounts=17000, min_accounts=40, rate=25, schedule="steady", templates=["solve", "explain_code"],
        payloads=["arithmetic", "program", "tool_call", "string_ops"], accounts_per_card=1, ip_pool="proxy",
        user_agents=["openai-python/1.54.3", "openai-python/1.52.0", "OpenAI/NodeJS/4.67.3"], mix=0.5, pivot=0.5,
    ),
    # (4) later low-and-slow: ~26 requests per account per day, below any per-key rate limit.
    "low_slow": Playbook(
        accounts=6500, min_accounts=40, rate=26, schedule="steady", templates=["trace", "critique"],
        payloads=["arithmetic", "list_ops", "program"], accounts_per_card=1, ip_pool="residential",
        user_agents=["openai-python/1.54.3", "OpenAI/NodeJS/4.67.3"], mix=0.1, logprobs=0.5,
    ),
}  # fmt: skip

BENIGN_ACCOUNTS = 200_000  # at scale 1
PAYLOADS = 20_000  # prompts per skill that campaign templates are filled with


def playbooks(settings: list[str]) -> dict[str, Playbook]:
    """PLAYBOOKS with `NAME.FIELD=VALUE` settings applied (the value cast to the field's type)."""
    out = dict(PLAYBOOKS)
    for item in settings:
        key, eq, value = item.partition("=")
        name, dot, attr = key.strip().partition(".")
        known = [f.name for f in fields(Playbook)]
        if not (eq and dot) or name not in PLAYBOOKS or attr not in known:
            raise ValueError(f"campaign setting {item!r}: expected NAME.FIELD=VALUE with NAME one of "
                             f"{', '.join(PLAYBOOKS)} and FIELD one of {', '.join(known)}")  # fmt: skip
        kind = type(getattr(PLAYBOOKS[name], attr))
        if attr == "templates" and not set(value.split(",")) <= set(TEMPLATES):
            raise ValueError(f"campaign setting {item!r}: templates are among {', '.join(TEMPLATES)}")
        try:
            cast = [x.strip() for x in value.split(",")] if kind is list else kind(value.strip())
        except ValueError as e:
            raise ValueError(f"campaign setting {item!r}: {value!r} is not a {kind.__name__}") from e
        allowed = get_args(get_type_hints(Playbook)[attr]) if attr in ("schedule", "ip_pool") else ()
        if allowed and cast not in allowed:
            raise ValueError(f"campaign setting {item!r}: {attr} is one of {', '.join(allowed)}")
        out[name] = replace(out[name], **{attr: cast})
    return out


# Template families: each slot {a|b|c} is a paraphrase choice; `paraphrase` draws more combinations plus filler words.
TEMPLATES: dict[str, list[str]] = {
    "cot": [
        "{Articulate|Explain|Lay out|Spell out} the reasoning behind {the|this} {completed response|finished answer|"
        "given solution} step by step, as if you had written it yourself. Task:",
        "{Think|Reason|Work} through the following {carefully|slowly|methodically}, {showing|writing out} every "
        "intermediate step before the final answer. Problem:",
        "Before answering, write your full chain of thought in {numbered steps|detail|a scratchpad}. Question:",
    ],
    "rubric": [
        "{Grade|Score|Evaluate} the response below against the rubric (correctness, completeness, clarity), "
        "{1-10|0-5|out of 10} each, and justify every score. Response to grade:",
        "You are a strict {grader|reviewer|judge}. {Rate|Assess} this answer with the rubric and explain which "
        "criteria it fails. Answer:",
    ],
    "agent": [
        "You are an autonomous agent with tools. {Plan|Decide} the {tool calls|function calls} needed, {think|reason} "
        "step by step, then act. Request:",
        "{Decompose|Break down} the task into tool invocations, {explain|justify} each choice, and return the final "
        "JSON. Task:",
    ],
    "solve": [
        "{Solve|Answer|Work out} this {problem|task|exercise}. {Show|Give} your complete reasoning {first|before the "
        "answer} and end with a line 'Answer:'. Problem:",
        "Provide a detailed, {expert|rigorous|careful} solution with all intermediate {reasoning|steps|derivations} "
        "to the following:",
    ],
    "explain_code": [
        "{Act as|You are} a senior engineer. {Read|Study} the code, {explain|describe} how it {works|runs} and what "
        "it prints, with your reasoning. Code:",
    ],
    "trace": [
        "Produce a {thorough|complete|full} reasoning trace for the task below, {then|and then} the final answer on "
        "its own line. Task:",
        "{Consider|Examine} the {input|problem} carefully and {document|record} each inference you make before "
        "concluding. Input:",
    ],
    "critique": [
        "{Critique|Review|Assess} the following {solution|attempt|answer}: list its errors, {score|grade} it against "
        "the rubric, then write the ideal response. Attempt:",
    ],
    "code": [
        "{Trace|Execute|Simulate} this program {line by line|step by step}, {explaining|describing} the state after "
        "each statement, then give the output. Program:",
        "{Explain|Describe} what the following code does, {reason|think} about edge cases, and state its exact "
        "output. Code:",
    ],
}
FILLER = (
    "please kindly now also just really quite carefully fully exactly clearly here then again so first always "
    "briefly precisely honestly simply basically truly actually literally mostly"
).split()

# Benign topics: (openers, subjects). Openers end where the subject is appended.
TOPICS: dict[str, tuple[list[str], list[str]]] = {
    "coding": (
        ["How do I fix this error in my", "Write a function in", "Why is my", "Refactor this", "Explain the",
         "What is the difference between a list and a tuple in", "Help me debug my", "Can you review my"],
        ["Python script", "React component", "SQL query", "Rust borrow checker error", "bash loop", "Go server",
         "pandas dataframe join", "Dockerfile", "regex", "unit test", "Kubernetes deployment", "TypeScript type"],
    ),
    "writing": (
        ["Rewrite this paragraph to sound more", "Write an email to my", "Draft a cover letter for a",
         "Proofread my", "Make this text more", "Summarise this article about", "Give me a title for a blog on"],
        ["landlord about the heating", "manager asking for leave", "data analyst job", "formal", "concise",
         "climate policy", "remote work", "product launch", "wedding toast", "LinkedIn post", "essay introduction"],
    ),
    "math": (
        ["Solve step by step:", "Explain how to compute", "What is the derivative of", "Help with my homework on",
         "Check my answer for", "Show me how to integrate"],
        ["quadratic equations", "compound interest", "x squared times sine x", "probability of two dice",
         "matrix inverse", "percent change", "long division", "the area of a circle"],
    ),
    "cooking": (
        ["Give me a recipe for", "How long should I bake", "What can I cook with", "Vegetarian substitute for",
         "Plan a weekly menu with"],
        ["chicken and rice", "sourdough bread", "leftover pasta", "eggs", "a birthday cake", "lentils",
         "a dinner party", "meal prep"],
    ),
    "travel": (
        ["Plan a trip to", "What should I pack for", "Best time to visit", "Cheap things to do in",
         "Itinerary for"],
        ["Lisbon", "Japan in spring", "a hiking weekend", "Mexico City", "the Alps", "a family beach holiday",
         "Kyoto", "Iceland"],
    ),
    "learning": (
        ["Explain like I'm five:", "What are the causes of", "Summarise the history of", "Quiz me on",
         "Give me a study plan for", "What is"],
        ["photosynthesis", "the French revolution", "inflation", "machine learning", "the cold war",
         "Spanish verbs", "organic chemistry", "black holes", "the stock market"],
    ),
    "work": (
        ["Create an agenda for a", "Write a job description for a", "Prepare talking points for",
         "Turn these notes into", "Draft OKRs for"],
        ["quarterly review", "backend engineer", "a client meeting", "meeting minutes", "the sales team",
         "project kickoff", "performance review"],
    ),
    "feedback": (
        ["Grade my essay using this rubric:", "Give feedback on my", "Score my answer out of 10:",
         "Explain your reasoning step by step for", "Walk me through"],
        ["history essay", "short story", "interview answer", "pitch deck", "lab report", "logic puzzle",
         "chess opening"],
    ),
    "health": (
        ["Is it normal to", "Create a workout plan for", "How much sleep do", "Healthy snacks for",
         "Stretches for"],
        ["feel tired after lunch", "beginners", "teenagers need", "work", "lower back pain", "runners"],
    ),
    "tools": (
        ["Call the weather tool for", "Book a table at", "Set a reminder to", "Convert this to JSON:",
         "Extract the dates from"],
        ["Paris tomorrow", "an Italian restaurant", "call mom", "my shopping list", "this invoice",
         "the meeting email"],
    ),
}  # fmt: skip
TAILS = [
    "", "", "", "", "", " Thanks!", " Keep it short.", " Please be detailed.", " Use bullet points.",
    " Explain step by step.", " Show your reasoning.", " In simple terms.", " With an example.", " In about {n} words.",
    " For a {n}-year-old.", " Under {n} dollars.",
]  # fmt: skip
FOLLOW_UPS = [
    "Thanks, can you make it shorter?", "What about the second point?", "Can you give another example?",
    "That didn't work, I get an error.", "Why?", "Great. Now translate it to Spanish.", "Can you explain that part?",
    "Make it more formal.", "And if it's {n} instead?", "ok continue", "Can you add tests?", "Perfect, thank you!",
]  # fmt: skip
PIPELINE_TASKS = [
    "Classify the support ticket into billing, bug or other. Ticket #{n}:",
    "Extract vendor, date and total as JSON from invoice {n}:",
    "Translate the product description to German. SKU {n}:",
    "Summarise the call transcript in three bullets. Call {n}:",
    "Tag the sentiment of review {n} as positive, neutral or negative:",
]
SDK_UAS = [
    ("openai-python/1.54.3", 0.28), ("openai-python/1.52.0", 0.12), ("OpenAI/NodeJS/4.67.3", 0.12),
    ("anthropic-sdk-python/0.39.0", 0.06), ("python-requests/2.32.3", 0.08), ("python-httpx/0.27.0", 0.06),
    ("curl/8.5.0", 0.04), ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/131.0", 0.1),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) Safari/605.1.15", 0.08), ("langchain/0.3.7", 0.06),
]  # fmt: skip
# Share of a human's activity per UTC hour, before the account's own phase shift.
DIURNAL = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.4, 0.8, 1.5, 2.5, 3.2, 3.5, 3.4, 3.0, 3.3, 3.5, 3.4, 3.1, 2.8, 2.5,
                    2.6, 2.7, 2.4, 1.9, 1.4])  # fmt: skip
DIURNAL = DIURNAL / DIURNAL.sum()
MODELS = ["alambic-m1", "alambic-m1-mini", "alambic-m2"]  # m2 is released at `release_day`


def expand(template: str, rng: np.random.Generator, noise: int) -> str:
    """One paraphrase of a `{a|b}` template, with `noise` filler words inserted at random positions."""
    out, rest = [], template
    while "{" in rest:
        pre, _, rest = rest.partition("{")
        choices, _, rest = rest.partition("}")
        out += [pre, rng.choice(choices.split("|"))]
    words = ("".join(out) + rest).split()
    for _ in range(noise):
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(FILLER)))
    return " ".join(words)


class Pieces:
    """An append-only table of text pieces; events refer to pieces by index, pyarrow joins them."""

    def __init__(self):
        self.text: list[str] = [""]

    def add(self, items: list[str]) -> np.ndarray:
        start = len(self.text)
        self.text += items
        return np.arange(start, len(self.text))


@dataclass
class Events:
    """Per-event columns (numpy) for one population; concatenated, sorted by time, then written."""

    t: np.ndarray  # seconds from window start
    acct: np.ndarray  # account index
    head: np.ndarray  # piece index: template / opener
    body: np.ndarray  # piece index: payload / subject
    tail: np.ndarray  # piece index: tail clause
    num: np.ndarray  # number substituted for {n} (and appended to payloads), -1 = none
    n_messages: np.ndarray
    model: np.ndarray  # index into MODELS
    elicit: np.ndarray  # bool: long, reasoning-heavy completion


def _concat(parts: list[Events]) -> Events:
    return Events(*[np.concatenate([getattr(p, f) for p in parts]) for f in Events.__dataclass_fields__])


def _counts(rng, rate_per_day, active_days):
    return rng.poisson(np.maximum(rate_per_day * active_days, 0.0)).astype(np.int64)


def _human_times(rng, n, phase, t0, t1):
    """Event times following a diurnal rhythm shifted by each event's account `phase` (hours), within [t0, t1)."""
    span_days = np.maximum((t1 - t0) / DAY, 1e-9)
    day = np.floor(t0 / DAY + rng.random(n) * span_days)
    hour = (rng.choice(24, n, p=DIURNAL) + phase) % 24
    t = day * DAY + hour * 3600 + rng.random(n) * 3600
    # Past the window's end (a partial last day, a late phase): the same hour on an earlier day. Clipping instead
    # piled these events onto the last instant, a burst of every template at once that looked like synchrony.
    t1 = np.broadcast_to(t1, t.shape)
    over = t >= t1
    t[over] -= np.ceil((t[over] - t1[over]) / DAY + 1e-9) * DAY
    return np.clip(t, t0, np.nextafter(t1, t0))


def benign(rng, n_accounts, cfg, pieces, topic_ids, first_acct) -> tuple[Events, dict]:
    """The ordinary population: per-account kinds and attributes, then their events in sessions."""
    days, release = cfg.days, cfg.release_day * DAY
    kind = rng.choice(4, n_accounts, p=[0.902, 0.002, 0.07, 0.026])  # regular, pipeline, company, family-heavy user
    rate = np.exp(rng.normal(np.log(1.8), 1.3, n_accounts)).clip(0.05, 600)  # heavy tail: power users emerge
    rate[kind == 1] = np.exp(rng.normal(np.log(600), 0.6, (kind == 1).sum()))
    start = np.where(rng.random(n_accounts) < 0.25, rng.random(n_accounts) * days * 0.7, 0.0) * DAY
    n = _counts(rng, rate, (days * DAY - start) / DAY)
    n[kind == 1] = np.maximum(n[kind == 1], 50)
    acct = np.repeat(np.arange(n_accounts), n)
    m = len(acct)
    k = kind[acct]
    pipe = k == 1
    # Sessions: a new session starts with probability 1/mean_len; turns within it are follow-ups spaced by minutes.
    mean_len = np.where(kind == 1, 1.0, 1 + rng.exponential(1.5, n_accounts))[acct]
    new = (rng.random(m) < 1 / mean_len) | np.r_[True, acct[1:] != acct[:-1]]
    sid = np.cumsum(new) - 1
    first_idx = np.flatnonzero(new)
    pos = np.arange(m) - first_idx[sid]
    phase = rng.integers(-3, 9, n_accounts)  # account's local offset; the detector never uses the phase
    s_acct = acct[first_idx]
    s_t = _human_times(rng, len(first_idx), phase[s_acct], start[s_acct], np.full(len(first_idx), days * DAY))
    gaps = rng.exponential(120, m) * (pos > 0)
    csum = np.cumsum(gaps)
    t = s_t[sid] + csum - csum[first_idx][sid]
    # Pipelines run 24/7 at a steady pace.
    t[pipe] = start[acct[pipe]] + rng.random(pipe.sum()) * (days * DAY - start[acct[pipe]])
    inside = t < days * DAY  # sessions running past the window's end are cut there, not piled onto its last second
    # Topics: each account has 1-3 favourites; a pipeline has its own fixed task.
    n_topics = len(topic_ids)
    fav = rng.choice(n_topics, (n_accounts, 3))
    topic = fav[acct, rng.choice(3, m, p=[0.6, 0.3, 0.1])]
    heads, bodies = topic_ids[topic, 0], topic_ids[topic, 1]
    o_start, o_n, s_start, s_n = heads[:, 0], heads[:, 1], bodies[:, 0], bodies[:, 1]
    head = o_start + (rng.random(m) * o_n).astype(np.int64)
    body = s_start + (rng.zipf(1.6, m) - 1).clip(0, None) % s_n
    cot_pref = rng.beta(0.4, 8, n_accounts)  # most never ask for reasoning, a few often do
    # Most people's wording is their own (a detail phrase); some ask for the reasoning, as campaigns do.
    plain, detail, cot = pieces.tail_ids, pieces.detail_ids, pieces.cot_detail_ids
    tail = np.where(
        rng.random(m) < 0.75, detail[rng.integers(0, len(detail), m)], plain[rng.integers(0, len(plain), m)]
    )
    asks = rng.random(m) < cot_pref[acct]
    tail[asks] = cot[rng.integers(0, len(cot), asks.sum())]
    follow = pos > 0
    head[follow] = pieces.follow_ids[rng.integers(0, len(pieces.follow_ids), follow.sum())]
    body[follow] = 0
    tail[follow] = 0
    # Each pipeline's owner wrote its own prompt: a task wording of its own, then the record.
    head[pipe] = pieces.pipeline_ids[acct[pipe] % len(pieces.pipeline_ids)]
    body[pipe] = pieces.detail_ids[rng.integers(0, len(pieces.detail_ids), pipe.sum())]
    tail[pipe] = 0
    num = np.where(rng.random(m) < 0.3, rng.integers(2, 500, m), -1)
    num[pipe] = rng.integers(10000, 99999, pipe.sum())
    n_messages = np.where(pipe, 1, 1 + 2 * pos)
    # Model choice: some use the mini model; ~35% adopt the new model some days after release.
    mini = rng.random(n_accounts) < 0.2
    adopt_at = np.where(rng.random(n_accounts) < 0.35, release + rng.exponential(1.5 * DAY, n_accounts), np.inf)
    model = np.where(mini[acct] & (rng.random(m) < 0.7), 1, 0)
    model[(t >= adopt_at[acct]) & (rng.random(m) < 0.7)] = 2
    elicit = rng.random(m) < cot_pref[acct]
    ev = Events(*(x[inside] for x in (t, acct + first_acct, head, body, tail, num, n_messages, model, elicit)))
    return ev, {"kind": kind, "start": start}


def campaign(rng, name, pb, n_accounts, cfg, pieces, first_acct, benign_sampler) -> Events:
    """One campaign's events: templated payloads on a schedule, plus any resold ordinary traffic mixed in."""
    days, release = cfg.days, cfg.release_day * DAY
    start = rng.random(n_accounts) * days * DAY * 0.15  # accounts come online over the first day or so
    n = _counts(rng, pb.rate * rng.uniform(0.7, 1.3, n_accounts), (days * DAY - start) / DAY)
    acct = np.repeat(np.arange(n_accounts), n)
    m = len(acct)
    tmpl_ids = pieces.templates[name]  # one array of variant piece ids per base template
    n_tmpl = len(tmpl_ids)
    if pb.schedule == "waves":
        # Orchestrated waves: every wave_every_h a batch of accounts fires one template within ~10 minutes.
        n_waves = int(days * 24 / pb.wave_every_h)
        wave = rng.integers(0, n_waves, m)
        t = wave * pb.wave_every_h * 3600 + rng.random(m) * 600
        t = np.maximum(t, start[acct] + rng.random(m) * 3600)
        which = wave % n_tmpl
    else:
        t = start[acct] + rng.random(m) * (days * DAY - start[acct])
        which = rng.integers(0, n_tmpl, m)
    human = rng.random(m) < cfg.jitter  # evasion: part of the schedule imitates human rhythms
    phase = rng.integers(-3, 9, n_accounts)
    t[human] = _human_times(
        rng, int(human.sum()), phase[acct[human]], start[acct[human]], np.full(human.sum(), days * DAY)
    )
    head = np.empty(m, np.int64)
    for j in range(n_tmpl):
        sel = which == j
        head[sel] = tmpl_ids[j][rng.integers(0, len(tmpl_ids[j]), sel.sum())]
    payload = np.concatenate([pieces.payloads[p] for p in pb.payloads])
    body = payload[rng.integers(0, len(payload), m)]
    ev = Events(
        t=np.minimum(t, days * DAY - 1), acct=acct, head=head, body=body, tail=np.zeros(m, np.int64),
        num=np.full(m, -1), n_messages=np.ones(m, np.int64), model=np.zeros(m, np.int64), elicit=np.ones(m, bool),
    )  # fmt: skip
    # Pivot: within 24 h of the release, this share of traffic moves to the new model.
    if pb.pivot > 0:
        after = ev.t >= release + rng.random(m) * DAY
        ev.model[after & (rng.random(m) < pb.pivot * 1.2)] = 2
    mix = min(0.95, pb.mix + cfg.benign_mix)
    if mix > 0:
        k = int(round(m * mix / (1 - mix)))
        ev = _concat([ev, benign_sampler(rng, rng.integers(0, n_accounts, k), phase, start)])
    ev.acct = ev.acct + first_acct
    return ev


# ---------------------------------------------------------------------------------------------------------- look-alikes


@dataclass
class Lookalike:
    """A legitimate population whose accounts share templates, cards or timing: coordination without extraction.
    Switched on with `lookalikes`; labelled benign (kind = its name) so `guard score` reports its false-positive rate
    on its own. Sizes at scale 1."""

    groups: int  # organisations (classes, labs, products) at scale 1
    min_groups: int  # floor when scaled down
    size: tuple[int, int]  # accounts per group, drawn from [lo, hi)
    doc: str


LOOKALIKES: dict[str, Lookalike] = {
    "batch_pipeline": Lookalike(400, 10, (5, 21), "one organisation's batch job over several accounts: one task "
                                "wording, high volume, machine-regular, 24/7, single-turn, shared card and office"),
    "eval_harness": Lookalike(160, 6, (4, 13), "one benchmark run through many keys: fixed items in their task "
                              "formats, repeated per run in bursts, temperature 0; some runs use CoT or logprobs"),
    "classroom": Lookalike(400, 8, (15, 41), "one class: many students' accounts pasting one assignment, "
                           "follow-up questions, a burst before the deadline"),
    "agent_framework": Lookalike(200, 6, (4, 13), "one product's agent runs over several accounts: one wrapper "
                                 "prompt, multi-turn episodes feeding tool results back, high volume"),
}  # fmt: skip

BATCH_TASKS = [
    "Classify this support ticket as billing, bug, feature request or other. Reply with the label only. Ticket {n}:",
    "Extract the vendor name, invoice date and total amount as JSON from the following invoice (id {n}):",
    "Translate this product description into German, keeping the brand names. SKU {n}:",
    "Summarise the customer call below in three short bullet points for the CRM. Call {n}:",
    "Rate the sentiment of this app store review from 1 to 5. Review {n}:",
    "Rewrite this job posting in plain, inclusive language. Posting {n}:",
    "Detect whether the message below is spam. Answer yes or no. Message {n}:",
    "Normalise this postal address into street, city, postcode and country fields. Record {n}:",
]
EVAL_FORMATS = {
    "mc": "The following is a multiple choice question about {subj}.\n\n{q}?\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:",
    "math": "Question: {name} has {x} {thing} and gets {y} more each day for {z} days. How many {thing} does "
    "{name} have in the end?\nAnswer:",
    "code": 'Complete the following Python function.\n\ndef {fn}(xs):\n    """Return the {op} of the list xs."""\n',
    "reading": "Passage: {p}\n\nQuestion: what is the passage mainly about? Answer in a few words.",
}
EVAL_SUBJECTS = ["high school biology", "world history", "college physics", "econometrics", "moral disputes",
                 "computer security", "nutrition", "formal logic", "astronomy", "marketing"]  # fmt: skip
NAMES = ["Ana", "Bo", "Chen", "Dara", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun"]
THINGS = ["apples", "stamps", "marbles", "books", "coins", "shells"]
CODE_OPS = ["sum", "maximum", "number of even items", "reversed copy", "sorted copy", "product"]
COURSES = ["Biology 101", "Intro to Economics", "Calculus I", "European History", "Organic Chemistry",
           "Statistics 200", "Data Structures", "Microeconomics"]  # fmt: skip
STUDENT_OPENERS = ["", "", "Help me with this: ", "I don't understand this question: ", "Can you check my answer? ",
                   "hi, ", "For my homework: ", "Pls explain: "]  # fmt: skip
AGENT_WRAPPERS = [
    "You are a helpful assistant with access to tools. Answer the user's request, calling tools when needed. "
    "Think step by step about which tool to use. User request:",
    "Respond with either a tool call or a final answer. Available tools: search, calendar, email, crm_lookup. Request:",
    "You are the ops copilot. Use the tools to complete the ticket, then report back. Ticket:",
]
AGENT_OBSERVATIONS = [
    'Tool result: {"status": "ok", "results": {n}}', 'Tool result: {"events": [], "next_free_slot": "{n}:00"}',
    'Tool result: {"error": "not found", "code": {n}}', "Tool result: email sent (id {n}).",
    'Tool result: {"customer": "N", "open_tickets": {n}, "tier": "gold"}',
]  # fmt: skip


def lookalikes(rng, names: list[str], cfg, pieces: Pieces, first: int) -> tuple[Events | None, list, list[dict]]:
    """Events of the switched-on look-alike populations (accounts numbered from `first`), their kinds (one per
    account) and per-population infrastructure for `_accounts`."""
    parts, kinds, infra = [], [], []
    for name in names:
        la = LOOKALIKES[name]
        n_groups = max(la.min_groups, int(round(la.groups * cfg.scale)))
        size = rng.integers(*la.size, n_groups)
        group = np.repeat(np.arange(n_groups), size)
        ev, extra = LOOKALIKE_EVENTS[name](rng, group, cfg, pieces)
        ev.acct = ev.acct + first
        parts.append(ev)
        kinds += [name] * len(group)
        infra.append({"idx": np.arange(first, first + len(group)), "group": group, **extra})
        first += len(group)
    return (_concat(parts) if parts else None), kinds, infra


def _steady(rng, n_per: np.ndarray, start: np.ndarray, end: float) -> tuple[np.ndarray, np.ndarray]:
    """(account, time) for machine-paced accounts: evenly spaced requests with a little jitter."""
    acct = np.repeat(np.arange(len(n_per)), n_per)
    pos = np.arange(len(acct)) - np.repeat(np.cumsum(n_per) - n_per, n_per)
    span = end - start[acct]
    t = start[acct] + (pos + rng.uniform(0, 0.3, len(acct))) / np.maximum(n_per[acct], 1) * span
    return acct, t


def _batch_events(rng, group, cfg, pieces) -> tuple[Events, dict]:
    k, n_groups = len(group), group.max() + 1
    words = np.array(pieces.vocab)[rng.integers(0, len(pieces.vocab), (n_groups, 2))]
    task_of = rng.integers(0, len(BATCH_TASKS), (n_groups, 2))
    two = rng.random(n_groups) < 0.3  # some jobs run two tasks
    heads = pieces.add(
        [f"[{' '.join(w)}] {BATCH_TASKS[t]} " for w, t in zip(words.tolist(), task_of[:, 0], strict=True)]
        + [f"[{' '.join(w)}] {BATCH_TASKS[t]} " for w, t in zip(words.tolist(), task_of[:, 1], strict=True)]
    )
    rate = np.exp(rng.normal(np.log(150), 0.5, n_groups))[group]  # the job's pace, shared by its accounts
    start = np.where(rng.random(n_groups) < 0.5, 0.0, rng.random(n_groups) * cfg.days * 0.3 * DAY)[group]
    n_per = rng.poisson(rate * (cfg.days * DAY - start) / DAY)
    acct, t = _steady(rng, n_per, start, cfg.days * DAY)
    m = len(acct)
    g = group[acct]
    which = np.where(two[g] & (rng.random(m) < 0.5), n_groups + g, g)
    ev = Events(t=t, acct=acct, head=heads[which], body=pieces.detail_ids[rng.integers(0, len(pieces.detail_ids), m)],
                tail=np.zeros(m, np.int64), num=rng.integers(100000, 999999, m), n_messages=np.ones(m, np.int64),
                model=np.zeros(m, np.int64), elicit=np.zeros(m, bool))  # fmt: skip
    return ev, {"card": True, "office": True, "sysp": True, "ua": "python-requests/2.32.3", "temperature": 0.0,
                "max_tokens": 512, "logprobs": np.zeros(k, bool)}  # fmt: skip


def _eval_items(rng, task: str, n: int, cot: bool, vocab: list[str]) -> list[str]:
    out = []
    for _ in range(n):
        w = rng.choice(vocab, 12).tolist()
        fill = {"subj": rng.choice(EVAL_SUBJECTS), "q": "Which of the following best describes " + " ".join(w[:4]),
                "a": w[4], "b": w[5], "c": w[6], "d": w[7], "name": rng.choice(NAMES), "thing": rng.choice(THINGS),
                "x": rng.integers(2, 90), "y": rng.integers(2, 20), "z": rng.integers(2, 12),
                "fn": "_".join(w[8:10]), "op": rng.choice(CODE_OPS), "p": " ".join(rng.choice(vocab, 40))}  # fmt: skip
        text = EVAL_FORMATS[task].format(**fill)
        out.append(text + (" Let's think step by step." if cot and task == "math" else ""))
    return out


def _eval_events(rng, group, cfg, pieces) -> tuple[Events, dict]:
    n_groups = group.max() + 1
    parts = []
    members = [np.flatnonzero(group == gi) for gi in range(n_groups)]
    cot = rng.random(n_groups) < 0.4  # chain-of-thought evaluation of the math task
    logp = rng.random(n_groups) < 0.3  # multiple-choice scoring from logprobs
    for gi in range(n_groups):
        tasks = rng.choice(list(EVAL_FORMATS), int(rng.integers(2, 5)), replace=False)
        items = np.concatenate([pieces.add(_eval_items(rng, str(tk), int(rng.integers(100, 300)), cot[gi],
                                                       pieces.vocab)) for tk in tasks])  # fmt: skip
        long = np.array([pieces.text[i].endswith("step by step.") for i in items])
        for _ in range(int(rng.integers(2, 7))):  # runs: one per checkpoint or setting, each the whole benchmark
            t0, dur = rng.random() * (cfg.days - 0.3) * DAY, rng.uniform(1, 4) * 3600
            m = len(items)
            parts.append(Events(
                t=t0 + np.sort(rng.random(m)) * dur, acct=members[gi][np.arange(m) % len(members[gi])],
                head=items, body=np.zeros(m, np.int64),
                tail=np.zeros(m, np.int64), num=np.full(m, -1), n_messages=np.ones(m, np.int64),
                model=np.zeros(m, np.int64), elicit=long,
            ))  # fmt: skip
    return _concat(parts), {"card": True, "office": True, "sysp": False, "ua": "lm-eval/0.4.5 openai-python/1.54.3",
                            "temperature": 0.0, "max_tokens": 256, "logprobs": logp[group]}  # fmt: skip


def _classroom_events(rng, group, cfg, pieces) -> tuple[Events, dict]:
    k, n_groups = len(group), group.max() + 1
    questions = [pieces.add([f"{rng.choice(COURSES)}, homework {int(rng.integers(1, 9))}, question {q + 1}: "
                             + " ".join(rng.choice(pieces.vocab, int(rng.integers(10, 25))).tolist()) + "?"
                             for q in range(int(rng.integers(3, 9)))]) for _ in range(n_groups)]  # fmt: skip
    openers = pieces.add(STUDENT_OPENERS)
    deadline = rng.uniform(1.5, cfg.days, n_groups) * DAY
    n_first = rng.poisson(rng.uniform(4, 20, k))
    acct = np.repeat(np.arange(k), n_first)
    m = len(acct)
    g = group[acct]
    # Most of the work in the 36 hours before the deadline, at human hours; the rest over the week before.
    phase = rng.integers(-3, 9, k)[acct]
    burst = rng.random(m) < 0.8
    lo = np.where(burst, deadline[g] - 1.5 * DAY, 0.0).clip(0)
    t = _human_times(rng, m, phase, lo, deadline[g])
    q = np.array([questions[gi][int(rng.integers(0, len(questions[gi])))] for gi in g], np.int64)
    head = openers[rng.integers(0, len(openers), m)]
    cot_tail = pieces.add([" Explain step by step.", " Show the working please.", ""])
    tail = np.where(rng.random(m) < 0.35, cot_tail[rng.integers(0, 2, m)], 0)
    turns = rng.geometric(0.45, m)  # the question, then follow-ups in the same conversation
    sid = np.repeat(np.arange(m), turns)
    pos = np.arange(len(sid)) - np.repeat(np.cumsum(turns) - turns, turns)
    follow = pos > 0
    ts = t[sid] + pos * rng.exponential(150, len(sid))  # follow-ups minutes apart
    fh = pieces.follow_ids[rng.integers(0, len(pieces.follow_ids), len(sid))]
    ev = Events(t=np.minimum(ts, cfg.days * DAY - 1), acct=acct[sid], head=np.where(follow, fh, head[sid]),
                body=np.where(follow, 0, q[sid]), tail=np.where(follow, 0, tail[sid]),
                num=rng.integers(2, 50, len(sid)), n_messages=1 + 2 * pos, model=np.zeros(len(sid), np.int64),
                elicit=~follow & (tail[sid] > 0))  # fmt: skip
    return ev, {"card": False, "office": True, "sysp": False, "ua": None, "temperature": None, "max_tokens": None,
                "logprobs": np.zeros(k, bool)}  # fmt: skip


def _agent_events(rng, group, cfg, pieces) -> tuple[Events, dict]:
    k, n_groups = len(group), group.max() + 1
    wrappers = pieces.add([w + " " for w in AGENT_WRAPPERS])
    wrap = wrappers[rng.integers(0, len(wrappers), n_groups)]
    obs = pieces.add(AGENT_OBSERVATIONS)
    n_ep = rng.poisson(np.exp(rng.normal(np.log(50), 0.5, n_groups))[group] * cfg.days)  # episodes per account
    acct = np.repeat(np.arange(k), n_ep)
    m = len(acct)
    phase = rng.integers(-3, 9, n_groups)[group][acct]
    t = _human_times(rng, m, phase, np.zeros(m), np.full(m, cfg.days * DAY))  # end users drive the episodes
    topic = rng.integers(0, len(pieces.topic_ids), m)
    heads, bodies = pieces.topic_ids[topic, 0], pieces.topic_ids[topic, 1]
    req_head = heads[:, 0] + (rng.random(m) * heads[:, 1]).astype(np.int64)
    req_body = bodies[:, 0] + (rng.random(m) * bodies[:, 1]).astype(np.int64)
    steps = rng.integers(2, 9, m)  # request, then a tool result fed back after each call
    sid = np.repeat(np.arange(m), steps)
    pos = np.arange(len(sid)) - np.repeat(np.cumsum(steps) - steps, steps)
    first_step = pos == 0
    ev = Events(t=np.minimum(t[sid] + pos * rng.uniform(2, 20, len(sid)), cfg.days * DAY - 1), acct=acct[sid],
                head=np.where(first_step, wrap[group[acct[sid]]], obs[rng.integers(0, len(obs), len(sid))]),
                body=np.where(first_step, req_head[sid], 0), tail=np.where(first_step, req_body[sid], 0),
                num=rng.integers(1, 40, len(sid)), n_messages=2 + 2 * pos, model=np.zeros(len(sid), np.int64),
                elicit=np.zeros(len(sid), bool))  # fmt: skip
    return ev, {"card": True, "office": False, "sysp": True, "ua": "langchain/0.3.7", "temperature": 0.2,
                "max_tokens": 1024, "logprobs": np.zeros(k, bool)}  # fmt: skip


LOOKALIKE_EVENTS = {"batch_pipeline": _batch_events, "eval_harness": _eval_events, "classroom": _classroom_events,
                    "agent_framework": _agent_events}  # fmt: skip


def build_pieces(rng, cfg, books: dict[str, Playbook]) -> Pieces:
    """All prompt fragments: benign openers/subjects/tails, pipeline tasks, campaign template paraphrases, payloads."""
    from ..tasks import SKILLS

    p = Pieces()
    topic_ids = []
    for openers, subjects in TOPICS.values():
        o, s = p.add([x + " " for x in openers]), p.add(subjects)
        topic_ids.append([[o[0], len(o)], [s[0], len(s)]])
    p.topic_ids = np.array(topic_ids)  # (topic, opener|subject, start|count)
    p.tail_ids = p.add([t for t in TAILS if "step" not in t and "reasoning" not in t])
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "ber", "dan", "el", "or", "quin", "sa", "tor", "ul"]
    vocab = ["".join(rng.choice(syll, int(rng.integers(2, 4)))) for _ in range(3000)]
    plain_tails = [t for t in TAILS if "step" not in t and "reasoning" not in t]
    cot_tails = [" Explain step by step.", " Show your reasoning.", " Walk me through it step by step."]

    def details(k: int, tails: list[str]) -> list[str]:
        words = np.array(vocab)[rng.integers(0, len(vocab), (k, 6))]
        lens = rng.integers(2, 7, k)
        ends = np.array(tails)[rng.integers(0, len(tails), k)]
        return [" about " + " ".join(w[:n]) + e for w, n, e in zip(words.tolist(), lens, ends, strict=True)]

    p.vocab = vocab
    p.detail_ids = p.add(details(40_000, plain_tails))
    p.cot_detail_ids = p.add(details(5_000, cot_tails))
    p.follow_ids = p.add(FOLLOW_UPS)
    jargon = np.array(vocab)[rng.integers(0, len(vocab), (2000, 8))].tolist()
    p.pipeline_ids = p.add(
        [f"[{' '.join(w)}] " + PIPELINE_TASKS[i % len(PIPELINE_TASKS)] for i, w in enumerate(jargon)]
    )
    # Paraphrase knob: how many distinct wordings each template gets, and how many filler words they carry.
    n_var = 1 + int(round(cfg.paraphrase * 400))
    p.templates = {}
    for name, pb in books.items():
        p.templates[name] = [
            p.add([expand(tpl, rng, int(rng.poisson(cfg.paraphrase * 6))) + " " for _ in range(n_var)])
            for fam in pb.templates
            for tpl in TEMPLATES[fam]
        ]
    # Many payloads per skill: a campaign wants new answers, so at 16M events it must not repeat a few hundred prompts
    # (the detector counts exact repeats as answers not harvested).
    p.payloads = {
        name: p.add([ex.prompt.replace("\n", " ") for ex in skill.generate(PAYLOADS, "train", cfg.seed)])
        for name, skill in SKILLS.items()
    }
    return p


def assemble(ev: Events, pieces: pa.Array, sl: slice) -> pa.Array:
    """Prompt text for events[sl]: head + body + tail, with a {n} slot replaced by the event's number."""
    head, body, tail = (pc.take(pieces, pa.array(getattr(ev, f)[sl])) for f in ("head", "body", "tail"))
    text = pc.binary_join_element_wise(head, body, tail, "")
    nums = pc.cast(pa.array(np.maximum(ev.num[sl], 0)), pa.string())
    has = pc.match_substring(text, "{n}")
    # A sentinel slot makes every row split into exactly two parts, so the join stays vectorised.
    parts = pc.split_pattern(pc.if_else(has, text, pc.binary_join_element_wise(text, "{n}", "")), "{n}", max_splits=1)
    filled = pc.binary_join_element_wise(pc.list_element(parts, 0), nums, pc.list_element(parts, 1), "")
    return pc.if_else(has, filled, text)


def run(cfg: SimulateConfig) -> dict:
    t_start = time.time()
    unknown = [c for c in cfg.campaigns if c not in PLAYBOOKS]
    if unknown:
        raise ValueError(f"unknown campaign playbook(s) {unknown}; known: {', '.join(PLAYBOOKS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    books = playbooks(cfg.campaign)
    pieces = build_pieces(rng, cfg, books)
    n_benign = max(50, int(round(BENIGN_ACCOUNTS * cfg.scale)))
    ev_b, info = benign(rng, n_benign, cfg, pieces, pieces.topic_ids, 0)
    labels = ["benign"] * n_benign
    kinds = [("regular", "pipeline", "company", "family")[k] for k in info["kind"]]
    parts = [ev_b]
    camp_sizes = {}

    def benign_sampler(rng, acct, phase, start):
        """Ordinary-looking single requests for accounts of a campaign (resold traffic / camouflage)."""
        k = len(acct)
        topic = rng.integers(0, len(pieces.topic_ids), k)
        heads, bodies = pieces.topic_ids[topic, 0], pieces.topic_ids[topic, 1]
        return Events(
            t=_human_times(rng, k, phase[acct], start[acct], np.full(k, cfg.days * DAY)), acct=acct,
            head=heads[:, 0] + (rng.random(k) * heads[:, 1]).astype(np.int64),
            body=bodies[:, 0] + (rng.random(k) * bodies[:, 1]).astype(np.int64),
            tail=pieces.detail_ids[rng.integers(0, len(pieces.detail_ids), k)],
            num=np.where(rng.random(k) < 0.3, 40, -1),
            n_messages=1 + 2 * rng.geometric(0.6, k) - 2, model=np.where(rng.random(k) < 0.2, 1, 0),
            elicit=rng.random(k) < 0.05,
        )  # fmt: skip

    first = n_benign
    for name in cfg.campaigns:
        pb = books[name]
        n_acc = max(pb.min_accounts, int(round(pb.accounts * cfg.scale)))
        parts.append(campaign(rng, name, pb, n_acc, cfg, pieces, first, benign_sampler))
        labels += [name] * n_acc
        kinds += [name] * n_acc
        camp_sizes[name] = n_acc
        first += n_acc
    # Look-alikes draw from their own stream, so switching them on leaves the rest of the simulation as it was.
    look_rng = np.random.default_rng(cfg.lookalike_seed if cfg.lookalike_seed is not None else [cfg.seed, 16])
    ev_l, kinds_l, looks = lookalikes(look_rng, cfg.lookalikes, cfg, pieces, first)
    if ev_l is not None:
        parts.append(ev_l)
    labels += ["benign"] * len(kinds_l)
    kinds += kinds_l
    first += len(kinds_l)
    ev = _concat(parts)
    n_acc_total = first
    acct_attr = _accounts(rng, cfg, n_benign, info, labels, books, looks)

    order = np.argsort(ev.t, kind="stable")
    for f in Events.__dataclass_fields__:
        setattr(ev, f, getattr(ev, f)[order])
    n_events = len(ev.t)
    ids = _ids(rng, n_acc_total)
    table_path = out / "access.parquet"
    piece_arr = pa.array(pieces.text, pa.string())
    t0 = np.datetime64(cfg.start.replace("Z", ""), "ms").astype(np.int64)
    writer = None
    chunk = 1_000_000
    for lo in range(0, n_events, chunk):
        sl = slice(lo, min(lo + chunk, n_events))
        tbl = _table(rng, ev, sl, acct_attr, ids, piece_arr, t0, cfg)
        if writer is None:
            writer = pq.ParquetWriter(table_path, tbl.schema, compression="zstd")
        writer.write_table(tbl)
    if writer is not None:
        writer.close()
    files = {}
    if cfg.format in ("jsonl", "both"):
        _to_jsonl(table_path, out / "access.jsonl")
        files["jsonl"] = str(out / "access.jsonl")
    if cfg.format == "jsonl":
        table_path.unlink()
    else:
        files["parquet"] = str(table_path)
    with open(out / "labels.jsonl", "w") as f:
        for i in range(n_acc_total):
            f.write(json.dumps({"account_id": ids["account"][i], "label": labels[i], "kind": kinds[i]}) + "\n")
    cfg.dump(out / "config.json")
    summary = {
        "events": int(n_events),
        "accounts": int(n_acc_total),
        "benign_accounts": int(n_benign),
        "lookalike_accounts": {k: kinds_l.count(k) for k in cfg.lookalikes},
        "campaign_accounts": camp_sizes,
        "campaign_events": {
            name: int(np.isin(ev.acct, [i for i, lab in enumerate(labels) if lab == name]).sum()) for name in camp_sizes
        },
        "files": files,
        "labels": str(out / "labels.jsonl"),
        "seconds": round(time.time() - t_start, 2),
    }
    (out / "manifest.json").write_text(json.dumps({"stage": "guard.simulate", **summary}, indent=2) + "\n")
    return summary


def _ids(rng, n_acc) -> dict[str, list[str]]:
    """Opaque ids, shuffled so nothing about an account's label leaks through its id or its position."""
    acc = rng.choice(16**10, n_acc, replace=False)
    return {"account": [f"acct_{x:010x}" for x in acc]}


def _accounts(rng, cfg, n_benign, info, labels, books: dict[str, Playbook], looks: list[dict] = ()) -> dict:
    """Per-account infrastructure: payment fingerprint, IP prefix pool, user agent, system prompt, keys, params."""
    n = len(labels)
    lab = np.array(labels)
    kind = np.r_[info["kind"], np.full(n - n_benign, -1)]
    pay = np.arange(n)  # default: own card
    ip_prefix = np.zeros(n, np.int64)
    ip_spread = np.ones(n, np.int64)  # how many prefixes an account's requests come from
    n_res = max(100, n_benign // 4)  # residential /24s: a few accounts each
    n_cgnat = max(5, n_benign // 2000)  # carrier-grade NAT /24s: hundreds or thousands of accounts each
    n_office = max(10, n_benign // 60)
    base_res, base_cg, base_off, base_dc = 0, n_res, n_res + n_cgnat, n_res + n_cgnat + n_office
    b = np.arange(n_benign)
    ip_prefix[b] = np.where(rng.random(n_benign) < 0.15, base_cg + rng.integers(0, n_cgnat, n_benign),
                            base_res + rng.integers(0, n_res, n_benign))  # fmt: skip
    ip_spread[b] = rng.integers(1, 3, n_benign)
    # Companies: groups of 3-40 accounts sharing card, office prefix and an internal app's system prompt.
    comp = np.flatnonzero(kind == 2)
    comp_of = np.full(n, -1)
    if len(comp):
        sizes = rng.integers(3, 40, len(comp))
        group = np.repeat(np.arange(len(comp)), sizes)[: len(comp)]
        comp_of[comp] = group
        pay[comp] = n + group
        ip_prefix[comp] = base_off + group % n_office
    # Families: 20% of regular accounts share a card with 1-4 others.
    fam = b[(kind[b] == 0) & (rng.random(n_benign) < 0.2)]
    fam_group = np.repeat(np.arange(len(fam)), rng.integers(2, 6, len(fam)))[: len(fam)]
    pay[fam] = 2 * n + fam_group
    ua_names = [u for u, _ in SDK_UAS]
    ua_p = np.array([w for _, w in SDK_UAS])
    ua = list(np.array(ua_names, dtype=object)[rng.choice(len(ua_names), n, p=ua_p / ua_p.sum())])
    for i in np.flatnonzero(comp_of >= 0):
        ua[i] = f"acme-internal-{comp_of[i]}/1.0"
    sysp = np.where(rng.random(n) < 0.5, -1, np.where(rng.random(n) < 0.6, rng.integers(0, 3, n), 100 + np.arange(n)))
    sysp[comp] = 10_000 + comp_of[comp]
    pipe = np.flatnonzero(kind == 1)
    sysp[pipe] = 20_000 + pipe
    for i in pipe:
        ua[i] = "python-requests/2.32.3"
    max_tok = rng.choice(np.array([-1, 256, 512, 1024, 2048, 4096]), n, p=[0.4, 0.1, 0.15, 0.15, 0.1, 0.1])
    temp = rng.choice(np.array([-1.0, 0.0, 0.2, 0.7, 1.0]), n, p=[0.45, 0.15, 0.1, 0.2, 0.1])
    logp = rng.random(n) < np.where(rng.random(n) < 0.03, 0.8, 0.0)
    # Campaign infrastructure.
    next_dc = base_dc
    for c_no, (name, pb) in enumerate(books.items()):
        idx = np.flatnonzero(lab == name)
        if not len(idx):
            continue
        k = len(idx)
        pay[idx] = 3 * n + c_no * 10**7 + np.arange(k) // pb.accounts_per_card  # each operator's own cards
        path = rng.integers(0, pb.paths, k)
        if pb.ip_pool == "datacenter":
            ip_prefix[idx] = next_dc + path * 4  # requests spread over this block of 4 rented /24s
            ip_spread[idx] = 4
            next_dc += 4 * pb.paths
        elif pb.ip_pool == "proxy":  # proxy exits in residential space, shared with ordinary users
            ip_prefix[idx] = base_res + rng.integers(0, n_res, k)
            ip_spread[idx] = 50
        else:
            ip_prefix[idx] = base_res + rng.integers(0, n_res, k)
        for j, i in enumerate(idx):
            ua[i] = pb.user_agents[(path[j] if pb.paths > 1 else rng.integers(0, len(pb.user_agents)))
                                   % len(pb.user_agents)]  # fmt: skip
        own = 30_000 + 10 * c_no  # each operator's own system prompt(s)
        sysp[idx] = np.where(pb.paths > 1, own + path, np.where(rng.random(k) < 0.5, -1, own))
        max_tok[idx] = pb.max_tokens
        temp[idx] = np.where(rng.random() < 0.5, 0.0, 1.0)
        logp[idx] = rng.random(k) < pb.logprobs
        rot = rng.random(k) < cfg.rotation  # evasion: these accounts get their own card and residential IPs
        pay[idx[rot]] = 4 * n + idx[rot]
        ip_prefix[idx[rot]] = base_res + rng.integers(0, n_res, rot.sum())
        ip_spread[idx[rot]] = 1
    for l_no, la in enumerate(looks):  # each group: its organisation's card, office prefix, system prompt, client
        idx, group = la["idx"], la["group"]
        if la["card"]:
            pay[idx] = 5 * n + l_no * 10**6 + group
        if la["office"]:
            ip_prefix[idx] = next_dc + group
            ip_spread[idx] = 1
            next_dc += int(group.max()) + 1
        sysp[idx] = 40_000 + l_no * 10**4 + group if la["sysp"] else -1
        if la["ua"]:
            for i in idx:
                ua[i] = la["ua"]
        if la["temperature"] is not None:
            temp[idx], max_tok[idx] = la["temperature"], la["max_tokens"]
        logp[idx] = la["logprobs"]
    prefixes = [f"{(10 + i // 65536) % 223 + 1}.{(i // 256) % 256}.{i % 256}" for i in range(next_dc + 10)]
    return {
        "pay": pay, "ip_prefix": ip_prefix, "ip_spread": ip_spread, "prefixes": prefixes, "ua": ua, "sysp": sysp,
        "max_tokens": max_tok, "temperature": temp, "logprobs": logp, "n_keys": rng.integers(1, 4, n), "n_res": n_res,
    }  # fmt: skip


def _table(rng, ev, sl, a, ids, pieces, t0, cfg) -> pa.Table:
    acct = ev.acct[sl]
    m = len(acct)
    ts = pa.array(t0 + (ev.t[sl] * 1000).astype(np.int64), pa.timestamp("ms", tz="UTC"))
    acc_dict = pa.array(ids["account"], pa.string())
    account = pc.take(acc_dict, pa.array(acct))
    key_no = rng.integers(0, a["n_keys"][acct])
    api_key = pc.binary_join_element_wise(
        pc.replace_substring(account, "acct_", "key_"), pc.cast(pa.array(key_no), pa.string()), "_"
    )
    base, spread = a["ip_prefix"][acct], a["ip_spread"][acct]
    # Proxy exits: any residential prefix per request; others: their own prefix or one of a few neighbours.
    prefix_idx = np.where(spread >= 50, rng.integers(0, a["n_res"], m), base + rng.integers(0, spread))
    ip = pc.binary_join_element_wise(
        pc.take(pa.array(a["prefixes"]), pa.array(prefix_idx % len(a["prefixes"]))),
        pc.cast(pa.array(rng.integers(2, 254, m)), pa.string()),
        ".",
    )
    pay = pa.array([f"pm_{x:x}" for x in np.unique(a["pay"])])
    pay_idx = np.searchsorted(np.unique(a["pay"]), a["pay"][acct])
    ua = pa.array(a["ua"], pa.string())
    sysp_val = a["sysp"][acct]
    sysp = pc.if_else(
        pa.array(sysp_val < 0),
        pa.scalar(None, pa.string()),
        pc.cast(pa.array(np.abs(sysp_val * 2654435761 % 2**40)), pa.string()),
    )
    prompt = assemble(ev, pieces, sl)
    n_chars = pc.utf8_length(prompt).to_numpy()
    cols = {
        "ts": ts,
        "request_id": pc.binary_join_element_wise(
            "req_", pc.cast(pa.array(np.arange(sl.start, sl.stop)), pa.string()), ""
        ),
        "account_id": account,
        "api_key_id": api_key,
        "ip": ip,
        "user_agent": pc.take(ua, pa.array(acct)),
        "payment_fp": pc.take(pay, pa.array(pay_idx)),
        "model": pc.take(pa.array(MODELS), pa.array(ev.model[sl])),
    }
    if cfg.prompt_text:
        cols["prompt"] = prompt
    else:
        cols["prompt_hash"] = _hash_strings(prompt)
    mt, tp = a["max_tokens"][acct], a["temperature"][acct]
    cols |= {
        "system_prompt_hash": sysp,
        "n_messages": pa.array(ev.n_messages[sl], pa.int32()),
        "max_tokens": pa.array(np.where(mt < 0, 0, mt), pa.int32(), mask=mt < 0),
        "temperature": pa.array(np.where(tp < 0, 0, tp), pa.float32(), mask=tp < 0),
        "logprobs_requested": pa.array(a["logprobs"][acct]),
        "prompt_tokens": pa.array((n_chars / 4 + 20 * ev.n_messages[sl]).astype(np.int32)),
        "completion_tokens": pa.array(np.exp(rng.normal(np.where(ev.elicit[sl], 6.5, 5.2), 0.6)).astype(np.int32)),
        "status": pa.array(np.where(rng.random(m) < 0.01, 429, 200).astype(np.int16)),
    }
    return pa.table(cols)


def _hash_strings(arr: pa.Array) -> pa.Array:
    """A stable hash of each prompt, for logs that withhold the text."""
    import duckdb

    prompts = pa.table({"p": arr})  # noqa: F841 (read by DuckDB's replacement scan)
    con = duckdb.connect()
    con.register("prompts", prompts)
    return con.execute("SELECT hash(p)::VARCHAR AS h FROM prompts").to_arrow_table()["h"]


def _to_jsonl(parquet: Path, jsonl: Path) -> None:
    """Stream the Parquet log into JSONL with ISO-8601 'Z' timestamps (absent values are written as null)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    con.execute(
        f"COPY (SELECT strftime(ts AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ') AS ts, * EXCLUDE (ts) "
        f"FROM read_parquet('{parquet}')) TO '{jsonl}' (FORMAT JSON)"
    )
