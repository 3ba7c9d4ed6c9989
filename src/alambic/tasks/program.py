"""Evaluate a tiny straight-line program by tracing it (code execution, step-by-step reasoning)."""

from __future__ import annotations

import random

from .arithmetic import Arithmetic
from .base import Skill

VARS = "abc"


class Program(Skill):
    name = "program"
    description = "trace a 3-to-5-line program of assignments and print its output"

    def __init__(self, min_lines: int = 3, max_lines: int = 5, max_value: int = 99):
        self.min_lines, self.max_lines, self.max_value = min_lines, max_lines, max_value

    def _statement(self, rng: random.Random, env: dict[str, int]) -> tuple[str, str, int] | None:
        """(statement, its trace line, value). The trace substitutes the operands' current values first
        ("a = b + 3 = 7 + 3 = 10"), so each step is one look-up and one operation: small models learn
        that far more easily than a bare "a = 10", which hides both in a single token."""
        var = rng.choice(VARS)
        if not env or rng.random() < 0.25:
            v = rng.randint(0, 9)
            return f"{var} = {v}", f"{var} = {v}", v
        src = rng.choice(sorted(env))
        op = rng.choice("+-*")
        if op == "*":
            # One-digit times one-digit only: the trace shows one product per line.
            if env[src] > 9:
                return None
            k = rng.randint(2, 9)
            return f"{var} = {src} * {k}", f"{var} = {src} * {k} = {env[src]} * {k} = {env[src] * k}", env[src] * k
        other = rng.choice(sorted(env) + ["lit"])
        rhs, value = (str(k := rng.randint(1, 9)), k) if other == "lit" else (other, env[other])
        result = env[src] + value if op == "+" else env[src] - value
        if not 0 <= result <= self.max_value:
            return None
        text = f"{var} = {src} {op} {rhs}"
        return text, f"{text} = {env[src]} {op} {value} = {result}", result

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        while True:
            env: dict[str, int] = {}
            lines, trace = [], []
            for _ in range(rng.randint(self.min_lines, self.max_lines)):
                st = None
                while st is None:
                    st = self._statement(rng, env)
                text, step, value = st
                env[text.split(" = ")[0]] = value
                lines.append(text)
                # Each trace line ends with the whole state ("; a=8 b=56"), so every later look-up of a
                # variable is a copy from the line just above (what small models learn fastest), not a
                # search for the last line that assigned it. Our first traces without it stalled near 40%.
                trace.append(f"{step}; " + " ".join(f"{k}={v}" for k, v in sorted(env.items())))
            out = rng.choice(sorted(env))
            lines.append(f"print({out})")
            program = "\n".join(lines)
            prompt = f"What does this program print?\n{program}"
            trace.append(f"print({out}) = {env[out]}")
            return prompt, str(env[out]), "\n".join(trace + [f"Answer: {env[out]}"])

    extract = Arithmetic.extract
