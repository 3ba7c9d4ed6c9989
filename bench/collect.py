"""Benchmark: `alambic collect` against a minimal raw httpx asyncio loop, and a fully cached re-run.

Both clients hit the same `alambic serve` (in its own process, fixed-response mode, so the server is not the
bottleneck) with the same prompts at the same concurrency, alternating, in one run. The baseline is the simplest
correct loop a user would write (a semaphore, one shared client, post and parse); collect does more per request
(store, key pool, budget) and spreads its connections over small httpx pools. Then the store is filled with N
cached replies (as a previous run would leave it) and `alambic collect` re-runs over them through the CLI entry
point, writing its outputs: records/s of a run that sends nothing. Both figures are wall-clock; on a shared
machine the cached run's records per CPU-second (its child process included), per CPU-second of its main process
(the critical path: an idle 2-core machine's wall-clock rate) and the load average are given beside them.

    python bench/collect.py [--quick]
Prints one JSON line and writes bench/results/collect.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
from _results import publish  # bench/ is the script's directory, so on sys.path

from alambic import cli, collect
from alambic.modeling import build_model, char_tokenizer
from alambic.store import Store, request_key
from alambic.teachers import ChatRequest

FIXED = "Answer: 42"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path) -> tuple[subprocess.Popen, str]:
    model = tmp / "model"
    tok = char_tokenizer()
    build_model("test", tok).save_pretrained(model)
    tok.save_pretrained(model)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "alambic.cli", "serve", str(model), "--port", str(port), "--fixed-response", FIXED],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


async def raw_loop(url: str, prompts: list[str], concurrency: int) -> float:
    """The baseline a user would write by hand: a semaphore, one shared client, post and parse."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url + "/v1/", timeout=60, limits=limits) as client:
        model = (await client.get("models")).json()["data"][0]["id"]

        async def one(p):
            async with sem:
                r = await client.post(
                    "chat/completions",
                    json={
                        "model": model,
                        "max_tokens": 8,
                        "temperature": 0,
                        "messages": [{"role": "user", "content": p}],
                    },
                )
                r.raise_for_status()
                return r.json()["choices"][0]["message"]["content"]

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(p) for p in prompts))
        assert all(o == FIXED for o in out)
        return len(prompts) / (time.perf_counter() - t0)


def alambic_run(url: str, prompt_file: Path, tmp: Path, concurrency: int, tag: str) -> tuple[float, int]:
    """(prompts answered per second, retries) of `collect.run` over the prompt file."""
    cfg = collect.CollectConfig(
        base_url=url + "/v1",
        prompts=str(prompt_file),
        max_tokens=8,
        concurrency=concurrency,
        store=str(tmp / f"store-{tag}.sqlite"),
        out=str(tmp / f"out-{tag}" / "interactions.jsonl"),
    )
    t0 = time.perf_counter()
    m = collect.run(cfg)
    rate = m["records"] / (time.perf_counter() - t0)
    errors = Path(cfg.out).parent / "errors.jsonl"
    assert m["records"] == m["prompts"] and m["errors"] == 0, (
        {k: m[k] for k in ("records", "requests_sent", "retries", "errors")},
        errors.read_text()[:2000] if errors.exists() else "",
    )
    return rate, m["retries"]


def cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def cached_rerun(tmp: Path, n: int) -> tuple[float, float, float]:
    """(records/s, records per CPU-second, records per CPU-second of this process) of `alambic collect` over n
    prompts whose replies are all stored. The CPU counts the child that builds half the records (the server's
    was counted before, when it was waited for); this process's alone is the run's critical path, so its rate is
    what an idle 2-core machine would give in wall-clock time."""
    prompts = [f"Reverse the word: w{i:07d}" for i in range(n)]
    pf = tmp / "cached.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp / "cached-out" / "interactions.jsonl"
    cfg = collect.CollectConfig(
        base_url="http://127.0.0.1:9/v1",
        model="m",
        prompts=str(pf),
        max_tokens=8,
        store=str(tmp / "cached.sqlite"),
        out=str(out),
    )
    spec = cfg.teacher_spec().identity()
    reply = {
        "choices": [{"text": FIXED, "finish_reason": "stop", "logprobs": None}],
        "prompt_tokens": 30,
        "completion_tokens": 4,
        "model": "m",
    }
    rows = []
    for p in prompts:
        req = ChatRequest(messages=[{"role": "user", "content": p}], max_tokens=8).model_dump()
        rows.append((request_key(spec, req), spec, req, reply, 0.01))
    store = Store(cfg.store)
    store.put_many(rows)
    store.close()
    del rows
    args = [
        "collect",
        "--base-url",
        cfg.base_url,
        "--model",
        "m",
        "--prompts",
        str(pf),
        "--max-tokens",
        "8",
        "--store",
        cfg.store,
        "--out",
        str(out),
    ]
    t0, c0, k0 = time.perf_counter(), cpu_s(), cpu_s(resource.RUSAGE_CHILDREN)
    with open(os.devnull, "w") as null, redirect_stdout(null), redirect_stderr(null):  # the progress bar, the table
        cli.app(args, standalone_mode=False)  # the URL is unreachable: a single request would fail the run
    el, own = time.perf_counter() - t0, cpu_s() - c0
    cpu = own + cpu_s(resource.RUSAGE_CHILDREN) - k0
    m = json.loads((out.parent / "manifest.json").read_text())
    assert m["requests_sent"] == 0 and m["records"] == n
    assert sum(1 for _ in open(out)) == n
    return n / el, n / cpu, n / own


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    n, n_cached, rounds = (1000, 50_000, 2) if args.quick else (4000, 200_000, 3)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        proc, url = start_server(tmp)
        try:
            ratios, raw_rates, ours, retries = [], [], [], 0
            for r in range(rounds):
                prompts = [f"Reverse the word: r{r}x{i:06d}" for i in range(n)]
                pf = tmp / f"p{r}.jsonl"
                pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
                # Alternate which client goes first, so drift on a noisy machine hits both alike.
                if r % 2:
                    a, again = alambic_run(url, pf, tmp, args.concurrency, str(r))
                    b = asyncio.run(raw_loop(url, prompts, args.concurrency))
                else:
                    b = asyncio.run(raw_loop(url, prompts, args.concurrency))
                    a, again = alambic_run(url, pf, tmp, args.concurrency, str(r))
                retries += again  # counted against collect: a retried prompt took two requests' time
                ours.append(a)
                raw_rates.append(b)
                ratios.append(a / b)
        finally:
            proc.terminate()
            proc.wait(10)
        load = os.getloadavg()[0]
        cached, cached_cpu, cached_own = cached_rerun(tmp, n_cached)
        load_cached = os.getloadavg()[0]
    result = {
        "bench": "collect",
        "quick": args.quick,
        "concurrency": args.concurrency,
        "requests_per_round": n,
        "alambic_rps": round(statistics.median(ours), 1),
        "raw_httpx_rps": round(statistics.median(raw_rates), 1),
        "ratio_vs_httpx": round(statistics.median(ratios), 3),
        "alambic_retries": retries,
        "cached_records": n_cached,
        "cached_records_per_s": round(cached),
        "cached_records_per_cpu_s": round(cached_cpu),
        "cached_records_per_main_cpu_s": round(cached_own),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(load, 2),
        "load_avg_1m_after_cached": round(load_cached, 2),
    }
    publish("collect", result)


if __name__ == "__main__":
    main()
