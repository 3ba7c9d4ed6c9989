"""`alambic collect` against a real `alambic serve` on 127.0.0.1, with a fault-injecting proxy where needed."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from alambic import collect
from alambic.collect import CollectConfig, parse_shard, read_prompt_file, shard_of
from alambic.records import Interaction
from alambic.store import Store, canonical, canonical_messages, request_key, request_keys
from alambic.tasks import SKILLS
from alambic.teachers import ChatRequest, TeacherSpec, make_teacher


def cfg_for(server, tmp_path: Path, **kw) -> CollectConfig:
    base = dict(
        base_url=server.base_url + "/v1",
        api_key_env="TEST_COLLECT_KEYS",
        task=["string_ops"],
        n=12,
        max_tokens=8,
        store=str(tmp_path / "cache.sqlite"),
        out=str(tmp_path / "out" / "interactions.jsonl"),
        concurrency=8,
    )
    base.update(kw)
    return CollectConfig(**base)


@pytest.fixture
def key_env(tiny_server, monkeypatch):
    monkeypatch.setenv("TEST_COLLECT_KEYS", tiny_server.keys["alice"])


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@contextmanager
def proxy(target: str, faults: list):
    """A tiny HTTP proxy on 127.0.0.1 that answers the next requests with `faults` (then forwards to `target`).

    A fault is ("429", retry_after_s), ("500", None), ("timeout", seconds) or ("401", None) and applies to one
    chat request, in order. Keeps a log of what it did.
    """
    plan = list(faults)
    seen: list[tuple[float, str]] = []
    client = httpx.AsyncClient(base_url=target, timeout=60)

    async def handle(request: Request):
        body = await request.body()
        if request.url.path.endswith("/chat/completions") and plan:
            kind, arg = plan.pop(0)
            seen.append((time.monotonic(), kind))
            if kind == "429":
                return JSONResponse({"error": {"message": "slow down"}}, 429, headers={"Retry-After": str(arg)})
            if kind == "500":
                return JSONResponse({"error": {"message": "boom"}}, 500)
            if kind == "401":
                return JSONResponse({"error": {"message": "bad key"}}, 401)
            if kind == "timeout":
                await asyncio.sleep(arg)
        seen.append((time.monotonic(), "ok"))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        r = await client.request(request.method, request.url.path, content=body, headers=headers)
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    app = Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.should_exit = True
        thread.join(5)


def test_collect_writes_records_and_manifest(tiny_server, tmp_path, key_env):
    m = collect.run(cfg_for(tiny_server, tmp_path, top_logprobs=3))
    recs = read_out(tmp_path / "out" / "interactions.jsonl")
    assert len(recs) == m["records"] == 12
    assert m["requests_sent"] == 12 and m["from_cache"] == 0
    assert m["capability"] == "top_k_logprobs"
    r = recs[0]
    assert r["prompt"][0]["role"] == "user" and isinstance(r["completion"], str)
    assert r["teacher"]["model"] == tiny_server.model and r["meta"]["skill"] == "string_ops"
    assert len(r["logprobs"][0]["top"]) == 3 and r["usage"]["prompt_tokens"] > 0
    assert len({x["id"] for x in recs}) == 12
    # The lines are assembled from fragments: each must still be the Interaction contract, graded.
    for x in recs:
        Interaction.model_validate(x)
        assert isinstance(x["meta"]["correct"], bool) and x["latency_s"] > 0 and x["created_at"].endswith("Z")
    # No secret anywhere in what was written.
    for f in (tmp_path / "out").iterdir():
        assert tiny_server.keys["alice"] not in f.read_text()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["teacher"]["base_url"].startswith("http")


def test_cache_reuse_rerun_extend_and_unrelated_options(tiny_server, tmp_path, key_env):
    collect.run(cfg_for(tiny_server, tmp_path, n=10))
    again = collect.run(cfg_for(tiny_server, tmp_path, n=10, concurrency=3, out=str(tmp_path / "b.jsonl")))
    assert again["requests_sent"] == 0 and again["from_cache"] == 10 and again["records"] == 10
    more = collect.run(cfg_for(tiny_server, tmp_path, n=15))
    assert more["requests_sent"] == 5 and more["records"] == 15
    changed = collect.run(cfg_for(tiny_server, tmp_path, n=10, max_tokens=9))  # a different request
    assert changed["requests_sent"] == 10


def test_keys_and_canonical_prompts_match_the_plain_encoding():
    """The spliced keys and the hand-spelled canonical messages must equal the plain encoding, byte for byte
    (a different byte is a cache miss: paying twice)."""
    teacher = {"backend": "openai", "base_url": "http://h/v1", "model": "m"}
    params = ChatRequest(messages=[], max_tokens=7, temperature=0.5, seed=3).model_dump()
    del params["messages"]
    shapes = [
        [{"role": "user", "content": "plain"}],
        [{"role": "user", "content": 'caf\u00e9 "q"\n\t\\ \U0001f600 </script>'}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "x", "name": "extra key"}],
        [{"role": "user", "content": ["not", "a", "string"]}],
    ]
    texts = [canonical_messages(m) for m in shapes]
    assert texts == [canonical(m) for m in shapes]
    assert request_keys(teacher, params, texts) == [request_key(teacher, {**params, "messages": m}) for m in shapes]


def test_store_reads_the_same_by_lookup_and_by_scan(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    teacher = {"backend": "openai", "model": "m"}
    rows = [(f"k{i}", teacher, {"i": i}, {"choices": [{"text": str(i)}]}, i / 10) for i in range(40)]
    store.put_many(rows)
    few = store.get_many(["k3", "k7", "absent"])  # a small share: looked up by key
    every = store.get_many([f"k{i}" for i in range(40)] + ["absent"])  # most of the store: one sequential pass
    some = store.get_many([f"k{i}" for i in range(0, 40, 3)] + ["absent"])  # a quarter and more: a pass, filtered
    assert set(few) == {"k3", "k7"} and set(every) == {f"k{i}" for i in range(40)}
    assert set(some) == {f"k{i}" for i in range(0, 40, 3)} and some["k3"] == few["k3"]
    assert few["k7"] == every["k7"] and json.loads(every["k7"][1]) == {"choices": [{"text": "7"}]}
    assert every["k7"][3] == 0.7
    store.close()


def test_http_teacher_spreads_requests_over_small_pools(tiny_server):
    spec = TeacherSpec(base_url=tiny_server.base_url + "/v1", model=tiny_server.model)
    teacher = make_teacher(spec)
    request = ChatRequest(messages=[{"role": "user", "content": "Reverse the word: abc"}], max_tokens=2)

    async def go():
        await teacher.start()
        try:
            replies = await asyncio.gather(*(teacher.complete(request, tiny_server.keys["alice"]) for _ in range(20)))
        finally:
            await teacher.close()
        return replies

    assert teacher.pools == []  # nothing opened before it is needed (a fully cached run opens nothing)
    replies = asyncio.run(go())
    assert len(replies) == 20 and all(r.choices for r in replies)
    assert len(teacher.pools) == 3 and teacher.busy == [0, 0, 0]  # 20 at once, 8 per pool at most


def test_retries_on_429_500_timeout_and_retry_after(tiny_server, tmp_path, key_env):
    faults = [("429", 1), ("500", None), ("timeout", 6), ("500", None)]
    with proxy(tiny_server.base_url, faults) as (url, seen):
        t0 = time.monotonic()
        m = collect.run(
            cfg_for(tiny_server, tmp_path, base_url=url + "/v1", n=6, concurrency=1, timeout_s=3.0, backoff_s=0.05)
        )
        elapsed = time.monotonic() - t0
    assert m["records"] == 6 and m["errors"] == 0
    assert [k for _, k in seen if k != "ok"] == ["429", "500", "timeout", "500"]  # every fault was hit and retried
    # A loaded machine can push a normal request past the timeout too: that only adds retries.
    assert m["retries"] >= 4 and m["requests_sent"] == 6 + m["retries"]
    # Retry-After: 1 was honoured: the request after the 429 came at least a second later.
    t429 = next(t for t, k in seen if k == "429")
    assert next(t for t, k in seen if t > t429) - t429 >= 0.95
    assert elapsed >= 1.0


def test_non_retryable_error_is_recorded(tiny_server, tmp_path, key_env):
    m = collect.run(cfg_for(tiny_server, tmp_path, n=3, max_tokens=1000))  # over the model's context: 400
    assert m["errors"] == 3 and m["records"] == 0 and m["retries"] == 0
    errs = read_out(tmp_path / "out" / "errors.jsonl")
    assert errs[0]["status"] == 400 and "context" in errs[0]["error"].lower()


def test_key_retired_on_401_others_go_on(tiny_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_COLLECT_KEYS", f"sk-not-a-real-key,{tiny_server.keys['bob']}")
    m = collect.run(cfg_for(tiny_server, tmp_path, n=8, concurrency=2))
    assert m["records"] == 8 and len(m["retired_keys"]) == 1 and m["errors"] == 0
    monkeypatch.setenv("TEST_COLLECT_KEYS", "sk-wrong-1,sk-wrong-2")
    with pytest.raises(RuntimeError, match="every API key was rejected"):
        collect.run(cfg_for(tiny_server, tmp_path, n=9, model=tiny_server.model))


def test_budget_stops_before_cap(tiny_server, tmp_path, key_env):
    # Each request is priced in advance at its worst case; the cap admits a few, then the run stops cleanly.
    cfg = cfg_for(tiny_server, tmp_path, n=40, concurrency=1, price_in=1000.0, price_out=1000.0, max_usd=0.2)
    m = collect.run(cfg)
    assert m["budget_stop"] and 0 < m["records"] < 40
    assert m["spent_usd"] <= 0.2 and m["not_collected_budget"] == 40 - m["records"]
    t = collect.run(cfg_for(tiny_server, tmp_path, n=40, max_total_tokens=300, out=str(tmp_path / "t.jsonl")))
    assert t["budget_stop"] and t["prompt_tokens"] + t["completion_tokens"] <= 300


def test_sharding_covers_every_prompt_once(tiny_server, tmp_path, key_env):
    prompts = [ex.messages for ex in SKILLS["list_ops"].generate(500, "train")]
    shards = [shard_of(m, 4) for m in prompts]
    assert set(shards) == {0, 1, 2, 3}
    ids = []
    for i in range(3):
        m = collect.run(cfg_for(tiny_server, tmp_path, n=20, shard=f"{i}/3", out=str(tmp_path / f"s{i}.jsonl")))
        ids += [r["id"] for r in read_out(m["output"])]
    whole = collect.run(cfg_for(tiny_server, tmp_path, n=20, out=str(tmp_path / "all.jsonl")))
    assert whole["requests_sent"] == 0  # the shards filled the shared store
    assert sorted(ids) == sorted(r["id"] for r in read_out(whole["output"]))
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("3")
    with pytest.raises(ValueError, match="0 <= i < n"):
        parse_shard("4/4")


def test_prompt_files_and_bad_lines(tiny_server, tmp_path, key_env):
    good = tmp_path / "p.jsonl"
    good.write_text(
        '{"prompt": "Reverse the word: abc", "id": 1}\n'
        '{"messages": [{"role": "user", "content": "Uppercase this: hi"}]}\n'
        'not json\n{"other": 1}\n'
    )
    with pytest.raises(ValueError, match=r"p.jsonl:3: not valid JSON.*--skip-bad"):
        read_prompt_file(good)
    bad: list[str] = []
    assert len(read_prompt_file(good, skip_bad=True, bad=bad)) == 2
    assert len(bad) == 2 and "p.jsonl:4" in bad[1]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,reference\n"Reverse the word: xyz",zyx\n')
    m = collect.run(cfg_for(tiny_server, tmp_path, task=[], prompts=str(csv_file)))
    assert m["records"] == 1 and m["sources"][0]["sha256"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "Reverse the word: q"}]), tmp_path / "p.parquet")
    m = collect.run(
        cfg_for(tiny_server, tmp_path, task=[], prompts=str(tmp_path / "p.parquet"), out=str(tmp_path / "o.parquet"))
    )
    assert pq.read_table(tmp_path / "o.parquet").num_rows == 1


def test_bad_teacher_settings_fail_fast(tiny_server, tmp_path, key_env, monkeypatch):
    with pytest.raises(ValueError, match="unknown teacher backend 'nope'.*openai"):
        collect.run(cfg_for(tiny_server, tmp_path, backend="nope"))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="cannot reach teacher"):
        collect.run(cfg_for(tiny_server, tmp_path, base_url="http://127.0.0.1:9/v1"))
    assert time.monotonic() - t0 < 10
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ValueError, match="ANTHROPIC_API_KEY"):
        collect.run(cfg_for(tiny_server, tmp_path, backend="anthropic", model="m", api_key_env=""))
    monkeypatch.setenv("TEST_COLLECT_KEYS", "")
    with pytest.raises(ValueError, match="401.*set the API key"):
        collect.run(cfg_for(tiny_server, tmp_path))
    with pytest.raises(RuntimeError, match="wants an API key"):  # model given, so the first call finds out
        collect.run(cfg_for(tiny_server, tmp_path, model=tiny_server.model))


def test_anthropic_backend_against_served_messages_api(tiny_server, tmp_path, key_env):
    m = collect.run(cfg_for(tiny_server, tmp_path, backend="anthropic", model=tiny_server.model, n=3))
    assert m["records"] == 3 and m["capability"] == "text"


def test_hf_backend_in_process(tiny_model_dir, tmp_path):
    cfg = CollectConfig(
        backend="hf",
        model=str(tiny_model_dir),
        task=["list_ops"],
        n=3,
        max_tokens=6,
        top_logprobs=2,
        store=str(tmp_path / "c.sqlite"),
        out=str(tmp_path / "o.jsonl"),
    )
    m = collect.run(cfg)
    assert m["records"] == 3 and m["capability"] == "full_logits"
    assert len(read_out(tmp_path / "o.jsonl")[0]["logprobs"][0]["top"]) == 2


@pytest.mark.slow
def test_crash_resume_sigkill_no_double_pay(tiny_server, tmp_path):
    """SIGKILL the collector at random points, re-run: every record exactly once, nothing paid for twice."""
    n = 60
    store, out = tmp_path / "cache.sqlite", tmp_path / "crash" / "interactions.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "alambic.cli",
        "collect",
        "--base-url",
        tiny_server.base_url + "/v1",
        "--api-key-env",
        "TEST_COLLECT_KEYS",
        "--task",
        "arithmetic",
        "--n",
        str(n),
        "--max-tokens",
        "24",
        "--concurrency",
        "4",
        "--store",
        str(store),
        "--out",
        str(out),
    ]
    env = {**os.environ, "TEST_COLLECT_KEYS": tiny_server.keys["bob"]}
    rng = random.Random(0)
    started = time.time()

    def stored_count() -> int:
        if not store.exists():
            return 0
        with sqlite3.connect(store) as db:
            try:
                return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            except sqlite3.OperationalError:  # table not created yet
                return 0

    kills_mid_run = 0
    for _ in range(3):
        before = stored_count()
        target = before + rng.randint(3, 12)  # kill at a random point after a few more responses are stored
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300  # generous: a loaded CI machine can take long to start Python + torch
        while p.poll() is None and stored_count() < target and time.time() < deadline:
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills_mid_run += 0 < stored_count() < n
    assert kills_mid_run >= 2
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    recs = read_out(out)
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    # When was each prompt's response stored? No request for it may arrive after that.
    stored = {}
    with sqlite3.connect(store) as db:
        for req, created in db.execute("SELECT request, created_at FROM responses"):
            stored[json.loads(req)["messages"][-1]["content"]] = created
    assert len(stored) == n
    events = [json.loads(line) for line in tiny_server.log_path.read_text().splitlines()]
    mine = [
        e
        for e in events
        if e.get("prompt") in stored
        and e.get("status") == 200
        and datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp() >= started
    ]
    assert len(mine) >= n
    for e in mine:
        ts = datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
        assert ts <= stored[e["prompt"]] + 0.05, "a prompt was sent again after its response was stored"


def test_large_cached_rerun_split_over_two_processes_writes_the_same_bytes(tmp_path, monkeypatch, caplog):
    """Past `SPLIT_AT` stored replies a forked child builds half the records: the output must be the bytes one
    process writes, counted the same, and a child that fails (here: it cannot create its part file) must cost
    only time, never a record."""
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps({"prompt": f"say {i} caf\u00e9"}) + "\n" for i in range(301)))
    cfg = CollectConfig(
        base_url="http://127.0.0.1:9/v1",
        model="m",
        prompts=str(pf),
        max_tokens=8,
        top_logprobs=2,
        store=str(tmp_path / "s.sqlite"),
        out=str(tmp_path / "one" / "i.jsonl"),
    )
    spec = cfg.teacher_spec().identity()
    rows = []
    for i in range(301):
        req = ChatRequest(
            messages=[{"role": "user", "content": f"say {i} caf\u00e9"}], max_tokens=8, top_logprobs=2
        ).model_dump()
        # Only the last prompt's reply has top-k logprobs: the child's half must report them.
        lp = [{"token": "a", "logprob": -0.1, "top": [["a", -0.1], ["b", -2.0]] if i == 300 else []}]
        reply = {
            "choices": [{"text": f"\u00e9 {i}", "finish_reason": "stop", "logprobs": lp}],
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "model": "m",
        }
        rows.append((request_key(spec, req), spec, req, reply, i / 1000))
    store = Store(cfg.store)
    store.put_many(rows)
    store.close()
    one = collect.run(cfg)
    monkeypatch.setattr(collect, "SPLIT_AT", 1)
    two = collect.run(cfg.model_copy(update={"out": str(tmp_path / "two" / "i.jsonl")}))
    broken = tmp_path / "three" / "i.jsonl"
    (tmp_path / "three" / "i.jsonl.tmp.part").mkdir(parents=True)  # where the child would write its half
    three = collect.run(cfg.model_copy(update={"out": str(broken)}))
    assert "second half of the records failed" in caplog.text
    expected = (tmp_path / "one" / "i.jsonl").read_bytes()
    assert len(expected.splitlines()) == 301
    for m, out in ((two, tmp_path / "two" / "i.jsonl"), (three, broken)):
        assert out.read_bytes() == expected
        assert (m["records"], m["from_cache"], m["requests_sent"], m["capability"]) == (301, 301, 0, "top_k_logprobs")
        assert (m["records"], m["capability"]) == (one["records"], one["capability"])
    assert sorted(p.name for p in broken.parent.iterdir()) == [
        "config.json",
        "i.jsonl",
        "i.jsonl.tmp.part",
        "manifest.json",
    ]
