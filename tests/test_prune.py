"""Minitron-style pruning (students.prune): every axis, on every decoder family the trainer is meant for.

Properties, not smoke: the parameter count is what `count_params` predicts; the pruned directory reloads with
transformers and gives the same logits; removing heads or MLP channels that contribute nothing leaves the
model's output unchanged (so importance ranks them last and the surgery keeps the rest intact); a ratio is met.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from alambic.modeling import n_params
from alambic.train.students import Shape, count_params, importance, keep_layers_by_importance, prune, shape_for_ratio

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, 4),  # multi-head attention
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, 2),  # grouped-query, q/k/v biases
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, 2),  # q/k norms
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, 2),
}


def tiny(arch: str, tied: bool = True):
    cfg_cls, model_cls, kv = ARCHS[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=50, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=kv, head_dim=12, max_position_embeddings=64, tie_word_embeddings=tied,
                  pad_token_id=0)
    return model_cls(cfg).eval()


def calib(n: int = 6) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(1, 50, (20,), generator=g).tolist() for _ in range(n)]


def logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("tied", [True, False])
def test_every_axis_pruned_counts_reloads_and_runs(arch, tied, tmp_path):
    model = tiny(arch, tied)
    shape = Shape(layers=2, hidden=32, heads=2, mlp=40)
    small = prune(model, calib(), shape)
    assert n_params(small) == count_params(model.config, shape) < n_params(model)
    assert model.config.hidden_size == 48 and n_params(model) == count_params(model.config, Shape())  # source kept
    small.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    c = again.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (2, 32, 2, 40)
    torch.testing.assert_close(logits(again, calib()[0]), logits(small, calib()[0]))
    out = again.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)  # the KV cache path works
    assert out.shape == (1, 7)


def test_removing_dead_heads_and_channels_changes_nothing():
    model = tiny("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight[12:24] = 0  # head 1 outputs zeros: it contributes nothing
            layer.mlp.up_proj.weight[::3] = 0  # a third of the MLP channels are always 0
    scores = importance(model, calib())
    assert all(int(h.argmin()) == 1 for h in scores.heads)
    small = prune(model, calib(), Shape(heads=3, mlp=64), scores=scores)
    torch.testing.assert_close(logits(small, calib()[1]), logits(model, calib()[1]), atol=1e-5, rtol=1e-4)


def test_grouped_query_heads_keep_their_kv_group():
    model = tiny("qwen2")  # 4 query heads over 2 KV heads: heads 0, 1 read KV 0; heads 2, 3 read KV 1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 12:24] = 0  # query head 1 (group 0) does not reach the output
            layer.self_attn.o_proj.weight[:, 24:36] = 0  # query head 2 (group 1) neither
    scores = importance(model, calib())
    for h in scores.heads:  # its attention output is not zero, so say which heads are dead
        h.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]))
    small = prune(model, calib(), Shape(heads=2), scores=scores)
    assert small.model.layers[0].self_attn.num_key_value_groups == 1
    torch.testing.assert_close(logits(small, calib()[1]), logits(model, calib()[1]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of 2"):
        prune(model, calib(), Shape(heads=3), scores=scores)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_ratio_is_met_width_first(ratio):
    model = tiny("llama")
    shape = shape_for_ratio(model.config, ratio)
    got = count_params(model.config, shape) / n_params(model)
    assert 0.85 * ratio < got <= ratio
    assert shape.layers is None  # widths shrink, every layer is kept
    small = prune(model, calib(), shape)
    assert n_params(small) / n_params(model) == pytest.approx(got)


def test_layers_by_block_importance_keep_first_and_last():
    assert keep_layers_by_importance(torch.tensor([0.9, 0.1, 0.5, 0.2, 0.8]), 3) == [0, 2, 4]
    model = tiny("mistral")
    small = prune(model, calib(), Shape(layers=2), layer_select="importance")
    assert small.config.num_hidden_layers == 2


def test_bad_sizes_are_clear():
    model = tiny("llama")
    with pytest.raises(ValueError, match="--hidden must be between"):
        prune(model, calib(), Shape(hidden=64))
    with pytest.raises(ValueError, match="multiple of --heads"):
        prune(model, calib(), Shape(hidden=30, heads=4))
    with pytest.raises(ValueError, match="calibration"):
        prune(model, [], Shape(mlp=10))
