"""The two records that are the contracts between stages (see DESIGN.md), and JSONL read/write helpers.

`Interaction`: one teacher exchange (collect writes it; train/evaluate/report read it).
`AccessEvent`: one API request as the provider sees it (serve writes it; guard reads it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def utc_now() -> str:
    """ISO-8601 UTC with milliseconds, e.g. 2026-03-02T14:05:09.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TopLogprob(BaseModel):
    token: str
    logprob: float


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    top: list[tuple[str, float]] = Field(default_factory=list)  # k <= 20 for APIs


class Interaction(BaseModel):
    """One teacher exchange."""

    model_config = ConfigDict(extra="allow")

    id: str  # content hash of (teacher identity, request): the cache key
    prompt: list[dict[str, Any]]  # chat messages as sent
    completion: str
    logprobs: list[TokenLogprob] | None = None
    teacher: dict[str, Any] = Field(default_factory=dict)  # backend, base_url (no secrets), model, sampling params
    usage: dict[str, Any] = Field(default_factory=dict)  # prompt_tokens, completion_tokens, cost_usd
    meta: dict[str, Any] = Field(default_factory=dict)  # skill, reference, verdict, source
    created_at: str = Field(default_factory=utc_now)
    latency_s: float | None = None
    finish_reason: str | None = None


class AccessEvent(BaseModel):
    """One API request as the provider sees it. Optional fields may be absent; geography is never a signal."""

    model_config = ConfigDict(extra="allow")

    ts: str  # ISO-8601 UTC; readers also accept epoch seconds
    request_id: str
    account_id: str | None = None
    api_key_id: str | None = None  # a stable id derived from the key, never the key itself
    ip: str | None = None
    user_agent: str | None = None
    payment_fp: str | None = None
    model: str | None = None
    prompt: str | None = None  # the user text
    prompt_hash: str | None = None  # instead of `prompt` where text is withheld
    system_prompt_hash: str | None = None
    n_messages: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    logprobs_requested: bool | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    status: int | None = None


def write_jsonl(path: str | Path, records: Iterable[BaseModel | dict], append: bool = False) -> int:
    """Write records one JSON object per line; returns how many were written."""
    n = 0
    with open(path, "a" if append else "w") as f:
        for r in records:
            obj = r.model_dump(exclude_none=True) if isinstance(r, BaseModel) else r
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per non-empty line; a malformed line raises ValueError naming the file and line number."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
