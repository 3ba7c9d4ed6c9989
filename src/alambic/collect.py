"""`alambic collect`: ask a teacher many prompts, concurrently, within rate limits and budget, never paying twice.

Reads: prompt files (JSONL / CSV / Parquet with a `prompt` or `messages` column) or built-in skills.
Writes: interactions (JSONL or Parquet, the record of DESIGN.md), errors.jsonl, config.json and a manifest
(the data-provenance card: teacher identity without secrets, prompt source hashes, counts, tokens, spend).

The engine: one asyncio task per in-flight request (bounded by `concurrency`), a pool of API keys each with
its own requests/min and tokens/min buckets, retries with jittered exponential backoff that honour
`Retry-After`, keys retired on 401/403, and the budget checked *before* each request is sent. Replies are
committed to the store every `COMMIT_EVERY_S` and a prompt counts as done only once committed, so a crash or
Ctrl-C resumes where it stopped. A re-run served from the store streams its records straight to the output.
"""

from __future__ import annotations

import asyncio
import csv
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from pydantic import Field, field_validator

from . import __version__, tasks
from .config import Config
from .records import utc_now
from .store import Store, canonical_messages, request_keys
from .teachers import ChatRequest, TeacherError, TeacherSpec, make_teacher

log = logging.getLogger(__name__)


class CollectConfig(Config):
    """Settings of a collection run."""

    # the teacher
    backend: str = Field("openai", description="teacher backend: openai, anthropic or hf")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="teacher API base URL")
    model: str = Field("", description="teacher model name (or directory for hf); '' = the first one listed")
    api_key_env: str = Field("", description="env var with comma-separated API keys (default by backend)")
    api_keys_file: str | None = Field(None, description="file with one API key per line")
    teacher_id: str | None = Field(
        None, description="stable teacher name for the cache, instead of its URL (a local server on a changing port)"
    )
    # the prompts
    prompts: str | None = Field(None, description="prompt file: .jsonl, .csv or .parquet with `prompt` or `messages`")
    task: list[str] = Field(default_factory=list, description="built-in skill(s) to draw prompts from")
    n: int = Field(100, gt=0, description="prompts per built-in skill")
    split: str = Field("train", description="skill split to draw from: train or test")
    prompt_seed: int = Field(0, description="seed of the built-in prompts")
    skip_bad: bool = Field(False, description="skip malformed prompt lines (reported) instead of failing")
    shard: str = Field("0/1", description="i/n: keep only shard i of n (deterministic by prompt content)")
    # sampling
    samples: int = Field(1, gt=0, description="samples per prompt (the API's `n`)")
    temperature: float = Field(0.0, ge=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(256, gt=0, description="max completion tokens per sample")
    top_logprobs: int = Field(0, ge=0, le=20, description="top-k logprobs per token to request (0: none)")
    seed: int | None = Field(None, description="sampling seed sent with every request")
    # the engine
    concurrency: int = Field(32, gt=0, description="requests in flight at once")
    rpm: float = Field(0, ge=0, description="requests per minute per key (0: unlimited)")
    tpm: float = Field(0, ge=0, description="tokens per minute per key (0: unlimited)")
    max_retries: int = Field(6, ge=0, description="retries per request on 429/5xx/timeouts/connection errors")
    backoff_s: float = Field(0.5, gt=0, description="base of the exponential backoff, seconds")
    backoff_max_s: float = Field(30.0, gt=0, description="cap of one backoff wait, seconds")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout, seconds")
    # budget
    max_usd: float | None = Field(None, gt=0, description="stop before spending more than this (needs prices)")
    max_total_tokens: int | None = Field(None, gt=0, description="stop before using more tokens than this")
    price_in: float = Field(0.0, ge=0, description="USD per 1M prompt tokens")
    price_out: float = Field(0.0, ge=0, description="USD per 1M completion tokens")
    # outputs
    store: str = Field("runs/cache.sqlite", description="response cache shared across runs (SQLite)")
    out: str = Field("runs/collect/interactions.jsonl", description="output file: .jsonl or .parquet")

    @field_validator("shard")
    @classmethod
    def _check_shard(cls, v: str) -> str:
        parse_shard(v)
        return v

    @field_validator("split")
    @classmethod
    def _check_split(cls, v: str) -> str:
        if v not in tasks.base.SPLITS:
            raise ValueError(f"split must be one of {tasks.base.SPLITS}")
        return v

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec(
            backend=self.backend,
            base_url=self.base_url,
            model=self.model,
            api_key_env=self.api_key_env,
            api_keys_file=self.api_keys_file,
            timeout_s=self.timeout_s,
            teacher_id=self.teacher_id,
        )


# --- prompts -----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prompt:
    messages: list[dict[str, Any]]
    meta: dict[str, Any]


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n, e.g. 0/4 (got {spec!r})") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {spec!r}: need 0 <= i < n")
    return i, n


def shard_of(messages: list[dict], n: int) -> int:
    """The shard a prompt belongs to: a hash of its content, so every machine agrees without coordination."""
    blob = json.dumps(messages, sort_keys=True, separators=(",", ":")).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") % n


def _row_to_prompt(row: Any, file_meta: dict[str, Any]) -> Prompt:
    """One prompt from a file's row (its other fields and `file_meta`, {"source": file}, become the meta); a
    ValueError says what is wrong with the row, the caller says where."""
    if type(row) is not dict:
        raise row if isinstance(row, ValueError) else ValueError("expected a JSON object")
    prompt = row.get("prompt")
    if len(row) == 1 and type(prompt) is str and prompt.strip():
        # The common row, {"prompt": "..."}, first: files of millions of prompts are read on every re-run. Its
        # meta is the file's, one dict shared by all such rows (metas are only read).
        return Prompt([{"role": "user", "content": prompt}], file_meta)
    if "messages" in row and row["messages"] is not None:
        msgs = row["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise ValueError(f"`messages` is not valid JSON ({e.msg})") from None
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
        ):
            raise ValueError("`messages` must be a non-empty list of {role, content} strings")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    elif isinstance(prompt, str) and prompt.strip():
        msgs = [{"role": "user", "content": prompt}]
    else:
        raise ValueError("needs a non-empty `prompt` string or a `messages` list")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "messages") and v is not None}
    meta.setdefault("source", file_meta["source"])
    return Prompt(msgs, meta)


def loads(text: str | bytes) -> Any:
    """`json.loads`, through orjson (5x faster on the small documents a re-run decodes by the million); what
    orjson refuses but json reads (NaN and Infinity, integers past 64 bits) goes to json."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _jsonl_rows(f: Iterable[str]):
    """(line number, object or the ValueError saying why the line is not JSON) of each non-blank line."""
    for lineno, line in enumerate(f, 1):
        try:
            yield lineno, loads(line)
        except json.JSONDecodeError as e:
            if line.strip():
                yield lineno, ValueError(f"not valid JSON ({e.msg})")


def read_prompt_file(path: str | Path, skip_bad: bool = False, bad: list[str] | None = None) -> list[Prompt]:
    """Prompts from a .jsonl/.csv/.parquet file. Bad rows fail with their line number, or are skipped and listed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} not found")
    bad = bad if bad is not None else []
    suffix = path.suffix.lower()
    where = f"{path}:"  # a bad row is named by this and its place
    if suffix in (".jsonl", ".json"):
        with open(path) as f:
            rows = list(_jsonl_rows(f))
    elif suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(enumerate(csv.DictReader(f), 2))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        where = f"{path}: row "
        rows = list(enumerate(pq.read_table(path).to_pylist()))
    else:
        raise ValueError(f"prompt file {str(path)!r}: unknown format {suffix!r}; use .jsonl, .csv or .parquet")
    out = []
    file_meta = {"source": str(path)}
    for place, row in rows:
        try:
            out.append(_row_to_prompt(row, file_meta))
        except ValueError as e:
            problem = f"{where}{place}: {e}"
            if not skip_bad:
                raise ValueError(f"{problem}; fix the line or pass --skip-bad") from None
            bad.append(problem)
    return out


def load_prompts(cfg: CollectConfig, bad: list[str]) -> tuple[list[Prompt], list[dict]]:
    """All prompts of the run (before sharding) and a description of each source, with its content hash."""
    prompts: list[Prompt] = []
    sources: list[dict] = []
    if cfg.prompts:
        items = read_prompt_file(cfg.prompts, cfg.skip_bad, bad)
        digest = hashlib.sha256(Path(cfg.prompts).read_bytes()).hexdigest()
        sources.append({"file": cfg.prompts, "sha256": digest, "prompts": len(items)})
        prompts += items
    for name in cfg.task:
        exs = tasks.get(name).generate(cfg.n, cfg.split, seed=cfg.prompt_seed)
        prompts += [
            Prompt(
                ex.messages,
                {"skill": ex.skill, "reference": ex.reference, "split": cfg.split, "source": f"skill:{ex.skill}"},
            )
            for ex in exs
        ]
        sources.append({"skill": name, "split": cfg.split, "seed": cfg.prompt_seed, "prompts": len(exs)})
    if not prompts:
        raise ValueError("no prompts: give --prompts FILE or --task SKILL (built-in: " + ", ".join(tasks.SKILLS) + ")")
    return prompts, sources


# --- rate limits and keys ------------------------------------------------------------------------------------------


class Bucket:
    """Token bucket refilled continuously at `per_minute / 60` per second; capacity one minute's worth."""

    def __init__(self, per_minute: float):
        self.rate = per_minute / 60.0
        self.capacity = per_minute
        self.level = per_minute
        self.t = time.monotonic()

    def wait_for(self, cost: float) -> float:
        """Seconds until `cost` is available (0 if now); does not take it."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now
        cost = min(cost, self.capacity)
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate

    def take(self, cost: float) -> None:
        if self.rate > 0:
            self.level -= min(cost, self.capacity)


@dataclass
class Key:
    value: str | None
    id: str
    requests: Bucket
    tokens: Bucket
    cooldown_until: float = 0.0
    retired: bool = False


class KeyPool:
    """API keys with per-key limits; picks the key that can send soonest, retires rejected keys.

    No lock: `acquire` never awaits between reading the buckets and taking from them, so on one event loop a
    choice and its taking are atomic.
    """

    def __init__(self, keys: list[str | None], rpm: float, tpm: float):
        self.keys = [
            Key(
                k,
                "key_" + hashlib.sha256((k or "").encode()).hexdigest()[:12] if k else "none",
                Bucket(rpm),
                Bucket(tpm),
            )
            for k in keys
        ]
        self.turn = 0

    def live(self) -> list[Key]:
        return [k for k in self.keys if not k.retired]

    async def acquire(self, tokens: float) -> Key:
        while True:
            live = self.live()
            if not live:
                raise RuntimeError("every API key was rejected (401/403); check the keys and re-run to resume")
            now = time.monotonic()
            # Round-robin among the keys that can send now (ties broken from a rotating start), so load and
            # rate-limit headroom are spread over the whole pool.
            self.turn = (self.turn + 1) % len(live)
            waits = [
                (
                    max(k.cooldown_until - now, k.requests.wait_for(1), k.tokens.wait_for(tokens)),
                    (i - self.turn) % len(live),
                    k,
                )
                for i, k in enumerate(live)
            ]
            wait, _, key = min(waits, key=lambda w: (w[0], w[1]))
            if wait <= 0:
                key.requests.take(1)
                key.tokens.take(tokens)
                return key
            await asyncio.sleep(min(wait, 1.0))


# --- the run -------------------------------------------------------------------------------------------------------


@dataclass
class Stats:
    total: int = 0
    done: int = 0
    cached: int = 0
    sent: int = 0  # HTTP requests made, retries included
    errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    spent_usd: float = 0.0
    skipped_budget: int = 0
    retired_keys: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        el = max(1e-9, time.time() - self.started)
        fresh = self.done - self.cached
        rate = fresh / el
        left = self.total - self.done - self.skipped_budget
        return {
            **{k: v for k, v in self.__dict__.items() if k != "started"},
            "elapsed_s": el,
            "requests_per_s": self.sent / el,
            "tokens_per_s": (self.prompt_tokens + self.completion_tokens) / el,
            "eta_s": left / rate if rate > 0 else None,
        }


class BudgetExceeded(Exception):
    pass


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small acyclic objects are built (prompts, keys,
    rows, lines): its passes over the growing heap cost more than the building itself (5x on reading a 200k-line
    prompt file); reference counting still frees everything. What was built is then frozen (left out of later
    passes, e.g. during the network phase, which runs with the collector on) until `run` ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was:
            gc.enable()


# Replies are committed to the store in one transaction per this many seconds (not one per reply, which costs
# more than the HTTP request it records); a prompt counts as done only once its reply is committed, so a SIGKILL
# loses at most this long's replies, and a re-run asks for those again.
COMMIT_EVERY_S = 0.05


@dataclass(repr=False)  # CPython 3.11's asyncio.run can repr its result on exit: seconds for millions of rows
class Outcome:
    identity: dict
    capability: str  # what the backend can return; the output refines it from what the replies hold
    sampling: dict
    keys: list[str]  # the cache key of each prompt
    prompt_json: list[str]  # each prompt's messages in the canonical JSON its key hashes
    found: dict[str, tuple[str, str, float, float | None]]  # key -> (key, reply JSON, created_at, latency_s)
    errors: list[dict]
    budget_hit: bool


def cost_usd(cfg: CollectConfig, prompt_tokens: float, completion_tokens: float) -> float:
    return (prompt_tokens * cfg.price_in + completion_tokens * cfg.price_out) / 1e6


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_string = encode_basestring  # what `_JSON` does with a str, without its method call around it


def interaction_lines(
    cfg: CollectConfig, prompts: list[Prompt], res: Outcome, seen: dict[str, Any], span: range | None = None
):
    """The Interaction records (DESIGN.md) of every stored reply (of the prompts in `span`; default all), one per
    sample, as JSON lines in prompt order.

    A re-run of millions of cached prompts spends most of its time here, so each line is assembled from JSON
    fragments: what many records share (teacher, prompt, meta, timestamp, token counts) is encoded once, each
    reply is decoded once (orjson) and its text encoded by json's C encoder. `seen` gets the number of records
    and whether any carried (top-k) logprobs.
    """
    teacher_json: dict[str | None, str] = {}  # the `teacher` field by served model
    last_created, created_json = None, ""  # replies committed together share their timestamp
    last_meta, meta_json = None, ""
    records, logprobs, top = 0, False, False
    usage_json: dict[tuple[int, int], str] = {}  # token counts repeat: price each pair once
    finish_json: dict[str | None, str] = {}
    found, keys, prompt_json = res.found, res.keys, res.prompt_json
    for j in span or range(len(keys)):
        key = keys[j]
        row = found.get(key)
        if row is None:
            continue
        _, text, created, latency = row
        reply = loads(text)
        choices = reply["choices"]
        served = reply.get("model")
        teacher = teacher_json.get(served)
        if teacher is None:
            teacher = teacher_json[served] = _JSON({**res.identity, "served_model": served, **res.sampling})
        if created != last_created:
            last_created = created
            created_json = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(created))}.{int(created % 1 * 1000):03d}Z"
        head = (
            f'"prompt":{prompt_json[j]},"teacher":{teacher},"created_at":"{created_json}",'
            f'"latency_s":{"null" if latency is None else repr(latency)}'
        )  # float repr is json's
        meta = prompts[j].meta
        grader = tasks.SKILLS.get(meta.get("skill")) if "reference" in meta else None
        if grader is None and meta is not last_meta and meta != last_meta:  # a file's prompts often share it
            last_meta, meta_json = meta, _JSON(meta)
        n = len(choices)
        c_tok = reply.get("completion_tokens", 0) // max(1, n)
        for i, c in enumerate(choices):
            p_tok = reply.get("prompt_tokens", 0) if i == 0 else 0
            if grader is not None:
                last_meta = None
                meta_json = _JSON({**meta, "correct": grader.grade(c["text"], str(meta["reference"]))})
            finish = c.get("finish_reason")
            fin = finish_json.get(finish)
            if fin is None:
                fin = finish_json[finish] = _JSON(finish)
            lp = c.get("logprobs")
            if lp is not None:
                logprobs = True
                top = top or any(t.get("top") for t in lp)
            usage = usage_json.get((p_tok, c_tok))
            if usage is None:
                cost = repr(round(cost_usd(cfg, p_tok, c_tok), 8))
                usage = usage_json[p_tok, c_tok] = (
                    f'{{"prompt_tokens":{p_tok},"completion_tokens":{c_tok},"cost_usd":{cost}}}'
                )
            yield (
                f'{{"id":"{key if n == 1 else f"{key}:{i}"}",{head},"completion":{_string(c["text"])},'
                f'"usage":{usage},"meta":{meta_json},"finish_reason":{fin}'
                + ("}\n" if lp is None else f',"logprobs":{_JSON(lp)}}}\n')
            )
        records += n
    seen.update(records=records, logprobs=logprobs, top=top)


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file + rename: a crash never leaves a half-written output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def _write_chunks(f: BinaryIO, lines: Iterable[str]) -> None:
    """Lines to a binary file, a few thousand joined and encoded at once: half the cost of one write a line."""
    it = iter(lines)
    while chunk := "".join(islice(it, 4096)):
        f.write(chunk.encode())


def write_lines(path: Path, lines: Iterable[str]) -> None:
    """JSON lines (each ending in a newline) to `path`, atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            _write_chunks(f, lines)

    _write_atomic(path, write)


# A re-run with this many stored replies or more builds its JSONL records in two processes: building them is
# pure Python, most of a cached re-run's time, and one process uses one core.
SPLIT_AT = 50_000


def write_records(out: Path, cfg: CollectConfig, prompts: list[Prompt], res: Outcome, seen: dict[str, Any]) -> None:
    """The records of every stored reply to `out` (JSONL or Parquet, by suffix), atomically; `seen` as in
    `interaction_lines`."""
    if out.suffix == ".parquet":
        write_interactions(out, (json.loads(line) for line in interaction_lines(cfg, prompts, res, seen)))
    elif len(res.found) < SPLIT_AT or sys.platform != "linux" or (os.cpu_count() or 1) < 2:
        write_lines(out, interaction_lines(cfg, prompts, res, seen))
    else:
        _write_atomic(out, lambda tmp: _write_lines_forked(tmp, cfg, prompts, res, seen))


def _write_lines_forked(path: Path, cfg: CollectConfig, prompts: list[Prompt], res: Outcome, seen: dict) -> None:
    """`interaction_lines` to `path` in two processes: a forked child (it shares every prompt and reply, copied on
    write) writes the second half of the prompts' records to a part file while this process writes the first
    half, then the part is appended. Should the child fail in any way, this process writes that half itself, and
    so raises whatever made it fail, with its traceback. Forking, not spawning: a new interpreter would need the
    prompts and replies sent over, which costs more than building the records."""
    n = len(res.keys)
    part = path.with_name(path.name + ".part")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its half, its `seen` through the pipe, and out without running the parent's exits
        code = 1
        try:
            os.close(r)
            theirs: dict[str, Any] = {}
            with open(part, "wb") as f:
                _write_chunks(f, interaction_lines(cfg, prompts, res, theirs, range(n // 2, n)))
            os.write(w, json.dumps(theirs).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with open(path, "wb") as f:
            _write_chunks(f, interaction_lines(cfg, prompts, res, seen, range(n // 2)))
            with os.fdopen(r, "rb") as pipe:
                r = -1
                said = pipe.read()  # until the child exits
            _, status = os.waitpid(pid, 0)
            pid = 0
            if os.waitstatus_to_exitcode(status) == 0:
                theirs = json.loads(said)
                with open(part, "rb") as p:
                    shutil.copyfileobj(p, f, 1 << 20)
            else:
                log.warning("the process writing the second half of the records failed; writing it here")
                theirs = {}
                _write_chunks(f, interaction_lines(cfg, prompts, res, theirs, range(n // 2, n)))
    finally:
        if r >= 0:
            os.close(r)
        if pid:  # this process failed first (e.g. Ctrl-C): its output is void, the child's too
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        if part.is_file():  # not whatever else a user may have there
            part.unlink()
    seen.update(
        records=seen["records"] + theirs["records"],
        logprobs=seen["logprobs"] or theirs["logprobs"],
        top=seen["top"] or theirs["top"],
    )


def write_interactions(path: Path, records: Iterable[dict]) -> None:
    """Records as JSONL or Parquet (by suffix), atomically."""
    if path.suffix != ".parquet":
        write_lines(path, (_JSON(r) + "\n" for r in records))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Nested fields as JSON strings keep one flat, stable schema across teachers.
    flat = [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in records]
    _write_atomic(path, lambda tmp: pq.write_table(pa.Table.from_pylist(flat), tmp))


async def _collect(
    cfg: CollectConfig, prompts: list[Prompt], store: Store, stats: Stats, progress: Callable[[dict], None] | None
) -> Outcome:
    spec = cfg.teacher_spec()
    teacher = make_teacher(spec)
    keys = spec.keys()
    if cfg.backend == "anthropic" and not keys:
        raise ValueError("no API key: set ANTHROPIC_API_KEY (or --api-key-env NAME / --api-keys-file FILE)")
    await teacher.start(keys or [None])
    identity = teacher.spec.identity()
    errors: list[dict] = []
    # Requests as plain dicts (the fields of ChatRequest, in its order), built only for the prompts to send:
    # millions of pydantic objects would make a fully cached re-run slower than the records it writes.
    params = ChatRequest(
        messages=[],
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        n=cfg.samples,
        top_logprobs=cfg.top_logprobs,
        seed=cfg.seed,
    ).model_dump()
    sampling = {k: v for k, v in params.items() if k != "messages"}
    with gc_paused():
        prompt_json = [canonical_messages(p.messages) for p in prompts]  # hashed into keys, written into records
        keys_of = request_keys(identity, sampling, prompt_json)
        found = store.get_many(keys_of)
        todo = asyncio.Queue()
        for i, k in enumerate(keys_of):
            if k not in found:
                todo.put_nowait(i)
    stats.total = len(prompts)
    stats.cached = stats.done = len(prompts) - todo.qsize()
    pool = KeyPool(keys or [None], cfg.rpm, cfg.tpm)
    reserved = {"usd": 0.0, "tokens": 0.0}
    stop = {"budget": False}
    last_progress = [0.0]
    teacher_json = json.dumps(identity)
    pending: list[tuple[str, str, str, float]] = []  # replies received, not yet committed: key, request, reply, latency

    def report(force: bool = False):
        if progress and (force or time.monotonic() - last_progress[0] > 0.2):
            last_progress[0] = time.monotonic()
            progress(stats.view())

    def commit() -> None:
        """Store the replies received since the last commit, then (never before) count them as done."""
        if pending:
            now = time.time()
            store.put_rows([(k, teacher_json, q, r, now, lat) for k, q, r, lat in pending])
            found.update((k, (k, r, now, lat)) for k, _, r, lat in pending)
            stats.done += len(pending)
            pending.clear()

    def estimate(i: int) -> tuple[float, float]:
        # Worst case, so the cap holds whatever the tokenizer: a token covers at least one byte (true of byte-level
        # BPE, SentencePiece and character vocabularies), plus a few template tokens per message.
        p_tok = sum(len(str(m.get("content", "")).encode()) + 8 for m in prompts[i].messages) + 8
        c_tok = cfg.max_tokens * cfg.samples
        return p_tok, c_tok

    async def one(i: int) -> None:
        p_tok, c_tok = estimate(i)
        usd, toks = cost_usd(cfg, p_tok, c_tok), p_tok + c_tok
        if (cfg.max_usd is not None and stats.spent_usd + reserved["usd"] + usd > cfg.max_usd) or (
            cfg.max_total_tokens is not None
            and stats.prompt_tokens + stats.completion_tokens + reserved["tokens"] + toks > cfg.max_total_tokens
        ):
            stop["budget"] = True
            raise BudgetExceeded
        reserved["usd"] += usd
        reserved["tokens"] += toks
        # Validated already: the sampling fields by ChatRequest above, the messages when the prompts were read.
        request = ChatRequest.model_construct(**sampling, messages=prompts[i].messages)
        try:
            attempt = 0
            while True:
                key = await pool.acquire(toks)
                t0 = time.monotonic()
                stats.sent += 1
                try:
                    reply = await teacher.complete(request, key.value)
                except TeacherError as e:
                    if e.auth:
                        if key.value is None:
                            env = cfg.api_key_env or "OPENAI_API_KEY"
                            raise RuntimeError(
                                f"the teacher wants an API key ({e}); set one in the environment "
                                f"variable {env} or give --api-keys-file"
                            ) from e
                        if not key.retired:
                            key.retired = True
                            stats.retired_keys.append(key.id)
                            log.warning("key %s rejected (%s); retired, %d left", key.id, e, len(pool.live()))
                        continue  # another key takes the request; acquire() fails once none is left
                    if e.retryable and attempt < cfg.max_retries:
                        attempt += 1
                        stats.retries += 1
                        delay = (
                            e.retry_after
                            if e.retry_after is not None
                            else random.uniform(0, min(cfg.backoff_max_s, cfg.backoff_s * 2**attempt))
                        )
                        if e.status == 429:
                            key.cooldown_until = time.monotonic() + delay
                        log.info("retrying prompt %d in %.2fs after %s", i, delay, e)
                        await asyncio.sleep(delay)
                        continue
                    stats.errors += 1
                    errors.append(
                        {
                            "index": i,
                            "prompt": prompts[i].messages,
                            "status": e.status,
                            "error": str(e),
                            "attempts": attempt + 1,
                            "ts": utc_now(),
                        }
                    )
                    return
                latency = time.monotonic() - t0
                pending.append(
                    (
                        keys_of[i],
                        json.dumps({**params, "messages": prompts[i].messages}),
                        reply.model_dump_json(),
                        latency,
                    )
                )
                # Paid for once the reply is here, stored or not: the budget counts it now.
                stats.prompt_tokens += reply.prompt_tokens
                stats.completion_tokens += reply.completion_tokens
                stats.spent_usd += cost_usd(cfg, reply.prompt_tokens, reply.completion_tokens)
                return
        finally:
            reserved["usd"] -= usd
            reserved["tokens"] -= toks

    async def committer() -> None:
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            commit()
            report()

    committing = asyncio.ensure_future(committer())

    async def worker():
        while not todo.empty() and not stop["budget"] and not committing.done():
            i = todo.get_nowait()
            try:
                await one(i)
            except BudgetExceeded:
                stats.skipped_budget = todo.qsize() + 1
                return

    report(force=True)
    try:
        results = await asyncio.gather(
            *(worker() for _ in range(min(cfg.concurrency, max(1, todo.qsize())))), return_exceptions=True
        )
        if committing.done():  # it ends by itself only when a commit failed: raise that
            committing.result()
        for r in results:
            if isinstance(r, BaseException):
                raise r
    finally:
        committing.cancel()
        commit()  # whatever arrived is kept, even when the run fails or is interrupted
        await teacher.close()
    if stop["budget"]:
        stats.skipped_budget = stats.total - stats.done - stats.errors
    report(force=True)
    return Outcome(identity, teacher.capability, sampling, keys_of, prompt_json, found, errors, stop["budget"])


def run(cfg: CollectConfig, progress: Callable[[dict], None] | None = None) -> dict:
    """Collect, write interactions + manifest, and return the manifest."""
    try:
        return _run(cfg, progress)
    finally:
        gc.unfreeze()  # what `gc_paused` froze is freed or long-lived again: the collector may walk it


def _run(cfg: CollectConfig, progress: Callable[[dict], None] | None) -> dict:
    started = utc_now()
    bad: list[str] = []
    with gc_paused():
        prompts, sources = load_prompts(cfg, bad)
        shard_i, shard_n = parse_shard(cfg.shard)
        if shard_n > 1:
            prompts = [p for p in prompts if shard_of(p.messages, shard_n) == shard_i]
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg.dump(out.parent / "config.json")
    store = Store(cfg.store)
    stats = Stats()
    try:
        res = asyncio.run(_collect(cfg, prompts, store, stats, progress))
    finally:
        store.close()
    seen: dict[str, Any] = {}
    with gc_paused():
        write_records(out, cfg, prompts, res, seen)
    capability = res.capability
    if cfg.backend != "hf":  # an API's capability is what its replies held
        capability = "top_k_logprobs" if seen["top"] else "token_logprobs" if seen["logprobs"] else "text"
    errors = res.errors
    if errors or bad:
        with open(out.parent / "errors.jsonl", "w") as f:
            for e in errors:
                f.write(json.dumps(e) + "\n")
            for b in bad:
                f.write(json.dumps({"bad_input": b}) + "\n")
    view = stats.view()
    manifest = {
        "kind": "alambic.collect",
        "alambic_version": __version__,
        "teacher": res.identity,
        "capability": capability,
        "sampling": {
            "samples": cfg.samples,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_tokens": cfg.max_tokens,
            "top_logprobs": cfg.top_logprobs,
            "seed": cfg.seed,
        },
        "sources": sources,
        "shard": cfg.shard,
        "prompts": len(prompts),
        "records": seen["records"],
        "from_cache": stats.cached,
        "requests_sent": stats.sent,
        "retries": stats.retries,
        "errors": len(errors),
        "bad_input_skipped": len(bad),
        "retired_keys": stats.retired_keys,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "spent_usd": round(stats.spent_usd, 6),
        "budget_stop": res.budget_hit,
        "not_collected_budget": stats.skipped_budget if res.budget_hit else 0,
        "started_at": started,
        "ended_at": utc_now(),
        "elapsed_s": round(view["elapsed_s"], 2),
        "output": str(out),
        "store": str(cfg.store),
    }
    (out.parent / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
