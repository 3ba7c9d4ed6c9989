"""Shared fixtures: a tiny model saved to disk, and that model served over real HTTP on 127.0.0.1.

Other stages' tests reuse them: `tiny_model_dir` is any stage's model input; `tiny_server` is a teacher endpoint
(OpenAI- and Anthropic-compatible) with API keys and an access log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from alambic.modeling import build_model, char_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An HF model directory: a freshly initialised ~22k-parameter Llama and the char tokenizer (chat template).

    Special tokens other than EOS get zero embeddings (tied to the output layer, so zero logits), so that the
    untrained model writes visible characters rather than role markers that decoding would hide.
    """
    path = tmp_path_factory.mktemp("models") / "tiny-test"
    tokenizer = char_tokenizer()
    model = build_model("test", tokenizer, seed=0)
    with torch.no_grad():
        for t in tokenizer.all_special_ids:
            if t != tokenizer.eos_token_id:
                model.get_input_embeddings().weight[t] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class Served(NamedTuple):
    base_url: str  # e.g. http://127.0.0.1:PORT (OpenAI clients want base_url + "/v1")
    keys: dict[str, str]  # name -> API key: "alice", "bob" (no account), "limited" (2 requests per minute)
    log_path: Path  # the access log (JSONL of AccessEvent)
    model: str  # the served model id


TEST_KEYS = {"alice": "sk-test-alice-0123456789", "bob": "sk-test-bob-9876543210", "limited": "sk-test-limited-42"}


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """The tiny model served in a background thread, with API keys (JSON key file) and an access log."""
    from alambic.serve import ServeConfig, serve_in_thread

    folder = tmp_path_factory.mktemp("serve")
    keys_file = folder / "keys.json"
    keys_file.write_text(
        json.dumps(
            [
                {"key": TEST_KEYS["alice"], "account_id": "acct_alice", "payment_fp": "pm_alice"},
                {"key": TEST_KEYS["bob"]},
                {"key": TEST_KEYS["limited"], "account_id": "acct_limited", "rpm": 2},
            ]
        )
    )
    log_path = folder / "access.jsonl"
    cfg = ServeConfig(
        model=str(tiny_model_dir), port=0, api_keys_file=str(keys_file), access_log=str(log_path), max_batch=32
    )
    with serve_in_thread(cfg) as url:
        yield Served(url, dict(TEST_KEYS), log_path, tiny_model_dir.name)
