"""String transformations on made-up words, so answers cannot be memorised."""

from __future__ import annotations

import random
import string

from .base import Skill

VOWELS = set("aeiou")


def _word(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


OPS = {
    "reverse": ("Reverse the word: {w}", lambda ws: ws[0][::-1], 1),
    "upper": ("Uppercase this: {w}", lambda ws: " ".join(ws).upper(), 2),
    "acronym": ("Acronym of: {w}", lambda ws: "".join(w[0] for w in ws).upper(), 4),
    "novowels": ("Remove the vowels from: {w}", lambda ws: "".join(c for c in ws[0] if c not in VOWELS) or "none", 1),
}


class StringOps(Skill):
    name = "string_ops"
    description = "reverse, uppercase, acronym or strip vowels from made-up words"

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        op = rng.choice(sorted(OPS))
        template, fn, n_words = OPS[op]
        ws = [_word(rng) for _ in range(rng.randint(1, n_words) if n_words > 1 else 1)]
        if op == "acronym":
            ws = [_word(rng) for _ in range(rng.randint(2, 4))]
        prompt = template.format(w=" ".join(ws))
        result = fn(ws)
        return prompt, result, f"Answer: {result}"
