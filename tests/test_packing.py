"""Packed training is only correct if a packed example sees nothing of the examples before it in its row.

The property itself is tested: the logits of examples packed in one row equal those of each example alone, on
every model class the trainer is meant for, in train mode, through the same forward pass the trainer uses.
(transformers isolates packed rows only when no KV cache is built; these tests fail when that is forgotten.)
"""

from __future__ import annotations

import pytest
import torch
import transformers

from alambic.train import data as D

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}


def tiny(arch: str) -> torch.nn.Module:
    cfg_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        use_cache=True,  # what real checkpoints' configs say: the case that leaked
        pad_token_id=0,
    )
    return model_cls(cfg).train()


def examples(n: int = 3) -> list[D.Example]:
    g = torch.Generator().manual_seed(1)
    out = []
    for length in (9, 14, 11)[:n]:
        ids = torch.randint(1, 64, (length,), generator=g).tolist()
        out.append(D.Example(ids=ids, prompt_len=3))
    return out


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_logits_equal_each_example_alone_in_train_mode(arch):
    model = tiny(arch)
    ex = examples()
    packed = D.collate(ex, [[0, 1, 2]], pad_id=0, with_topk=False)
    assert "position_ids" in packed
    logits = model(**D.model_inputs(packed)).logits[0]  # (T, V)
    at = 0
    for i, e in enumerate(ex):
        alone = model(**D.model_inputs(D.collate(ex, [[i]], pad_id=0, with_topk=False))).logits[0]
        n = len(e.ids)
        torch.testing.assert_close(logits[at : at + n], alone[:n], atol=1e-5, rtol=1e-4)
        at += n


def test_a_batch_mixing_packed_and_single_rows_is_isolated_too():
    model = tiny("llama")
    ex = examples()
    batch = D.collate(ex, [[0, 2], [1]], pad_id=0, with_topk=False)
    logits = model(**D.model_inputs(batch)).logits  # (2, T, V)
    alone = [model(**D.model_inputs(D.collate(ex, [[i]], pad_id=0, with_topk=False))).logits[0] for i in range(3)]
    n0, n2, n1 = (len(ex[i].ids) for i in (0, 2, 1))
    torch.testing.assert_close(logits[0, :n0], alone[0][:n0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[0, n0 : n0 + n2], alone[2][:n2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits[1, :n1], alone[1][:n1], atol=1e-5, rtol=1e-4)


def test_isolation_check_catches_a_forward_pass_that_leaks(monkeypatch):
    model = tiny("llama")
    ex = examples()
    assert D.check_isolation(model, ex, pad_id=0) < 1e-4
    # The bug this guards against: the forward pass without `use_cache=False` (a cache is built, mask ignored).
    monkeypatch.setattr(
        D, "model_inputs", lambda b: {k: b[k] for k in ("input_ids", "position_ids") if k in b} or dict(b)
    )
    with pytest.raises(RuntimeError, match="not isolated"):
        D.check_isolation(model, ex, pad_id=0)


def test_a_right_padded_batch_gives_each_example_its_own_logits():
    """Unpacked batches are right-padded with an attention mask: padding must change nothing before it."""
    model = tiny("llama")
    ex = examples()
    batch = D.collate(ex, [[0], [1], [2]], pad_id=0, with_topk=False)
    assert "position_ids" not in batch
    logits = model(**D.model_inputs(batch)).logits
    for i, e in enumerate(ex):
        alone = model(**D.model_inputs(D.collate(ex, [[i]], pad_id=0, with_topk=False))).logits[0]
        torch.testing.assert_close(logits[i, : len(e.ids)], alone, atol=1e-5, rtol=1e-4)
