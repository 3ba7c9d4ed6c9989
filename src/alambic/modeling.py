"""Models and tokenizers: build tiny ones from configs, load any HF causal LM (directory or GGUF file).

Everything here returns standard Hugging Face objects, so the same code paths serve our demo teacher,
a student, or a real checkpoint such as Qwen2.5-0.5B or SmolLM2 from a GGUF file.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

log = logging.getLogger(__name__)

# A plain chat template: one special token per role, <|end|> closes every turn (and is the EOS token).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|unk|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus newline, with a chat template.

    Why characters: the built-in skills are digit- and symbol-level tasks (carries, sorting, copying),
    which a tiny model learns far faster when every digit is its own token. A BPE with no merges is
    exactly a character tokenizer in the `tokenizers` library, and saves as a standard `tokenizer.json`.
    """
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|end|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


@dataclass
class ModelPreset:
    """Shape of a small Llama-style decoder built from scratch."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    intermediate_size: int = 768
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


PRESETS: dict[str, ModelPreset] = {
    # ~1.2M parameters: the demo teacher.
    "teacher": ModelPreset(hidden_size=160, num_hidden_layers=4, num_attention_heads=5, num_key_value_heads=5,
                           intermediate_size=448),
    # ~0.15M parameters: a student at most 1/8 of the teacher.
    "tiny": ModelPreset(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=160),
    # ~30k parameters: for tests.
    "test": ModelPreset(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, max_position_embeddings=256),
}


def build_model(preset: str | ModelPreset, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised Llama-style causal LM sized by `preset`, vocabulary taken from `tokenizer`."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **asdict(preset),
    )
    return LlamaForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def resolve_model_path(path: str | Path) -> tuple[Path, str | None]:
    """Split a user's model path into (directory, gguf file name or None).

    Accepts an HF model directory, a `.gguf` file, or a directory holding exactly one `.gguf` file
    and no HF weights.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model path {str(p)!r} does not exist; give an HF model directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{str(p)!r} is a file but not a .gguf file; give an HF model directory or a .gguf file")
        return p.parent, p.name
    if (p / "config.json").exists():
        return p, None
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if len(ggufs) == 1:
        return p, ggufs[0]
    if len(ggufs) > 1:
        raise ValueError(f"{str(p)!r} holds several .gguf files ({', '.join(ggufs)}); name one file directly")
    raise ValueError(f"{str(p)!r} has no config.json and no .gguf file: it is not a model directory")


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (model, tokenizer) from an HF directory or GGUF file, in eval mode."""
    folder, gguf = resolve_model_path(path)
    kw = {"gguf_file": gguf} if gguf else {}
    log.info("loading model from %s%s", folder, f" ({gguf})" if gguf else "")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer in {str(folder)!r} has no chat template; chat endpoints need one")
    return model, tokenizer


def model_name(path: str | Path) -> str:
    """The name a served model answers to: its directory (or GGUF file) name."""
    folder, gguf = resolve_model_path(path)
    return Path(gguf).stem if gguf else folder.resolve().name


@torch.no_grad()
def chat_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 256,
    batch_size: int = 64,
) -> list[str]:
    """Greedy replies to chat conversations, batched with left padding (for evaluation, not serving)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        # Similar lengths together waste less compute on padding; results are put back in input order.
        order = sorted(range(len(conversations)), key=lambda i: len(str(conversations[i])))
        texts: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            prompts = [
                tokenizer.apply_chat_template(conversations[i], tokenize=False, add_generation_prompt=True)
                for i in idx
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            for i, row in zip(idx, gen[:, enc["input_ids"].shape[1] :], strict=True):
                texts[i] = tokenizer.decode(row, skip_special_tokens=True)
        out = [texts[i] for i in range(len(conversations))]
    finally:
        tokenizer.padding_side = side
    return out
