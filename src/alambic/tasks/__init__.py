"""The built-in skill suite: verifiable tasks that mirror what distillers target.

A new skill is one `Skill` subclass plus one line in `SKILLS`.
"""

from __future__ import annotations

from .arithmetic import Arithmetic
from .base import Example, Skill, split_of
from .list_ops import ListOps
from .naming import Naming
from .program import Program
from .string_ops import StringOps
from .tool_call import ToolCall

SKILLS: dict[str, Skill] = {
    "arithmetic": Arithmetic(),
    "tool_call": ToolCall(),
    "list_ops": ListOps(),
    "string_ops": StringOps(),
    "program": Program(),
    "naming": Naming(),
}


def get(name: str) -> Skill:
    if name not in SKILLS:
        raise ValueError(f"unknown skill {name!r}; built-in skills are: {', '.join(SKILLS)}")
    return SKILLS[name]


def generate(names: list[str] | None, n_per_skill: int, split: str, seed: int = 0) -> list[Example]:
    """`n_per_skill` examples of each named skill (all skills when `names` is None), skill after skill."""
    return [ex for name in (names or list(SKILLS)) for ex in get(name).generate(n_per_skill, split, seed)]


def accuracy(examples: list[Example], replies: list[str]) -> dict[str, float]:
    """Accuracy per skill of `replies` to `examples`, plus the macro average under 'mean'."""
    hits: dict[str, list[bool]] = {}
    for ex, reply in zip(examples, replies, strict=True):
        hits.setdefault(ex.skill, []).append(get(ex.skill).grade(reply, ex.reference))
    acc = {k: sum(v) / len(v) for k, v in hits.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc


__all__ = ["SKILLS", "Example", "Skill", "accuracy", "generate", "get", "split_of"]
