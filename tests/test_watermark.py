"""Green-list watermark: the green lists, the key file, the scorer, `alambic serve --watermark-key-file` against the
official openai client, the `guard watermark` verbs, and why de-duplication matters."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from scipy.stats import binomtest
from typer.testing import CliRunner

from alambic.cli import app
from alambic.guard import watermark as W
from alambic.modeling import char_tokenizer
from alambic.serve import ServeConfig, serve_in_thread

KEY = "test-watermark-key-0123456789abcdef"
PROMPTS = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(12)]


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wm") / "wm.key"
    W.write_key(path, W.WatermarkParams(context_width=1, gamma=0.25, delta=4.0), key=KEY)
    return path


@pytest.fixture(scope="module")
def marked_server(tiny_model_dir, key_file, tmp_path_factory):
    """The tiny model served with the watermark key (no API keys), and its access log."""
    log_path = tmp_path_factory.mktemp("wm-serve") / "access.jsonl"
    cfg = ServeConfig(model=str(tiny_model_dir), port=0, watermark_key_file=str(key_file), access_log=str(log_path),
                      threads=1)
    with serve_in_thread(cfg) as url:
        yield url, log_path


def ask(base_url: str, model: str, prompts, temperature: float = 1.0, max_tokens: int = 48,
        api_key: str = "unused") -> list[str]:
    """Completions through the official client, all requests in flight at once (the server batches them)."""
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0)

    def one(i: int) -> str:
        return client.chat.completions.create(model=model, messages=prompts[i], max_tokens=max_tokens,
                                              temperature=temperature, seed=i).choices[0].message.content

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))


def score(key: str, docs, params=None, **kw) -> dict:
    tok = char_tokenizer()
    params = params or W.WatermarkParams(1, 0.25, 4.0)
    wm = W.Watermark(key.encode(), params, len(tok))
    return W.score_pairs(wm, W.select(W.encode(tok, docs), params.context_width, **kw))


# --- green lists and the test ----------------------------------------------------------------------------------------


def test_green_lists_are_keyed_deterministic_and_gamma_sized():
    p = W.WatermarkParams(context_width=2, gamma=0.25, delta=2.0)
    a, b = W.Watermark(b"k" * 16, p, 1000), W.Watermark(b"k" * 16, p, 1000)
    other = W.Watermark(b"j" * 16, p, 1000)
    assert np.array_equal(a.green([5, 7]), b.green([5, 7]))  # same key and context: same list, on any machine
    assert not np.array_equal(a.green([5, 7]), other.green([5, 7]))
    assert not np.array_equal(a.green([5, 7]), a.green([7, 5]))
    assert np.array_equal(a.green([1, 5, 7]), a.green([5, 7]))  # only the last k tokens count
    share = np.mean([a.green([i, i + 1]).mean() for i in range(200)])
    assert abs(share - 0.25) < 0.01
    # token t's membership does not depend on the vocabulary's width (logits wider than the tokenizer)
    assert np.array_equal(W.Watermark(b"k" * 16, p, 1200).green([5, 7])[:1000], a.green([5, 7]))
    bias = a.bias([[5, 7], [3]], 1000)  # second row: context shorter than k, never marked
    assert bias.shape == (2, 1000) and set(bias[0].unique().tolist()) == {0.0, 2.0} and not bias[1].any()
    assert KEY not in repr(W.Watermark(KEY.encode(), p, 10))


def test_binomial_test_is_exact():
    r = W.binomial_test(40, 100, 0.25)
    assert r["p_value"] == pytest.approx(binomtest(40, 100, 0.25, alternative="greater").pvalue, rel=1e-9)
    assert r["z"] == pytest.approx((40 - 25) / np.sqrt(100 * 0.25 * 0.75), abs=1e-4)
    assert W.binomial_test(0, 0, 0.25)["p_value"] == 1.0


def test_p_by_tokens_matches_the_test_on_each_prefix():
    wm = W.Watermark(KEY.encode(), W.WatermarkParams(1, 0.25, 4.0), 104)
    pairs = [((c,), t) for c in range(10) for t in range(10)]  # 100 distinct pairs
    curve = W.p_by_tokens(wm, W.Selection(pairs=pairs))
    assert [p["tokens_scored"] for p in curve] == [16, 32, 64, 100]
    for point in curve:
        prefix = W.Selection(pairs=pairs[: point["tokens_scored"]])
        assert point["p_value"] == W.score_pairs(wm, prefix)["p_value"]
    assert W.p_by_tokens(wm, W.Selection()) == []


def test_select_dedups_excludes_prompt_windows_and_filters():
    prompt = [9, 1, 2]
    seqs = [(prompt + [1, 2, 3, 1, 2, 3], 3), ([4, 1, 2, 3], 1)]
    sel = W.select(seqs, k=1)
    # windows of seq 1: (2)->1, (1)->2 [in prompt], (2)->3, (3)->1, (1)->2 [in prompt], (2)->3 [dup]
    # seq 2 (prompt [4]): (4)->1, (1)->2, (2)->3 [dup]
    assert sel.positions == 9 and sel.in_prompt == 2 and sel.duplicates == 2
    assert sorted(sel.pairs) == [((1,), 2), ((2,), 1), ((2,), 3), ((3,), 1), ((4,), 1)]
    assert len(W.select(seqs, k=1, dedup=False, exclude_prompt=False).pairs) == 9
    assert W.select(seqs, k=1, contexts={(2,)}).pairs == [((2,), 1), ((2,), 3)]


def test_key_file_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="keygen"):
        W.load_key(tmp_path / "none")
    cases = {"short": ("abc\n", "at least 16"), "json": ('{"key": "x', "not valid JSON"),
             "field": (json.dumps({"key": KEY, "colour": 1}), "unknown fields"),
             "gamma": (json.dumps({"key": KEY, "gamma": 1.5}), "gamma")}
    for name, (text, msg) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=msg):
            W.load_key(tmp_path / name)
    (tmp_path / "plain").write_text(KEY + "\n")
    assert W.load_key(tmp_path / "plain") == (KEY.encode(), W.WatermarkParams())
    W.write_key(tmp_path / "new.key")
    assert (tmp_path / "new.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="never overwritten"):
        W.write_key(tmp_path / "new.key")


# --- serve with a key ------------------------------------------------------------------------------------------------


def test_served_completions_carry_the_watermark_and_only_for_our_key(marked_server, tiny_server, tiny_model_dir,
                                                                     caplog):
    url, log_path = marked_server
    with caplog.at_level(logging.DEBUG):
        marked = ask(url, tiny_model_dir.name, PROMPTS)
    # the same model served without a key
    plain = ask(tiny_server.base_url, tiny_model_dir.name, PROMPTS, api_key=tiny_server.keys["alice"])
    docs = list(zip(PROMPTS, marked, strict=True))
    ours = score(KEY, docs)
    assert ours["tokens_scored"] > 100 and ours["p_value"] < 1e-10
    assert score("another-key-0123456789abcdef", docs)["p_value"] > 1e-3
    assert score(KEY, list(zip(PROMPTS, plain, strict=True)))["p_value"] > 1e-3
    # the key never reaches a log line or the access log
    assert KEY not in caplog.text and KEY not in log_path.read_text()


def test_greedy_without_key_is_unchanged_and_with_key_is_marked(marked_server, tiny_server, tiny_model_dir):
    """No key: the greedy answer is the plain model's; with a key the bias changes it (delta 4 on a tiny model)."""
    from alambic.modeling import chat_generate, load

    model, tok = load(tiny_model_dir)
    reference = chat_generate(model, tok, PROMPTS[:4], max_new_tokens=24)
    plain = ask(tiny_server.base_url, tiny_model_dir.name, PROMPTS[:4], temperature=0, max_tokens=24,
                api_key=tiny_server.keys["alice"])
    assert plain == reference
    assert ask(marked_server[0], tiny_model_dir.name, PROMPTS[:4], temperature=0, max_tokens=24) != reference


# --- the verbs -------------------------------------------------------------------------------------------------------


def test_cli_keygen_and_score(marked_server, tiny_model_dir, key_file, tmp_path):
    marked = ask(marked_server[0], tiny_model_dir.name, PROMPTS[:6])
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n"
                            for p, c in zip(PROMPTS[:6], marked, strict=True)))
    runner = CliRunner()
    r = runner.invoke(app, ["guard", "watermark", "score", str(data), "--key-file", str(key_file),
                            "--tokenizer", str(tiny_model_dir)])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["p_value"] < 1e-6 and result["key"] == W.fingerprint(KEY.encode())
    assert KEY not in r.output

    r = runner.invoke(app, ["guard", "watermark", "keygen", str(tmp_path / "k.json"), "--gamma", "0.5"])
    assert r.exit_code == 0, r.output
    assert W.load_key(tmp_path / "k.json")[1].gamma == 0.5
    key = W.load_key(tmp_path / "k.json")[0].decode()
    assert key not in r.output

    r = runner.invoke(app, ["guard", "watermark", "score", str(data), "--key-file", str(tmp_path / "missing"),
                            "--tokenizer", str(tiny_model_dir)])
    assert r.exit_code == 2 and "keygen" in r.output


# --- why de-duplication matters --------------------------------------------------------------------------------------


def test_dedup_keeps_a_clean_model_prompted_with_watermarked_text_clean(marked_server, tiny_server, tiny_model_dir):
    """A clean model (the same weights served without a key) asked, greedily, to continue watermarked text repeats
    itself: counted position by position, the same few (context, token) coin flips are counted over and over, and
    the binomial test calls the text watermarked for far more keys than alpha allows. Counted once, it does not."""
    marked = ask(marked_server[0], tiny_model_dir.name, PROMPTS)
    prompts = [[{"role": "user", "content": "Continue: " + text}] for text in marked]
    replies = ask(tiny_server.base_url, tiny_model_dir.name, prompts, temperature=0, max_tokens=64,
                  api_key=tiny_server.keys["alice"])
    docs = list(zip(prompts, replies, strict=True))
    tok = char_tokenizer()
    seqs = W.encode(tok, docs)
    params = W.WatermarkParams(1, 0.25, 4.0)

    def fpr(dedup: bool) -> float:
        sel = W.select(seqs, 1, dedup=dedup)
        ps = [W.binomial_test(W.green_count(W.Watermark(k, params, len(tok)), sel.pairs), len(sel.pairs),
                              0.25)["p_value"] for k in W.random_keys(200, seed=1)]
        return float(np.mean(np.array(ps) < 0.01))

    assert fpr(dedup=False) > 0.1
    assert fpr(dedup=True) <= 0.03
    assert score(KEY, docs, dedup=True)["p_value"] > 0.01
