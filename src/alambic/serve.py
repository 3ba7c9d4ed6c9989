"""`alambic serve`: an OpenAI- and Anthropic-compatible HTTP server for any HF causal LM, with continuous batching.

Read top to bottom:
- `ServeConfig`;
- API keys, per-key rate limits and the access log (the file `guard` reads; keys never enter it);
- request schemas (pydantic) for /v1/chat/completions, /v1/completions and /v1/messages;
- the FastAPI app, which translates between the wire formats and engine jobs;
- `run(cfg)` (blocking, for the CLI), `serve_in_thread(cfg)` (for tests and other stages) and
  `serve_in_process(cfg)` (the same from a child process, for stages that keep a core busy themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import Config
from .engine import Engine, GenerationError, Job, Row, Sampling, TextStream, TokenText, events_of, wait_all
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
    drop_share: float = Field(0.125, ge=0, le=1, description="finished rows stay in the batch until they are this "
                              "share of it, then are dropped and replaced together (0: at once)")
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
    # OpenAI's four shapes: a string, a list of token ids, or a list of either (several prompts in one request).
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for this legacy route
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_of_four_shapes(cls, v: Any) -> Any:  # one clear message rather than one per shape it is not
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        many = isinstance(v, list) and (all(isinstance(p, str) for p in v) or all(ids(p) for p in v))
        if isinstance(v, str) or ids(v) or many:
            return v
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of token ids")


class TokenizeRequest(_Lenient):
    """vLLM's POST /tokenize: either `prompt` (text as /v1/completions takes it) or `messages` (chat, rendered by
    the model's template as /v1/chat/completions renders it)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # default: True for `prompt`, False for `messages` (as vLLM)
    add_generation_prompt: bool | None = None  # default: unless continue_final_message
    continue_final_message: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Lenient):
    """vLLM's POST /detokenize."""

    model: str | None = None
    tokens: list[int]


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
        self.engine = Engine(self.model, self.tokenizer, cfg.max_batch, cfg.batch_wait_ms, self.watermark,
                             drop_share=cfg.drop_share)
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

    def render_chat(
        self, messages: list[dict[str, str]], continue_final: bool = False, add_generation_prompt: bool | None = None
    ) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=not continue_final if add_generation_prompt is None else add_generation_prompt,
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
        queue: asyncio.Queue | None = None,
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
        job = Job(prompt, sampling, n=n, stream=stream, prompt_logprobs=prompt_logprobs, queue=queue)
        try:
            self.engine.submit(job)
        except GenerationError as e:
            raise ApiError(503, str(e)) from None
        return job

    def check_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"{param}: token ids must lie in [0, {vocab}); got {bad[:5]}", param=param)

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

    # vLLM's tokenizer routes, at the root as vLLM serves them: clients (lm_eval's tokenizer_backend=remote) then
    # need no copy of the served model's tokenizer. Same keys as the API; they never touch the model.

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        async def answer(req, event) -> Response:
            event.model = svc.name
            return JSONResponse(_tokenizer_info(svc))

        return await _handle(svc, request, "/tokenizer_info", None, answer)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await _handle(svc, request, "/tokenize", TokenizeRequest, lambda r, e: _tokenize(svc, r, e))

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await _handle(svc, request, "/detokenize", DetokenizeRequest, lambda r, e: _detokenize(svc, r, e))

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


def _streaming(svc: Service, event: AccessEvent, jobs: list[Job], chunks: AsyncIterator) -> StreamingResponse:
    """Stream SSE chunks. The access-log line is written when generation completes, before the closing chunks (so a
    client that has read the whole stream finds its line), or when the stream fails or the client goes away."""
    logged = False

    async def body() -> AsyncIterator[str]:
        nonlocal logged
        status = 499  # the client went away mid-stream (nginx's convention)
        try:
            async for chunk in chunks:
                if chunk is _END:
                    event.completion_tokens = sum(j.completion_tokens for j in jobs)
                    _log_event(svc, event, 200)
                    logged = True
                else:
                    yield chunk
        except GenerationError as e:
            status = 500
            yield _sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            for job in jobs:
                job.cancelled = True  # no-op if finished; otherwise the engine drops its rows at the next step
            if not logged:
                event.completion_tokens = sum(j.completion_tokens for j in jobs)
                _log_event(svc, event, status)

    headers = {"Cache-Control": "no-cache", "x-request-id": event.request_id}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m.content, f"messages.{i}.content")}
        for i, m in enumerate(messages)
    ]


async def _chat(svc: Service, req: ChatRequest, event: AccessEvent) -> Response:
    messages = _chat_messages(req.messages)
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

    return _streaming(svc, event, [job], chunks())


async def _complete(svc: Service, req: CompletionRequest, event: AccessEvent) -> Response:
    """Legacy completions. `prompt` takes OpenAI's four shapes; a list of prompts gets n choices per prompt, numbered
    `index` = prompt's position x n + choice, as OpenAI numbers them. `echo` with `logprobs` scores the prompt too,
    as vLLM does: each prompt token's logprob given the ones before it (the first has none), which lets a black-box
    teacher score a student's samples. The EOS that ends a choice is in its logprobs (its text is empty), as in
    OpenAI's and vLLM's answers: lm_eval reads `echo` + `max_tokens: 1` as "the prompt's tokens + one new token"."""
    prompts = _prompt_list(req.prompt)
    text = "\n".join(p for p in prompts if isinstance(p, str))  # token prompts are decoded once they are checked
    _describe(event, req.model, [{"role": "user", "content": text}], req.temperature, req.logprobs is not None)
    svc.check_model(req.model)
    svc.check_n(req.n)
    if req.stream and req.echo:
        raise ApiError(400, "echo is not supported with stream", param="echo")
    many = len(prompts) > 1
    ids_list, texts = [], []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids_list.append(svc.tokenizer(p, add_special_tokens=True)["input_ids"])
            texts.append(p)
        else:
            svc.check_ids(p, f"prompt.{i}" if many else "prompt")
            ids_list.append(p)
            texts.append(svc.tokenizer.decode(p))
    event.prompt = "\n".join(texts)
    budgets = []
    for i, ids in enumerate(ids_list):
        try:
            budgets.append(svc.budget(event, ids, req.max_tokens, "prompt"))
        except ApiError as e:
            if many:
                e.message = f"prompt {i}: {e.message}"
            raise
    event.prompt_tokens = sum(map(len, ids_list))
    queue: asyncio.Queue = asyncio.Queue()  # one for all the prompts' jobs, so that their events come in order
    jobs: list[Job] = []
    try:
        for ids, max_new in zip(ids_list, budgets, strict=True):
            jobs.append(svc.submit(
                req, ids, max_new, req.temperature, req.top_p, _stops(req.stop, "stop"), logprobs=req.logprobs,
                seed=req.seed, n=req.n, stream=req.stream, prompt_logprobs=req.logprobs if req.echo else None,
                queue=queue,
            ))  # fmt: skip
    except ApiError:
        _cancel(jobs)
        raise
    rid, created = "cmpl-" + event.request_id[4:], int(time.time())
    number = {id(job): p * req.n for p, job in enumerate(jobs)}  # the first choice index of each prompt

    def logprobs(entries, offsets: list[int], start: int = 0) -> dict | None:
        if req.logprobs is None:
            return None
        # vLLM's shape; the top dict also holds the chosen token, so that a scorer always finds it.
        tops = [{svc.token_text(t)[0]: v for t, v in [*top, (token, lp)]} for token, lp, top in entries]
        tokens = [svc.token_text(token)[0] for token, _, _ in entries]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
                "text_offset": [start + o for o in offsets]}  # fmt: skip

    def eos(row: Row) -> tuple[list, list[int]]:  # the ending EOS as a logprob entry with empty text, if any
        return ([row.eos_logprob], [len(row.text)]) if row.eos_logprob is not None else ([], [])

    def body(choices: list[dict]) -> dict:
        return dict(id=rid, object="text_completion", created=created, model=svc.name, choices=choices)

    if not req.stream:
        try:
            await wait_all(jobs)
        except BaseException:  # one prompt failed: the others' rows need not run on
            _cancel(jobs)
            raise
        event.completion_tokens = sum(j.completion_tokens for j in jobs)
        choices = []
        for job in jobs:
            echo, echo_lp = _echo(svc, job.prompt_ids, job) if req.echo else ("", None)
            for r in job.rows:
                more, more_at = eos(r)
                lp = logprobs(r.logprobs + more, r.offsets[: len(r.logprobs)] + more_at, start=len(echo))
                if lp is not None and echo_lp is not None:
                    lp = {k: echo_lp[k] + lp[k] for k in lp}
                choices.append(dict(index=number[id(job)] + r.index, text=echo + r.text, logprobs=lp,
                                    finish_reason=FINISH_OPENAI[r.finish]))  # fmt: skip
        return _reply(event, **body(choices), usage=_usage(event.prompt_tokens, event.completion_tokens))

    async def chunks() -> AsyncIterator:
        async for kind, row, *delta in events_of(jobs):
            index = number[id(row.job)] + row.index
            if kind == "delta":
                text, entries, offsets = delta
                choice = dict(index=index, text=text, logprobs=logprobs(entries, offsets), finish_reason=None)
            else:
                more, more_at = eos(row)
                lp = logprobs(more, more_at) if more else None
                choice = dict(index=index, text="", logprobs=lp, finish_reason=FINISH_OPENAI[row.finish])
            yield _sse(body([choice]))
        yield _END
        yield "data: [DONE]\n\n"

    return _streaming(svc, event, jobs, chunks())


def _prompt_list(prompt: str | list) -> list[str | list[int]]:
    """The prompts of a completions request: a string or a list of token ids is one prompt; a list of either, many."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt is an empty list; send a string, a list of strings, a list of token ids or a "
                       "list of lists of token ids", param="prompt")  # fmt: skip
    return [list(prompt)] if isinstance(prompt[0], int) else list(prompt)


def _cancel(jobs: list[Job]) -> None:
    for job in jobs:
        job.cancelled = True  # the engine drops their rows at its next step


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

    return _streaming(svc, event, [job], chunks())


def _tokenizer_info(svc: Service) -> dict[str, Any]:
    """vLLM's GET /tokenizer_info: the tokenizer's settings (tokenizer_config.json's fields) less this machine's paths
    and loading options, its current special tokens and chat template, and the served context (`max_model_len`)."""
    tok = svc.tokenizer
    local = {"vocab_file", "merges_file", "tokenizer_file", "name_or_path", "is_local", "local_files_only"}

    def plain(v: Any) -> Any:  # AddedToken -> its text (as vLLM); anything else JSON cannot hold -> its str
        if hasattr(v, "content"):
            return v.content
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, set)):
            return [plain(x) for x in v]
        return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

    info = {k: plain(v) for k, v in tok.init_kwargs.items() if k not in local}
    info.update(
        tokenizer_class=type(tok).__name__,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        pad_token=tok.pad_token,
        unk_token=tok.unk_token,
        chat_template=tok.chat_template if isinstance(tok.chat_template, str) else None,
        vocab_size=len(tok),
        max_model_len=svc.context or svc.cfg.max_new_tokens_limit,
    )
    return info


async def _tokenize(svc: Service, req: TokenizeRequest, event: AccessEvent) -> Response:
    """vLLM's POST /tokenize: `prompt` as /v1/completions tokenizes it, or `messages` as /v1/chat/completions does."""
    event.model = req.model or svc.name
    if req.model is not None:
        svc.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "send either 'prompt' (text) or 'messages' (a chat), not both or neither", param="prompt")
    if req.prompt is not None:
        ids = svc.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens is not False)["input_ids"]
    else:
        if req.continue_final_message and req.add_generation_prompt:
            raise ApiError(400, "continue_final_message and add_generation_prompt cannot both be true",
                           param="add_generation_prompt")  # fmt: skip
        ids = svc.render_chat(_chat_messages(req.messages), req.continue_final_message, req.add_generation_prompt)
        if req.add_special_tokens:  # on top of what the template wrote, as vLLM does
            ids = svc.tokenizer.build_inputs_with_special_tokens(ids)
    event.prompt_tokens = len(ids)
    strs = svc.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return JSONResponse({"count": len(ids), "max_model_len": svc.context or svc.cfg.max_new_tokens_limit,
                         "tokens": ids, "token_strs": strs})  # fmt: skip


async def _detokenize(svc: Service, req: DetokenizeRequest, event: AccessEvent) -> Response:
    """vLLM's POST /detokenize: the text of these token ids, special tokens kept (so that it tokenizes back)."""
    event.model = req.model or svc.name
    if req.model is not None:
        svc.check_model(req.model)
    svc.check_ids(req.tokens, "tokens")
    event.prompt_tokens = len(req.tokens)
    return JSONResponse({"prompt": svc.tokenizer.decode(req.tokens, skip_special_tokens=False)})


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


def _serve_fd(fd: int, cfg_json: str) -> None:
    """Child side of `serve_in_process`: serve on the inherited listening socket until SIGTERM/SIGINT."""
    cfg = ServeConfig.model_validate_json(cfg_json)
    sock = socket.socket(fileno=fd)
    server = _uvicorn(create_app(cfg))
    parent = os.getppid()

    def orphaned() -> None:  # the parent was killed without stopping us: stop, rather than serve forever
        while not server.should_exit:
            if os.getppid() != parent:
                server.should_exit = True
            time.sleep(1)

    threading.Thread(target=orphaned, daemon=True).start()
    server.run(sockets=[sock])  # main thread: uvicorn shuts down gracefully on SIGTERM


@contextlib.contextmanager
def serve_in_process(cfg: ServeConfig, startup_timeout: float = 120.0) -> Iterator[str]:
    """Like `serve_in_thread`, but the server runs in a child Python process; yields its base URL.

    For a stage that is itself busy while it talks to the server (the demo's collection: the client parses
    thousands of replies while the teacher generates): in one process both share one interpreter lock and one core,
    in two each gets its own. The socket is bound here and inherited, so port 0 works and there is no race for it.
    """
    import signal
    import subprocess
    import sys

    import httpx

    sock = _bind(cfg.host, cfg.port)
    url = _url(sock, cfg.host)
    code = f"from alambic.serve import _serve_fd; _serve_fd({sock.fileno()}, {cfg.model_dump_json()!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[sock.fileno()])
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server for {cfg.model} exited with status {proc.returncode} before it was "
                                   "ready (see the log above for the reason)")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server for {cfg.model} did not start within {startup_timeout:.0f} s")
            time.sleep(0.1)
        yield url
    finally:
        sock.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
