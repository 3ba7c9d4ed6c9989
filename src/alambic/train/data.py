"""Interactions → training tensors: chat template, prompt masking, teacher top-k as student token ids, packing.

An interaction (DESIGN.md) holds the prompt messages, the teacher's completion text and, optionally, per
completion token the sampled token's string, its logprob and the top-k alternatives as (string, logprob). Here:

- each record becomes token ids through the student tokenizer's chat template, with every prompt token's label
  masked (-100), as the teacher stage does (`teacher.encode`);
- stored top-k logprobs become compact arrays aligned with the completion tokens: ids int32 and logprobs float16,
  K = k + 1 slots per token (the top-k plus the sampled token when it fell outside them). Token strings are mapped
  to ids through a table built from the tokenizer itself (the same strings `alambic serve` writes), and the
  record's tokens must re-tokenize to the same ids, else the teacher's tokenizer is not the student's and only
  `sft` applies;
- a slot a position does not use holds logprob -inf (an empty bucket, see `losses.topk_buckets`);
- the split into train / validation is by a hash of the record id, so it does not depend on file order;
- packing concatenates examples into rows of `max_len` tokens with position ids restarting at each example,
  which transformers turns into a block-diagonal causal mask (no attention across examples) — but only when the
  forward pass builds no KV cache, so every forward pass over a batch goes through `model_inputs`, and the
  trainer checks isolation numerically on the model it trains (`check_isolation`) before it packs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..records import read_jsonl
from ..serve import TokenText
from ..teacher import encode

log = logging.getLogger(__name__)

IGNORE = -100  # label of a position that does not count (prompt, padding)
NESTED = ("prompt", "logprobs", "teacher", "usage", "meta")  # Parquet stores these as JSON strings


class TokenizerMismatch(ValueError):
    """The teacher's tokens are not the student's: logit losses cannot be aligned; `sft` still works."""


# --- reading ---------------------------------------------------------------------------------------------------------


def read_interactions(paths: list[str]) -> tuple[list[dict], dict[str, str]]:
    """All records of the given JSONL / Parquet files, and each file's sha256 (for the manifest)."""
    records: list[dict] = []
    hashes: dict[str, str] = {}
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"interactions file {str(p)!r} not found; give the output of `alambic collect`")
        hashes[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(p).to_pylist()
            rows = [
                {k: (json.loads(v) if k in NESTED and isinstance(v, str) else v) for k, v in r.items()} for r in rows
            ]
        elif p.suffix in (".jsonl", ".json"):
            rows = list(read_jsonl(p))
        else:
            raise ValueError(f"interactions file {str(p)!r}: unknown format {p.suffix!r}; use .jsonl or .parquet")
        for i, r in enumerate(rows):
            if not isinstance(r.get("prompt"), list) or not isinstance(r.get("completion"), str):
                raise ValueError(
                    f"{p}: record {i + 1} has no `prompt` (chat messages) or `completion` (text); "
                    "is this an interactions file from `alambic collect`?"
                )
        records += rows
    if not records:
        raise ValueError(f"no interactions in {', '.join(paths)}")
    return records, hashes


def split(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train / validation split by a hash of (seed, record id): file order does not matter."""

    def bucket(r: dict) -> float:
        key = f"{seed}:{r.get('id') or json.dumps([r['prompt'], r['completion']])}"
        return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    train = [r for r in records if bucket(r) >= val_fraction]
    val = [r for r in records if bucket(r) < val_fraction]
    if val_fraction > 0 and not val and len(train) > 1:
        val = [train.pop()]  # a tiny data set still gets a validation example
    return train, val


# --- tokens ----------------------------------------------------------------------------------------------------------


def token_table(tokenizer) -> dict[str, int]:
    """Token string → id, with the strings `alambic serve` (and OpenAI) report. Strings that several ids share
    (e.g. the replacement character for partial UTF-8 bytes) map to -1: such an alternative is left out of the
    top-k, which moves its mass to the tail bucket."""
    text = TokenText(tokenizer)
    table: dict[str, int] = {}
    for i in range(len(tokenizer)):
        s = text(i)[0]
        table[s] = -1 if s in table else i
    return table


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids to the same strings (padding of the embedding matrix aside)."""
    return a.get_vocab() == b.get_vocab()


def align_vocab(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate two logit tensors (..., V_s), (..., V_t) of the same tokenizer to the shared vocabulary size.

    Checkpoints often pad the embedding matrix past the tokenizer (151,936 vs 152,064 for Qwen2.5 sizes); the padded
    rows are never real tokens, so dropping them only renormalises over the real vocabulary.
    """
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    return student_logits[..., :v], teacher_logits[..., :v]


@dataclass
class Example:
    """One tokenized interaction. `top_*` rows align with the completion tokens ids[prompt_len:]."""

    ids: list[int]
    prompt_len: int
    top_ids: np.ndarray | None = None  # (n_completion, K) int32
    top_lp: np.ndarray | None = None  # (n_completion, K) float16; -inf marks an unused slot
    meta: dict = field(default_factory=dict)


def encode_record(tokenizer, record: dict, table: dict[str, int] | None, k: int | None, max_len: int) -> Example:
    """Tokenize one interaction; with `table`, also map its stored top-k logprobs to token ids.

    With logprobs, the completion is the teacher's own tokens (mapped to ids), not a re-tokenization of its text:
    the text drops special tokens a teacher may sample, and a sampled split of a word need not be the canonical
    one. They must agree with the re-tokenized text, special tokens aside, or the tokenizers differ.
    """
    ids, labels = encode(tokenizer, record["prompt"], record["completion"])
    prompt_len = sum(1 for y in labels if y == IGNORE)
    meta = record.get("meta") or {}
    if table is None:
        return Example(ids=ids[:max_len], prompt_len=min(prompt_len, max_len), meta=meta)
    lps = record.get("logprobs") or []
    if not lps and record["completion"]:  # an empty answer rightly has none
        raise ValueError(
            f"record {record.get('id')!r} has no logprobs; collect with --top-logprobs K, use a local "
            "--teacher for logit losses, or use --loss sft"
        )
    empty = encode(tokenizer, record["prompt"], "")[0]
    suffix = empty[prompt_len:]  # what the template puts after a reply (the end-of-turn token, ...)
    text_ids = ids[prompt_len : len(ids) - len(suffix)]
    chosen = [table.get(t["token"], -2) for t in lps]
    # A string several ids share (a partial UTF-8 byte) is resolved by the re-tokenized text at that position.
    chosen = [text_ids[i] if c == -1 and i < len(text_ids) else c for i, c in enumerate(chosen)]
    special = set(tokenizer.all_special_ids)
    plain = [c for c in chosen if c not in special]
    n = min(len(plain), len(text_ids))
    if any(c < 0 for c in chosen) or plain[:n] != text_ids[:n] or (n == 0 and text_ids):
        raise TokenizerMismatch(
            f"record {record.get('id')!r}: the teacher's tokens are not the student's tokens of the same text (the "
            "teacher's tokenizer differs from the student's), so its logprobs cannot be aligned; use --loss sft"
        )
    completion = chosen + suffix
    k = k or max((len(t.get("top") or []) for t in lps), default=1)
    top_ids = np.zeros((len(completion), k + 1), np.int32)
    top_lp = np.full((len(completion), k + 1), -np.inf, np.float32)
    for i, tok in enumerate(completion):
        if i < len(lps):
            alts = sorted(((lp, table.get(s, -1)) for s, lp in lps[i].get("top") or []), reverse=True)[:k]
            alts = [(lp, j) for lp, j in alts if j >= 0]
            if tok not in (j for _, j in alts):
                alts.append((lps[i]["logprob"], tok))  # the sampled token's own logprob is known: keep it
        else:
            # The template's closing tokens. The teacher chose to stop there (that logprob is not reported), so the
            # end of turn is given as certain.
            alts = [(0.0, tok)]
        used: list[int] = []
        for lp, j in alts:
            if j not in used:
                top_ids[i, len(used)], top_lp[i, len(used)] = j, lp
                used.append(j)
        top_ids[i, len(used) :] = used[0]  # unused slots repeat a real id, so the tail's scatter stays exact
    ids = (empty[:prompt_len] + completion)[:max_len]
    keep = len(ids) - min(prompt_len, max_len)
    return Example(
        ids=ids,
        prompt_len=min(prompt_len, max_len),
        top_ids=top_ids[:keep],
        top_lp=top_lp[:keep].astype(np.float16),
        meta=meta,
    )


def encode_all(
    tokenizer, records: list[dict], table: dict[str, int] | None, k: int | None, max_len: int
) -> list[Example]:
    """Every record tokenized; with `table`, top-k arrays of one width: `k`, else the largest k stored."""
    if table is not None and not k:
        k = max((len(t.get("top") or []) for r in records for t in r.get("logprobs") or []), default=0)
    out = [encode_record(tokenizer, r, table, k, max_len) for r in records]
    return [e for e in out if len(e.ids) > e.prompt_len]  # a prompt longer than max_len leaves nothing to learn


def topk_bytes_per_token(examples: list[Example]) -> float:
    """Bytes of stored teacher signal per completion token (ids + logprobs)."""
    n = sum(e.top_ids.shape[0] for e in examples if e.top_ids is not None)
    b = sum(e.top_ids.nbytes + e.top_lp.nbytes for e in examples if e.top_ids is not None)
    return b / max(n, 1)


# --- batches ---------------------------------------------------------------------------------------------------------


def pack(examples: list[Example], max_len: int) -> list[list[int]]:
    """Greedy first-fit packing of example indices into rows of at most `max_len` tokens (longest first)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].ids)):
        n = len(examples[i].ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
    return rows


def collate(examples: list[Example], rows: list[list[int]], pad_id: int, with_topk: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors for rows of one or more (packed) examples.

    input_ids, labels, attention_mask (B, T) long; with packed rows also position_ids (B, T), restarting at each
    example; top_ids (B, T, K) long and top_lp (B, T, K) float32, aligned with labels (prompt: -inf).
    """
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, width), dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    if with_topk:
        kk = examples[rows[0][0]].top_ids.shape[1]
        top_ids = torch.zeros((b, width, kk), dtype=torch.long)
        top_lp = torch.full((b, width, kk), float("-inf"))
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e.ids)
            ids[r, at : at + n] = torch.tensor(e.ids)
            labels[r, at + e.prompt_len : at + n] = torch.tensor(e.ids[e.prompt_len :])
            pos[r, at : at + n] = torch.arange(n)
            attn[r, at : at + n] = 1
            if with_topk:
                top_ids[r, at + e.prompt_len : at + n] = torch.from_numpy(e.top_ids.astype(np.int64))
                top_lp[r, at + e.prompt_len : at + n] = torch.from_numpy(e.top_lp.astype(np.float32))
            at += n
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    if any(len(row) > 1 for row in rows):
        # The model gets position ids and no attention mask (see `model_inputs`): transformers then masks attention
        # between packed examples. Padding (at the end of a row) keeps counting up, so it never starts a new example.
        pos[attn == 0] = torch.arange(width).expand(b, -1)[attn == 0]
        batch["position_ids"] = pos
    if with_topk:
        batch["top_ids"], batch["top_lp"] = top_ids, top_lp
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | bool]:
    """The keyword arguments of a training-style forward pass over `batch` (student, local teacher, validation).

    Packed rows get position ids, no attention mask and `use_cache=False`. transformers (5.24,
    `masking_utils._preprocess_mask_arguments`) derives the block-diagonal mask from position ids only when the
    attention mask is None *and* no KV cache exists, and a model whose config says `use_cache: true` builds a cache
    on every forward pass, training included: without `use_cache=False`, a packed example attends to the examples
    before it in its row (measured on the demo teacher: logits off by up to 15.7).
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def segments(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """The examples of a batch as (row, start, length): one per row, or one per example of a packed row (where
    its position ids restart at 0); padding (at each row's end) belongs to none."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    starts = (batch["position_ids"] == 0) if "position_ids" in batch else None
    out = []
    for r, n in enumerate(lengths):
        at = [0] if starts is None else starts[r, :n].nonzero().flatten().tolist()
        out += [(r, a, b - a) for a, b in zip(at, at[1:] + [n], strict=True)]
    return out


@torch.no_grad()
def check_isolation(model, examples: list[Example], pad_id: int, tol: float = 1e-3) -> float:
    """Raise unless the logits of examples packed in one row equal those of each example alone (max |diff|).

    Packing trusts the model class to honour restarting position ids; this checks the promise on the model
    actually being trained, so an architecture that ignores them fails here instead of training on leaked
    attention. Returns the largest difference seen.
    """
    picked = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))[:3]  # the shortest: cheap
    if len(picked) < 2:
        return 0.0
    was_training = model.training
    model.eval()  # dropout off: train mode with dropout would differ between any two passes
    try:
        packed = collate(examples, [picked], pad_id, with_topk=False)
        logits = model(**model_inputs(packed)).logits[0]  # (T, V)
        worst, at = 0.0, 0
        for i in picked:
            alone = collate(examples, [[i]], pad_id, with_topk=False)
            ref = model(**model_inputs(alone)).logits[0]  # (n, V)
            n = len(examples[i].ids)
            worst = max(worst, float((logits[at : at + n] - ref[:n]).abs().max()))
            at += n
    finally:
        model.train(was_training)
    if worst > tol:
        raise RuntimeError(
            f"packed examples are not isolated in {type(model).__name__}: their logits differ from the same examples "
            f"alone by {worst:.3g}, so attention leaks across examples in a row; train without --packing"
        )
    return worst


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler of a run's whole schedule: the rows of step s depend only on (seed, s), so a resumed run
    (which starts at its checkpoint's step) sees exactly the batches the killed run would have seen."""

    def __init__(self, n_rows: int, batch_size: int, steps: int, start: int, seed: int, accum: int = 1) -> None:
        self.n, self.bs, self.steps, self.start, self.seed, self.accum = n_rows, batch_size, steps, start, seed, accum
        self.batch_size, self.drop_last = batch_size, True  # what accelerate reads to split batches across processes

    def _epoch(self, e: int) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1_000_003 + e).shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = max(1, self.n // self.bs)  # a short last batch is dropped: every step has the same size
        for micro in range(self.start * self.accum, self.steps * self.accum):
            e, j = divmod(micro, per_epoch)
            order = self._epoch(e)
            yield [order[(j * self.bs + t) % self.n] for t in range(self.bs)]

    def __len__(self) -> int:
        return (self.steps - self.start) * self.accum


class RowDataset(torch.utils.data.Dataset):
    """Index → one row (a list of example indices); the DataLoader's collate_fn builds the tensors."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return self.rows[i]


def rows_for(examples: list[Example], max_len: int, packing: bool) -> list[list[int]]:
    return pack(examples, max_len) if packing else [[i] for i in range(len(examples))]
