"""Green-list watermark (Kirchenbauer et al., "A Watermark for Large Language Models", ICML 2023): mark and score.

Marking: at each step the `context_width` tokens before the next one select, through a keyed hash, a "green" share
`gamma` of the vocabulary; `delta` is added to the green tokens' logits before sampling (or greedy choice). Scoring:
count green tokens in a text; without the key a text is green at rate `gamma`, so an exact binomial test says how
surprising the count is.

Membership is decided on the CPU, identically on any machine and device: HMAC-SHA256(key, context ids) gives a
64-bit seed; numpy's PCG64 seeded with it draws one uniform number per vocabulary entry, and token t is green when
its draw is below `gamma`. Independent draws per token (rather than a permutation with exactly gamma*V greens) make
every distinct (context, token) pair green with probability exactly `gamma` and independently of the others when
the text does not depend on the key, which is what makes the binomial p-value exact once repeated pairs are removed
(Fernandez et al., "Three Bricks to Consolidate Watermarks for LLMs", WIFS 2023). Draw t does not depend on how many
are drawn, so a model whose logits are wider than its tokenizer gets the same green lists.

Read top to bottom: the key file, `Watermark` (the green lists and the logit bias), the scorer (windows,
de-duplication, exclusions, the binomial test), and the `guard watermark` verbs (`keygen`, `score`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from scipy.stats import binom

from ..config import Config

DOMAIN = b"alambic-watermark-v1"  # domain separation: the key is never used by any other HMAC

# Defaults from the measurements in docs/watermark.md: delta 2 costs the demo teacher ~2 points of held-out accuracy
# (delta 4: ~13); with the demo's 104-token vocabulary, k=1 keeps the windows few enough for a small student to learn
# their green lists (students of a sampled tiny teacher were detected at p < 1e-18 with 50% watermarked data).
DEFAULT_CONTEXT_WIDTH = 1
DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0


# --- the key file ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatermarkParams:
    """The public settings of a watermark; the key is kept apart so that these can be logged and reported."""

    context_width: int = DEFAULT_CONTEXT_WIDTH
    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        if not (isinstance(self.context_width, int) and 1 <= self.context_width <= 16):
            raise ValueError(f"watermark context_width must be an integer in [1, 16], got {self.context_width!r}")
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma (green fraction) must lie in (0, 1), got {self.gamma!r}")
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise ValueError(f"watermark delta (logit bias) must be a finite number >= 0, got {self.delta!r}")


def fingerprint(key: bytes) -> str:
    """A public name for a key (for manifests and logs), from which the key cannot be recovered."""
    return "wm_" + hashlib.sha256(DOMAIN + b"/fingerprint/" + key).hexdigest()[:12]


def load_key(path: str | Path) -> tuple[bytes, WatermarkParams]:
    """Read a watermark key file: JSON {key, context_width, gamma, delta} (as `guard watermark keygen` writes), or a
    text file whose first non-empty line is the key (default settings). The key is a secret string, >= 16 chars."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"watermark key file {str(p)!r} not found; make one with `alambic guard watermark "
                                "keygen --out FILE`")
    text = p.read_text().strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"watermark key file {str(p)!r} is not valid JSON: {e}") from None
        unknown = set(data) - {"key", "context_width", "gamma", "delta"}
        if unknown:
            raise ValueError(f"watermark key file {str(p)!r}: unknown fields {sorted(unknown)}; known: key, "
                             "context_width, gamma, delta")
        key = data.pop("key", None)
        params = WatermarkParams(**data)
    else:
        key, params = (text.splitlines() or [""])[0].strip(), WatermarkParams()
    if not isinstance(key, str) or len(key) < 16:
        raise ValueError(f"watermark key file {str(p)!r}: the key must be a string of at least 16 characters (e.g. "
                         "64 hex digits from `alambic guard watermark keygen`)")
    return key.encode(), params


def write_key(path: str | Path, params: WatermarkParams | None = None, key: str | None = None) -> str:
    """Write a new key file (mode 600) with a random 256-bit key; returns its fingerprint."""
    p = Path(path)
    if p.exists():
        raise ValueError(f"{str(p)!r} exists; a key file is never overwritten (delete it or choose another --out)")
    key = key or secrets.token_hex(32)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.touch(mode=0o600)
    p.write_text(json.dumps({"key": key, **asdict(params or WatermarkParams())}) + "\n")
    return fingerprint(key.encode())


# --- the green lists -------------------------------------------------------------------------------------------------


class Watermark:
    """Green lists for one key: `green(context)` is a bool mask over the vocabulary, cached per context."""

    def __init__(self, key: bytes, params: WatermarkParams, vocab_size: int, cache_size: int = 65536) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self._key = key
        self.params = params
        self.vocab_size = vocab_size
        self.fingerprint = fingerprint(key)
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def __repr__(self) -> str:  # never the key
        return f"Watermark({self.fingerprint}, {self.params}, vocab_size={self.vocab_size})"

    @classmethod
    def from_file(cls, path: str | Path, vocab_size: int) -> Watermark:
        key, params = load_key(path)
        return cls(key, params, vocab_size)

    def seed(self, context: Sequence[int]) -> int:
        msg = DOMAIN + struct.pack(f"<{len(context)}q", *context)
        return int.from_bytes(hmac.new(self._key, msg, hashlib.sha256).digest()[:8], "little")

    def green(self, context: Sequence[int]) -> np.ndarray:
        """(V,) bool: the green tokens after `context` (its last `context_width` tokens)."""
        ctx = tuple(context[-self.params.context_width :])
        mask = self._cache.get(ctx)
        if mask is None:
            rng = np.random.Generator(np.random.PCG64(self.seed(ctx)))
            mask = rng.random(self.vocab_size) < self.params.gamma
            self._cache[ctx] = mask
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(ctx)
        return mask

    def bias(self, contexts: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        """(B, width) float: `delta` on each row's green tokens, 0 elsewhere and for rows whose context is shorter
        than `context_width` (the first tokens of a text are never marked, and never scored)."""
        k = self.params.context_width
        out = torch.zeros((len(contexts), width))
        for b, ctx in enumerate(contexts):
            if len(ctx) >= k:
                mask = self.green(ctx)[:width]
                out[b, : len(mask)] = torch.from_numpy(mask.astype(np.float32)) * self.params.delta
        return out


# --- scoring ---------------------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The (context, token) pairs a test counts, and how many positions each rule removed."""

    pairs: list[tuple[tuple[int, ...], int]] = field(default_factory=list)
    positions: int = 0  # completion tokens with a full context window
    duplicates: int = 0  # repeats of a pair already counted
    in_prompt: int = 0  # windows (context + token) that occur in the sequence's own prompt
    filtered: int = 0  # contexts not seen in the reference (watermarked) data

    def counts(self) -> dict[str, int]:
        return {"positions": self.positions, "scored": len(self.pairs), "duplicates": self.duplicates,
                "in_prompt": self.in_prompt, "filtered": self.filtered}


def windows(ids: Sequence[int], k: int, start: int = 0) -> Iterable[tuple[tuple[int, ...], int]]:
    """(context, token) for each position >= max(start, k) of `ids`."""
    for i in range(max(start, k), len(ids)):
        yield tuple(ids[i - k : i]), ids[i]


def select(
    sequences: Iterable[tuple[Sequence[int], int]],
    k: int,
    dedup: bool = True,
    exclude_prompt: bool = True,
    contexts: set[tuple[int, ...]] | None = None,
) -> Selection:
    """Pick the pairs to score from (ids, completion start) sequences: prompt + completion token ids.

    - `dedup`: count each (context, token) pair once over all sequences. A text repeating itself (or many texts
      sharing a template) would otherwise count the same coin flip again and again, and the binomial test, which
      assumes independent flips, would give tiny p-values to unwatermarked text (Fernandez et al., 2023).
    - `exclude_prompt`: skip windows found in the sequence's own prompt: a model that copies watermarked text it
      was shown reproduces the watermark without having learned it (Sander et al., NeurIPS 2024).
    - `contexts`: score only windows whose context occurs in this set, e.g. those of our watermarked data that a
      suspect may have trained on (Sander et al.'s filter): where the suspect never saw our text it cannot
      have learned our green lists, so those tokens only dilute the signal.
    """
    sel = Selection()
    seen: set[tuple[tuple[int, ...], int]] = set()
    for ids, start in sequences:
        prompt_windows = set(windows(ids[:start], k)) if exclude_prompt else set()
        for pair in windows(ids, k, start):
            sel.positions += 1
            if pair in prompt_windows:
                sel.in_prompt += 1
            elif contexts is not None and pair[0] not in contexts:
                sel.filtered += 1
            elif dedup and pair in seen:
                sel.duplicates += 1
            else:
                seen.add(pair)
                sel.pairs.append(pair)
    return sel


def green_mask(wm: Watermark, pairs: Sequence[tuple[tuple[int, ...], int]]) -> np.ndarray:
    """(len(pairs),) bool: whether each pair's token is green after its context (ids past the vocabulary: never)."""
    return np.fromiter((tok < wm.vocab_size and bool(wm.green(ctx)[tok]) for ctx, tok in pairs), dtype=bool,
                       count=len(pairs))


def green_count(wm: Watermark, pairs: Sequence[tuple[tuple[int, ...], int]]) -> int:
    return int(green_mask(wm, pairs).sum())


def binomial_test(green: int, n: int, gamma: float) -> dict[str, float]:
    """z-score and exact one-sided p-value P[X >= green] for X ~ Binomial(n, gamma)."""
    if n == 0:
        return {"z": 0.0, "p_value": 1.0}
    z = (green - gamma * n) / math.sqrt(n * gamma * (1 - gamma))
    return {"z": round(z, 4), "p_value": float(binom.sf(green - 1, n, gamma))}


def score_pairs(wm: Watermark, sel: Selection) -> dict:
    green = green_count(wm, sel.pairs)
    n = len(sel.pairs)
    return {"tokens_scored": n, "green": green, "green_fraction": round(green / n, 4) if n else None,
            "gamma": wm.params.gamma, **binomial_test(green, n, wm.params.gamma), **sel.counts()}


def p_by_tokens(wm: Watermark, sel: Selection, first: int = 16) -> list[dict]:
    """The p-value after the first 16, 32, 64, … scored pairs and after all of them: how much a suspect must write
    before the evidence is strong (the x-axis of Sander et al.'s radioactivity plots)."""
    hits = np.cumsum(green_mask(wm, sel.pairs))
    sizes, m = [], first
    while m < len(hits):
        sizes.append(m)
        m *= 2
    sizes += [len(hits)] if len(hits) else []
    return [{"tokens_scored": m, "p_value": binomial_test(int(hits[m - 1]), m, wm.params.gamma)["p_value"]}
            for m in sizes]


def random_keys(n: int, seed: int = 0) -> list[bytes]:
    """`n` keys for the null check, reproducible from `seed` (they only need to be independent of the text)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [rng.bytes(32).hex().encode() for _ in range(n)]


# --- inputs: texts and interactions ----------------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[tuple[list[dict] | None, str]]:
    """(prompt messages or None, text) per document: a .jsonl of interactions (`prompt`, `completion`) or of
    {"text": ...} lines, else a plain text file read as one document."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input {str(p)!r} not found; give a text file or a JSONL of interactions")
    if p.suffix != ".jsonl":
        return [(None, p.read_text())]
    docs = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(p)!r} line {i} is not valid JSON: {e}") from None
        text = obj.get("completion", obj.get("text")) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{str(p)!r} line {i}: needs a string `completion` (interactions) or `text` field")
        prompt = obj.get("prompt")
        docs.append((prompt if isinstance(prompt, list) else None, text))
    return docs


def encode(tokenizer, docs: Sequence[tuple[list[dict] | None, str]]) -> list[tuple[list[int], int]]:
    """(ids, completion start) per document. A chat prompt is rendered with the tokenizer's chat template, as the
    server does, so the first tokens of a reply are scored with the context they were generated in; a bare text
    starts scoring after its first `context_width` tokens."""
    out = []
    for prompt, text in docs:
        head: list[int] = []
        if prompt:
            rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            head = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        out.append((head + tokenizer(text, add_special_tokens=False)["input_ids"], len(head)))
    return out


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    from ..modeling import resolve_model_path

    folder, gguf = resolve_model_path(path)
    return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf} if gguf else {}))


# --- the verbs -------------------------------------------------------------------------------------------------------


class KeygenConfig(Config):
    """Make a watermark key file."""

    out: str = Field(..., description="key file to write (mode 600; never overwritten)",
                     json_schema_extra={"positional": True})
    context_width: int = Field(DEFAULT_CONTEXT_WIDTH, ge=1, le=16,
                               description="tokens of context that seed the green list (k)")
    gamma: float = Field(DEFAULT_GAMMA, gt=0, lt=1, description="green fraction of the vocabulary (γ)")
    delta: float = Field(DEFAULT_DELTA, ge=0, description="logit bias added to green tokens (δ)")


def keygen(cfg: KeygenConfig) -> dict:
    params = WatermarkParams(cfg.context_width, cfg.gamma, cfg.delta)
    return {"key_file": cfg.out, "fingerprint": write_key(cfg.out, params), **asdict(params)}


class WatermarkScoreConfig(Config):
    """Is this text watermarked with our key?"""

    input: str = Field(..., description="a text file, or a .jsonl of interactions (completion, prompt) or {text}",
                       json_schema_extra={"positional": True})
    key_file: str = Field(..., description="the watermark key file the text would have been marked with")
    tokenizer: str = Field(..., description="model directory (or .gguf) whose tokenizer the watermark is defined on")
    dedup: bool = Field(True, description="count each (context, token) pair once (off: p-values are not valid)")
    exclude_prompt: bool = Field(True, description="skip windows that occur in a record's own prompt")


def score(cfg: WatermarkScoreConfig) -> dict:
    """z-score and exact binomial p-value of the input's green tokens under the key."""
    key, params = load_key(cfg.key_file)
    tokenizer = load_tokenizer(cfg.tokenizer)
    wm = Watermark(key, params, len(tokenizer))
    seqs = encode(tokenizer, read_texts(cfg.input))
    sel = select(seqs, params.context_width, cfg.dedup, cfg.exclude_prompt)
    return {"key": wm.fingerprint, **asdict(params), "documents": len(seqs), **score_pairs(wm, sel)}
