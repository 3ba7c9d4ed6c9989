"""HTTP teachers: OpenAI-compatible chat completions and Anthropic Messages, over one httpx client each.

httpx rather than the vendors' SDKs because the collector owns retries, rate limits and key rotation: the
SDKs retry on their own and hide the rate-limit headers we schedule by.
"""

from __future__ import annotations

import email.utils
import re
import time

import httpx

from .base import ChatRequest, Choice, Reply, Teacher, TeacherError, TeacherSpec

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 529}


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait, from `Retry-After` (seconds or HTTP date) or OpenAI's `x-ratelimit-reset-*` ("1m30s")."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        value = headers.get(name)
        if value:
            parts = re.findall(r"([\d.]+)(ms|s|m|h)", value)
            if parts:
                scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
                return sum(float(n) * scale[u] for n, u in parts)
    return None


def _error_message(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else str(err)
    except ValueError:
        msg = r.text[:300]
    return f"HTTP {r.status_code}: {msg}"


def raise_for(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    raise TeacherError(
        _error_message(r),
        status=r.status_code,
        retryable=r.status_code in RETRYABLE_STATUS,
        retry_after=parse_retry_after(r.headers),
        auth=r.status_code in (401, 403),
    )


class HTTPTeacher(Teacher):
    """One teacher over HTTP, through several small connection pools.

    httpcore's pool walks every connection it holds each time a request is queued or a response closed (and asks
    each socket whether it is readable), so one client with 64 connections spends more CPU per request than the
    HTTP itself (measured: ~6 ms/request against ~4 with pools of 8, at concurrency 64 on 2 cores). A request
    goes to the least busy pool; a new pool opens when every pool has `PER_POOL` requests in flight.
    """

    PER_POOL = 8

    def __init__(self, spec: TeacherSpec):
        super().__init__(spec)
        self.pools: list[httpx.AsyncClient] = []
        self.busy: list[int] = []  # requests in flight per pool
        self._ssl = None

    @property
    def client(self) -> httpx.AsyncClient:
        """The first pool, for one-off calls (listing models). Pools open on first use: a run served entirely
        from the cache opens none."""
        if not self.pools:
            self._open_pool()
        return self.pools[0]

    def _open_pool(self) -> int:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()  # one for all pools: building one costs milliseconds
        limits = httpx.Limits(max_connections=self.PER_POOL, max_keepalive_connections=self.PER_POOL)
        self.pools.append(httpx.AsyncClient(base_url=self.spec.base_url.rstrip("/") + "/", timeout=self.spec.timeout_s,
                                            limits=limits, verify=self._ssl))
        self.busy.append(0)
        return len(self.pools) - 1

    async def close(self) -> None:
        for pool in self.pools:
            await pool.aclose()

    async def post(self, path: str, json: dict, headers: dict) -> dict:
        busy = self.busy
        i = busy.index(min(busy)) if busy else 0
        if not busy or busy[i] >= self.PER_POOL:
            i = self._open_pool()
        busy[i] += 1
        try:
            r = await self.pools[i].post(path, json=json, headers=headers)
        except httpx.TimeoutException as e:
            raise TeacherError(f"timeout after {self.spec.timeout_s}s ({type(e).__name__})", retryable=True) from e
        except httpx.TransportError as e:
            raise TeacherError(f"cannot reach {self.spec.base_url}: {e!r}", retryable=True) from e
        finally:
            busy[i] -= 1
        raise_for(r)
        try:
            return r.json()
        except ValueError as e:
            raise TeacherError(f"response is not JSON: {r.text[:200]!r}", retryable=True) from e


class OpenAITeacher(HTTPTeacher):
    """Any OpenAI-compatible `/chat/completions` endpoint (OpenAI, DeepSeek, vLLM, Ollama, `alambic serve`)."""

    capability = "top_k_logprobs"

    async def start(self, api_keys: list[str | None] | None = None) -> None:
        await super().start(api_keys)
        if not self.spec.model:
            # Resolve the served model's name; this also proves the endpoint is reachable.
            r = None
            for key in api_keys or [None]:
                try:
                    r = await self.client.get("models", headers=self._headers(key))
                except httpx.TransportError as e:
                    raise ValueError(f"cannot reach teacher at {self.spec.base_url} ({e!r}); is the server running "
                                     "and the --base-url right?") from None
                if r.status_code not in (401, 403):
                    break  # a rejected key is retired later by the collector; try the next one here
            if r.status_code >= 400:
                raise ValueError(f"teacher at {self.spec.base_url} answered {_error_message(r)} when listing "
                                 "models; set the API key (env var or --api-keys-file) or --model")
            models = r.json().get("data") or []
            if not models:
                raise ValueError(f"teacher at {self.spec.base_url} lists no models; set --model")
            self.spec = self.spec.model_copy(update={"model": models[0]["id"]})

    def _headers(self, api_key: str | None) -> dict:
        return {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def complete(self, request: ChatRequest, api_key: str | None) -> Reply:
        body = {
            "model": self.spec.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "n": request.n,
        }
        if request.seed is not None:
            body["seed"] = request.seed
        if request.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        data = await self.post("chat/completions", body, self._headers(api_key))
        choices = []
        for c in data.get("choices", []):
            lp = None
            content = (c.get("logprobs") or {}).get("content")
            if content:
                lp = [{"token": t["token"], "logprob": t["logprob"],
                       "top": [[x["token"], x["logprob"]] for x in t.get("top_logprobs") or []]} for t in content]
            choices.append(Choice(text=c["message"].get("content") or "", finish_reason=c.get("finish_reason"),
                                  logprobs=lp))
        usage = data.get("usage") or {}
        return Reply(choices=choices, prompt_tokens=usage.get("prompt_tokens", 0),
                     completion_tokens=usage.get("completion_tokens", 0), model=data.get("model"))


class AnthropicTeacher(HTTPTeacher):
    """Anthropic's Messages API (`/v1/messages`). It returns text only, and one sample per call."""

    capability = "text"

    async def start(self, api_keys: list[str | None] | None = None) -> None:
        await super().start(api_keys)
        if not self.spec.model:
            raise ValueError("the anthropic backend needs --model (e.g. claude-sonnet-4-5)")

    async def complete(self, request: ChatRequest, api_key: str | None) -> Reply:
        system = "\n".join(m["content"] for m in request.messages if m["role"] == "system")
        body = {
            "model": self.spec.model,
            "messages": [m for m in request.messages if m["role"] != "system"],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if system:
            body["system"] = system
        headers = {"anthropic-version": "2023-06-01"}
        if api_key:
            headers["x-api-key"] = api_key
        choices, p_tok, c_tok, model = [], 0, 0, None
        for _ in range(request.n):
            data = await self.post("messages", body, headers)
            text = "".join(b.get("text", "") for b in data.get("content", []) if b.get("type") == "text")
            stop = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length"}.get(data.get("stop_reason"))
            choices.append(Choice(text=text, finish_reason=stop or data.get("stop_reason")))
            usage = data.get("usage") or {}
            p_tok += usage.get("input_tokens", 0)
            c_tok += usage.get("output_tokens", 0)
            model = data.get("model")
        return Reply(choices=choices, prompt_tokens=p_tok, completion_tokens=c_tok, model=model)
