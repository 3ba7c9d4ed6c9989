"""Where a student comes from: a preset shape, any HF causal LM directory (full or LoRA), or a pruned teacher.

Specs (the `student` setting):
- `preset:NAME`: a fresh Llama-style model shaped by `modeling.PRESETS[NAME]`, on the teacher's tokenizer;
- `prune:DIR`: the model in DIR made smaller as Minitron does it (Muralidharan et al., 2024, "Compact Language
  Models via Pruning and Knowledge Distillation"; Sreenivas et al., 2024): one forward pass over calibration
  prompts (the training prompts) ranks every hidden (embedding) channel, attention head, MLP channel and layer
  by its activations, and the least important are removed: `hidden` channels consistently across the embedding,
  every norm, every projection and the output layer; `heads` per layer (grouped-query models keep the same number
  in each KV group); `width` MLP channels; `layers` decoder layers, evenly spaced with the first and last kept
  (DistilBERT's one layer in two: Sanh et al., 2019) or by Block Importance (Men et al., 2024). Any combination,
  or `ratio` (a parameter budget, e.g. 0.25) which picks the sizes width first;
- anything else: an HF model directory (or .gguf), trained in full or through LoRA adapters (Hu et al., 2022)
  with `peft`, merged into the weights on save.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass

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


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a Llama/Qwen-style model (`model.layers`), also inside DDP or peft wrappers."""
    for name, m in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(m, torch.nn.ModuleList):
            return m
    raise ValueError(f"{type(model).__name__} has no decoder `layers`: pruning and the relation loss need a "
                     "Llama-style decoder")


# --- importance (Minitron: activation-based, one forward pass over calibration prompts) -----------------------------


@dataclass
class Importance:
    """Per-axis importance scores of a decoder, from activations on calibration tokens (Muralidharan et al., 2024,
    "Compact Language Models via Pruning and Knowledge Distillation", section 2.2)."""

    hidden: torch.Tensor  # (E,) mean |output| of every RMSNorm (each layer's two, and the final one), summed
    heads: list[torch.Tensor]  # per layer (H,): mean L2 norm of each head's attention output (input of o_proj)
    mlp: list[torch.Tensor]  # per layer (I,): mean |activation| of each MLP channel (input of down_proj)
    blocks: torch.Tensor  # (L,): 1 - mean cosine(input, output) of each layer (Block Importance, Men et al., 2024)


@torch.no_grad()
def importance(model: PreTrainedModel, calib: list[list[int]]) -> Importance:
    """Activation importance of every hidden channel, head, MLP channel and layer over `calib` (token id lists)."""
    layers = decoder_layers(model)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    hidden = torch.zeros(cfg.hidden_size)
    heads = [torch.zeros(n_heads) for _ in layers]
    mlp = [torch.zeros(layer.mlp.down_proj.in_features) for layer in layers]
    blocks = torch.zeros(len(layers))
    count = [0]

    def add_hidden(_, __, out):
        hidden.add_(out.detach().abs().flatten(0, -2).sum(0).float())

    def head_norms(i):
        def hook(_, args):
            x = args[0]  # (B, T, H * D)
            heads[i].add_(x.reshape(*x.shape[:-1], n_heads, -1).norm(dim=-1).flatten(0, -2).sum(0).float())

        return hook

    def block(i):
        def hook(_, args, out):
            h_in = args[0] if args else None
            h_out = out[0] if isinstance(out, tuple) else out
            if h_in is not None:
                blocks[i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum().float()

        return hook

    hooks = [model.model.norm.register_forward_hook(add_hidden)]
    for i, layer in enumerate(layers):
        hooks += [
            layer.input_layernorm.register_forward_hook(add_hidden),
            layer.post_attention_layernorm.register_forward_hook(add_hidden),
            layer.self_attn.o_proj.register_forward_pre_hook(head_norms(i)),
            layer.mlp.down_proj.register_forward_pre_hook(
                lambda _, args, i=i: mlp[i].add_(args[0].abs().flatten(0, -2).sum(0).float())
            ),
            layer.register_forward_hook(block(i)),
        ]
    was_training = model.training
    model.eval()
    try:
        for ids in calib:
            model(input_ids=torch.tensor([ids]), use_cache=False)
            count[0] += len(ids)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    n = max(count[0], 1)
    return Importance(hidden / n, [h / n for h in heads], [m / n for m in mlp], blocks / n)


# --- sizes -----------------------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """The sizes a pruned student keeps (None: the source's)."""

    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    mlp: int | None = None

    def resolved(self, cfg) -> Shape:
        return Shape(
            self.layers or cfg.num_hidden_layers,
            self.hidden or cfg.hidden_size,
            self.heads or cfg.num_attention_heads,
            self.mlp or cfg.intermediate_size,
        )


def count_params(cfg, shape: Shape) -> int:
    """Parameters of a Llama-style decoder of `cfg` pruned to `shape` (what `prune` gives; biases and q/k norms
    included where the architecture has them)."""
    s = shape.resolved(cfg)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads if cfg.num_key_value_heads < cfg.num_attention_heads else s.heads
    attn = s.hidden * d * (2 * s.heads + 2 * kv)
    if getattr(cfg, "attention_bias", False) or cfg.model_type == "qwen2":  # Qwen2: biases on q, k, v
        attn += d * (s.heads + 2 * kv)
    if cfg.model_type == "qwen3":  # q_norm, k_norm
        attn += 2 * d
    mlp = 3 * s.hidden * s.mlp + (2 * s.mlp + s.hidden if getattr(cfg, "mlp_bias", False) else 0)
    per_layer = attn + mlp + 2 * s.hidden
    emb = cfg.vocab_size * s.hidden * (1 if cfg.tie_word_embeddings else 2)
    return s.layers * per_layer + emb + s.hidden


def _needs_divisible(cfg) -> bool:
    """LlamaConfig (transformers 5.24) refuses to save a hidden size that is not a multiple of the head count, even
    with an explicit head_dim; Qwen2/3 and Mistral do not ask it."""
    return cfg.model_type == "llama"


def _round(x: float, step: int, lo: int) -> int:
    return max(lo, int(round(x / step)) * step)


def shape_for_ratio(cfg, ratio: float, layers: int | None = None) -> Shape:
    """Sizes for a student of about `ratio` × the parameters of `cfg`, width first.

    Minitron's lesson (Muralidharan et al., 2024; Sreenivas et al., 2024, "LLM Pruning and Distillation in
    Practice"): at equal size, pruning width (hidden, heads, MLP) keeps far more than dropping layers. So every
    layer is kept unless `layers` says otherwise, and the three widths shrink together by one factor found by
    bisection (hidden rounded to a multiple of 8, heads to a multiple of the KV groups, MLP to a multiple of 16):
    the largest shape at or under the budget.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1] (got {ratio})")
    full = count_params(cfg, Shape())
    kv = cfg.num_key_value_heads
    gqa = kv < cfg.num_attention_heads

    def shape(f: float) -> Shape:
        heads = min(_round(cfg.num_attention_heads * f, kv if gqa else 1, kv if gqa else 1), cfg.num_attention_heads)
        step = math.lcm(8, heads) if _needs_divisible(cfg) else 8
        return Shape(layers, min(_round(cfg.hidden_size * f, step, step), cfg.hidden_size), heads,
                     _round(cfg.intermediate_size * f, 16, 16))

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_params(cfg, shape(mid)) <= ratio * full else (lo, mid)
    best = shape(lo)
    if count_params(cfg, best) > ratio * full:
        raise ValueError(f"no shape of this model reaches --ratio {ratio}; raise it or give explicit sizes")
    # Rounding hidden and heads leaves budget unused: the MLP (the finest axis) takes what is left.
    wider = Shape(**{**asdict(best), "mlp": best.mlp + 8})
    while wider.mlp <= cfg.intermediate_size and count_params(cfg, wider) <= ratio * full:
        best, wider = wider, Shape(**{**asdict(wider), "mlp": wider.mlp + 8})
    return best


# --- pruning ---------------------------------------------------------------------------------------------------------


def _take(lin: torch.nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.nn.Linear:
    """A new Linear keeping output channels `rows` and input channels `cols` of `lin`."""
    w = lin.weight
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=w.dtype, device=w.device)
    new.weight.copy_(w)
    if lin.bias is not None:
        new.bias.copy_(lin.bias if rows is None else lin.bias[rows])
    return new


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


def _head_channels(heads: torch.Tensor, d: int) -> torch.Tensor:
    return (heads[:, None] * d + torch.arange(d)).flatten()  # (h * D,)


def _keep_heads(scores: torch.Tensor, n_heads: int, n_kv: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(query heads, kv heads) to keep. Multi-head attention (one KV head per query head) drops both together;
    grouped-query attention keeps every KV head and the same number of query heads in each group, so that query
    head h still reads KV head h // group (the layout `repeat_kv` assumes)."""
    if n_kv == n_heads:
        q = _top(scores, keep)
        return q, q
    if keep % n_kv:
        raise ValueError(
            f"--heads {keep}: this model groups its {n_heads} query heads over {n_kv} KV heads; keep a multiple of "
            f"{n_kv} heads (the same number in each group)"
        )
    g = n_heads // n_kv
    q = torch.cat([j * g + _top(scores[j * g : (j + 1) * g], keep // n_kv) for j in range(n_kv)])
    return q, torch.arange(n_kv)


def keep_layers_by_importance(blocks: torch.Tensor, n_keep: int) -> list[int]:
    """The `n_keep` layers that change their input most (Block Importance), in order; the first and last always."""
    n = len(blocks)
    if not 0 < n_keep <= n:
        raise ValueError(f"--layers must be between 1 and the model's {n} layers (got {n_keep})")
    pinned = [0, n - 1][:n_keep] if n > 1 else [0]
    rest = [i for i in sorted(range(n), key=lambda i: -float(blocks[i])) if i not in pinned]
    return sorted(pinned + rest[: n_keep - len(pinned)])


@torch.no_grad()
def prune(
    model: PreTrainedModel,
    calib: list[list[int]],
    shape: Shape | None = None,
    *,
    layer_select: str = "even",
    scores: Importance | None = None,
) -> PreTrainedModel:
    """A copy of `model` pruned to `shape`: decoder layers dropped (evenly spaced, or by Block Importance), then
    attention heads, MLP channels and hidden (embedding) channels removed by activation importance on `calib`,
    consistently across the embedding, every norm, every projection and the output layer (Minitron, Muralidharan
    et al., 2024). Works on Llama-style decoders (Llama, Qwen2/3, Mistral, SmolLM); the result is a plain model of
    the same class whose config says its new sizes, so `save_pretrained` gives a directory transformers loads."""
    cfg = model.config
    shape = (shape or Shape()).resolved(cfg)
    layers = decoder_layers(model)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    for name, value, full in (("hidden", shape.hidden, cfg.hidden_size), ("heads", shape.heads, n_heads),
                              ("width", shape.mlp, cfg.intermediate_size)):
        if not 0 < value <= full:
            raise ValueError(f"--{name} must be between 1 and the model's {full} (got {value})")
    if _needs_divisible(cfg) and shape.hidden % shape.heads:
        raise ValueError(
            f"--hidden {shape.hidden} is not a multiple of --heads {shape.heads}, which Llama configs require; "
            f"choose a hidden size divisible by the head count (e.g. {shape.hidden // shape.heads * shape.heads})"
        )
    if layer_select not in ("even", "importance"):
        raise ValueError(f"layer selection must be 'even' or 'importance' (got {layer_select!r})")
    width_pruned = (shape.hidden, shape.heads, shape.mlp) != (cfg.hidden_size, n_heads, cfg.intermediate_size)
    needs_scores = width_pruned or (layer_select == "importance" and shape.layers < len(layers))
    if needs_scores and scores is None:
        if not calib:
            raise ValueError("pruning widths needs calibration prompts to measure importance")
        scores = importance(model, calib)
    keep = (
        keep_layers_by_importance(scores.blocks, shape.layers)
        if layer_select == "importance"
        else keep_layers(len(layers), shape.layers)
    )
    model = copy.deepcopy(model)
    cfg = model.config  # the copy's: the source model stays as it was
    layers = decoder_layers(model)
    h_idx = _top(scores.hidden, shape.hidden) if shape.hidden < cfg.hidden_size else None
    for i in keep:
        attn, mlp = layers[i].self_attn, layers[i].mlp
        if shape.heads < n_heads:
            q, kv = _keep_heads(scores.heads[i], n_heads, n_kv, shape.heads)
            qc, kvc = _head_channels(q, d), _head_channels(kv, d)
            attn.q_proj = _take(attn.q_proj, rows=qc)
            attn.k_proj = _take(attn.k_proj, rows=kvc)
            attn.v_proj = _take(attn.v_proj, rows=kvc)
            attn.o_proj = _take(attn.o_proj, cols=qc)
            attn.num_key_value_groups = len(q) // len(kv)
        if shape.mlp < cfg.intermediate_size:
            c = _top(scores.mlp[i], shape.mlp)
            mlp.gate_proj, mlp.up_proj = _take(mlp.gate_proj, rows=c), _take(mlp.up_proj, rows=c)
            mlp.down_proj = _take(mlp.down_proj, cols=c)
        if h_idx is not None:
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, _take(getattr(attn, name), cols=h_idx))
            attn.o_proj = _take(attn.o_proj, rows=h_idx)
            mlp.gate_proj, mlp.up_proj = _take(mlp.gate_proj, cols=h_idx), _take(mlp.up_proj, cols=h_idx)
            mlp.down_proj = _take(mlp.down_proj, rows=h_idx)
            for norm in (layers[i].input_layernorm, layers[i].post_attention_layernorm):
                norm.weight = torch.nn.Parameter(norm.weight[h_idx].clone())
    model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_i  # the KV cache is indexed by position in the stack
    if h_idx is not None:
        emb = model.get_input_embeddings()
        new_emb = torch.nn.Embedding(emb.num_embeddings, shape.hidden, padding_idx=emb.padding_idx)
        new_emb.weight.copy_(emb.weight[:, h_idx])
        model.set_input_embeddings(new_emb)
        norm = model.model.norm
        norm.weight = torch.nn.Parameter(norm.weight[h_idx].clone())
        head = model.get_output_embeddings()
        if cfg.tie_word_embeddings:
            head.weight = new_emb.weight
        else:
            model.set_output_embeddings(_take(head, cols=h_idx))
    cfg.head_dim = d  # explicit: the default (hidden / heads) changes with either
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = shape.hidden, shape.heads, shape.mlp
    if n_kv == n_heads:
        cfg.num_key_value_heads = shape.heads
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    log.info(
        "pruned to layers %s, hidden %d, heads %d, MLP %d: %d parameters",
        keep, shape.hidden, shape.heads, shape.mlp, n_params(model),
    )
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
    shape: Shape | None = None,
    ratio: float | None = None,
    layer_select: str = "even",
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
        shape = shape or Shape()
        base, tok = load(src)
        if ratio is not None:
            if any(v is not None for v in (shape.hidden, shape.heads, shape.mlp)):
                raise ValueError("give either --ratio or explicit widths (--hidden, --heads, --width), not both")
            shape = shape_for_ratio(base.config, ratio, shape.layers)
        if shape == Shape():
            raise ValueError(
                f"student {spec!r} needs a size: --ratio R (e.g. 0.25), or any of --layers, --hidden, --heads, --width"
            )
        full = shape.resolved(base.config)
        scores = importance(base, calib) if calib else None
        layers = (
            keep_layers_by_importance(scores.blocks, full.layers)
            if layer_select == "importance"
            else keep_layers(base.config.num_hidden_layers, full.layers)
        )
        model = prune(base, calib or [], shape, layer_select=layer_select, scores=scores)
        return (
            model,
            tok,
            {
                "kind": "prune",
                "source": src,
                "layers": layers,
                "layer_select": layer_select,
                **{k: v for k, v in asdict(full).items() if k != "layers"},
                "width": full.mlp,
                "ratio_requested": ratio,
                "parameters_ratio": round(n_params(model) / n_params(base), 4),
            },
        )
    model, tok = load(spec)
    return model, tok, {"kind": "hf", "source": spec}
