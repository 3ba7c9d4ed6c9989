"""Where a student comes from: a preset shape, any HF causal LM directory (full or LoRA), or a pruned teacher.

Specs (the `student` setting):
- `preset:NAME`: a fresh Llama-style model shaped by `modeling.PRESETS[NAME]`, on the teacher's tokenizer;
- `prune:DIR`: the model in DIR with `layers` of its decoder layers kept, evenly spaced, first and last included
  (DistilBERT takes one layer in two from BERT: Sanh et al., 2019), and optionally its MLPs narrowed to `width`
  channels, keeping the channels with the largest mean activation on the training prompts (Minitron's
  activation-based importance: Muralidharan et al., 2024; Sreenivas et al., 2024). Attention heads and the hidden
  size are kept: pruning those is where Minitron needs long retraining;
- anything else: an HF model directory (or .gguf), trained in full or through LoRA adapters (Hu et al., 2022)
  with `peft`, merged into the weights on save.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import AutoTokenizer, PreTrainedModel

from ..modeling import PRESETS, build_model, load, n_params

log = logging.getLogger(__name__)


def tokenizer_for(spec: str, tokenizer_dir: str | None, teacher_dir: str | None):
    """The tokenizer a `preset:` student uses: `--tokenizer DIR`, else the local teacher's."""
    src = tokenizer_dir or teacher_dir
    if src is None:
        raise ValueError(
            f"student {spec!r} is built from scratch and needs a tokenizer: give --tokenizer DIR "
            "(e.g. the teacher's model directory) or a local --teacher DIR"
        )
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def keep_layers(n_total: int, n_keep: int) -> list[int]:
    """Evenly spaced layer indices, first and last included: 12 → 6 gives 0, 2, 4, 7, 9, 11."""
    if not 0 < n_keep <= n_total:
        raise ValueError(f"--layers must be between 1 and the teacher's {n_total} layers (got {n_keep})")
    if n_keep == 1:
        return [n_total - 1]
    return [round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)]


def _decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot prune {type(model).__name__}: it has no `model.layers` (Llama-style decoders only)")
    return layers


@torch.no_grad()
def mlp_importance(model: PreTrainedModel, calib: list[list[int]]) -> list[torch.Tensor]:
    """Per layer, the mean |activation| of each MLP channel (the input of down_proj) over calibration tokens."""
    layers = _decoder_layers(model)
    sums = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    count = [0]
    hooks = [
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda _, args, i=i: sums[i].add_(args[0].abs().flatten(0, -2).sum(0).float())
        )  # (I,)
        for i, layer in enumerate(layers)
    ]
    try:
        for ids in calib:
            model(input_ids=torch.tensor([ids]))
            count[0] += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return [s / max(count[0], 1) for s in sums]


@torch.no_grad()
def prune(model: PreTrainedModel, n_layers: int, width: int | None, calib: list[list[int]]) -> PreTrainedModel:
    """A copy of `model` with `n_layers` evenly spaced decoder layers and, optionally, MLPs narrowed to `width`."""
    model = copy.deepcopy(model)
    layers = _decoder_layers(model)
    keep = keep_layers(len(layers), n_layers)
    if width is not None:
        inter = layers[0].mlp.down_proj.in_features
        if not 0 < width <= inter:
            raise ValueError(f"--width must be between 1 and the teacher's MLP width {inter} (got {width})")
        scores = mlp_importance(model, calib)
        for i in keep:
            mlp = layers[i].mlp
            idx = scores[i].topk(width).indices.sort().values  # (W,)
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlp, name)
                new = torch.nn.Linear(lin.in_features, width, bias=lin.bias is not None)
                new.weight.copy_(lin.weight[idx])
                if lin.bias is not None:
                    new.bias.copy_(lin.bias[idx])
                setattr(mlp, name, new)
            new = torch.nn.Linear(width, mlp.down_proj.out_features, bias=mlp.down_proj.bias is not None)
            new.weight.copy_(mlp.down_proj.weight[:, idx])
            if mlp.down_proj.bias is not None:
                new.bias.copy_(mlp.down_proj.bias)
            mlp.down_proj = new
        model.config.intermediate_size = width
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    log.info("pruned to layers %s%s: %d parameters", keep, f", MLP width {width}" if width else "", n_params(model))
    return model


def lora(model: PreTrainedModel, r: int, alpha: float, dropout: float, targets: list[str]) -> PreTrainedModel:
    """Wrap `model` in LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets or "all-linear", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, cfg)


def merged(model) -> PreTrainedModel:
    """The plain transformers model to save: LoRA adapters merged into the weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def make_student(
    spec: str,
    *,
    tokenizer_dir: str | None,
    teacher_dir: str | None,
    layers: int | None,
    width: int | None,
    calib: list[list[int]] | None = None,
    seed: int = 0,
):
    """(model, tokenizer, description) for a student spec; see the module docstring."""
    if spec.startswith("preset:"):
        name = spec.removeprefix("preset:")
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in student {spec!r}; choose one of {sorted(PRESETS)}")
        tok = tokenizer_for(spec, tokenizer_dir, teacher_dir)
        model = build_model(name, tok, seed=seed)
        return model, tok, {"kind": "preset", "preset": name, "tokenizer": tokenizer_dir or teacher_dir}
    if spec.startswith("prune:"):
        src = spec.removeprefix("prune:")
        if layers is None:
            raise ValueError(f"student {spec!r} needs --layers N (how many of the teacher's layers to keep)")
        base, tok = load(src)
        model = prune(base, layers, width, calib or [])
        return (
            model,
            tok,
            {
                "kind": "prune",
                "source": src,
                "layers": keep_layers(base.config.num_hidden_layers, layers),
                "width": width,
            },
        )
    model, tok = load(spec)
    return model, tok, {"kind": "hf", "source": spec}
