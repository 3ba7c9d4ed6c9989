"""`alambic guard provenance`: was a suspect model trained on our watermarked outputs?

Watermark radioactivity (Sander et al., "Watermarking Makes Language Models Radioactive", NeurIPS 2024): a model
fine-tuned on green-list-watermarked text (Kirchenbauer et al., 2023) keeps favouring the green tokens of the
contexts it learned, so its own generations, scored with our key, hold more green tokens than chance.

Read top to bottom: `ProvenanceConfig`; generation (a local model is served by `alambic serve` on 127.0.0.1 and
queried through `alambic collect`, exactly as an OpenAI-compatible endpoint is, so both kinds of suspect take one
path, with the collector's retries, rate limits and cache); scoring (re-tokenize with the watermark's tokenizer,
de-duplicate (context, token) pairs, drop windows found in the prompt, optionally keep only contexts seen in our
watermarked data; exact binomial test); the null check (the same pairs scored with many random keys: their p-values
must be uniform, and the true key's rank among them is a p-value that assumes nothing about the binomial model);
`run(cfg)`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from pydantic import Field
from scipy.stats import binom, kstest

from .. import __version__, collect
from ..config import Config
from . import watermark as W


class ProvenanceConfig(Config):
    """Settings of a radioactivity test."""

    suspect: str = Field(..., description="the suspect: a local model directory (or .gguf), or the base URL (…/v1) "
                         "of an OpenAI-compatible endpoint", json_schema_extra={"positional": True})
    key_file: str = Field(..., description="our watermark key file (the one the teacher served with)")
    tokenizer: str | None = Field(None, description="model directory whose tokenizer the watermark is defined on (our "
                                  "teacher's); default: the suspect's, when it is local")
    suspect_model: str = Field("", description="endpoint: model name ('' = the first one listed)")
    api_key_env: str = Field("", description="endpoint: env var holding its API key(s) (default OPENAI_API_KEY)")
    # prompts and generation
    prompts: str | None = Field(None, description="prompt file (.jsonl, .csv or .parquet with `prompt` or `messages`)")
    task: list[str] = Field(default_factory=list, description="built-in skill(s) to prompt with (default: all, when "
                            "no prompt file is given)")
    n: int = Field(200, gt=0, description="prompts per built-in skill")
    split: str = Field("test", description="skill split of the prompts: test (never in anyone's training data) or "
                       "train")
    prompt_seed: int = Field(1, description="seed of the built-in prompts")
    samples: int = Field(1, gt=0, description="completions per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the suspect")
    max_tokens: int = Field(128, gt=0, description="max tokens per completion")
    seed: int = Field(0, description="seed of the null check's random keys (requests carry no seed: one seed sent "
                      "with every prompt would make all completions share their random draws)")
    concurrency: int = Field(32, gt=0, description="requests in flight at once")
    threads: int = Field(0, ge=0, description="torch CPU threads for a local suspect (0: the server's default)")
    # scoring
    data: list[str] = Field(default_factory=list, description="our watermarked interactions (.jsonl): score only "
                            "contexts seen there (Sander et al.'s filter); default: score every context")
    dedup: bool = Field(True, description="count each (context, token) pair once (off: p-values are not valid)")
    exclude_prompt: bool = Field(True, description="skip windows that occur in the completion's own prompt")
    null_keys: int = Field(100, ge=0, description="random keys for the null check (0: skip it)")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of the null check's false-positive rate")
    out: str = Field("runs/provenance", description="output folder: suspect completions, provenance.json, config")


# --- generation ------------------------------------------------------------------------------------------------------


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _weights_id(folder: Path) -> str:
    """Names a local suspect for the response cache by its weights, so a retrained model is never served stale."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.gguf")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def generate(cfg: ProvenanceConfig, out: Path) -> tuple[Path, dict]:
    """Completions of the suspect to the prompts, as interactions at out/suspect.jsonl (and the collect manifest)."""
    path = out / "suspect.jsonl"
    spec = dict(prompts=cfg.prompts, task=[] if cfg.prompts else (cfg.task or list(_skills())), n=cfg.n,
                split=cfg.split, prompt_seed=cfg.prompt_seed, samples=cfg.samples, temperature=cfg.temperature,
                max_tokens=cfg.max_tokens, concurrency=cfg.concurrency,
                store=str(out / "cache.sqlite"), out=str(path))
    if _is_url(cfg.suspect):
        manifest = collect.run(collect.CollectConfig(base_url=cfg.suspect, model=cfg.suspect_model,
                                                     api_key_env=cfg.api_key_env, **spec))
        return path, manifest
    from ..modeling import resolve_model_path
    from ..serve import ServeConfig, serve_in_thread

    folder, _ = resolve_model_path(cfg.suspect)
    serve_cfg = ServeConfig(model=cfg.suspect, port=0, threads=cfg.threads, max_batch=max(cfg.concurrency, 1))
    with serve_in_thread(serve_cfg) as url:
        manifest = collect.run(collect.CollectConfig(
            base_url=url + "/v1", teacher_id=f"suspect:{folder.name}:{_weights_id(folder)}", **spec))
    return path, manifest


def _skills() -> list[str]:
    from .. import tasks

    return list(tasks.SKILLS)


# --- scoring and the null check --------------------------------------------------------------------------------------


def seen_contexts(files: list[str], tokenizer, k: int) -> set[tuple[int, ...]]:
    """The contexts (k-token windows) that precede a token in our watermarked interactions' completions."""
    contexts: set[tuple[int, ...]] = set()
    for f in files:
        for ids, start in W.encode(tokenizer, W.read_texts(f)):
            contexts.update(ctx for ctx, _ in W.windows(ids, k, start))
    return contexts


def null_check(sel: W.Selection, params: W.WatermarkParams, vocab_size: int, p_true: float, n_keys: int,
               alpha: float, seed: int = 0) -> dict:
    """Score the same pairs with `n_keys` random keys: under the null their p-values are uniform (KS test), at most
    about `alpha` of them fall below `alpha`, and the true key ranks among them as its own (permutation) p-value.

    A binomial p-value is discrete (few distinct values when few pairs are scored), and the KS test assumes a
    continuous law, so uniformity is tested on randomized p-values P[X > g] + U P[X = g], U ~ U(0, 1), which are
    exactly uniform under the null; the false-positive rate and the rank use the exact p-values users see."""
    n, gamma = len(sel.pairs), params.gamma
    greens = np.array([W.green_count(W.Watermark(key, params, vocab_size), sel.pairs)
                       for key in W.random_keys(n_keys, seed)])
    ps = binom.sf(greens - 1, n, gamma) if n else np.ones(n_keys)
    randomized = binom.sf(greens, n, gamma) + np.random.default_rng(seed).random(n_keys) * binom.pmf(greens, n, gamma)
    rank = 1 + int((ps <= p_true).sum())  # 1: the true key beats every random key
    ks = kstest(randomized, "uniform")
    return {"keys": n_keys, "true_key_rank": rank, "rank_p_value": round(rank / (n_keys + 1), 6),
            "ks_statistic": round(float(ks.statistic), 4), "ks_p_value": round(float(ks.pvalue), 6),
            "alpha": alpha, "false_positive_rate": round(float((ps < alpha).mean()), 4),
            "min_p_value": float(ps.min()), "median_p_value": round(float(np.median(ps)), 4)}


def score_interactions(cfg: ProvenanceConfig, files: list[str], tokenizer) -> dict:
    """The radioactivity test on completions already collected from the suspect (interactions JSONL files)."""
    key, params = W.load_key(cfg.key_file)
    wm = W.Watermark(key, params, len(tokenizer))
    seqs = [s for f in files for s in W.encode(tokenizer, W.read_texts(f))]
    contexts = seen_contexts(cfg.data, tokenizer, params.context_width) if cfg.data else None
    t0 = time.perf_counter()
    sel = W.select(seqs, params.context_width, cfg.dedup, cfg.exclude_prompt, contexts)
    result = {"key": wm.fingerprint, **asdict(params), "completions": len(seqs), **W.score_pairs(wm, sel),
              "p_by_tokens": W.p_by_tokens(wm, sel)}
    result["score_seconds"] = round(time.perf_counter() - t0, 4)
    if contexts is not None:
        result["reference_contexts"] = len(contexts)
    if cfg.null_keys:
        result["null_check"] = null_check(sel, params, len(tokenizer), result["p_value"], cfg.null_keys, cfg.alpha,
                                          cfg.seed)
    return result


def run(cfg: ProvenanceConfig) -> dict:
    """Generate from the suspect, score with our key, check the null; writes provenance.json and config.json in
    `out` and returns the same dict: p_value, z, tokens_scored, green, the exclusion counts and `null_check`."""
    if not _is_url(cfg.suspect) and not Path(cfg.suspect).exists():
        raise FileNotFoundError(f"suspect {cfg.suspect!r} is neither a local model path nor an http(s) URL")
    if _is_url(cfg.suspect) and cfg.tokenizer is None:
        raise ValueError("an endpoint suspect needs --tokenizer: the model directory whose tokenizer the watermark "
                         "is defined on (the teacher that served the watermarked outputs)")
    W.load_key(cfg.key_file)  # fail on a bad key file before spending anything on generation
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.dump(out / "config.json")
    t0 = time.time()
    path, manifest = generate(cfg, out)
    gen_s = time.time() - t0
    tokenizer = W.load_tokenizer(cfg.tokenizer or cfg.suspect)
    result = {"alambic_version": __version__, "suspect": cfg.suspect if _is_url(cfg.suspect) else str(cfg.suspect),
              **score_interactions(cfg, [str(path)], tokenizer),
              "generation": {k: manifest.get(k) for k in ("records", "errors", "completion_tokens", "elapsed_s")},
              "generate_seconds": round(gen_s, 1), "seconds": round(time.time() - t0, 1)}
    (out / "provenance.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
