"""List operations: sort, filter and pick from a list of numbers."""

from __future__ import annotations

import random

from .base import Skill

OPS = {
    "sort_asc": ("Sort ascending: {xs}", lambda xs, t: sorted(xs)),
    "sort_desc": ("Sort descending: {xs}", lambda xs, t: sorted(xs, reverse=True)),
    "evens": ("Keep only the even numbers: {xs}", lambda xs, t: [x for x in xs if x % 2 == 0]),
    "above": ("Keep the numbers above {t}: {xs}", lambda xs, t: [x for x in xs if x > t]),
    "max": ("Largest number in: {xs}", lambda xs, t: [max(xs)]),
}


class ListOps(Skill):
    name = "list_ops"
    description = "sort, filter or take the maximum of a short list of numbers"

    def __init__(self, min_len: int = 3, max_len: int = 6, max_value: int = 99):
        self.min_len, self.max_len, self.max_value = min_len, max_len, max_value

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        op = rng.choice(sorted(OPS))
        template, fn = OPS[op]
        xs = [rng.randint(0, self.max_value) for _ in range(rng.randint(self.min_len, self.max_len))]
        t = rng.randint(10, self.max_value - 10)
        prompt = template.format(xs=" ".join(map(str, xs)), t=t)
        result = " ".join(map(str, fn(xs, t))) or "none"
        # Filters get one verdict per element ("55 no"), so the answer is a copy of the "yes" lines;
        # sorts and max have no such local steps and answer directly.
        test = {"evens": lambda x: x % 2 == 0, "above": lambda x: x > t}.get(op)
        steps = [f"{x} {'yes' if test(x) else 'no'}" for x in xs] if test else []
        return prompt, result, "\n".join(steps + [f"Answer: {result}"])
