"""`alambic serve`: an OpenAI- and Anthropic-compatible HTTP server for any HF causal LM, with continuous batching.

Read top to bottom:
- `ServeConfig`;
- API keys, per-key rate limits and the access log (the file `guard` reads; keys never enter it);
- request schemas (pydantic) for /v1/chat/completions, /v1/completions and /v1/messages;
- the engine: one worker thread owns the model and batches every concurrent request into shared forward passes;
- the FastAPI app, which translates between the wire formats and engine jobs;
- `run(cfg)` (blocking, for the CLI) and `serve_in_thread(cfg)` (for tests and other stages).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import queue
import re
import secrets
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.cache_utils import DynamicLayer

from .config import Config
from .modeling import load, model_name
from .records import AccessEvent, utc_now

log = logging.getLogger(__name__)

KEYS_ENV = "ALAMBIC_API_KEYS"
MAX_TOP_LOGPROBS = 20  # OpenAI's limit; clients written for it never ask for more


class ServeConfig(Config):
    """How `alambic serve` serves a model."""

    model: str = Field(
        ..., description="HF model directory or .gguf file to serve", json_schema_extra={"positional": True}
    )
    served_name: str | None = Field(None, description="model id clients must send (default: the model's folder name)")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: pick a free one)")
    api_keys_file: str | None = Field(
        None,
        # No square brackets here: the CLI's help renderer (rich) would read them as markup.
        description="file of accepted API keys: lines 'KEY account_id payment_fp' (the last two optional) or a JSON "
        f"list of {{key, account_id, payment_fp, rpm}}; also read from ${KEYS_ENV} (comma-separated). No keys: no auth",
    )
    rate_limit_rpm: int = Field(
        0, ge=0, description="requests per minute per key, or per client IP when auth is off (0: unlimited)"
    )
    access_log: str | None = Field(None, description="append one JSON line per request to this file (default: off)")
    max_batch: int = Field(32, ge=1, description="most sequences decoded together in one forward pass")
    batch_wait_ms: float = Field(5.0, ge=0, description="when idle, wait this long after a request for others to batch")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body accepted (HTTP 413 above)")
    max_new_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    fixed_response: str | None = Field(
        None, description="benchmark mode: answer every chat request with this text without running the model"
    )
    threads: int = Field(
        0, ge=0, description="torch CPU threads, process-wide (0: half the CPU cores, at most 8; the rest serve HTTP)"
    )
    watermark_key_file: str | None = Field(
        None, description="watermark every completion with this key file (`alambic guard watermark keygen`); "
        "default: off"
    )


# --- API keys, rate limits, access log ------------------------------------------------------------------------------


def key_id(key: str) -> str:
    """A stable, non-reversible name for an API key: what logs and records carry instead of the key."""
    return "key_" + hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    account_id: str | None = None
    payment_fp: str | None = None
    rpm: int | None = None  # overrides ServeConfig.rate_limit_rpm for this key


def load_api_keys(file: str | Path | None = None, env: str | None = None) -> dict[str, ApiKey]:
    """Accepted keys, indexed by sha256(key) so the keys themselves are not kept around.

    `file` holds either a JSON list of {key, account_id, payment_fp, rpm} or lines `KEY [account_id] [payment_fp]`
    (# starts a comment); `env` is a comma-separated list of bare keys.
    """
    entries: list[dict[str, Any]] = []
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"API keys file {str(path)!r} not found")
        text = path.read_text()
        if text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"API keys file {str(path)!r} is not valid JSON: {e}") from None
            for i, item in enumerate(data):
                if not isinstance(item, dict) or not isinstance(item.get("key"), str) or not item["key"]:
                    raise ValueError(f"API keys file {str(path)!r}: entry {i} needs a non-empty string 'key'")
                entries.append(item)
        else:
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if parts:
                    entries.append(dict(zip(("key", "account_id", "payment_fp"), parts[:3], strict=False)))
    if env:
        entries += [{"key": k.strip()} for k in env.split(",") if k.strip()]
    keys = {}
    for e in entries:
        rpm = e.get("rpm")
        if rpm is not None and (not isinstance(rpm, int) or rpm < 0):
            raise ValueError(f"API key {key_id(e['key'])}: rpm must be a non-negative integer, got {rpm!r}")
        digest = hashlib.sha256(e["key"].encode()).hexdigest()
        keys[digest] = ApiKey(key_id(e["key"]), e.get("account_id"), e.get("payment_fp"), rpm)
    return keys


class RateLimiter:
    """Sliding one-minute window per caller. Only the event-loop thread touches it, so it needs no lock."""

    def __init__(self) -> None:
        self._hits: dict[str, deque[float]] = {}

    def check(self, who: str, rpm: int) -> int | None:
        """Record a request; None if allowed, else the seconds to wait (for Retry-After)."""
        if rpm <= 0:
            return None
        now = time.monotonic()
        hits = self._hits.setdefault(who, deque())
        while hits and hits[0] <= now - 60:
            hits.popleft()
        if len(hits) >= rpm:
            return max(1, math.ceil(hits[0] + 60 - now))
        hits.append(now)
        return None


class AccessLog:
    """Append-only JSONL of AccessEvent, one flushed line per request; safe to call from any thread."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the server)

    def write(self, event: AccessEvent) -> None:
        if self._file is None:
            return
        line = event.model_dump_json(exclude_none=True) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# --- request schemas -------------------------------------------------------------------------------------------------
# Unknown fields are accepted and ignored (as OpenAI-compatible servers do), so clients' extra options never break.


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Extensions(_Lenient):
    """vLLM-style extensions, accepted on every route (the benchmark needs equal-length completions)."""

    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    top_k: int | None = Field(None, ge=0)


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class OpenAISampling(Extensions):
    """Fields both OpenAI routes share."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False


class ChatRequest(OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(OpenAISampling):
    prompt: str | list[int]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this legacy route
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class AnthropicMessage(_Lenient):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock]


class MessagesRequest(Extensions):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    stop_sequences: list[str] | None = None
    stream: bool = False


# --- the engine ------------------------------------------------------------------------------------------------------


class GenerationError(RuntimeError):
    """The model failed on a batch; the requests in it get HTTP 500 and the worker carries on."""


@dataclass
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 16
    min_new_tokens: int = 0  # EOS is masked out until this many tokens exist (ignore_eos: = max_new_tokens)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    seed: int | None = None


class TextStream:
    """Token ids in, text out, one token at a time.

    Decoding a token alone is wrong for byte-level BPE (a character may span tokens) and for tokenizers whose
    decoding of a token depends on its neighbours, and decoding the whole list each step is quadratic. So we decode
    a short window twice, with and without the new token, and emit the difference (the windowed incremental
    detokenisation of TGI and vLLM); a trailing U+FFFD means the rest of a multi-byte character is still to come.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # end of the tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip) if ids else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        prev = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])
        if len(new) > len(prev) and not new.endswith("\ufffd"):
            piece = new[len(prev) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever text is still pending at the end (possibly an incomplete character)."""
        prev = self._decode(self.ids[self._prefix : self._read])
        piece = self._decode(self.ids[self._prefix :])[len(prev) :]
        self._prefix = self._read = len(self.ids)
        self.text += piece
        return piece


class Row:
    """One sequence being generated: a request with n choices has n rows. Mutated only by the worker thread."""

    def __init__(self, job: Job, index: int, tokenizer, device: torch.device) -> None:
        self.job = job
        self.index = index
        s = job.sampling
        seed = secrets.randbits(63) if s.seed is None else (s.seed + index) % (1 << 63)  # choice i uses seed + i
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.stream = TextStream(tokenizer)
        self.ids: list[int] = []  # generated tokens (EOS excluded)
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []  # (token, logprob, top-k)
        self.offsets: list[int] = []  # where each generated token's text starts in `text`
        self.text = ""
        self.finish: str | None = None  # "eos" | "stop" | "length"
        self.stop_sequence: str | None = None
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self._sent = 0  # chars of text already streamed
        self._lp_sent = 0  # logprob entries already streamed

    @property
    def done(self) -> bool:
        return self.finish is not None

    def advance(self, token: int, lp: tuple[float, list[tuple[int, float]]] | None, eos: set[int]) -> None:
        """Take one sampled token: stop on EOS, a stop string or the token budget; stream what is safe to show."""
        s = self.job.sampling
        if token in eos and len(self.ids) >= s.min_new_tokens:
            self.text += self.stream.flush()
            self.finish = "eos"
        else:
            self.offsets.append(len(self.text))
            self.ids.append(token)
            if lp is not None:
                self.logprobs.append((token, *lp))
            piece = self.stream.push(token)
            self.text += piece
            if piece and s.stop:
                self._check_stop(len(piece))
            if not self.done and len(self.ids) >= s.max_new_tokens:
                self.text += self.stream.flush()
                self.finish = "length"
            self.next_token = token
        if self.job.stream:
            self._emit_delta()
        if self.done:
            self.job.emit(("done", self))

    def _check_stop(self, n_new: int) -> None:
        hits = []
        for stop in self.job.sampling.stop:
            at = self.text.find(stop, max(0, len(self.text) - n_new - len(stop) + 1))
            if at >= 0:
                hits.append((at, stop))
        if hits:
            at, stop = min(hits)
            self.text = self.text[:at]
            keep = sum(1 for o in self.offsets if o < at)  # tokens whose text starts before the cut
            self.logprobs, self.offsets = self.logprobs[:keep], self.offsets[:keep]
            self.finish, self.stop_sequence = "stop", stop

    def _safe_end(self) -> int:
        """How much text can be streamed now: hold back a tail that could still become a stop string."""
        if self.done or not self.job.sampling.stop:
            return len(self.text)
        longest = max(len(s) for s in self.job.sampling.stop)
        for start in range(max(self._sent, len(self.text) - longest + 1), len(self.text)):
            tail = self.text[start:]
            if any(s.startswith(tail) for s in self.job.sampling.stop):
                return start
        return len(self.text)

    def _emit_delta(self) -> None:
        end = self._safe_end()
        text = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        n_lp = len(self.logprobs) if self.done else sum(1 for o in self.offsets[: len(self.logprobs)] if o < end)
        lps, offsets = self.logprobs[self._lp_sent : n_lp], self.offsets[self._lp_sent : n_lp]  # copies: we go on
        self._lp_sent = max(self._lp_sent, n_lp)
        if text or lps:
            self.job.emit(("delta", self, text, lps, offsets))


class Job:
    """One request as the engine sees it; created in the event loop, results flow back through `queue`."""

    def __init__(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        n: int = 1,
        stream: bool = False,
        prompt_logprobs: int | None = None,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.n = n
        self.stream = stream  # push text deltas as tokens arrive, not only the final rows
        self.prompt_logprobs_k = prompt_logprobs  # None: not wanted; k: each prompt token's logprob and top k
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None  # tokens 1.. (0 has none)
        self.rows: list[Row] = []
        self.cancelled = False  # set by the event loop when the client goes away
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows)

    async def wait(self) -> list[Row]:
        """Wait until every row is done (non-streaming requests)."""
        async for _ in self.events():
            pass
        return self.rows

    async def events(self) -> AsyncIterator[tuple]:
        """Yield ("delta", row, text, logprobs, offsets) and ("done", row) events until every row is done."""
        remaining = self.n
        while remaining:
            event = await self.queue.get()
            if event[0] == "error":
                raise GenerationError(event[1])
            if event[0] == "done":
                remaining -= 1
            yield event


class Engine:
    """Continuous batching on one worker thread that owns the model.

    The worker keeps a running batch: its rows, their KV cache (left-padded) and attention mask. Each iteration
    (iteration-level scheduling, as in Orca, Yu et al., OSDI 2022):
      1. admit waiting jobs while the batch has room (`max_batch` rows): prefill them together in one left-padded
         forward pass (which also gives prompt logprobs for free), copy each job's cache n times for its n choices,
         sample every new row's first token, and splice the new rows into the running batch by left-padding the
         shorter cache along time;
      2. one decode step for every running row: a single forward of their last tokens over the shared cache;
      3. drop rows that finished (EOS, stop string, token budget, client gone) from the cache and trim the
         all-padding columns at the left.
    So a request joins at the next step instead of waiting for the longest row of a batch to finish. Positions come
    from each row's own mask (cumsum), so padding never shifts a row's positions. Caches other than plain
    `DynamicLayer`s (sliding windows, recurrent state) cannot be spliced: then new jobs wait until the batch drains.
    When idle, the worker waits `batch_wait_ms` after the first job so that a burst is prefilled together.
    """

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_ms: float = 5.0, watermark=None) -> None:
        self.model = model
        self.watermark = watermark  # guard.watermark.Watermark or None
        # The event loop tokenizes prompts while this thread decodes; a private copy avoids sharing the Rust object.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos = eos_ids(model, tokenizer)
        self._keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.rows: list[Row] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 = real token in the cache
        self.spliceable = True
        self.stats = {
            "forward_passes": 0,
            "prefill_passes": 0,
            "decode_steps": 0,
            "rows_decoded": 0,
            "max_batch_rows": 0,
            "jobs": 0,
            "generated_tokens": 0,
            "errors": 0,
        }
        self._thread: threading.Thread | None = None
        self._stopping = False

    # lifecycle, called from other threads

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="alambic-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self.inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping:
            raise GenerationError("the server is shutting down")
        self.inbox.put(job)

    def snapshot(self) -> dict[str, Any]:
        s = dict(self.stats)
        s["mean_batch_rows"] = round(s["rows_decoded"] / s["decode_steps"], 3) if s["decode_steps"] else 0.0
        s["active_rows"] = len(self.rows)
        s["queued_jobs"] = self.inbox.qsize() + len(self.waiting)
        s["max_batch"] = self.max_batch
        return s

    # the worker

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._start(self._admit())
                if self.rows and not self._stopping:
                    try:
                        self._decode()
                    except Exception as e:  # a failing batch must not kill the server
                        log.exception("decode step failed")
                        self._fail(list({id(r.job): r.job for r in self.rows}.values()), e)
                        self.rows, self.cache, self.mask = [], None, None
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        for job in list(self.waiting) + [r.job for r in self.rows]:
            if job is not None:
                job.emit(("error", "the server is shutting down"))

    def _start(self, jobs: list[Job]) -> None:
        """Prefill admitted jobs and splice them into the running batch."""
        # Prompt logprobs need the logits at every position (prompt length x vocabulary floats per row), so those
        # jobs are prefilled one at a time; the others together, keeping only the last position's logits.
        groups = [[j for j in jobs if j.prompt_logprobs_k is None]]
        groups += [[j] for j in jobs if j.prompt_logprobs_k is not None]
        deferred: list[Job] = []
        for group in filter(None, groups):
            if self.rows and not self.spliceable:  # this model's cache cannot take rows mid-flight: wait
                deferred += group
                continue
            try:
                self._prefill(group)
            except Exception as e:
                log.exception("prefill failed")
                self._fail(group, e)
        self.waiting.extendleft(reversed(deferred))

    def _fail(self, jobs: list[Job], e: Exception) -> None:
        self.stats["errors"] += 1
        for job in jobs:
            job.cancelled = True  # rows of it already in the running batch are dropped at the next step
            job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))

    def _admit(self) -> list[Job]:
        """Jobs to prefill now: block when idle, else take whatever is already queued and fits."""
        idle = not self.rows
        if idle and not self.waiting:
            job = self.inbox.get()
            if job is None:
                return []
            self.waiting.append(job)
        if not idle and not self.spliceable:
            return []
        deadline = time.monotonic() + (self.batch_wait if idle else 0.0)
        taken: list[Job] = []
        room = self.max_batch - len(self.rows)
        while True:
            while self.waiting and not self.waiting[0].cancelled and self.waiting[0].n <= room:
                job = self.waiting.popleft()
                taken.append(job)
                room -= job.n
            while self.waiting and self.waiting[0].cancelled:
                self.waiting.popleft()
            if self.waiting or room <= 0:  # FIFO: the head does not fit yet, so nobody overtakes it
                break
            wait = deadline - time.monotonic()
            try:
                job = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
            except queue.Empty:
                break
            if job is None:
                break
            self.waiting.append(job)
        return taken

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, all_logits: bool = False):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]  # (B, L): each row counts its own tokens
        kw = {"logits_to_keep": 0 if all_logits else 1} if self._keep_arg else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **kw)
        self.stats["forward_passes"] += 1
        return out.logits.float(), out.cache  # (B, L or 1, V)

    def _prefill(self, jobs: list[Job]) -> None:
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for b, job in enumerate(jobs):
            ids[b, width - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[b, width - len(job.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        want_prompt_lp = any(j.prompt_logprobs_k is not None for j in jobs)
        logits, cache = self._forward(ids, mask, None, all_logits=want_prompt_lp)  # (B, W or 1, V)
        self.stats["prefill_passes"] += 1
        self.stats["jobs"] += len(jobs)
        for b, job in enumerate(jobs):
            if job.prompt_logprobs_k is not None:
                job.prompt_logprobs = self._prompt_logprobs(logits[b], ids[b], len(job.prompt_ids), job)
        self.spliceable = all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

        # One row per choice; a job asking for no new tokens (echo scoring) is done after the prefill.
        select, rows = [], []
        for b, job in enumerate(jobs):
            job.rows = [Row(job, i, self.tokenizer, self.device) for i in range(job.n)]
            for row in job.rows:
                if job.sampling.max_new_tokens == 0:
                    row.finish = "length"
                    job.emit(("done", row))
                else:
                    select.append(b)
                    rows.append(row)
        if not rows:
            return
        index = torch.tensor(select, device=self.device)
        cache.batch_select_indices(index)  # (R, H, W, D) per layer: copies a job's cache for each of its choices
        self._sample(rows, logits[index, -1])
        keep = [i for i, r in enumerate(rows) if not r.done]
        if not keep:
            return
        if len(keep) < len(rows):
            cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self._splice(cache, mask[index][keep], [rows[i] for i in keep])

    def _prompt_logprobs(self, logits: torch.Tensor, ids: torch.Tensor, n: int, job: Job):
        """Logprob of each prompt token after the first given the ones before it, and the top k there."""
        width = ids.shape[0]
        logp = torch.log_softmax(logits[width - n : width - 1], -1)  # (n-1, V): position t predicts token t+1
        target = ids[width - n + 1 :]
        chosen = logp.gather(-1, target[:, None])[:, 0].tolist()
        k = job.prompt_logprobs_k or 0
        if k:
            top_v, top_i = logp.topk(k, -1)
            tops = [list(zip(i, v, strict=True)) for i, v in zip(top_i.tolist(), top_v.tolist(), strict=True)]
        else:
            tops = [[] for _ in chosen]
        return list(zip(chosen, tops, strict=True))

    def _splice(self, cache, mask: torch.Tensor, rows: list[Row]) -> None:
        """Append freshly prefilled rows to the running batch, left-padding whichever cache is shorter."""
        if not self.rows:
            self.cache, self.mask, self.rows = cache, mask, rows
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)
        for old, new in zip(self.cache.layers, cache.layers, strict=True):  # keys/values: (B, H, T, D)
            old.keys = torch.cat([F.pad(old.keys, (0, 0, width - t_old, 0)), F.pad(new.keys, (0, 0, width - t_new, 0))])
            old.values = torch.cat(
                [F.pad(old.values, (0, 0, width - t_old, 0)), F.pad(new.values, (0, 0, width - t_new, 0))]
            )
        self.mask = torch.cat([F.pad(self.mask, (width - t_old, 0)), F.pad(mask, (width - t_new, 0))])
        self.rows = self.rows + rows

    def _decode(self) -> None:
        live = [i for i, r in enumerate(self.rows) if not r.job.cancelled]
        if len(live) < len(self.rows):
            self._keep(live)
            if not self.rows:
                return
        ids = torch.tensor([[r.next_token] for r in self.rows], device=self.device)  # (B, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, T+1)
        logits, self.cache = self._forward(ids, self.mask, self.cache)
        self.stats["decode_steps"] += 1
        self.stats["rows_decoded"] += len(self.rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(self.rows))
        self._sample(self.rows, logits[:, -1])
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        """Keep only these rows of the running batch, then drop columns that are padding in every row."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        if self.spliceable:
            first = int(self.mask.argmax(-1).min())  # every row has a real token, so argmax finds its first one
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
                self.mask = self.mask[:, first:]

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose each row's next token (greedy or temperature / top-k / top-p with the row's own generator)."""
        if self.watermark is not None:
            # Green-list bias on every row (Kirchenbauer et al., 2023), before anything reads the logits: the
            # reported logprobs are those of the distribution actually served, so a student distilled on them
            # (top-k KL) inherits the watermark as one trained on the sampled text does.
            k = self.watermark.params.context_width
            contexts = [(r.job.prompt_ids[-k:] + r.ids)[-k:] for r in rows]
            logits = logits + self.watermark.bias(contexts, logits.shape[-1]).to(logits.device)
        k_max = max((r.job.sampling.logprobs or 0) for r in rows)
        want_lp = any(r.job.sampling.logprobs is not None for r in rows)
        logp = torch.log_softmax(logits, -1) if want_lp else None  # of the raw logits, as OpenAI reports them
        top = logp.topk(k_max, -1) if want_lp and k_max else None

        scores = logits
        blocked = [i for i, r in enumerate(rows) if len(r.ids) < r.job.sampling.min_new_tokens]
        if blocked and self.eos:
            scores = logits.clone()
            rows_i = torch.tensor(blocked, device=scores.device)[:, None]
            scores[rows_i, torch.tensor(sorted(self.eos), device=scores.device)] = -math.inf
        tokens = scores.argmax(-1).tolist()
        sampled = [i for i, r in enumerate(rows) if r.job.sampling.temperature > 0]
        if sampled:
            temps = torch.tensor([rows[i].job.sampling.temperature for i in sampled], device=scores.device)
            probs = torch.softmax(scores[sampled] / temps[:, None], -1)  # (S, V)
            probs = _top_k_top_p(probs, [rows[i].job.sampling for i in sampled])
            for j, i in enumerate(sampled):
                tokens[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))

        if want_lp:
            chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
            top_i, top_v = (top.indices.tolist(), top.values.tolist()) if top is not None else (None, None)
        for i, row in enumerate(rows):
            k = row.job.sampling.logprobs
            lp = None
            if k is not None:
                lp = (chosen[i], list(zip(top_i[i][:k], top_v[i][:k], strict=True)) if k else [])
            before = len(row.ids)
            row.advance(tokens[i], lp, self.eos)
            self.stats["generated_tokens"] += len(row.ids) - before


def _top_k_top_p(probs: torch.Tensor, params: list[Sampling]) -> torch.Tensor:
    """Zero out tokens outside each row's top-k and top-p (nucleus, Holtzman et al. 2020) sets."""
    for j, s in enumerate(params):
        if 0 < s.top_k < probs.shape[-1]:
            kth = probs[j].topk(s.top_k).values[-1]
            probs[j] = torch.where(probs[j] < kth, 0.0, probs[j])
    top_p = torch.tensor([s.top_p for s in params], device=probs.device)
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(-1, descending=True)
        sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]  # the first token is always kept
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a reply: the tokenizer's EOS and the model's generation-config EOS (may be a list)."""
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


# --- token strings and bytes for logprobs ----------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class TokenText:
    """Each token's text and UTF-8 bytes as OpenAI reports them in logprobs (cached; event-loop thread only)."""

    _BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece byte-fallback tokens

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            self._byte_level = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            m = self._BYTE_FALLBACK.match(piece or "")
            if m:
                raw = bytes([int(m.group(1), 16)])
            elif self._byte_level is not None and piece and all(c in self._byte_level for c in piece):
                raw = bytes(self._byte_level[c] for c in piece)
            else:
                raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = self(token_id)
        return {"token": text, "logprob": logprob, "bytes": raw}


# --- the app ---------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered to the client, in OpenAI's or Anthropic's shape depending on the route."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


OPENAI_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


def error_response(e: ApiError, style: str = "openai") -> JSONResponse:
    if style == "anthropic":
        body = {
            "type": "error",
            "error": {"type": ANTHROPIC_ERROR_TYPES.get(e.status, "api_error"), "message": e.message},
        }
    else:
        kind = OPENAI_ERROR_TYPES.get(e.status, "invalid_request_error")
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _text_of(content: str | list | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{where}.{i}: only text content is supported, got type {part.type!r}", param=where)
        parts.append(part.text)
    return "".join(parts)


def _stops(stop: str | list[str] | None, param: str) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise ApiError(400, f"{param}: at most 16 stop sequences, got {len(stops)}", param=param)
    return [s for s in stops if s]


def _sse(obj: Any, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Service:
    """Everything the routes share: config, model, tokenizer, engine, keys, limiter, access log."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        # Intra-op threads beyond the free cores make small models far slower (threads spin waiting for each
        # other), and the event loop needs a core too; hence half the cores unless told otherwise.
        torch.set_num_threads(cfg.threads or max(1, min(8, (os.cpu_count() or 2) // 2)))
        self.keys = load_api_keys(cfg.api_keys_file, os.environ.get(KEYS_ENV))
        self.model, self.tokenizer = load(cfg.model)
        self.name = cfg.served_name or model_name(cfg.model)
        text_config = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
        self.context = getattr(text_config or self.model.config, "max_position_embeddings", None)
        self.watermark = None
        if cfg.watermark_key_file is not None:
            from .guard.watermark import Watermark

            head = self.model.get_output_embeddings()
            width = head.weight.shape[0] if head is not None else self.model.config.vocab_size  # the logits' width
            self.watermark = Watermark.from_file(cfg.watermark_key_file, width)
            log.info("watermarking completions: %r", self.watermark)  # fingerprint and settings, never the key
        self.engine = Engine(self.model, self.tokenizer, cfg.max_batch, cfg.batch_wait_ms, self.watermark)
        self.token_text = TokenText(self.tokenizer)
        self.limiter = RateLimiter()
        self.access_log = AccessLog(cfg.access_log)
        self.created = int(time.time())

    # request plumbing

    def new_event(self, request: Request, endpoint: str) -> AccessEvent:
        return AccessEvent(
            ts=utc_now(),
            request_id="req_" + uuid.uuid4().hex[:24],
            account_id="anonymous",
            ip=request.client.host if request.client else None,
            user_agent=request.headers.get("user-agent"),
            endpoint=endpoint,
        )

    def authenticate(self, request: Request, event: AccessEvent) -> ApiKey | None:
        """Fill the caller's identity into the event; 401 when keys are configured and this one is not among them."""
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "").strip()
        if key:
            event.api_key_id = key_id(key)
            event.account_id = event.api_key_id
        if not self.keys:
            return None
        if not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'", code="no_key")
        entry = self.keys.get(hashlib.sha256(key.encode()).hexdigest())
        if entry is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        event.account_id = entry.account_id or entry.key_id
        event.payment_fp = entry.payment_fp
        return entry

    def rate_limit(self, event: AccessEvent, entry: ApiKey | None) -> None:
        rpm = entry.rpm if entry is not None and entry.rpm is not None else self.cfg.rate_limit_rpm
        who = event.api_key_id or f"ip:{event.ip}"
        wait = self.limiter.check(who, rpm)
        if wait is not None:
            raise ApiError(
                429,
                f"rate limit of {rpm} requests per minute reached; retry in {wait} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )

    async def read_json(self, request: Request) -> dict:
        limit = self.cfg.max_body_bytes
        too_large = ApiError(413, f"request body is larger than {limit} bytes (--max-body-bytes)", code="too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > 16 * limit:
            raise too_large  # not worth reading; the connection is closed after the answer
        chunks, size = [], 0
        async for chunk in request.stream():  # read to the end, so the client gets the 413 rather than a reset
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise too_large
        try:
            data = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return data

    def check_model(self, name: str) -> None:
        if name != self.name:
            raise ApiError(
                404, f"model {name!r} not found; this server serves {self.name!r}", "model", "model_not_found"
            )

    def budget(self, event: AccessEvent, prompt: list[int], requested: int | None, param: str) -> int:
        """The completion's token budget (default: the rest of the context); 400 if the prompt plus it does not fit
        the model's context."""
        prompt_len = event.prompt_tokens = len(prompt)
        limit = self.cfg.max_new_tokens_limit
        if prompt_len == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if requested is not None and requested > limit:
            raise ApiError(
                400,
                f"max_tokens is {requested}, above this server's limit of {limit} (--max-new-tokens-limit)",
                "max_tokens",
            )
        room = (self.context - prompt_len) if self.context else limit
        want = min(limit, room) if requested is None else requested
        if self.context and (prompt_len + want > self.context or room < 1):
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context} tokens, but the request needs "
                f"{prompt_len + max(want, 1)} ({prompt_len} in the prompt, {max(want, 1)} for the completion); "
                "shorten the prompt or lower max_tokens",
                param=param,
                code="context_length_exceeded",
            )
        event.max_tokens = want
        return want

    def render_chat(self, messages: list[dict[str, str]], continue_final: bool = False) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
                tokenize=False,
            )
        except Exception as e:  # jinja templates raise on conversations they do not accept
            raise ApiError(400, f"the model's chat template rejected these messages: {e}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_n(self, n: int) -> None:
        if n > self.cfg.max_batch:
            raise ApiError(400, f"n is {n}, above this server's --max-batch of {self.cfg.max_batch}", param="n")

    def submit(
        self,
        req: Extensions,
        prompt: list[int],
        max_new: int,
        temperature: float | None,
        top_p: float | None,
        stop: list[str],
        logprobs: int | None = None,
        seed: int | None = None,
        n: int = 1,
        stream: bool = False,
        prompt_logprobs: int | None = None,
    ) -> Job:
        """Hand a generation job to the engine; unset sampling options get OpenAI's defaults."""
        sampling = Sampling(
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            top_k=req.top_k or 0,
            max_new_tokens=max_new,
            min_new_tokens=max_new if req.ignore_eos else min(req.min_tokens, max_new),
            stop=stop,
            logprobs=logprobs,
            seed=seed,
        )
        job = Job(prompt, sampling, n=n, stream=stream, prompt_logprobs=prompt_logprobs)
        try:
            self.engine.submit(job)
        except GenerationError as e:
            raise ApiError(503, str(e)) from None
        return job

    def logprob_entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict[str, Any]:
        entry = self.token_text.entry(token, logprob)
        entry["top_logprobs"] = [self.token_text.entry(t, v) for t, v in top]
        return entry


def _log_event(svc: Service, event: AccessEvent, status: int) -> None:
    event.status = status
    try:
        svc.access_log.write(event)
    except Exception:  # a full disk must not turn answers into errors
        log.exception("could not write the access log")


async def _handle(svc: Service, request: Request, endpoint: str, schema: type[BaseModel] | None, route, style="openai"):
    """The pipeline every API request goes through: auth, rate limit, size, JSON, schema, then `route(req, event)`;
    and one access-log line, whatever happens (a stream writes its own when it ends)."""
    event = svc.new_event(request, endpoint)
    status: int | None = 500
    try:
        svc.rate_limit(event, svc.authenticate(request, event))
        req = None
        if schema is not None:
            data = await svc.read_json(request)
            try:
                req = schema.model_validate(data)
            except ValidationError as e:
                where = [".".join(map(str, err["loc"])) or "body" for err in e.errors()]
                problems = "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, e.errors(), strict=True))
                raise ApiError(400, f"invalid request: {problems}", param=where[0], code="invalid_value") from None
        response = await route(req, event)
        status = None if isinstance(response, StreamingResponse) else response.status_code
        return response
    except ApiError as e:
        status = e.status
        return error_response(e, style)
    except GenerationError as e:
        return error_response(ApiError(500, str(e)), style)
    except Exception as e:
        log.exception("request failed")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}"), style)
    finally:
        if status is not None:
            _log_event(svc, event, status)


def create_app(cfg: ServeConfig) -> FastAPI:
    """The ASGI app serving `cfg.model`: loads the model now; the engine runs for the app's lifespan."""
    svc = Service(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.engine.start()
        try:
            yield
        finally:
            svc.engine.stop()
            svc.access_log.close()

    app = FastAPI(title="alambic", lifespan=lifespan)
    app.state.service = svc

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, exc: StarletteHTTPException):
        _log_event(svc, svc.new_event(request, request.url.path), exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return error_response(ApiError(exc.status_code, msg))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": svc.name}

    @app.get("/v1/alambic/stats")
    async def stats():
        """Engine counters (forward passes, batch sizes); not logged, no key needed: it reveals no traffic content."""
        return svc.engine.snapshot()

    card = {"id": svc.name, "object": "model", "created": int(time.time()), "owned_by": "alambic"}

    async def list_models(req, event) -> Response:
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/v1/models")
    async def models(request: Request):
        return await _handle(svc, request, "/v1/models", None, list_models)

    @app.get("/v1/models/{name}")
    async def one_model(request: Request, name: str):
        async def answer(req, event) -> Response:
            event.model = name
            svc.check_model(name)
            return JSONResponse(card)

        return await _handle(svc, request, "/v1/models/{name}", None, answer)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _handle(svc, request, "/v1/chat/completions", ChatRequest, lambda r, e: _chat(svc, r, e))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _handle(svc, request, "/v1/completions", CompletionRequest, lambda r, e: _complete(svc, r, e))

    @app.post("/v1/messages")
    async def messages(request: Request):
        route = lambda r, e: _messages(svc, r, e)  # noqa: E731
        return await _handle(svc, request, "/v1/messages", MessagesRequest, route, style="anthropic")

    return app


# --- the routes ------------------------------------------------------------------------------------------------------
# Each route fills the access-log event as soon as it knows a field (so that a refused request is logged with what
# was known), checks the request, submits one Job, and turns its rows (or streamed events) into the wire format.

FINISH_OPENAI = {"eos": "stop", "stop": "stop", "length": "length"}
FINISH_ANTHROPIC = {"eos": "end_turn", "stop": "stop_sequence", "length": "max_tokens"}
_END = object()  # what a chunk generator yields once generation is complete, before its closing chunks


def _describe(event: AccessEvent, model: str, messages: list[dict[str, str]], temperature, logprobs: bool) -> None:
    system = [m["content"] for m in messages if m["role"] == "system"]
    event.model = model
    event.prompt = "\n".join(m["content"] for m in messages if m["role"] == "user")
    event.system_prompt_hash = _sha256("\n".join(system)) if system else None
    event.n_messages = len(messages)
    event.temperature = 1.0 if temperature is None else temperature
    event.logprobs_requested = logprobs


def _reply(event: AccessEvent, **body) -> JSONResponse:
    return JSONResponse(body, headers={"x-request-id": event.request_id})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _streaming(svc: Service, event: AccessEvent, job: Job, chunks: AsyncIterator) -> StreamingResponse:
    """Stream SSE chunks. The access-log line is written when generation completes, before the closing chunks (so a
    client that has read the whole stream finds its line), or when the stream fails or the client goes away."""
    logged = False

    async def body() -> AsyncIterator[str]:
        nonlocal logged
        status = 499  # the client went away mid-stream (nginx's convention)
        try:
            async for chunk in chunks:
                if chunk is _END:
                    event.completion_tokens = job.completion_tokens
                    _log_event(svc, event, 200)
                    logged = True
                else:
                    yield chunk
        except GenerationError as e:
            status = 500
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            job.cancelled = True  # no-op if finished; otherwise the engine drops its rows at the next step
            if not logged:
                event.completion_tokens = job.completion_tokens
                _log_event(svc, event, status)

    headers = {"Cache-Control": "no-cache", "x-request-id": event.request_id}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _chat(svc: Service, req: ChatRequest, event: AccessEvent) -> Response:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content, f"messages.{i}.content")}
        for i, m in enumerate(req.messages)
    ]
    _describe(event, req.model, messages, req.temperature, req.logprobs)
    svc.check_model(req.model)
    svc.check_n(req.n)
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    prompt = svc.render_chat(messages)
    max_new = svc.budget(event, prompt, req.max_completion_tokens or req.max_tokens, "messages")
    if svc.cfg.fixed_response is not None and not req.stream:
        # Benchmark mode: everything but the model (auth, limits, validation, tokenizing, logging) still runs.
        event.completion_tokens = 1
        choice = dict(index=0, message={"role": "assistant", "content": svc.cfg.fixed_response}, logprobs=None,
                      finish_reason="stop")
        return _reply(event, id="chatcmpl-" + event.request_id[4:], object="chat.completion", created=int(time.time()),
                      model=svc.name, choices=[choice], usage=_usage(len(prompt), 1))
    job = svc.submit(
        req, prompt, max_new, req.temperature, req.top_p, _stops(req.stop, "stop"),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None, seed=req.seed, n=req.n, stream=req.stream,
    )  # fmt: skip
    rid, created = "chatcmpl-" + event.request_id[4:], int(time.time())

    def logprobs(entries) -> dict | None:
        return {"content": [svc.logprob_entry(*e) for e in entries]} if req.logprobs else None

    if not req.stream:
        rows = await job.wait()
        event.completion_tokens = job.completion_tokens
        choices = [
            dict(index=r.index, message={"role": "assistant", "content": r.text}, logprobs=logprobs(r.logprobs),
                 finish_reason=FINISH_OPENAI[r.finish])
            for r in rows
        ]  # fmt: skip
        usage = _usage(len(prompt), job.completion_tokens)
        return _reply(event, id=rid, object="chat.completion", created=created, model=svc.name, choices=choices,
                      usage=usage)  # fmt: skip

    def chunk(*choices: dict, **extra) -> str:
        obj = dict(id=rid, object="chat.completion.chunk", created=created, model=svc.name, choices=list(choices))
        return _sse(obj | extra)

    async def chunks() -> AsyncIterator:
        for i in range(req.n):
            yield chunk(dict(index=i, delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None))
        async for kind, row, *delta in job.events():
            if kind == "delta":
                text, entries, _ = delta
                yield chunk(
                    dict(index=row.index, delta={"content": text}, logprobs=logprobs(entries), finish_reason=None)
                )
            else:
                yield chunk(dict(index=row.index, delta={}, logprobs=None, finish_reason=FINISH_OPENAI[row.finish]))
        yield _END
        if req.stream_options is not None and req.stream_options.include_usage:
            yield chunk(usage=_usage(len(prompt), job.completion_tokens))
        yield "data: [DONE]\n\n"

    return _streaming(svc, event, job, chunks())


async def _complete(svc: Service, req: CompletionRequest, event: AccessEvent) -> Response:
    """Legacy completions. `echo` with `logprobs` scores the prompt too, as vLLM does: each prompt token's logprob
    given the ones before it (the first has none), which lets a black-box teacher score a student's samples."""
    text_prompt = req.prompt if isinstance(req.prompt, str) else None
    _describe(
        event, req.model, [{"role": "user", "content": text_prompt or ""}], req.temperature, req.logprobs is not None
    )
    svc.check_model(req.model)
    svc.check_n(req.n)
    if req.stream and req.echo:
        raise ApiError(400, "echo is not supported with stream", param="echo")
    if text_prompt is not None:
        prompt = svc.tokenizer(text_prompt, add_special_tokens=True)["input_ids"]
    else:
        vocab = len(svc.tokenizer)
        bad = [t for t in req.prompt if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt: token ids must lie in [0, {vocab}); got {bad[:5]}", param="prompt")
        prompt = list(req.prompt)
        event.prompt = svc.tokenizer.decode(prompt)
    max_new = svc.budget(event, prompt, req.max_tokens, "prompt")
    job = svc.submit(
        req, prompt, max_new, req.temperature, req.top_p, _stops(req.stop, "stop"), logprobs=req.logprobs,
        seed=req.seed, n=req.n, stream=req.stream, prompt_logprobs=req.logprobs if req.echo else None,
    )  # fmt: skip
    rid, created = "cmpl-" + event.request_id[4:], int(time.time())

    def logprobs(entries, offsets: list[int], start: int = 0) -> dict | None:
        if req.logprobs is None:
            return None
        # vLLM's shape; the top dict also holds the chosen token, so that a scorer always finds it.
        tops = [{svc.token_text(t)[0]: v for t, v in [*top, (token, lp)]} for token, lp, top in entries]
        tokens = [svc.token_text(token)[0] for token, _, _ in entries]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
                "text_offset": [start + o for o in offsets]}  # fmt: skip

    def body(choices: list[dict]) -> dict:
        return dict(id=rid, object="text_completion", created=created, model=svc.name, choices=choices)

    if not req.stream:
        rows = await job.wait()
        event.completion_tokens = job.completion_tokens
        echo, echo_lp = _echo(svc, prompt, job) if req.echo else ("", None)
        choices = []
        for r in rows:
            lp = logprobs(r.logprobs, r.offsets[: len(r.logprobs)], start=len(echo))
            if lp is not None and echo_lp is not None:
                lp = {k: echo_lp[k] + lp[k] for k in lp}
            choices.append(dict(index=r.index, text=echo + r.text, logprobs=lp, finish_reason=FINISH_OPENAI[r.finish]))
        return _reply(event, **body(choices), usage=_usage(len(prompt), job.completion_tokens))

    async def chunks() -> AsyncIterator:
        async for kind, row, *delta in job.events():
            if kind == "delta":
                text, entries, offsets = delta
                choice = dict(index=row.index, text=text, logprobs=logprobs(entries, offsets), finish_reason=None)
            else:
                choice = dict(index=row.index, text="", logprobs=None, finish_reason=FINISH_OPENAI[row.finish])
            yield _sse(body([choice]))
        yield _END
        yield "data: [DONE]\n\n"

    return _streaming(svc, event, job, chunks())


def _echo(svc: Service, prompt: list[int], job: Job) -> tuple[str, dict | None]:
    """The prompt as text (special tokens kept), and its tokens' logprobs in vLLM's shape if they were asked for."""
    stream = TextStream(svc.tokenizer, skip_special_tokens=False)
    offsets = []
    for t in prompt:
        offsets.append(len(stream.text))
        stream.push(t)
    stream.flush()
    if job.prompt_logprobs is None:
        return stream.text, None
    tops: list[dict | None] = [None]
    for token, (lp, top) in zip(prompt[1:], job.prompt_logprobs, strict=True):
        tops.append({svc.token_text(t)[0]: v for t, v in [*top, (token, lp)]})
    lps = [None] + [lp for lp, _ in job.prompt_logprobs]
    tokens = [svc.token_text(t)[0] for t in prompt]
    return stream.text, {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def _messages(svc: Service, req: MessagesRequest, event: AccessEvent) -> Response:
    """Anthropic's Messages API, text only. A final assistant message is continued, as Anthropic does."""
    system = _text_of(req.system, "system") if req.system is not None else ""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": m.role, "content": _text_of(m.content, f"messages.{i}.content")} for i, m in enumerate(req.messages)
    ]
    _describe(event, req.model, messages, req.temperature, False)
    svc.check_model(req.model)
    prompt = svc.render_chat(messages, continue_final=req.messages[-1].role == "assistant")
    max_new = svc.budget(event, prompt, req.max_tokens, "messages")
    stops = _stops(req.stop_sequences, "stop_sequences")
    job = svc.submit(req, prompt, max_new, req.temperature, req.top_p, stops, stream=req.stream)
    mid = "msg_" + event.request_id[4:]

    def message(content: list, row: Row | None) -> dict:
        return dict(
            id=mid, type="message", role="assistant", model=svc.name, content=content,
            stop_reason=FINISH_ANTHROPIC[row.finish] if row else None, stop_sequence=row.stop_sequence if row else None,
            usage={"input_tokens": len(prompt), "output_tokens": len(row.ids) if row else 0},
        )  # fmt: skip

    if not req.stream:
        (row,) = await job.wait()
        event.completion_tokens = job.completion_tokens
        return _reply(event, **message([{"type": "text", "text": row.text}], row))

    def sse(kind: str, **fields) -> str:
        return _sse({"type": kind, **fields}, event=kind)

    async def chunks() -> AsyncIterator:
        yield sse("message_start", message=message([], None))
        yield sse("content_block_start", index=0, content_block={"type": "text", "text": ""})
        async for kind, _, *delta in job.events():
            if kind == "delta" and delta[0]:
                yield sse("content_block_delta", index=0, delta={"type": "text_delta", "text": delta[0]})
        yield _END
        (row,) = job.rows
        yield sse("content_block_stop", index=0)
        stop = {"stop_reason": FINISH_ANTHROPIC[row.finish], "stop_sequence": row.stop_sequence}
        yield sse("message_delta", delta=stop, usage={"output_tokens": len(row.ids)})
        yield sse("message_stop")

    return _streaming(svc, event, job, chunks())


# --- running it ------------------------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket ourselves, so port 0 gives a free port we know before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(
            f"cannot listen on {host}:{port}: {e.strerror}; choose another --port (0: any free one)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}"


def _uvicorn(app: FastAPI) -> uvicorn.Server:
    # log_config=None: the server must not reconfigure the host program's logging (the CLI configures it).
    return uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=3, lifespan="on"))


def run(cfg: ServeConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C); `on_ready(base_url)` is called once the server is listening."""
    app = create_app(cfg)
    sock = _bind(cfg.host, cfg.port)
    server = _uvicorn(app)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started and on_ready is not None:
            on_ready(_url(sock, cfg.host))
        await task

    try:
        asyncio.run(main())
    finally:
        sock.close()


@contextlib.contextmanager
def serve_in_thread(cfg: ServeConfig, app: FastAPI | None = None, startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve `cfg` from a background thread; yields the base URL (e.g. http://127.0.0.1:PORT), stops on exit.

    For tests and for stages that need a teacher endpoint in-process (`collect`, `demo`, `bench`). Pass `app`
    (from `create_app(cfg)`) to keep a handle on it: `app.state.service` holds the engine, keys and access log.
    """
    app = app or create_app(cfg)
    sock = _bind(cfg.host, cfg.port)
    server = _uvicorn(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="alambic-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server for {cfg.model} did not start (see the log for the reason)")
        time.sleep(0.01)
    try:
        yield _url(sock, cfg.host)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
