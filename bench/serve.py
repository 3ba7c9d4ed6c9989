"""Benchmark `alambic serve`: throughput and latency at concurrency 1, 8 and 32, in one run.

The claim: continuous batching makes throughput grow with concurrency (target: 32 concurrent clients get >= 5x the
requests/s of one). The server runs in its own process (as in production: its GIL is not shared with the load
generator); clients send short chat prompts with temperature 0 and `ignore_eos`, so every request generates exactly
`--max-tokens` tokens and the levels are comparable.

    python bench/serve.py [--model models/demo-teacher] [--quick]

Prints one JSON line and writes it to bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

LEVELS = (1, 8, 32)


def serve_process(model: str, ready, max_batch: int, options: dict) -> None:
    """Child process: serve `model` on a free port and send the base URL through the pipe `ready`. `options`:
    ServeConfig fields, and `slack` (the KV cache's spare columns, `engine.SlackLayer.SLACK`; 0 reallocates the
    cache at every step, as transformers' `DynamicLayer` does)."""
    from transformers.utils import logging as hf_logging

    from alambic import engine
    from alambic.serve import ServeConfig, run

    hf_logging.disable_progress_bar()  # tqdm's lock is a named semaphore this process would leave behind
    options = dict(options)
    engine.SlackLayer.SLACK = options.pop("slack", engine.SlackLayer.SLACK)
    run(ServeConfig(model=model, port=0, max_batch=max_batch, **options), on_ready=ready.send)


@contextmanager
def served_in_process(model: str, max_batch: int, **options):
    """Serve `model` in a spawned process; yields (base URL, served model name), stops the server on exit."""
    ctx = mp.get_context("spawn")
    ready, child_end = ctx.Pipe(duplex=False)
    server = ctx.Process(target=serve_process, args=(model, child_end, max_batch, options), daemon=True)
    server.start()
    try:
        if not ready.poll(300):
            raise RuntimeError("the server did not start within 300 s")
        url = ready.recv()
        yield url, httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    finally:
        server.terminate()
        server.join(10)
        ready.close()


def collection_round(model: str, max_batch: int, n_per_skill: int, **options) -> dict[str, float]:
    """A collection-shaped load on a fresh server: the built-in skills' prompts at concurrency `max_batch`, answers
    of every length up to EOS (so rows finish at different steps), top-5 logprobs, as `alambic demo` collects."""
    from alambic import tasks

    examples = tasks.generate(None, n_per_skill, "train", seed=0)
    with served_in_process(model, max_batch, **options) as (url, served):

        async def run_all() -> tuple[float, int]:
            sem = asyncio.Semaphore(max_batch)
            limits = httpx.Limits(max_connections=max_batch, max_keepalive_connections=max_batch)
            async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

                async def one(ex) -> int:
                    async with sem:
                        body = {"model": served, "messages": ex.messages, "max_tokens": 200, "temperature": 0,
                                "logprobs": True, "top_logprobs": 5}
                        r = await client.post("/v1/chat/completions", json=body)
                        r.raise_for_status()
                        return r.json()["usage"]["completion_tokens"]

                t0 = time.perf_counter()
                tokens = await asyncio.gather(*(one(ex) for ex in examples))
                return time.perf_counter() - t0, sum(tokens)

        wall, tokens = asyncio.run(run_all())
    return {"requests": len(examples), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1)}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def load(url: str, model: str, concurrency: int, n_requests: int, max_tokens: int) -> dict[str, float]:
    """`concurrency` clients each send requests back to back until `n_requests` have been answered."""
    latencies: list[float] = []
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:

        async def worker() -> None:
            for i in counter:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"What is {17 * i % 89} + {31 * i % 97}?"}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                got = r.json()["usage"]["completion_tokens"]
                if got != max_tokens:
                    raise RuntimeError(f"a request generated {got} tokens instead of {max_tokens}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return {
        "rps": n_requests / wall,
        "p50": percentile(latencies, 50),
        "p99": percentile(latencies, 99),
        "tokens_per_s": n_requests * max_tokens / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo-teacher", help="HF model directory or .gguf file to serve")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request")
    parser.add_argument("--quick", action="store_true", help="fewer requests: runs in under a minute")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.json"))
    args = parser.parse_args()

    model, note = args.model, None
    tmp = None
    if not Path(model).exists():
        from alambic.modeling import build_model, char_tokenizer

        tmp = tempfile.TemporaryDirectory()
        model = str(Path(tmp.name) / "demo-teacher-untrained")
        tokenizer = char_tokenizer()
        build_model("teacher", tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)
        note = f"{args.model} not found: served a freshly initialised 'teacher' preset (same size) instead"
        print(note, file=sys.stderr)

    try:
        with served_in_process(model, max(LEVELS)) as (url, served):
            result = measure(args, model, url, served)
    finally:
        if tmp is not None:
            tmp.cleanup()
    if note:
        result["note"] = note

    line = json.dumps(result)
    print(line)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(line + "\n")


def measure(args, model: str, url: str, served: str) -> dict:
    """Every level on the running server, then the collection-shaped rounds on fresh servers of their own."""
    n_requests = {1: 8, 8: 32, 32: 64} if args.quick else {1: 24, 8: 96, 32: 256}
    asyncio.run(load(url, served, 4, 8, args.max_tokens))  # warm-up: first-call allocations, lazy imports
    result: dict[str, object] = {"bench": "serve", "model": served, "max_tokens": args.max_tokens}
    for c in LEVELS:
        before = httpx.get(url + "/v1/alambic/stats").json()
        m = asyncio.run(load(url, served, c, n_requests[c], args.max_tokens))
        after = httpx.get(url + "/v1/alambic/stats").json()
        steps = after["decode_steps"] - before["decode_steps"]
        result |= {f"rps_c{c}": round(m["rps"], 2), f"p50_c{c}": round(m["p50"], 3), f"p99_c{c}": round(m["p99"], 3)}
        result[f"tokens_per_s_c{c}"] = round(m["tokens_per_s"], 1)
        result[f"mean_batch_c{c}"] = round((after["rows_decoded"] - before["rows_decoded"]) / max(steps, 1), 2)
        print(f"concurrency {c}: {m['rps']:.2f} req/s, p50 {m['p50']:.3f}s, p99 {m['p99']:.3f}s", file=sys.stderr)
    result["ratio_32_vs_1"] = round(result["rps_c32"] / result["rps_c1"], 2)
    # Collection-shaped traffic on one fresh server per setting, the same prompts and greedy answers, alternating
    # (ABAB) against drift: the engine's defaults vs finished rows dropped at once, vs a KV cache reallocated at
    # every step (SlackLayer.SLACK = 0: what transformers' DynamicLayer does), and vs every core decoding
    # (threads: the default leaves half the cores to HTTP).
    n = 20 if args.quick else 100
    cores = min(8, os.cpu_count() or 1)
    settings = {"default": {}, "drop_at_once": {"drop_share": 0.0}, "no_slack": {"slack": 0},
                "all_cores": {"threads": cores}}
    rounds: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(1 if args.quick else 2):
        for name, options in settings.items():
            rounds[name].append(collection_round(model, 64, n, **options))
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in rounds.items()}
    tps = {name: b["tokens_per_s"] for name, b in best.items()}
    result["collection_c64"] = best | {
        "ratio_default_vs_drop_at_once": round(tps["default"] / tps["drop_at_once"], 3),
        "ratio_default_vs_no_slack": round(tps["default"] / tps["no_slack"], 3),
        "ratio_all_cores_vs_default": round(tps["all_cores"] / tps["default"], 3),
        "all_cores_threads": cores,
        "same_tokens": len({b["tokens"] for b in best.values()}) == 1}
    result["quick"] = args.quick
    return result


if __name__ == "__main__":
    main()
