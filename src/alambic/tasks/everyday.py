"""Everyday requests with checkable answers: the narrow prompt family of the SmolLM2 demo profile.

What people ask a small chat model every day: classify a review or a headline, pull an email address or a time out
of a message, rewrite a sentence, answer a short factual question. Each prompt is built from a template and word
lists, so its right answer is known. The reference is a regular expression matched against the final answer (the
`regex` grader of `alambic evaluate`), because a chat model words a right answer in many ways ("Positive.",
"The sentiment is positive").

Not in `tasks.SKILLS`: the embedded demo teacher was never trained on these, and the built-in suite stays as it is.
"""

from __future__ import annotations

import random
import re

from .base import Skill, last_answer

POSITIVE = ["I loved the {x}", "the {x} was excellent", "what a wonderful {x}", "the {x} made my day",
            "I would gladly buy this {x} again", "the {x} is fantastic value"]
NEGATIVE = ["I hated the {x}", "the {x} was terrible", "what an awful {x}", "the {x} ruined my evening",
            "I want a refund for this {x}", "the {x} broke after one day"]
THINGS = ["pizza", "hotel room", "phone", "movie", "concert", "jacket", "coffee", "laptop", "book", "bike", "service",
          "haircut", "train ride", "headphones", "soup"]
TOPICS = {
    "sports": ["{team} win the cup final after extra time", "{team} sign a new striker", "record crowd cheers {team}"],
    "technology": ["new {gadget} runs a day longer on one charge", "{gadget} sales double after the update",
                   "engineers unveil a folding {gadget}"],
    "food": ["chefs share a quick {dish} recipe", "the secret to a perfect {dish}", "{dish} prices rise at markets"],
    "weather": ["storm brings heavy rain to {city}", "heatwave expected in {city} this weekend",
                "snow closes roads around {city}"],
}
FILL = {"team": ["the Eagles", "the Rovers", "City", "the Lions", "United"],
        "gadget": ["phone", "tablet", "smartwatch", "laptop", "camera"],
        "dish": ["pasta", "curry", "pancake", "omelette", "salad"],
        "city": ["Lisbon", "Oslo", "Dublin", "Madrid", "Vienna", "Prague"]}
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lena"]
DOMAINS = ["example.com", "mail.org", "company.net", "shop.io"]
EVENTS = ["meeting", "dentist appointment", "team lunch", "interview", "flight", "yoga class", "call"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
SUBJECTS = ["the cat", "my brother", "our neighbour", "the teacher", "my friend", "the old man", "her sister"]
PREDICATES = ["sleeps on the sofa", "plays the guitar", "reads a book every week", "forgot the umbrella",
              "painted the fence blue", "waits at the station", "cooks dinner on Sundays", "likes green tea"]
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "Canada": "Ottawa", "Egypt": "Cairo", "Portugal": "Lisbon", "Norway": "Oslo", "Greece": "Athens",
            "Russia": "Moscow", "China": "Beijing", "Ireland": "Dublin", "Austria": "Vienna", "Poland": "Warsaw",
            "Sweden": "Stockholm", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana", "Thailand": "Bangkok"}
ASK = ["{q} Reply with the answer only.", "{q} Answer briefly.", "{q}"]


def _fill(rng: random.Random, template: str) -> str:
    return template.format(**{k: rng.choice(v) for k, v in FILL.items()})


def _word(answer: str) -> str:
    """A pattern that finds `answer` as a whole word, any case."""
    return r"(?i)\b" + re.escape(answer) + r"\b"


def sentiment(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(["positive", "negative"])
    first, second = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2)
    review = f"{first.format(x=rng.choice(THINGS))}, and {second.format(x=rng.choice(THINGS))}."
    q = f'Is the sentiment of this review positive or negative? Review: "{review[0].upper() + review[1:]}"'
    other = "negative" if label == "positive" else "positive"
    return q, rf"(?i)^(?!.*\b{other}\b).*\b{label}\b", label.capitalize()


def topic(rng: random.Random) -> tuple[str, str, str]:
    label = rng.choice(sorted(TOPICS))
    headline = _fill(rng, rng.choice(TOPICS[label]))
    q = f'Which category fits this headline: sports, technology, food or weather? Headline: "{headline}"'
    return q, _word(label), label.capitalize()


def email(rng: random.Random) -> tuple[str, str, str]:
    name, other = rng.sample(NAMES, 2)
    addr = f"{name.lower()}.{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    msg = f"Hi {other}, for the {rng.choice(EVENTS)} please write to {name} at {addr} before {rng.choice(DAYS)}."
    return f'What is the email address in this message? Message: "{msg}"', re.escape(addr), addr


def time_of(rng: random.Random) -> tuple[str, str, str]:
    event, day = rng.choice(EVENTS), rng.choice(DAYS)
    hhmm = f"{rng.randint(7, 18)}:{rng.choice(['00', '15', '30', '45'])}"
    msg = f"Reminder: your {event} is on {day} at {hhmm} in room {rng.randint(1, 40)}."
    return f'At what time is the {event}? Message: "{msg}"', r"\b" + re.escape(hhmm) + r"\b", hhmm


def uppercase(rng: random.Random) -> tuple[str, str, str]:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)}"
    return f'Rewrite this sentence in capital letters: "{s}"', re.escape(s.upper()), s.upper() + "."


def capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    q = rng.choice(ASK).format(q=f"What is the capital of {country}?")
    return q, _word(CAPITALS[country]), f"The capital of {country} is {CAPITALS[country]}."


KINDS = {"sentiment": sentiment, "topic": topic, "email": email, "time": time_of, "uppercase": uppercase,
         "capital": capital}
# How each kind's prompts begin: `Everyday.kind_of` reads the kind back from a prompt.
OPENINGS = {"sentiment": "Is the sentiment", "topic": "Which category", "email": "What is the email",
            "time": "At what time", "uppercase": "Rewrite this", "capital": "What is the capital"}


class Everyday(Skill):
    """One skill drawing each prompt from one of `KINDS` (classification, extraction, rewriting, short answers)."""

    name = "everyday"
    description = "classify, extract, rewrite, answer: short everyday requests with checkable answers"
    grader = "regex"  # how `alambic evaluate` grades a prompt file of these rows

    def __init__(self, kinds: list[str] | None = None):
        unknown = sorted(set(kinds or []) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown everyday kind(s) {unknown}; choose from {', '.join(KINDS)}")
        self.kinds = sorted(kinds or KINDS)

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        return KINDS[rng.choice(self.kinds)](rng)

    def extract(self, text: str) -> str | None:
        return last_answer(text)

    def grade(self, text: str, reference: str) -> bool:
        """True when the reference pattern matches the final answer (its last line)."""
        ans = self.extract(text)
        return ans is not None and re.search(reference, ans) is not None

    def kind_of(self, prompt: str) -> str:
        """The kind a prompt was drawn from, read back from its wording (for per-kind accuracy)."""
        for kind, start in OPENINGS.items():
            if prompt.startswith(start):
                return kind
        raise ValueError(f"not an everyday prompt: {prompt[:60]!r}")
