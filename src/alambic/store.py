"""The response cache shared across runs: content-addressed, crash-safe (SQLite in WAL mode).

Keyed by a hash of (teacher identity, request), so the same request is never paid for twice, whichever
run, shard or output file asked for it. Every response is committed as soon as it arrives: a SIGKILL loses
at most the requests in flight. The schema migrates forward only (simonw/llm's habit): each entry of
`MIGRATIONS` runs once, in order, tracked by SQLite's `user_version`.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable
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


def request_key(teacher: dict[str, Any], request: dict[str, Any]) -> str:
    """Content hash of (teacher identity, request): equal requests to the same teacher share one key."""
    return request_key_prefixed(teacher_prefix(teacher), request)


def teacher_prefix(teacher: dict[str, Any]) -> str:
    """The teacher's part of every key, serialised once per run (keys are computed for millions of prompts)."""
    return json.dumps(teacher, sort_keys=True, separators=(",", ":")) + "\n"


def request_key_prefixed(prefix: str, request: dict[str, Any]) -> str:
    blob = prefix + json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


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
            raise ValueError(f"cache {str(self.path)!r} is not a usable SQLite database ({e}); "
                             "point --store at another file") from None

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

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Stored rows for those keys that exist: key -> {reply, created_at, latency_s}."""
        keys = list(keys)
        found: dict[str, dict[str, Any]] = {}
        chunk = 900  # under SQLite's default limit of host parameters
        with self.lock:
            for i in range(0, len(keys), chunk):
                part = keys[i : i + chunk]
                marks = ",".join("?" * len(part))
                for key, reply, created, latency in self.db.execute(
                    f"SELECT key, reply, created_at, latency_s FROM responses WHERE key IN ({marks})", part
                ):
                    found[key] = {"reply": json.loads(reply), "created_at": created, "latency_s": latency}
        return found

    def put(self, key: str, teacher: dict, request: dict, reply: dict, latency_s: float | None = None) -> None:
        """Store one response, committed before returning. Storing an existing key keeps the first answer."""
        row = (key, json.dumps(teacher), json.dumps(request), json.dumps(reply), time.time(), latency_s)
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)

    def put_many(self, rows: Iterable[tuple[str, dict, dict, dict, float | None]]) -> int:
        """Store (key, teacher, request, reply, latency_s) rows in one transaction (merging shards, imports)."""
        now = time.time()
        data = [(k, json.dumps(t), json.dumps(q), json.dumps(r), now, lat) for k, t, q, r, lat in rows]
        with self.lock:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?)", data)
            self.db.execute("COMMIT")
        return len(data)

    def __len__(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()
