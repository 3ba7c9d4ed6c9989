"""The response cache shared across runs: content-addressed, crash-safe (SQLite in WAL mode).

Keyed by a hash of (teacher identity, request), so the same request is never paid for twice, whichever
run, shard or output file asked for it. The collector commits replies in small batches (`put_rows`) and counts
a prompt as done only once its reply is committed: a SIGKILL loses at most the requests in flight and the
replies of the last batch. The schema migrates forward only (simonw/llm's habit): each entry of `MIGRATIONS`
runs once, in order, tracked by SQLite's `user_version`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii
from operator import itemgetter
from pathlib import Path
from typing import Any

MIGRATIONS = [
    """CREATE TABLE responses (
        key TEXT PRIMARY KEY,
        teacher TEXT NOT NULL,
        request TEXT NOT NULL,
        reply TEXT NOT NULL,
        created_at REAL NOT NULL,
        latency_s REAL
    )""",
]


canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode  # the JSON form that keys hash
# What `canonical` does with a str, without its method call around it (ensure_ascii is json's default).
_string = encode_basestring_ascii


def request_key(teacher: dict[str, Any], request: dict[str, Any]) -> str:
    """Content hash of (teacher identity, request): equal requests to the same teacher share one key."""
    return hashlib.sha256((teacher_prefix(teacher) + canonical(request)).encode()).hexdigest()


def teacher_prefix(teacher: dict[str, Any]) -> str:
    """The teacher's part of every key."""
    return canonical(teacher) + "\n"


def canonical_messages(messages: list[dict[str, Any]]) -> str:
    """`canonical(messages)`, the same bytes, spelled out for the usual {role, content} strings: a re-run of
    millions of prompts encodes each one, and json's general path costs several times this one."""
    if len(messages) == 1:  # most prompts: no generator, no join
        m = messages[0]
        if len(m) == 2 and type(m.get("content")) is str and type(m.get("role")) is str:
            return f'[{{"content":{_string(m["content"])},"role":{_string(m["role"])}}}]'
    elif all(len(m) == 2 and type(m.get("content")) is str and type(m.get("role")) is str for m in messages):
        return (
            "[" + ",".join(f'{{"content":{_string(m["content"])},"role":{_string(m["role"])}}}' for m in messages) + "]"
        )
    return canonical(messages)


_HOLE = "\x00messages\x00"


def request_keys(teacher: dict[str, Any], params: dict[str, Any], messages: list[str]) -> list[str]:
    """`request_key` of many requests that share `params` and differ in their messages, given in canonical
    form: byte for byte the same keys. The shared part is encoded once and each message list spliced in where
    sorted keys place it, so a run of millions of prompts encodes only what differs (and only once)."""
    head, tail = canonical({**params, "messages": _HOLE}).split(canonical(_HOLE))
    head = teacher_prefix(teacher) + head
    sha = hashlib.sha256
    return [sha((head + m + tail).encode()).hexdigest() for m in messages]


class Store:
    """A thread-safe handle on the cache database at `path` (created on first use)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable against a process crash in WAL mode (only power loss can drop the last commits).
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA busy_timeout=30000")  # several collectors may share one store
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ValueError(
                f"cache {str(self.path)!r} is not a usable SQLite database ({e}); point --store at another file"
            ) from None

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise ValueError(f"cache {str(self.path)!r} was written by a newer alambic (schema {version}); upgrade")
        for i in range(version, len(MIGRATIONS)):
            with self.lock:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(MIGRATIONS[i])
                self.db.execute(f"PRAGMA user_version={i + 1}")
                self.db.execute("COMMIT")

    def get_many(self, keys: Iterable[str]) -> dict[str, tuple[str, str, float, float | None]]:
        """Stored rows for those keys that exist: key -> (key, reply as JSON text, created_at, latency_s).

        The reply stays text: a re-run decodes each one once, as it writes the record. A run that asks for a
        large share of the store (a re-run of a finished run) reads it in one sequential pass: past about a
        quarter of the rows that is cheaper than one index lookup per key (measured: ~2 us a row scanned against
        ~9 us a key looked up, 200k rows).
        """
        keys = list(keys)
        with self.lock:
            rows = self.db.execute("SELECT MAX(rowid) FROM responses").fetchone()[0] or 0  # >= the row count
            if 4 * len(keys) >= rows:
                every = self.db.execute("SELECT key, reply, created_at, latency_s FROM responses").fetchall()
                found = dict(zip(map(itemgetter(0), every), every, strict=True))
                want = set(keys)
                # A finished run's re-run wants every row: checked at once in C, not filtered row by row (which
                # costs half as much again as the pass itself).
                return found if found.keys() <= want else {k: row for k, row in found.items() if k in want}
            found = {}
            chunk = 900  # under SQLite's default limit of host parameters
            for i in range(0, len(keys), chunk):
                part = keys[i : i + chunk]
                marks = ",".join("?" * len(part))
                sql = f"SELECT key, reply, created_at, latency_s FROM responses WHERE key IN ({marks})"
                found.update((row[0], row) for row in self.db.execute(sql, part))
        return found

    def put_many(self, rows: Iterable[tuple[str, dict, dict, dict, float | None]]) -> int:
        """Store (key, teacher, request, reply, latency_s) rows in one transaction (merging shards, imports)."""
        now = time.time()
        return self.put_rows([(k, json.dumps(t), json.dumps(q), json.dumps(r), now, lat) for k, t, q, r, lat in rows])

    def put_rows(self, rows: list[tuple[str, str, str, str, float, float | None]]) -> int:
        """Store (key, teacher, request, reply, created_at, latency_s) rows, JSON already encoded, in one
        transaction, committed before returning. Storing an existing key keeps the first answer."""
        with self.lock:
            self.db.execute("BEGIN")
            try:
                self.db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        return len(rows)

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
