"""Distillation losses as plain functions over tensors.

Shapes: B sequences, T positions, V vocabulary, k stored top-k teacher tokens. Every loss takes the student's
logits already aligned with its targets (position t predicts token t+1 of the sequence: the caller shifts) and a
boolean `mask` (B, T) of the positions that count (completion tokens; prompt and padding are False).
Reduction: the mean over masked positions, so a loss does not grow with sequence length or padding.

Teacher signal, by what the teacher exposes (`collect` records it as the capability):
- text only → `sft` on the teacher's tokens;
- full logits (a local teacher) → `forward_kl`, `reverse_kl`, `jsd` on (B, T, V) teacher logits;
- top-k logprobs (an API teacher, k ≤ 20) → the same divergences, with the teacher's leftover mass (the tail) treated
  one of two ways (`tail`):
  - "spread" (the default): the tail spread evenly over the V − k tokens outside the top-k: the maximum-entropy
    teacher consistent with what was stored. It keeps what is known of the teacher's tail: no token outside the
    top-k is more likely than the k-th. Costs one (B, T, V) tensor, the size of the student's logits.
  - "bucket": k + 1 buckets, the k tokens plus one tail bucket, for both teacher and student; nothing
    vocabulary-sized is built for the teacher. The student may then put the whole tail on any one token: where the
    teacher is spread thin (on the demo's `naming` prompts its top-5 hold 22% of the mass), a student trained this
    way gave end-of-sequence 8% (the teacher 0.05%), more than any letter, and greedy decoding stopped mid-word.
  With k = V the tail is empty and both equal the full-logit loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
TAIL_FLOOR = 1e-10  # smallest probability given to a top-k tail bucket


def masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, T) values over True positions of `mask` (0 when nothing is masked in)."""
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dim, from log-probabilities; terms where p = 0 contribute 0. (..., K) -> (...)"""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def divergence(kind: str, log_t: Tensor, log_s: Tensor, beta: float = 0.5) -> Tensor:
    """Per-position divergence between teacher and student distributions given as log-probs (B, T, K) -> (B, T).

    - forward: KL(teacher || student), mode-covering (Hinton et al., 2015).
    - reverse: KL(student || teacher), mode-seeking (MiniLLM, Gu et al., ICLR 2024).
    - jsd: generalised Jensen–Shannon with mixture M = β·teacher + (1−β)·student,
      β·KL(teacher || M) + (1−β)·KL(student || M) (GKD, Agarwal et al., ICLR 2024). β → 0 behaves like forward
      KL and β → 1 like reverse KL after rescaling; β = 0.5 is the symmetric JSD.
    """
    if kind == "forward":
        return _kl(log_t, log_s)
    if kind == "reverse":
        return _kl(log_s, log_t)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1 (got {beta}); use forward_kl or reverse_kl for the limits")
        log_m = torch.logsumexp(
            torch.stack([log_t + torch.log(torch.tensor(beta, dtype=log_t.dtype)),
                         log_s + torch.log(torch.tensor(1 - beta, dtype=log_s.dtype))]), dim=0)
        return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)
    raise ValueError(f"unknown divergence {kind!r}; use forward, reverse or jsd")


def topk_buckets(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over k + 1 buckets: the teacher's top-k tokens and the tail.

    student_logits (B, T, V); teacher_ids (B, T, k) long; teacher_logprobs (B, T, k) log-probs of those tokens in
    the teacher's full distribution (-inf marks an unused slot). Returns (log_t, log_s), each (B, T, k + 1).
    """
    log_s_all = F.log_softmax(_upcast(student_logits), dim=-1)  # (B, T, V)
    log_t_k = teacher_logprobs.to(log_s_all.dtype)
    # A slot with teacher logprob -inf is unused (fewer than k alternatives were reported there): an empty bucket on
    # both sides. Its id must repeat one of the position's real ids, so that the tail's scatter below stays exact.
    log_s_k = log_s_all.gather(-1, teacher_ids).masked_fill(log_t_k == float("-inf"), float("-inf"))  # (B, T, k)
    # The student's tail: its mass outside the teacher's top-k, summed directly (not 1 − Σ top-k, which rounds to
    # a spurious tiny mass when k = V). Only the student side is dense: it is anyway.
    log_s_tail = torch.logsumexp(log_s_all.scatter(-1, teacher_ids, float("-inf")), -1, keepdim=True)  # (B, T, 1)
    # The teacher's tail: 1 − Σ top-k. Both tails are floored at TAIL_FLOOR so that a bucket empty on one side
    # and rounded to a tiny mass on the other cannot make a KL infinite; the floor's effect is below 1e-9.
    t_mass = torch.logsumexp(log_t_k, -1, keepdim=True).exp()  # (B, T, 1)
    log_t_tail = torch.log((1 - t_mass).clamp(min=TAIL_FLOOR))
    log_s_tail = log_s_tail.clamp(min=math.log(TAIL_FLOOR))
    return torch.cat([log_t_k, log_t_tail], -1), torch.cat([log_s_k, log_s_tail], -1)


def _spread_tail(log_t_k: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor]:
    """For stored top-k log-probs (B, T, k): which slots are used (unused ones are -inf and repeat a used id, see
    `topk_buckets`), the teacher's mass outside them (B, T), floored, and the number of tokens it spreads over."""
    used = log_t_k > float("-inf")
    rest = (1 - log_t_k.exp().sum(-1)).clamp(min=TAIL_FLOOR)
    return used, rest, (vocab - used.sum(-1)).clamp(min=1).to(log_t_k.dtype)


def topk_spread(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student log-probs over the whole vocabulary, the teacher's from its top-k: those k exact, the
    rest of its mass spread evenly over the other tokens (the maximum-entropy completion; each tail token then
    stays below the k-th, as in the teacher). Same arguments as `topk_buckets`; returns (log_t, log_s), each
    (B, T, V)."""
    log_s = F.log_softmax(_upcast(student_logits), dim=-1)  # (B, T, V)
    log_t_k = teacher_logprobs.to(log_s.dtype)
    _, rest, n_tail = _spread_tail(log_t_k, log_s.shape[-1])
    log_u = (torch.log(rest) - torch.log(n_tail)).unsqueeze(-1)  # (B, T, 1)
    # amax, not a plain scatter: an unused slot's -inf must not overwrite the used slot it shares an id with
    log_t = log_u.expand_as(log_s).scatter_reduce(-1, teacher_ids, log_t_k, reduce="amax", include_self=False)
    return log_t, log_s


def forward_kl_spread(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(teacher || student) with the spread tail, per position (B, T), in closed form: the tail's u = rest / (V - k)
    on each of its tokens gives rest·log u − u·Σ_tail log q, and Σ_tail log q is the sum over the vocabulary minus
    the top-k's; nothing vocabulary-sized is built for the teacher (equal to `divergence("forward", *topk_spread(...))`;
    on the demo's student the dense form trained at 17.1k tokens/s, this one at 20.3k, in two different runs)."""
    log_s = F.log_softmax(_upcast(student_logits), dim=-1)  # (B, T, V)
    log_t_k = teacher_logprobs.to(log_s.dtype)
    used, rest, n_tail = _spread_tail(log_t_k, log_s.shape[-1])
    log_s_k = torch.where(used, log_s.gather(-1, teacher_ids), torch.zeros_like(log_t_k))  # (B, T, k)
    head = torch.where(used, log_t_k.exp() * (log_t_k - log_s_k), torch.zeros_like(log_t_k)).sum(-1)  # (B, T)
    u = rest / n_tail
    return head + rest * torch.log(u) - u * (log_s.sum(-1) - log_s_k.sum(-1))


def _upcast(x: Tensor) -> Tensor:
    """Losses are computed in at least float32 (half-precision log-softmax loses the tail); float64 stays."""
    return x if x.dtype == torch.float64 else x.float()


def sft(student_logits: Tensor, mask: Tensor, labels: Tensor, **_) -> Tensor:
    """Sequence-level KD (Kim & Rush, 2016): cross-entropy on the teacher's sampled tokens `labels` (B, T)."""
    logp = F.log_softmax(_upcast(student_logits), dim=-1)  # (B, T, V)
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return masked_mean(nll, mask & (labels >= 0))


def _make(kind: str) -> Callable[..., Tensor]:
    def loss(student_logits: Tensor, mask: Tensor, teacher_logits: Tensor | None = None,
             teacher_ids: Tensor | None = None, teacher_logprobs: Tensor | None = None, beta: float = 0.5,
             tail: str = "spread", **_) -> Tensor:
        if teacher_logits is not None:
            if teacher_logits.shape[-1] != student_logits.shape[-1]:
                raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} != student {student_logits.shape[-1]}"
                                 "; truncate padded vocabularies first (train.data.align_vocab)")
            log_t = F.log_softmax(_upcast(teacher_logits), dim=-1)  # (B, T, V)
            log_s = F.log_softmax(_upcast(student_logits), dim=-1)
        elif teacher_ids is not None and teacher_logprobs is not None:
            if tail not in TAILS:
                raise ValueError(f"unknown top-k tail {tail!r}; use one of {', '.join(TAILS)}")
            if kind == "forward" and tail == "spread":
                return masked_mean(forward_kl_spread(student_logits, teacher_ids, teacher_logprobs), mask)
            log_t, log_s = TAILS[tail](student_logits, teacher_ids, teacher_logprobs)  # (B, T, V) or (B, T, k + 1)
        else:
            raise ValueError(f"{kind} needs teacher logits or stored top-k logprobs; a text-only teacher needs `sft`")
        return masked_mean(divergence(kind, log_t, log_s, beta), mask)

    loss.__name__ = {"forward": "forward_kl", "reverse": "reverse_kl", "jsd": "jsd"}[kind]
    loss.__doc__ = f"Masked mean of the {kind} divergence (see `divergence`), on full logits or top-k + tail."
    return loss


# how the teacher's mass outside its stored top-k is modelled (see the module docstring)
TAILS: dict[str, Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]] = {"spread": topk_spread,
                                                                              "bucket": topk_buckets}

forward_kl = _make("forward")
reverse_kl = _make("reverse")
jsd = _make("jsd")

# name -> loss(student_logits, mask, *, labels | teacher_logits | teacher_ids + teacher_logprobs, beta)
LOSSES: dict[str, Callable[..., Tensor]] = {
    "sft": sft,
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
}


# --- white-box: self-attention relations (MiniLMv2) ------------------------------------------------------------------


def relation_heads(width_s: int, width_t: int, most: int) -> int:
    """Relation heads for two projections of widths `width_s` and `width_t`: the largest count ≤ `most` that divides
    both (MiniLMv2 re-splits the concatenated heads so that student and teacher need not have the same heads)."""
    return max(r for r in range(1, most + 1) if width_s % r == 0 and width_t % r == 0)


def _relations(x: Tensor, n: int, allowed: Tensor) -> Tensor:
    """Log-softmax relation of (G, L, D) vectors split into n heads: (G, n, L, L), -inf where not `allowed`."""
    G, L, D = x.shape
    h = _upcast(x).view(G, L, n, D // n).transpose(1, 2)  # (G, n, L, d)
    scores = h @ h.transpose(-1, -2) / math.sqrt(D // n)
    return F.log_softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)


def relation_kl(student: list[Tensor], teacher: list[Tensor], segments: list[tuple[int, int, int]], most_heads: int,
                group: int = 8) -> Tensor:
    """MiniLMv2's self-attention relation loss (Wang et al., ACL Findings 2021): for each pair of (B, T, D)
    projections (the queries, keys and values of one layer, student and teacher), the KL(teacher || student)
    between their scaled dot-product relations, position by position, over the earlier positions of its own
    example. `segments` are the examples as (row, start, length) (`data.segments`). Widths may differ. Returns the
    sum over the pairs of the mean over positions and relation heads.

    The relations are computed example by example, not over whole packed rows: examples sorted by length are
    padded to the longest of each `group`, so a row of T tokens holding examples of lengths L_i costs about
    sum L_i^2 instead of T^2 (the demo's rows of 320 hold about three examples: 0.50 s -> 0.23 s of relation math
    per step on a two-core AVX2 CPU)."""
    by_length = sorted(segments, key=lambda s: s[2])
    positions = sum(length for *_, length in segments)
    B, T = student[0].shape[:2]
    device = student[0].device
    groups = []  # (index (G, L) into the B*T positions, allowed (G, L, L), valid (G, L)), shared by the pairs
    for i in range(0, len(by_length), group):
        chunk = by_length[i : i + group]
        L = chunk[-1][2]
        at = torch.arange(L, device=device)
        index = torch.stack([r * T + a + at.clamp(max=n - 1) for r, a, n in chunk])
        valid = torch.stack([at < n for *_, n in chunk])
        # causal within the example; a padding position sees itself only, so no softmax row is all -inf
        causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        groups.append((index, (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device), valid))
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        n = relation_heads(s.shape[-1], t.shape[-1], most_heads)
        flat_s, flat_t = s.reshape(B * T, -1), t.detach().reshape(B * T, -1)
        for index, allowed, valid in groups:
            log_s, log_t = _relations(flat_s[index], n, allowed), _relations(flat_t[index], n, allowed)
            p_t = log_t.exp()
            kl = torch.where(allowed[:, None], p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)  # (G, n, L)
            total = total + (kl.mean(1) * valid).sum()
    return total / max(positions, 1)
