"""Tool use: turn a natural-language request into one JSON tool call with typed arguments."""

from __future__ import annotations

import json
import random
import re

from .base import Skill

CITIES = ["Paris", "Tokyo", "Lisbon", "Nairobi", "Lima", "Oslo", "Cairo", "Seoul", "Austin", "Dublin", "Hanoi",
          "Quito", "Zurich", "Perth", "Accra", "Denver", "Milan", "Riga", "Dakar", "Bogota", "Kyoto", "Porto"]
NAMES = ["alice", "bob", "carol", "dan", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
DOMAINS = ["example.com", "mail.org", "corp.net"]
SUBJECTS = ["budget", "lunch", "report", "invoice", "meeting", "launch", "review", "holiday"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "CHF", "KES"]
LABELS = ["tea", "pasta", "laundry", "nap", "call", "oven", "run"]


def _date(rng: random.Random) -> str:
    return f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _weather(rng):
    # The date makes the prompt space large (22 cities x 2 units x 3 phrasings alone is 132 prompts): with so few,
    # a model memorises the training prompts' answers instead of learning to copy the city, and recalls a
    # training city for a held-out prompt.
    city, unit, date = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"]), _date(rng)
    text = rng.choice(["What's the weather in {c} on {t} in {u}?", "Weather for {c} on {t} please, in {u}.",
                       "Tell me the {u} temperature in {c} on {t}."]).format(c=city, u=unit, t=date)
    return text, "get_weather", {"city": city, "date": date, "unit": unit}


def _flight(rng):
    o, d = rng.sample(CITIES, 2)
    date, n = _date(rng), rng.randint(1, 9)
    text = rng.choice(["Book a flight from {o} to {d} on {t} for {n} people.",
                       "I need {n} seats from {o} to {d} on {t}.",
                       "Fly {n} of us {o} to {d}, date {t}."]).format(o=o, d=d, t=date, n=n)
    return text, "book_flight", {"origin": o, "destination": d, "date": date, "passengers": n}


def _email(rng):
    to = f"{rng.choice(NAMES)}@{rng.choice(DOMAINS)}"
    subject = rng.choice(SUBJECTS)
    text = rng.choice(["Email {to} about the {s}.", "Send a mail to {to} with subject {s}.",
                       "Write to {to}, subject: {s}."]).format(to=to, s=subject)
    return text, "send_email", {"to": to, "subject": subject}


def _timer(rng):
    minutes, label = rng.randint(1, 120), rng.choice(LABELS)
    text = rng.choice(["Set a {m} minute timer for {l}.", "Timer: {l}, {m} minutes.",
                       "Remind me about the {l} in {m} minutes."]).format(m=minutes, l=label)
    return text, "set_timer", {"minutes": minutes, "label": label}


def _convert(rng):
    amount = rng.randint(1, 5000)
    src, dst = rng.sample(CURRENCIES, 2)
    text = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?",
                       "Change {a} {s} into {d}."]).format(a=amount, s=src, d=dst)
    return text, "convert_currency", {"amount": amount, "from": src, "to": dst}


TOOLS = [_weather, _flight, _email, _timer, _convert]


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(", ", ": "))


class ToolCall(Skill):
    name = "tool_call"
    description = "extract a JSON tool call (name + typed arguments) from a request"

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        text, tool, args = rng.choice(TOOLS)(rng)
        prompt = f"Reply with a JSON tool call for: {text}"
        call = json.dumps({"name": tool, "arguments": args})  # name first, arguments in natural order
        return prompt, canonical({"name": tool, "arguments": args}), f"Answer: {call}"

    def extract(self, text: str) -> str | None:
        # The last balanced-looking {...} span that parses as a JSON object.
        for m in reversed(list(re.finditer(r"\{.*\}", text))):
            try:
                obj = json.loads(m.group(0))
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return canonical(obj)
        return None
