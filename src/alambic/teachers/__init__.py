"""Teacher backends behind one small interface: `async complete(request, api_key) -> Reply`.

A backend is one class plus one line in `TEACHERS`. Retries, rate limits, the cache and the budget live
once, in the collector; a backend only turns one request into one reply or raises `TeacherError`.
"""

from __future__ import annotations

from .base import CAPABILITIES, ChatRequest, Reply, Teacher, TeacherError, TeacherSpec
from .hf import LocalTeacher
from .http import AnthropicTeacher, OpenAITeacher

TEACHERS: dict[str, type[Teacher]] = {
    "openai": OpenAITeacher,  # any OpenAI-compatible endpoint: OpenAI, DeepSeek, vLLM, Ollama, alambic serve...
    "anthropic": AnthropicTeacher,  # Anthropic's Messages API
    "hf": LocalTeacher,  # a local HF causal LM in-process (white box)
}


def make_teacher(spec: TeacherSpec) -> Teacher:
    if spec.backend not in TEACHERS:
        raise ValueError(f"unknown teacher backend {spec.backend!r}; choose one of: {', '.join(TEACHERS)}")
    return TEACHERS[spec.backend](spec)


__all__ = ["CAPABILITIES", "TEACHERS", "ChatRequest", "Reply", "Teacher", "TeacherError", "TeacherSpec",
           "make_teacher"]
