"""A second traffic generator, written apart from `guard simulate` as a held-out referee for `guard detect`.

Nothing here is shared with the simulator: its own phrase banks (English, Spanish, French, German), its own task
payloads, its own benign population and coordinated-but-benign groups, its own four campaign styles, one event at a
time in plain Python (rows of dicts). The detector was never tuned on it. Labels: account_id, label (benign or the
campaign), kind (the benign population or the campaign).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

T0 = 1_775_000_000.0  # 2026-03-31
DAY = 86400.0

ASK = {
    "en": ["Can you help me {v}?", "I need to {v}.", "Quick question: how do I {v}?", "What's the best way to {v}?"],
    "es": ["¿Me ayudas a {v}?", "Necesito {v}.", "¿Cómo puedo {v}?", "Pregunta rápida: ¿cómo {v}?"],
    "fr": ["Peux-tu m'aider à {v} ?", "J'ai besoin de {v}.", "Comment faire pour {v} ?"],
    "de": ["Kannst du mir helfen, {v}?", "Ich muss {v}.", "Wie kann ich am besten {v}?"],
}
DO = {
    "en": ["write a thank-you note to my aunt", "fix a flaky pytest fixture", "plan meals for a busy week",
           "understand mortgage amortisation", "pick a laptop for video editing", "learn basic Italian phrases",
           "shorten this paragraph", "name my bakery", "prepare for a job interview", "set up a home network"],
    "es": ["escribir una carta de presentación", "organizar un viaje a Perú", "entender la fotosíntesis",
           "mejorar mi currículum", "preparar una paella", "aprender a programar en Python"],
    "fr": ["rédiger un mail à mon propriétaire", "comprendre les impôts", "préparer un exposé sur Rome",
           "réviser pour le bac", "choisir un vélo"],
    "de": ["eine Bewerbung schreiben", "meine Steuererklärung verstehen", "einen Urlaub in Norwegen planen",
           "ein Gedicht zum Geburtstag schreiben", "Excel-Formeln lernen"],
}  # fmt: skip
STEP = {"en": " Walk me through it step by step.", "es": " Explícalo paso a paso.", "fr": " Explique étape par étape.",
        "de": " Erklär es Schritt für Schritt."}  # fmt: skip
FOLLOW = ["ok and then?", "Thanks! Shorter please", "hmm that is wrong", "gracias, ¿y otra opción?", "merci !",
          "danke, noch ein Beispiel?", "can you redo it in a table", "what did you mean by that"]  # fmt: skip
UAS = ["openai-python/1.58.1", "OpenAI/NodeJS/4.77.0", "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
       "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1) Mobile Safari", "python-requests/2.32.3", "curl/8.11.0"]  # fmt: skip


def _task(r: random.Random) -> str:
    """A payload from one of several capabilities (the campaigns sweep them)."""
    k = r.randrange(6)
    if k == 0:
        return f"A train leaves at {r.randint(1, 12)}:{r.randint(10, 59)} going {r.randint(40, 120)} km/h; another "\
               f"leaves {r.randint(1, 5)} h later at {r.randint(60, 160)} km/h. When does it catch up?"
    if k == 1:
        v = r.choice("xyzw")
        return f"def f({v}):\n    s = 0\n    for i in range({r.randint(2, 9)}):\n        s += {v} * i\n    return s\n"\
               f"print(f({r.randint(1, 30)}))"
    if k == 2:
        return json.dumps({"order": r.randint(1000, 9999), "items": [r.randint(1, 9) for _ in range(3)],
                           "coupon": r.choice(["A1", "B2", None])}) + " -> compute the total"  # fmt: skip
    if k == 3:
        return "Invert the word order: " + " ".join(r.choice(["sol", "luna", "mar", "rio", "cielo", "tierra"])
                                                    for _ in range(r.randint(4, 8)))  # fmt: skip
    if k == 4:
        return f"Is {r.randint(1000, 99999)} prime? Factor it otherwise."
    return f"Summarise in one sentence: {r.choice(DO['en'])}, {r.choice(DO['en'])} and {r.choice(DO['en'])}."


class Log:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.rows: list[dict] = []
        self.labels: list[dict] = []
        self.n = 0

    def account(self, label: str, kind: str) -> str:
        self.n += 1
        a = f"u{self.r.getrandbits(40):010x}"
        self.labels.append({"account_id": a, "label": label, "kind": kind})
        return a

    def human_t(self, days: float, offset_h: float) -> float:
        """Afternoon/evening-heavy local time for a person."""
        d = self.r.randrange(int(days))
        h = (self.r.gauss(15, 4) + offset_h) % 24
        return T0 + d * DAY + h * 3600 + self.r.random() * 60

    def add(self, acct: str, t: float, prompt: str, **kw) -> None:
        r = self.r
        row = {"ts": round(t, 3), "account_id": acct, "api_key_id": acct.replace("u", "k", 1),
               "model": kw.pop("model", "m-large"), "prompt": prompt, "n_messages": kw.pop("n_messages", 1),
               "status": 200, "completion_tokens": int(math.exp(r.gauss(kw.pop("out_mu", 5.0), 0.5)))}  # fmt: skip
        row |= kw
        self.rows.append(row)


def generate(out: Path, seed: int, n_people: int = 2400, days: int = 5) -> dict:
    g = Log(seed)
    r = g.r
    net = lambda: f"{r.randint(11, 200)}.{r.randint(0, 255)}.{r.randint(0, 255)}"  # noqa: E731
    # Ordinary people: sessions of a few turns, their own language, a few like step-by-step, a few use logprobs.
    for _ in range(n_people):
        a = g.account("benign", "person")
        lang = r.choices(list(ASK), [0.55, 0.2, 0.15, 0.1])[0]
        rate, off = math.exp(r.gauss(0.8, 1.2)), r.uniform(-6, 6)
        stepper, lp = r.random() < 0.08, r.random() < 0.02
        ip, ua, card = net() + f".{r.randint(2, 250)}", r.choice(UAS), f"card_{r.getrandbits(32):x}"
        for _ in range(max(1, int(rate * days))):
            t = g.human_t(days, off)
            text = r.choice(ASK[lang]).format(v=r.choice(DO[lang])) + (STEP[lang] if stepper and r.random() < .4
                                                                       else "")  # fmt: skip
            for turn in range(1 if r.random() < 0.5 else r.randint(2, 5)):
                g.add(a, t + 90 * turn, text if turn == 0 else r.choice(FOLLOW), n_messages=1 + 2 * turn, ip=ip,
                      user_agent=ua, payment_fp=card, logprobs_requested=lp,
                      out_mu=5.9 if stepper and turn == 0 else 5.0)  # fmt: skip
    # Benign coordination: an ETL org, a benchmarking lab, a course, an agent product (each several accounts).
    for o in range(6):
        wrap = r.choice(["Extrahiere Rechnungsnummer, Datum und Betrag als JSON aus folgendem Beleg:",
                         "Label the intent of this chat transcript (refund/cancel/other), one word:",
                         "Mask every personal name and phone number in the text below and return it:"])  # fmt: skip
        card, ip, pace = f"corp_{o}", net(), r.uniform(60, 200)
        for _ in range(r.randint(8, 15)):
            a = g.account("benign", "etl_org")
            n = int(pace * days)
            for i in range(n):
                body = f"#{r.randint(10**5, 10**6)} {r.choice(DO['de'])} {r.choice(DO['en'])} {r.randint(1, 999)} EUR"
                g.add(a, T0 + (i + r.random() * 0.2) / n * days * DAY, f"{wrap} {body}", ip=f"{ip}.{r.randint(2, 9)}",
                      user_agent="etl-runner/3.2", payment_fp=card, system_prompt_hash=f"sys_etl_{o}", temperature=0.0,
                      max_tokens=200, out_mu=3.5)  # fmt: skip
    for lab in range(4):
        items = [f"Q{j}. Which option is correct?\n(a) {r.choice(DO['en'])}\n(b) {r.choice(DO['en'])}\n"
                 f"(c) {r.choice(DO['fr'])}\nAnswer:" for j in range(150)]  # fmt: skip
        items += [f"Problem {j}: {r.randint(2, 99)} * {r.randint(2, 99)} - {r.randint(2, 99)} = ? Final answer only."
                  for j in range(150)]  # fmt: skip
        keys = [g.account("benign", "bench_lab") for _ in range(r.randint(5, 10))]
        lp, ip = r.random() < 0.5, net()
        for _ in range(r.randint(3, 5)):
            start = T0 + r.uniform(0, days - 0.5) * DAY
            for j, it in enumerate(items):
                g.add(keys[j % len(keys)], start + j * 7 + r.random(), it, ip=f"{ip}.5", user_agent="harness/1.0",
                      payment_fp=f"lab_{lab}", logprobs_requested=lp, temperature=0.0, max_tokens=8, out_mu=1.5)
    for c in range(6):
        sheet = [f"Worksheet {c}, exercise {q}: " + r.choice(DO["en"]) + f" using {r.randint(2, 9)} examples"
                 for q in range(5)]  # fmt: skip
        due = T0 + r.uniform(2, days) * DAY
        for _ in range(r.randint(20, 35)):
            a = g.account("benign", "course")
            ua, card, ip = r.choice(UAS), f"card_{r.getrandbits(32):x}", net() + ".77"
            for _ in range(r.randint(2, 10)):
                t = due - r.expovariate(1 / (8 * 3600))
                q = r.choice(sheet) + (" Explain step by step." if r.random() < 0.3 else "")
                for turn in range(r.randint(1, 4)):
                    g.add(a, t + 120 * turn, q if turn == 0 else r.choice(FOLLOW), n_messages=1 + 2 * turn, ip=ip,
                          user_agent=ua, payment_fp=card)  # fmt: skip
    for p in range(4):
        card, ip = f"saas_{p}", net()
        for _ in range(r.randint(5, 10)):
            a = g.account("benign", "copilot")
            for _ in range(int(r.uniform(20, 60) * days)):
                t = g.human_t(days, 0)
                g.add(a, t, "Agent task from user: " + r.choice(DO["en"]), n_messages=2, ip=f"{ip}.9",
                      user_agent="copilot-sdk/0.9", payment_fp=card, system_prompt_hash=f"sys_copilot_{p}")
                for s in range(r.randint(1, 6)):
                    g.add(a, t + 5 * (s + 1), f'Function returned: {{"ok": true, "value": {r.randint(0, 500)}}}',
                          n_messages=4 + 2 * s, ip=f"{ip}.9", user_agent="copilot-sdk/0.9", payment_fp=card,
                          system_prompt_hash=f"sys_copilot_{p}", out_mu=4.0)  # fmt: skip
    # Campaigns, each its own style.
    styles = {
        "trace_farm": (20, 120, ["Razona paso a paso y muestra todo tu razonamiento antes de responder:",
                                 "Think aloud in full detail, every intermediate step, then answer:"], 5, "dc", 0.0),
        "sweeper": (40, 150, ["Respond as a domain expert. Give the answer, then the complete derivation:"], 1, "dc",
                    1.0),
        "resold": (150, 30, ["Résous ce problème en détaillant ton raisonnement :",
                             "Detailed solution with all working shown please:"], 1, "proxy", 0.0),
        "trickle": (100, 20, ["Document each inference you make, then conclude. Input:",
                              "Lay out your thought process in full before the verdict. Case:"], 1, "home", 0.5),
    }  # fmt: skip
    for name, (n_acc, rate, wraps, per_card, ipk, lp_share) in styles.items():
        block = net()
        for i in range(n_acc):
            a = g.account(name, name)
            card = f"op_{name}_{i // per_card}"
            lp = r.random() < lp_share
            ip = f"{block}.{r.randint(2, 250)}" if ipk == "dc" else None
            for _ in range(int(rate * days * r.uniform(0.7, 1.3))):
                if name == "resold" and r.random() < 0.5:  # resold ordinary traffic
                    g.add(a, g.human_t(days, 0), r.choice(ASK["en"]).format(v=r.choice(DO["en"])),
                          ip=net() + ".3", user_agent=r.choice(UAS[:2]), payment_fp=card)  # fmt: skip
                    continue
                if name == "trace_farm":  # waves every 3 h
                    t = T0 + r.randrange(int(days * 8)) * 3 * 3600 + r.random() * 300
                else:
                    t = T0 + r.random() * days * DAY
                g.add(a, t, f"{r.choice(wraps)} {_task(r)}", ip=ip or (net() + ".8"), payment_fp=card,
                      user_agent=r.choice(UAS[:2]), logprobs_requested=lp, max_tokens=4000, out_mu=6.4)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    for row in g.rows:
        row.setdefault("logprobs_requested", False)
    rows = sorted(g.rows, key=lambda x: x["ts"])
    pq.write_table(pa.Table.from_pylist(rows), out / "access.parquet")
    with open(out / "labels.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in g.labels)
    kinds: dict[str, int] = {}
    for x in g.labels:
        kinds[x["kind"]] = kinds.get(x["kind"], 0) + 1
    return {"events": len(rows), "accounts": g.n, "kinds": kinds, "log": str(out / "access.parquet"),
            "labels": str(out / "labels.jsonl")}  # fmt: skip
