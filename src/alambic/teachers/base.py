"""The teacher interface: what a request is, what a reply is, and how a backend reports failure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

# What a teacher exposes, richest first. Training picks its loss from this.
CAPABILITIES = ("full_logits", "top_k_logprobs", "token_logprobs", "text")


class TeacherSpec(BaseModel):
    """Which teacher to ask and how. Holds the *names* of secrets (env var, file), never their values."""

    backend: str = Field("openai", description="teacher backend: openai, anthropic or hf")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="API base URL (HTTP backends)")
    model: str = Field("", description="model name to request (HTTP) or model directory (hf); '' = the first "
                       "model the server lists")
    api_key_env: str = Field("", description="environment variable holding one or more comma-separated API keys "
                             "(default: OPENAI_API_KEY or ANTHROPIC_API_KEY by backend)")
    api_keys_file: str | None = Field(None, description="file with one API key per line (first word of a line)")
    timeout_s: float = Field(120.0, gt=0, description="per-request timeout in seconds")
    teacher_id: str | None = Field(None, description="stable name of the teacher for cache keys, instead of its URL "
                                   "(for a local server whose port changes between runs)")

    def identity(self) -> dict[str, Any]:
        """Who the teacher is, for records and cache keys: no secrets."""
        where = {"teacher_id": self.teacher_id} if self.teacher_id else {"base_url": self.base_url.rstrip("/")}
        return {"backend": self.backend, **where, "model": self.model}

    def keys(self) -> list[str]:
        """The API keys to use, from the key file and/or the environment; [] when none is configured."""
        keys: list[str] = []
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise FileNotFoundError(f"API key file {str(path)!r} not found")
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.append(line.split()[0])
        env = self.api_key_env or {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}.get(self.backend, "")
        if env and os.environ.get(env):
            keys += [k.strip() for k in os.environ[env].split(",") if k.strip()]
        return list(dict.fromkeys(keys))


class ChatRequest(BaseModel):
    """One request to a teacher. Everything here is part of the cache key."""

    messages: list[dict[str, Any]]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    top_logprobs: int = 0  # 0: no logprobs; k > 0: the sampled token's logprob and the top k
    seed: int | None = None


class Choice(BaseModel):
    text: str
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # [{token, logprob, top: [[token, logprob], ...]}]


class Reply(BaseModel):
    choices: list[Choice]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None  # the model that actually answered, as the API says


class TeacherError(Exception):
    """A failed teacher call. `retryable` says whether the collector may try again, `retry_after` when."""

    def __init__(self, message: str, status: int | None = None, retryable: bool = False,
                 retry_after: float | None = None, auth: bool = False):
        super().__init__(message)
        self.status, self.retryable, self.retry_after, self.auth = status, retryable, retry_after, auth


class Teacher:
    """A backend: one async method. `capability` says the richest signal it can return."""

    capability: str = "text"

    def __init__(self, spec: TeacherSpec):
        self.spec = spec

    async def start(self, api_keys: list[str | None] | None = None) -> None:
        """Open connections, resolve the model name; fail fast with a clear message if unreachable."""

    async def complete(self, request: ChatRequest, api_key: str | None) -> Reply:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""
