"""Constrained invention: make up a word of a given length and first letter (open-ended generation).

Every other skill has one right answer, so a teacher that has learnt them is near-deterministic. This one has
many (any word that fits), so the teacher's replies carry real entropy, as a chat model's free text does. That
is what a green-list watermark needs to mark (it can only steer choices the model was unsure about) and what a
student copies from the teacher when it learns the teacher's distribution: the demo's provenance stage rests on
it. The reference is a pattern: the first letter, then one `?` per further letter ("q?????").
"""

from __future__ import annotations

import random
import re
import string

from .base import Skill, last_answer

TEMPLATES = [
    "Make up a {n}-letter name for a {t} that starts with {c}.",
    "Invent a new {n}-letter name for a {t}, beginning with {c}.",
    "Name this {t}: {n} letters, starting with {c}.",
    "I need a {n}-letter {t} name that begins with {c}.",
]
THINGS = ["cat", "dog", "robot", "planet", "river", "shop", "boat", "band", "cafe", "game", "horse", "spice",
          "drink", "star", "town", "app", "bird", "tree", "font", "color", "dance", "dragon", "island", "cheese",
          "perfume", "village", "comet", "puppet", "castle", "lamp", "ship", "bakery", "moon", "garden", "song",
          "hotel", "pony", "engine", "potion", "kite", "parrot", "market", "valley", "crystal", "wizard", "candle",
          "pasta", "beetle", "forest", "lake", "mountain", "drum", "tiger", "rocket", "bridge", "lantern"]


class Naming(Skill):
    name = "naming"
    description = "invent a word of a given length and first letter (many right answers)"

    def __init__(self, min_len: int = 4, max_len: int = 9):
        self.min_len, self.max_len = min_len, max_len

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        n, c = rng.randint(self.min_len, self.max_len), rng.choice(string.ascii_lowercase)
        word = c + "".join(rng.choice(string.ascii_lowercase) for _ in range(n - 1))
        return rng.choice(TEMPLATES).format(n=n, c=c, t=rng.choice(THINGS)), c + "?" * (n - 1), f"Answer: {word}"

    def extract(self, text: str) -> str | None:
        ans = last_answer(text)
        return None if ans is None else ans.strip().lower()

    def grade(self, text: str, reference: str) -> bool:
        word = self.extract(text)
        return bool(word and re.fullmatch(r"[a-z]+", word) and len(word) == len(reference) and word[0] == reference[0])
