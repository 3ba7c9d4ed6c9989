"""Scoring clients get the numbers transformers gets from `alambic serve`: EleutherAI's lm-evaluation-harness
(`lm_eval`, the real package) and the official openai SDK, over HTTP on 127.0.0.1.

The model here ends replies often: its EOS embedding is scaled up, so that EOS is the greedy next token after about
a third of the contexts. A scorer that asks `echo` + `max_tokens: 1` must still get "the prompt's tokens + exactly
one new token" then (lm_eval keeps `token_logprobs[ctxlen:-1]`): the bug this file guards against dropped the
continuation's last token whenever the new token was EOS.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch

from alambic.modeling import build_model, char_tokenizer, load
from alambic.serve import ServeConfig, serve_in_thread

KEY = "sk-test-scoring-0123"
TOL = 1e-4


@pytest.fixture(scope="module")
def eos_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "eos-prone"
    tokenizer = char_tokenizer()
    model = build_model("test", tokenizer, seed=1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # tied to the output layer
        for t in tokenizer.all_special_ids:
            if t != tokenizer.eos_token_id:
                emb[t] = 0  # role markers never win, as in conftest's tiny model
        emb[tokenizer.eos_token_id] *= 8  # |EOS logit| large: the greedy token after ~1/3 of the contexts
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(eos_model_dir):
    """The same model scored directly in transformers: `logprobs(ids)[t]` = log p(ids[t] | ids[:t]) for t >= 1, and
    the greedy next token after `ids` with its logprob."""
    model, tokenizer = load(eos_model_dir)

    class Reference:
        def __init__(self) -> None:
            self.tokenizer = tokenizer
            self._cache: dict[tuple[int, ...], torch.Tensor] = {}

        def _logp(self, ids: list[int]) -> torch.Tensor:  # (T, V)
            key = tuple(ids)
            if key not in self._cache:
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([ids])).logits[0]
                self._cache[key] = torch.log_softmax(logits.double(), -1)
            return self._cache[key]

        def logprobs(self, ids: list[int]) -> list[float]:
            logp = self._logp(ids)
            return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))]

        def next_token(self, ids: list[int]) -> tuple[int, float]:
            last = self._logp(ids)[-1]
            return int(last.argmax()), last.max().item()

        def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            assert tokenizer(context + continuation, add_special_tokens=False)["input_ids"] == ctx + cont
            logp = self._logp(ctx + cont)[len(ctx) - 1 : -1]  # (len(cont), V): the positions predicting `cont`
            chosen = logp.gather(-1, torch.tensor(cont)[:, None])[:, 0]
            return chosen.sum().item(), bool((logp.argmax(-1) == torch.tensor(cont)).all())

        def greedy(self, context: str, max_new: int, stop: str) -> str:
            ids = tokenizer(context, add_special_tokens=False)["input_ids"]
            new: list[int] = []
            for _ in range(max_new):
                token, _ = self.next_token(ids + new)
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
            return tokenizer.decode(new, skip_special_tokens=True).split(stop)[0]

    return Reference()


@pytest.fixture(scope="module")
def eos_server(eos_model_dir, tmp_path_factory):
    """That model served with an API key, as a provider would serve it."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{KEY} acct_scoring\n")
    with serve_in_thread(ServeConfig(model=str(eos_model_dir), port=0, max_batch=8, api_keys_file=str(keys))) as url:
        yield url


# --- the openai SDK -------------------------------------------------------------------------------------------------

TEXTS = ["Q: What is 17 plus 22?\nA: 39", "The colour of the sky is blue", "x", "2+2=4. 3+3=6. 4+4=", "Hello!"]


@pytest.mark.parametrize("shape", ["string", "strings", "ids", "lists of ids"])
def test_openai_sdk_echo_logprobs_match_transformers_for_every_prompt_shape(
    shape, eos_server, eos_model_dir, reference
):
    client = openai.OpenAI(base_url=eos_server + "/v1", api_key=KEY, max_retries=0)
    ids = [reference.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    prompt = {"string": TEXTS[0], "strings": TEXTS, "ids": ids[0], "lists of ids": ids}[shape]
    texts, ids = (TEXTS[:1], ids[:1]) if shape in ("string", "ids") else (TEXTS, ids)
    r = client.completions.create(
        model=eos_model_dir.name, prompt=prompt, echo=True, logprobs=2, max_tokens=1, temperature=0
    )
    assert [c.index for c in r.choices] == list(range(len(texts)))  # one choice per prompt, in prompt order
    ended = []
    for c, text, prompt_ids in zip(r.choices, texts, ids, strict=True):
        lp = c.logprobs
        assert len(lp.token_logprobs) == len(prompt_ids) + 1  # the prompt's tokens + exactly one new token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        for got, want in zip(lp.token_logprobs[1:-1], reference.logprobs(prompt_ids), strict=True):
            assert got == pytest.approx(want, abs=TOL)
        token, logprob = reference.next_token(prompt_ids)
        assert lp.token_logprobs[-1] == pytest.approx(logprob, abs=TOL)
        assert lp.text_offset[-1] == len(text) and c.text.startswith(text)
        if token == reference.tokenizer.eos_token_id:  # the new token is EOS: in the logprobs, not in the text
            assert c.text == text and c.finish_reason == "stop" and lp.tokens[-1] == "<|end|>"
        else:
            assert c.text == text + reference.tokenizer.decode([token]) and c.finish_reason == "length"
        ended.append(token == reference.tokenizer.eos_token_id)
    if len(texts) > 1:
        assert any(ended) and not all(ended), "the prompts should end both ways: EOS and not"
    assert r.usage.prompt_tokens == sum(map(len, ids))


# --- lm-evaluation-harness ------------------------------------------------------------------------------------------

MC = [  # question, choices, answer index: the model is untrained, so only the numbers matter, not the accuracy
    ("What is 17 plus 22?", ["39", "40", "3", "393"], 0),
    ("Name a colour.", ["blue", "green", "a", "red!"], 0),
    ("What is 2 times 4?", ["8", "6", "24", "88"], 0),
    ("Which is a fruit?", ["apple", "stone", "sky", "x"], 0),
    ("Spell cat.", ["c-a-t", "cat", "k", "CAT"], 1),
    ("Sort 3 1 2.", ["1 2 3", "3 2 1", "123", "2"], 0),
]
GEN = ["What is 1+1?", "Say hi.", "Count to 3.", "Reverse abc."]


def write_tasks(folder: Path) -> None:
    """Two tiny lm_eval tasks from local JSONL files: one scored by loglikelihood, one generated."""
    mc, gen = folder / "mc.jsonl", folder / "gen.jsonl"
    mc.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in MC))
    gen.write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in GEN))
    common = 'dataset_path: json\ntest_split: test\ndoc_to_text: "Q: {{question}}\\nA:"\n'
    (folder / "scoring_mc.yaml").write_text(
        f"task: scoring_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {mc}\n"
        'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "scoring_gen.yaml").write_text(
        f"task: scoring_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {gen}\n"
        "output_type: generate_until\ndoc_to_target: answer\n"
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    write_tasks(folder)
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["huggingface", "remote"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("tokenized", [True, False])
def test_lm_eval_loglikelihoods_match_transformers(
    tokenized, batch_size, backend, eos_server, eos_model_dir, reference, task_manager, monkeypatch
):
    from lm_eval import simple_evaluate

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what local-completions sends as its bearer token
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = dict(
        base_url=eos_server + "/v1/completions",
        model=eos_model_dir.name,
        tokenizer_backend=backend,
        tokenized_requests=tokenized,
        max_length=256,
        max_retries=1,
        auth_token=KEY,  # what the remote tokenizer sends (the completions requests send $OPENAI_API_KEY)
    )
    if backend == "huggingface":
        args["tokenizer"] = str(eos_model_dir)  # the served model's tokenizer folder, on the client's disk
    results = simple_evaluate(
        model="local-completions",
        model_args=args,
        tasks=["scoring_mc", "scoring_gen"],
        batch_size=batch_size,
        task_manager=task_manager,
        log_samples=True,
        bootstrap_iters=0,
    )

    samples = results["samples"]["scoring_mc"]
    assert len(samples) == len(MC)
    n_checked = 0
    for s in samples:
        for (context, continuation), [(ll, is_greedy)] in zip(s["arguments"], s["resps"], strict=True):
            want_ll, want_greedy = reference.loglikelihood(context, continuation)
            assert ll == pytest.approx(want_ll, abs=TOL), (context, continuation)
            assert is_greedy == want_greedy
            n_checked += 1
    assert n_checked == sum(len(c) for _, c, _ in MC)

    generations = {s["doc"]["question"]: s["resps"][0][0] for s in results["samples"]["scoring_gen"]}
    assert generations == {q: reference.greedy(f"Q: {q}\nA:", 8, "\n") for q in GEN}
