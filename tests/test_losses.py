"""Each loss against an independent float64 reference (explicit sums / torch.distributions)."""

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from alambic.train.losses import LOSSES, TAILS, divergence, forward_kl_spread, topk_buckets, topk_spread

B, T, V = 3, 5, 11


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    labels = torch.randint(0, V, (B, T), generator=g)
    return s, t, mask, labels


def ref_mean(values, mask):
    vals = [values[b, i].item() for b in range(B) for i in range(T) if mask[b, i]]
    return sum(vals) / len(vals)


def test_sft_matches_explicit_cross_entropy(data):
    s, _, mask, labels = data
    ref = ref_mean(-torch.log_softmax(s, -1).gather(-1, labels[..., None])[..., 0], mask)
    assert LOSSES["sft"](s, mask, labels=labels).item() == pytest.approx(ref, rel=1e-6)
    labels2 = labels.clone()
    labels2[0, 0] = -100  # ignored label is excluded like a masked position
    mask2 = mask.clone()
    mask2[0, 0] = False
    assert LOSSES["sft"](s, mask, labels=labels2).item() == pytest.approx(ref_mean(
        -torch.log_softmax(s, -1).gather(-1, labels[..., None])[..., 0], mask2), rel=1e-6)


@pytest.mark.parametrize("name,ref", [
    ("forward_kl", lambda pt, ps: kl_divergence(pt, ps)),
    ("reverse_kl", lambda pt, ps: kl_divergence(ps, pt)),
])
def test_kl_losses_match_torch_distributions(data, name, ref):
    s, t, mask, _ = data
    expected = ref_mean(ref(Categorical(logits=t), Categorical(logits=s)), mask)
    assert LOSSES[name](s, mask, teacher_logits=t).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_explicit_sum(data, beta):
    s, t, mask, _ = data
    pt, ps = torch.softmax(t, -1), torch.softmax(s, -1)
    m = beta * pt + (1 - beta) * ps
    per = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    assert LOSSES["jsd"](s, mask, teacher_logits=t, beta=beta).item() == pytest.approx(ref_mean(per, mask), rel=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tail", list(TAILS))
def test_topk_with_k_equal_vocab_equals_full_logits(data, name, tail):
    s, t, mask, _ = data
    lt = torch.log_softmax(t, -1)
    top = lt.topk(V, dim=-1)
    full = LOSSES[name](s, mask, teacher_logits=t)
    topk = LOSSES[name](s, mask, teacher_ids=top.indices, teacher_logprobs=top.values, tail=tail)
    assert topk.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-9)


def reference(kind: str, pt: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """The divergence between two explicit float64 distributions, by torch.distributions or by its sum (jsd, β 0.5)."""
    if kind == "forward":
        return kl_divergence(Categorical(probs=pt), Categorical(probs=ps))
    if kind == "reverse":
        return kl_divergence(Categorical(probs=ps), Categorical(probs=pt))
    m = 0.5 * pt + 0.5 * ps
    return 0.5 * (pt * (pt / m).log()).sum() + 0.5 * (ps * (ps / m).log()).sum()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_topk_tail_bucket_against_explicit_reference(data, kind):
    s, t, mask, _ = data
    k = 4
    lt = torch.log_softmax(t, -1)
    top = lt.topk(k, dim=-1)
    got = LOSSES[{"forward": "forward_kl", "reverse": "reverse_kl", "jsd": "jsd"}[kind]](
        s, mask, teacher_ids=top.indices, teacher_logprobs=top.values, tail="bucket")
    # Reference: build the k+1 distributions by explicit sums, one position at a time, in float64.
    ps_all = torch.softmax(s, -1)
    vals = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            ids = top.indices[b, i].tolist()
            pt = [lt[b, i, j].exp().item() for j in ids]
            ps = [ps_all[b, i, j].item() for j in ids]
            pt.append(1 - sum(pt))
            ps.append(1 - sum(ps))
            vals[b, i] = reference(kind, torch.tensor(pt, dtype=torch.float64), torch.tensor(ps, dtype=torch.float64))
    assert got.item() == pytest.approx(ref_mean(vals, mask), rel=1e-6)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_topk_spread_tail_against_explicit_reference(data, kind):
    """tail="spread": the divergence against the teacher whose top-k are as stored and whose other V - k tokens
    share the rest of the mass evenly, built one position at a time in float64."""
    s, t, mask, _ = data
    k = 4
    lt = torch.log_softmax(t, -1)
    top = lt.topk(k, dim=-1)
    got = LOSSES[{"forward": "forward_kl", "reverse": "reverse_kl", "jsd": "jsd"}[kind]](
        s, mask, teacher_ids=top.indices, teacher_logprobs=top.values, tail="spread")
    ps_all = torch.softmax(s, -1)
    vals = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            ids = top.indices[b, i].tolist()
            rest = 1 - sum(lt[b, i, j].exp().item() for j in ids)
            pt_ = torch.tensor([lt[b, i, j].exp().item() if j in ids else rest / (V - k) for j in range(V)],
                               dtype=torch.float64)
            vals[b, i] = reference(kind, pt_, ps_all[b, i])
    assert got.item() == pytest.approx(ref_mean(vals, mask), rel=1e-6)
    if kind == "forward":  # the closed form the loss uses equals the divergence over the dense spread teacher
        dense = divergence("forward", *topk_spread(s, top.indices, top.values))
        assert torch.allclose(forward_kl_spread(s, top.indices, top.values), dense, rtol=1e-9, atol=1e-12)


def test_spread_tail_forbids_piling_the_tail_on_one_token():
    """The defect the spread tail fixes: a teacher whose top-2 hold 30% of the mass, and a student that matches those
    two and puts the other 70% on one token (end-of-text, say) has the same bucket loss (zero) as one that spreads
    it, so greedy decoding of a bucket-trained student may pick that token. Trained to convergence, the spread
    loss leaves every tail token below the teacher's 2nd."""
    V_ = 20
    teacher = torch.tensor([0.16, 0.14] + [0.7 / (V_ - 2)] * (V_ - 2), dtype=torch.float64).log()
    ids, lp = torch.tensor([[[0, 1]]]), teacher[:2].view(1, 1, 2)
    piled = torch.tensor([0.16, 0.14] + [0.7] + [0.0] * (V_ - 3), dtype=torch.float64).clamp(min=1e-12).log()
    spread = teacher.clone()
    mask = torch.ones(1, 1, dtype=torch.bool)
    for x in (piled, spread):  # the bucket loss cannot tell them apart
        assert LOSSES["forward_kl"](x.view(1, 1, V_), mask, teacher_ids=ids, teacher_logprobs=lp,
                                    tail="bucket").item() == pytest.approx(0, abs=1e-9)
    assert (LOSSES["forward_kl"](piled.view(1, 1, V_), mask, teacher_ids=ids, teacher_logprobs=lp).item()
            > LOSSES["forward_kl"](spread.view(1, 1, V_), mask, teacher_ids=ids, teacher_logprobs=lp).item() + 1)
    x = piled.clone().view(1, 1, V_).requires_grad_(True)
    opt = torch.optim.SGD([x], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        LOSSES["forward_kl"](x, mask, teacher_ids=ids, teacher_logprobs=lp).backward()
        opt.step()
    p = x.detach().softmax(-1)[0, 0]
    assert p[2:].max() < 0.14 and p.argmax() == 0


def test_unknown_tail_is_a_clear_error(data):
    s, t, mask, _ = data
    top = torch.log_softmax(t, -1).topk(3, -1)
    with pytest.raises(ValueError, match="bucket"):
        LOSSES["forward_kl"](s, mask, teacher_ids=top.indices, teacher_logprobs=top.values, tail="uniform")


def test_topk_never_builds_dense_teacher_tensor():
    s = torch.randn(2, 3, 50)
    ids = torch.randint(0, 50, (2, 3, 5))
    lt, ls = topk_buckets(s, ids, torch.log(torch.full((2, 3, 5), 0.1)))
    assert lt.shape == ls.shape == (2, 3, 6)
    assert torch.allclose(lt.exp().sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_finite_and_mask_respected(data, name):
    s, t, mask, labels = data
    s = s.float().clone().requires_grad_(True)
    top = torch.log_softmax(t.float(), -1).topk(3, -1)
    for kw in ([{"labels": labels}] if name == "sft" else
               [{"teacher_logits": t.float()}, {"teacher_ids": top.indices, "teacher_logprobs": top.values}]):
        s.grad = None
        LOSSES[name](s, mask, **kw).backward()
        assert torch.isfinite(s.grad).all()
        assert (s.grad[~mask] == 0).all()  # masked positions get no gradient
        assert s.grad[mask].abs().sum() > 0


def test_identical_distributions_give_zero(data):
    s, _, mask, _ = data
    for kind in ("forward", "reverse", "jsd"):
        ls = torch.log_softmax(s, -1)
        assert divergence(kind, ls, ls).abs().max() < 1e-12
    with pytest.raises(ValueError, match="sft"):
        LOSSES["forward_kl"](s, mask)
    with pytest.raises(ValueError, match="vocabulary"):
        LOSSES["forward_kl"](s, mask, teacher_logits=torch.randn(B, T, V + 1, dtype=torch.float64))


def test_relation_kl_against_explicit_reference():
    """MiniLMv2 relations on packed rows: each position's softmax over the earlier positions of its own example (no
    padding), widths 6 (student) and 10 (teacher) re-split into 2 relation heads; KL position by position in
    float64, whatever the grouping of examples by length."""
    from alambic.train import data as D
    from alambic.train.losses import relation_heads, relation_kl

    g = torch.Generator().manual_seed(0)
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 5], [0, 1, 2, 3, 4, 5]])}
    segments = D.segments(batch)
    assert segments == [(0, 0, 3), (0, 3, 2), (1, 0, 4)]  # the 2nd example of row 0 starts afresh; padding: none
    assert D.segments({"attention_mask": batch["attention_mask"]}) == [(0, 0, 5), (1, 0, 4)]  # unpacked rows
    s = [torch.randn(2, 6, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(2, 6, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    assert relation_heads(6, 10, 5) == 2
    ref = 0.0
    for xs, xt in zip(s, t, strict=True):
        per = []
        for r, start, n in segments:
            for h in range(2):
                a, b = xs[r, start:start + n, h * 3:(h + 1) * 3], xt[r, start:start + n, h * 5:(h + 1) * 5]
                for i in range(n):
                    ps = torch.softmax(torch.stack([a[i] @ a[j] / 3 ** 0.5 for j in range(i + 1)]), 0)
                    pt = torch.softmax(torch.stack([b[i] @ b[j] / 5 ** 0.5 for j in range(i + 1)]), 0)
                    per.append(float((pt * (pt / ps).log()).sum()))
        ref += sum(per) / len(per)
    for group in (1, 2, 8):  # one example per group, the two short ones padded together, all in one
        assert relation_kl(s, t, segments, most_heads=5, group=group).item() == pytest.approx(ref, rel=1e-9)
    x = [v.clone().requires_grad_(True) for v in s]
    relation_kl(x, t, segments, most_heads=5, group=8).backward()
    assert all(torch.isfinite(v.grad).all() and v.grad[0, 5].abs().sum() == 0 for v in x)  # padding: no gradient
    assert all(v.grad[1, 4:].abs().sum() == 0 and v.grad[1, :4].abs().sum() > 0 for v in x)
    assert relation_kl(t, t, segments, most_heads=5).item() == pytest.approx(0, abs=1e-12)
