"""What a skill is: a seeded generator of (messages, reference, worked solution) plus a grader.

Train and held-out splits are disjoint by construction: every prompt is assigned to a split by a hash of
its text, and each split's generator rejects prompts that hash into the other one. So no held-out prompt
can ever appear in training data, whatever seeds or sizes are used.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from typing import Any

HELDOUT_BUCKETS = 5  # 1 bucket in 5 of the prompt space is held out
SPLITS = ("train", "test")

ANSWER_RE = re.compile(r"Answer:\s*(.+?)\s*$", re.MULTILINE)


@dataclass
class Example:
    """One verifiable task instance."""

    skill: str
    messages: list[dict[str, str]]  # chat messages [{role, content}] to send to a model
    reference: str  # the correct final answer, as the grader compares it
    solution: str  # a worked solution ending in the answer: ground truth for training a teacher
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, fixed by its content."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "test" if h % HELDOUT_BUCKETS == 0 else "train"


def last_answer(text: str) -> str | None:
    """The text after the last `Answer:` marker, else the last non-empty line, else None."""
    found = ANSWER_RE.findall(text)
    if found:
        return found[-1].strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None


class Skill:
    """Base class: subclasses set `name` and implement `sample(rng)`; override `extract`/`grade` as needed."""

    name: str = ""
    description: str = ""

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        """Return (prompt text, reference answer, worked solution)."""
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        """The final answer found in a model's free text, normalised for comparison."""
        ans = last_answer(text)
        return None if ans is None else " ".join(ans.split())

    def grade(self, text: str, reference: str) -> bool:
        """True when the final answer in `text` equals `reference`."""
        return self.extract(text) == reference

    def generate(self, n: int, split: str = "train", seed: int = 0) -> list[Example]:
        """`n` distinct examples from `split`, reproducible from `seed`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        # The split name is part of the seed, so the two splits' streams differ even at the same seed.
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Example] = []
        seen: set[str] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise RuntimeError(f"skill {self.name!r} cannot produce {n} distinct {split} prompts")
            prompt, reference, solution = self.sample(rng)
            if prompt in seen or split_of(prompt) != split:
                continue
            seen.add(prompt)
            out.append(
                Example(
                    skill=self.name,
                    messages=[{"role": "user", "content": prompt}],
                    reference=reference,
                    solution=solution,
                    meta={"skill": self.name, "split": split, "seed": seed},
                )
            )
        return out
