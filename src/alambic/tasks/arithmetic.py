"""Multi-digit addition with worked, column-by-column steps (chain-of-thought style)."""

from __future__ import annotations

import random
import re

from .base import Skill, last_answer

TEMPLATES = [
    "What is {a} + {b}? Work it out digit by digit.",
    "Add {a} and {b}, showing each column.",
    "Compute {a} + {b} step by step.",
]


class Arithmetic(Skill):
    name = "arithmetic"
    description = "add two 2-to-4-digit numbers, column by column with carries"

    def __init__(self, min_digits: int = 2, max_digits: int = 4):
        self.min_digits, self.max_digits = min_digits, max_digits

    def _number(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        a, b = self._number(rng), self._number(rng)
        prompt = rng.choice(TEMPLATES).format(a=a, b=b)
        da, db = str(a)[::-1], str(b)[::-1]
        steps, carry = [], 0
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            s = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
        steps.append(f"Answer: {a + b}")
        return prompt, str(a + b), "\n".join(steps)

    def extract(self, text: str) -> str | None:
        ans = last_answer(text)
        if ans is None:
            return None
        nums = re.findall(r"-?\d[\d,]*", ans)
        return nums[-1].replace(",", "") if nums else None
