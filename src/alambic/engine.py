"""The generation engine behind `alambic serve`: one worker thread owns the model and batches every concurrent
request into shared forward passes (continuous batching), with per-request sampling, stop strings, logprobs and an
optional watermark. It knows nothing of HTTP: `serve` translates the wire formats into `Job`s and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
import math
import queue
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


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
        # The EOS that ended the row, as a logprob entry: not part of the text, but scorers need it (the legacy
        # completions route reports it, as OpenAI and vLLM do: lm_eval reads "prompt + exactly one new token").
        self.eos_logprob: tuple[int, float, list[tuple[int, float]]] | None = None
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
            if lp is not None:
                self.eos_logprob = (token, *lp)
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
        queue: asyncio.Queue | None = None,
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
        # Jobs of one request (a list of prompts) share one queue, so that their events arrive in the order they
        # happen: see `events_of`.
        self.queue: asyncio.Queue = asyncio.Queue() if queue is None else queue

    def emit(self, event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows)

    async def wait(self) -> list[Row]:
        """Wait until every row is done (non-streaming requests)."""
        await wait_all([self])
        return self.rows

    def events(self) -> AsyncIterator[tuple]:
        """Yield ("delta", row, text, logprobs, offsets) and ("done", row) events until every row is done."""
        return events_of([self])


async def events_of(jobs: list[Job]) -> AsyncIterator[tuple]:
    """The events of jobs that share one queue, as they happen, until every row of every job is done (`row.job`
    says whose). A failed job raises GenerationError; the caller cancels the others."""
    queue = jobs[0].queue
    if any(j.queue is not queue for j in jobs):
        raise ValueError("events_of needs jobs created with one shared queue")
    remaining = sum(j.n for j in jobs)
    while remaining:
        event = await queue.get()
        if event[0] == "error":
            raise GenerationError(event[1])
        if event[0] == "done":
            remaining -= 1
        yield event


async def wait_all(jobs: list[Job]) -> None:
    """Wait until every row of these jobs (sharing one queue) is done."""
    async for _ in events_of(jobs):
        pass


class SlackLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers with room to grow along time.

    `DynamicLayer.update` appends a decode step's one column with `torch.cat`, which copies the whole cache of the
    running batch at every step and layer: with 64 rows of ~250 positions that copy was 28% of the demo teacher's
    collection time (py-spy, 2026-12-07). Here a step writes its column in place; the buffer is reallocated only when
    full, with `SLACK` columns to spare, so the copy happens once per `SLACK` steps. transformers cannot do this for
    us: its `StaticCache` preallocates the full length for a fixed batch, and the engine adds and drops rows. `keys`
    and `values` read as the filled part, and assigning them (as splicing, dropping and trimming do) replaces the
    buffers, so everything written for `DynamicLayer` works unchanged.
    """

    SLACK = 64

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = keys, values

    # keys and values keep their own lengths: code written for `DynamicLayer` assigns one and then reads the other
    # (splicing pads the old values after the new keys are set)

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._nk]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._k, self._nk = t, 0 if t is None else t.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._nv]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._v, self._nv = t, 0 if t is None else t.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, at = key_states.shape[-2], self._nk
        if at + n > self._k.shape[-2]:
            grown = (*self._k.shape[:2], at + n + self.SLACK, self._k.shape[-1])
            k, v = self._k.new_empty(grown), self._v.new_empty(grown)
            k[:, :, :at], v[:, :, :at] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:, :, at : at + n], self._v[:, :, at : at + n] = key_states, value_states
        self._nk = self._nv = at + n
        return self.keys, self.values


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

    def __init__(self, model, tokenizer, max_batch: int = 32, batch_wait_ms: float = 5.0, watermark=None,
                 drop_share: float = 0.125) -> None:
        self.model = model
        self.watermark = watermark  # guard.watermark.Watermark or None
        # The event loop tokenizes prompts while this thread decodes; a private copy avoids sharing the Rust object.
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_batch = max_batch
        self.drop_share = drop_share  # finished rows are dropped once they are this share of the batch (0: at once)
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
        s["active_rows"] = sum(not r.done for r in self.rows)
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
                        self._fail(list({id(r.job): r.job for r in self.rows if not r.done}.values()), e)
                        self.rows, self.cache, self.mask = [], None, None
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        for job in list(self.waiting) + [r.job for r in self.rows if not r.done]:
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
        if self.spliceable:
            cache.layers = [SlackLayer(layer.keys, layer.values) for layer in cache.layers]

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

    def _live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not r.done and not r.job.cancelled]

    def _decode(self) -> None:
        live = self._live()
        if not live:
            self._keep(live)
            return
        # Finished rows ride along (their outputs are ignored) until they are `drop_share` of the batch: dropping
        # them copies the whole cache, and so does splicing in the jobs that take their place, so doing both once
        # per eight finished rows instead of at almost every step of a full batch saves more than the idle rows
        # cost (bench/serve.py measures both settings side by side).
        ids = torch.tensor([[r.next_token if r.next_token is not None else self.pad_id] for r in self.rows],
                           device=self.device)  # (B, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)  # (B, T+1)
        logits, self.cache = self._forward(ids, self.mask, self.cache)
        self.stats["decode_steps"] += 1
        self.stats["rows_decoded"] += len(live)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(live))
        if len(live) < len(self.rows):
            self._sample([self.rows[i] for i in live], logits[torch.tensor(live, device=logits.device), -1])
        else:
            self._sample(self.rows, logits[:, -1])
        live = self._live()
        if not live or len(self.rows) - len(live) >= max(1, int(len(self.rows) * self.drop_share)):  # rows <= max_batch
            self._keep(live)

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
