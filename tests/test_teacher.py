import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from alambic.modeling import char_tokenizer
from alambic.teacher import TeacherConfig, encode, run


def test_encode_masks_prompt_tokens():
    tok = char_tokenizer()
    msgs = [{"role": "user", "content": "Reverse the word: abc"}]
    ids, labels = encode(tok, msgs, "Answer: cba")
    assert len(ids) == len(labels)
    n_masked = sum(1 for x in labels if x == -100)
    prompt_text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert n_masked == len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert tok.decode([x for x in labels if x != -100]) == "Answer: cba<|end|>"


def test_teacher_train_end_to_end_tiny(tmp_path):
    cfg = TeacherConfig(out=str(tmp_path / "t"), preset="test", skills=["string_ops", "list_ops"], n_train=64,
                        seq_len=128, n_eval=4, steps=30, batch_size=8, warmup=5, eval_every=0)
    manifest = run(cfg)
    out = tmp_path / "t"
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert curve[-1]["loss"] < curve[0]["loss"]  # it learned something
    assert set(manifest["heldout_accuracy"]) == {"string_ops", "list_ops", "mean"}
    assert json.loads((out / "alambic_config.json").read_text())["steps"] == 30
    # A plain HF directory with a chat template.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>"
    assert model.config.vocab_size == len(tok)
