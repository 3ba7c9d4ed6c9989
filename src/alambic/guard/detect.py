"""Find distillation campaigns in API access logs: request signals -> account features -> account-link graph ->
communities -> campaigns, each with calibrated p-values (Benjamini-Hochberg FDR) and the evidence behind it.

Why layered: one distillation prompt looks benign; the signal is variations of it arriving tens of thousands of
times across coordinated accounts (a provider's Feb-Jun 2026 disclosures, see docs/guard.md). So no account is
flagged on its own behaviour. Each account gets a robust z-score from its features; accounts are linked through
shared artifacts (payment fingerprint, IP prefix, user agent, system prompt, prompt templates, synchronous activity
on a template); an artifact is *significant* when the accounts devoted to it are jointly unusual (Stouffer's Z over
their z-scores, one-sided). Significant artifacts (BH over all artifacts at `fdr`) join their accounts into
communities: those are the campaigns. Very common artifacts (popular SDKs, carrier NAT) are dropped, and an artifact
only links accounts for which it is a real share of their traffic, so one shared card or NAT address cannot chain
the whole population together.

Calibration: each feature is a robust z against the bulk of accounts (median and MAD: Efron's empirical null, 2004);
shares are shrunk towards the typical account's share, not the pooled rate that heavy campaign accounts inflate. The
summed score becomes normal scores of its ranks, N(0, 1) when every account is benign and conservative for benign
accounts when campaigns take the top ranks, so both stay valid while campaigns are a minority. Template links need
repeated use per account (`template_repeat`), since a popular phrasing's users are jointly unusual only by being
the people who ask for it.

Coordination is not extraction (issue 16): a batch job over an organisation's accounts, an evaluation harness, a class
and an agent product all share templates across accounts. So a community is *flagged* only when what its traffic is
for looks like extraction: its median member's purpose score (elicitation, logprobs, single turn, payload coverage,
novelty, long outputs; PURPOSE) exceeds a threshold set at the (1 - target_fpr) quantile of known-benign accounts (a
trusted `reference` log, or the accounts no significant artifact links). Otherwise it is reported *for review*.

The pipeline runs out of core in DuckDB (JSONL or Parquet in, any size); the log is read once, keeping only what the
signals read; only per-account arrays and the words of distinct prompt heads (for MinHash) reach numpy.
Geography is never a signal: IP addresses are used only as shared infrastructure (prefix equality), and hour-of-day
only through how *flat* an account's activity is, never which hours.

Outputs in `out/`: accounts.parquet (every account: features, z, p, q, purpose score, campaign, flag, review group,
evidence), campaigns.json, review.json, appeals.jsonl (each flagged or reviewed account's evidence with its share),
report.md, report.html, config.json, manifest.json.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from scipy.special import ndtr, ndtri
from scipy.stats import rankdata

from ..config import Config

REQUIRED = ("ts", "account_id")
OPTIONAL = {
    "request_id": "VARCHAR", "api_key_id": "VARCHAR", "ip": "VARCHAR", "user_agent": "VARCHAR",
    "payment_fp": "VARCHAR", "model": "VARCHAR", "prompt": "VARCHAR", "prompt_hash": "VARCHAR",
    "system_prompt_hash": "VARCHAR", "n_messages": "INTEGER", "max_tokens": "INTEGER", "temperature": "DOUBLE",
    "logprobs_requested": "BOOLEAN", "prompt_tokens": "INTEGER", "completion_tokens": "INTEGER", "status": "INTEGER",
}  # fmt: skip


WEAK_LINKS = {"ip_prefix", "user_agent"}  # link kinds that corroborate but never flag or join on their own
# Account features that say what the traffic is *for* (extraction) rather than how accounts are tied (coordination):
# reasoning traces asked for, logprobs, answers harvested (single turn: nothing fed back), capabilities swept, new
# prompts only. A community of linked accounts is flagged only when its accounts' purpose score clears a threshold set
# on known-benign traffic; otherwise it is reported for review.
PURPOSE = ("elicit_share", "logprobs", "single_turn", "coverage", "novelty", "long_outputs")


class DetectConfig(Config):
    logs: list[str] = Field(
        ..., description="access logs (JSONL or Parquet; globs allowed)", json_schema_extra={"positional": True}
    )
    out: str = Field("runs/guard-detect", description="output folder")
    fdr: float = Field(0.01, gt=0, lt=1, description="false discovery rate for artifacts (Benjamini-Hochberg)")
    min_effect: float = Field(0.75, description="minimum mean z of an artifact's accounts (guards against dilution)")
    member_min_z: float = Field(
        0.5, description="a community member is flagged if its own z exceeds this, or two kinds of link tie it"
    )
    min_campaign_accounts: int = Field(3, ge=2, description="smallest community reported as a campaign")
    split_resolution: float = Field(1.0, gt=0, description="Louvain resolution for splitting merged communities")
    split_max_bridge: float = Field(
        0.25, ge=0, le=1, description="a part of a community stays with another if more than this share of its "
        "accounts also link into that one (0 = never split)"
    )  # fmt: skip
    min_share: float = Field(0.05, ge=0, le=1, description="an artifact links an account only above this traffic share")
    max_df_frac: float = Field(0.2, gt=0, le=1, description="artifacts shared by more than this share of accounts drop")
    template_repeat: float = Field(
        3.0, ge=1, description="a template links accounts only if they use it this many times each on average"
    )
    sync_bucket_s: int = Field(600, ge=10, description="time bucket for synchrony on a template (seconds)")
    sync_min_accounts: int = Field(8, ge=2, description="accounts needed on one template in one bucket")
    sync_ratio: float = Field(5.0, gt=1, description="a synchronous cell exceeds the template's mean by this factor")
    reference: list[str] = Field(
        default_factory=list,
        description="known-benign access logs (traffic you trust) that set the flag threshold; "
        "without one, the accounts no significant artifact links (a held-out slice of this log) set it",
    )
    target_fpr: float = Field(
        0.001,
        gt=0,
        lt=0.5,
        description="benign false-positive rate the flag threshold is set for: the share of "
        "reference accounts whose purpose score may exceed it",
    )
    reference_min_requests: int = Field(
        10,
        ge=1,
        description="reference accounts with fewer requests are left out (community members are regular users)",
    )
    purpose_cap: float = Field(3.0, gt=0, description="each piece of evidence counts at most this many z units")
    signals: list[str] = Field(default_factory=lambda: list(SIGNALS), description="signals to use (see SIGNALS)")
    until: str | None = Field(None, description="only use events before this time (ISO-8601): replays detection")
    memory_limit: str = Field("8GB", description="DuckDB memory limit; it spills to disk beyond it")
    threads: int = Field(0, ge=0, description="DuckDB threads (0 = all cores)")


# ---------------------------------------------------------------------------------------------------------- loading


class LogError(ValueError):
    """A log cannot be used at all (missing file, missing required fields); the message says what to do."""


def _expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        matches = sorted(Path().glob(p)) if any(c in p for c in "*?[") else [Path(p)]
        for m in matches:
            if not m.is_file():
                raise LogError(f"access log {str(m)!r} not found")
            out.append(m)
    if not out:
        raise LogError(f"no access log matches {paths}")
    return out


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def _ts_expr(text: str, kind: str | None = None) -> str:
    """Epoch seconds from an ISO-8601 string (UTC when no zone is given) or from epoch seconds."""
    if kind in ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE") or (kind or "").startswith("TIMESTAMP"):
        return f"epoch({text})"
    if kind in ("BIGINT", "INTEGER", "DOUBLE", "FLOAT", "UBIGINT", "HUGEINT", "DECIMAL"):
        return f"CAST({text} AS DOUBLE)"
    return f"coalesce(epoch(try_cast({text} AS TIMESTAMPTZ)), try_cast({text} AS DOUBLE))"


def load(con: duckdb.DuckDBPyConnection, paths: list[Path], until: float | None, columns: dict[str, str]) -> dict:
    """Normalise every log into table `ev` (acct, t, then `columns`: name -> SQL over the log's fields) and `acc`
    (acct, account_id).

    Malformed lines (not JSON, not an object, no parsable `ts` or `account_id`) are counted with examples and
    skipped. A required field absent from a whole log is an error naming it.
    """
    bad: dict[str, int] = {}
    examples: list[dict] = []
    present: set[str] = set()
    selects = []
    for i, path in enumerate(paths):
        if path.suffix == ".parquet":
            try:
                cols = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()}
            except duckdb.Error as e:
                raise LogError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); "
                               "give a Parquet access log, or name it .jsonl if it is JSON lines") from e  # fmt: skip
            missing = [f for f in REQUIRED if f not in cols]
            if missing:
                raise LogError(f"{path}: required field(s) {missing} absent; every event needs {list(REQUIRED)}")
            src = f"read_parquet('{path}')"
            fields = {
                f: (f"CAST({f} AS {typ})" if f in cols else f"CAST(NULL AS {typ})") for f, typ in OPTIONAL.items()
            }
            t = _ts_expr("ts", cols["ts"])
            con.execute(f"CREATE OR REPLACE TEMP VIEW src{i} AS SELECT {t} AS t, CAST(account_id AS VARCHAR) "
                        f"AS account_id, {', '.join(f'{v} AS {k}' for k, v in fields.items())} FROM {src}")  # fmt: skip
            n_bad = con.execute(f"SELECT count(*) FROM src{i} WHERE t IS NULL OR account_id IS NULL").fetchall()[0][0]
            if n_bad:
                bad["missing or unparsable ts/account_id"] = bad.get("missing or unparsable ts/account_id", 0) + n_bad
                for (row,) in con.execute(
                    f"SELECT to_json(s)::VARCHAR FROM {src} s WHERE s.account_id IS NULL OR "
                    f"{_ts_expr('s.ts', cols['ts'])} IS NULL LIMIT 3"
                ).fetchall():
                    examples.append({"file": str(path), "line": None, "reason": "missing ts/account_id", "text": row})
        else:
            _load_jsonl(con, path, i, bad, examples)
        counts = con.execute(
            f"SELECT {', '.join(f'count({f})' for f in OPTIONAL)} FROM src{i} WHERE t IS NOT NULL"
        ).fetchall()[0]
        present |= {f for f, c in zip(OPTIONAL, counts, strict=True) if c}
        selects.append(f"SELECT * FROM src{i} WHERE t IS NOT NULL AND account_id IS NOT NULL")
    cut = f"WHERE t < {until}" if until is not None else ""
    con.execute(f"CREATE TEMP VIEW allsrc AS SELECT * FROM ({' UNION ALL '.join(selects)}) {cut}")
    # The events are materialised once, with only what the signals read, derived in the same pass (a prompt's head
    # and elicitation flag, an IP's prefix): at 16M events the raw prompt text alone is gigabytes and every rewrite
    # of it costs a minute. The account table comes from a scan of account_id alone.
    con.execute("CREATE TABLE acc AS SELECT (row_number() OVER (ORDER BY account_id) - 1)::INTEGER AS acct, "
                "account_id FROM (SELECT DISTINCT account_id FROM allsrc)")  # fmt: skip
    keep = "".join(f", {sql} AS {name}" for name, sql in columns.items())
    con.execute(f"CREATE TABLE ev AS SELECT a.acct, t{keep} FROM allsrc JOIN acc a USING (account_id)")
    n = con.execute("SELECT count(*), min(t), max(t) FROM ev").fetchall()[0]
    return {"events": n[0], "t_min": n[1], "t_max": n[2], "malformed": bad, "examples": examples[:5],
            "present": sorted(present)}  # fmt: skip


def _load_jsonl(con, path: Path, i: int, bad: dict, examples: list) -> None:
    # Lines are read as raw text so one malformed line is counted, never fatal. \x1f cannot occur unescaped in JSON.
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE raw{i} AS SELECT row_number() OVER () AS lineno, line FROM "
        f"read_csv('{path}', columns={{'line': 'VARCHAR'}}, header=false, delim='\x1f', quote='', escape='', "
        f"auto_detect=false, strict_mode=false, null_padding=true, ignore_errors=true)"
    )
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE js{i} AS SELECT lineno, line, "
        f"CASE WHEN json_valid(line) AND json_type(line) = 'OBJECT' THEN line::JSON END AS j FROM raw{i} "
        f"WHERE line IS NOT NULL AND trim(line) <> ''"
    )
    has = con.execute(
        f"SELECT {', '.join(f'count(j->>{chr(39)}$.{f}{chr(39)})' for f in REQUIRED)} FROM js{i} WHERE j IS NOT NULL"
    ).fetchall()[0]
    n_ok = con.execute(f"SELECT count(*) FROM js{i} WHERE j IS NOT NULL").fetchall()[0][0]
    missing = [f for f, c in zip(REQUIRED, has, strict=True) if c == 0]
    if n_ok and missing:
        raise LogError(
            f"{path}: required field(s) {missing} absent from every event; every event needs {list(REQUIRED)} "
            f"(see the access-log record in DESIGN.md; convert gateway logs into that shape first)"
        )
    ts_sql = (
        "CASE WHEN json_type(j, '$.ts') IN ('BIGINT', 'UBIGINT', 'DOUBLE') THEN CAST(j->>'$.ts' AS DOUBLE) "
        "ELSE coalesce(epoch(try_cast(j->>'$.ts' AS TIMESTAMPTZ)), try_cast(j->>'$.ts' AS DOUBLE)) END"
    )
    fields = ", ".join(f"try_cast(j->>'$.{f}' AS {typ}) AS {f}" for f, typ in OPTIONAL.items())
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE src{i} AS SELECT lineno, {ts_sql} AS t, "
        f"nullif(j->>'$.account_id', '') AS account_id, {fields} FROM js{i} WHERE j IS NOT NULL"
    )
    reasons = {
        "not a JSON object": f"SELECT lineno, line FROM js{i} WHERE j IS NULL",
        "missing or unparsable ts": f"SELECT s.lineno, r.line FROM src{i} s JOIN raw{i} r USING (lineno) "
        "WHERE s.t IS NULL",
        "missing account_id": f"SELECT s.lineno, r.line FROM src{i} s JOIN raw{i} r USING (lineno) "
        "WHERE s.t IS NOT NULL AND s.account_id IS NULL",
    }
    for reason, q in reasons.items():
        n = con.execute(f"SELECT count(*) FROM ({q})").fetchall()[0][0]
        if n:
            bad[reason] = bad.get(reason, 0) + n
            for lineno, line in con.execute(f"{q} ORDER BY 1 LIMIT 2").fetchall():
                examples.append({"file": str(path), "line": int(lineno), "reason": reason, "text": (line or "")[:200]})
    con.execute(f"ALTER TABLE src{i} DROP COLUMN lineno")
    con.execute(f"DROP TABLE raw{i}; DROP TABLE js{i}")


# ---------------------------------------------------------------------------------------------------------- signals


@dataclass
class Ctx:
    """What signals see: the DuckDB connection (tables ev, acc, nacc), the account count, config, fields present,
    and each account's request count (the denominator of every share)."""

    con: duckdb.DuckDBPyConnection
    n: int
    cfg: DetectConfig
    present: set[str]
    t_min: float
    t_max: float
    n_req: np.ndarray
    notes: dict[str, str] = field(default_factory=dict)
    tables: set[str] = field(default_factory=set)

    def per_account(self, sql: str, default: float = 0.0) -> np.ndarray:
        """Run `sql` returning (acct, value) and scatter it into an array over all accounts."""
        rows = self.con.execute(sql).fetchnumpy()
        out = np.full(self.n, default, dtype=np.float64)
        keys = list(rows)
        out[rows[keys[0]].astype(np.int64)] = np.asarray(rows[keys[1]], dtype=np.float64)
        return out

    def table(self, name: str, sql: str) -> str:
        """Create temp table `name` from `sql` the first time a signal asks for it (signals share aggregates)."""
        if name not in self.tables:
            self.con.execute(f"CREATE TEMP TABLE {name} AS {sql}")
            self.tables.add(name)
        return name


@dataclass
class Signal:
    """A detector signal. `needs`: fields required, `a|b` meaning either; `kind`: where its output goes; `columns`:
    the per-event columns it reads, as SQL over the log's fields, derived in the one pass that loads the log; `fn`:
    what it computes from them (a request signal may need none: its column is its output)."""

    needs: tuple[str, ...]
    kind: Literal["request", "account", "link"]
    doc: str
    fn: Callable[[Ctx], object] | None = None
    columns: dict[str, str] = field(default_factory=dict)


# Elicitation phrasing: asks for the reasoning trace, for grading against a rubric, or for a rewrite of an answer.
ELICIT_RE = (
    r"(step[ -]by[ -]step|chain of thought|reasoning behind|intermediate step|show(ing)? (your|every|all) (work|step)"
    r"|think (through|carefully)|reason (through|about)|scratchpad|rubric|grade (the|this)|score (the|this|each)"
    r"|justify (every|each)|rewrite (the|this) (answer|response)|as if you had written"
    r"|(complete|full|detailed|your) reasoning|reasoning trace|intermediate (reasoning|steps)"
    # the same asks in a few other languages (a campaign need not write English)
    r"|paso a paso|razonamiento|étape par étape|raisonnement|schritt für schritt|begründ|denkweg|passo dopo passo"
    r"|ragionamento|passo a passo|raciocínio|逐步|一步一步|推理过程|思考过程|ステップバイステップ|段階的)"
)
ELICIT_COLUMN = {"elicit": f"regexp_matches(prompt, '{ELICIT_RE}', 'i')"}  # 'i': no lower-cased copy of each prompt
# The prompt's head (first 12 words) is where a template lives; distinct heads are far fewer than prompts.
TEMPLATE_COLUMNS = {"head": "regexp_extract(prompt, '^\\S*(\\s+\\S+){0,11}')", "prompt_hash": "prompt_hash"}
# IPv4 /24 or IPv6 /48: the block an operator rents or a NAT sits behind.
IP_PREFIX_COLUMN = {"ip_prefix": "CASE WHEN contains(ip, ':') THEN array_to_string(string_split(ip, ':')[1:3], ':') "
                                  "ELSE regexp_extract(ip, '^(\\d+\\.\\d+\\.\\d+)\\.', 1) END"}  # fmt: skip


# Payload shape of the prompt's last 100 characters (where the payload sits after an instruction): digits, code or
# markup symbols, line breaks. A crude capability class (arithmetic, code, structured, prose) in any language.
_TAIL = "right(prompt, 100)"
_DIGITS, _SYMBOLS = "0123456789", '-=+*/<>(){}[];"_#|'
# Counted by deleting the class with translate, a character map (same counts as regexp_replace; detect at full
# scale took 206 CPU-s with it against 339 with the regex, bench/results/detect.json).
SHAPE_COLUMN = {"shape": f"CASE WHEN prompt IS NULL OR prompt = '' THEN NULL ELSE "
                         f"((length({_TAIL}) - length(translate({_TAIL}, '{_DIGITS}', ''))) * 25 >= length({_TAIL}))"
                         f"::INTEGER + 2 * ((length({_TAIL}) - length(translate({_TAIL}, '{_SYMBOLS}', ''))) * 25 "
                         f">= length({_TAIL}))::INTEGER + 4 * contains(prompt, chr(10))::INTEGER END"}  # fmt: skip
REPEAT_COLUMN = {"ph": "hash(coalesce(prompt, prompt_hash))"}  # exact prompt identity, 8 bytes


def _template(ctx: Ctx) -> None:
    """Template fingerprints: MinHash over word 2-shingles of the masked prompt head, 3 LSH bands of 4 rows.

    Masking (digits -> 0, capitalised names -> N) makes "Add 41 and 7" and "Add 3 and 950" one template; the first 12
    tokens hold the instruction, where templates live, before the payload. Each band key is one artifact, so prompts
    that agree on any band are linked (LSH + union through the graph). Without prompt text, the prompt hash is the
    template (exact repeats only). Replaces ev's `head` and `prompt_hash` by the band keys k0, k1, k2.
    """
    con = ctx.con
    if "prompt" not in ctx.present:
        ctx.notes["template"] = "prompt text absent: templates are exact prompt_hash repeats (paraphrase-blind)"
        keys = "hash(prompt_hash) AS k0, NULL::UBIGINT AS k1, NULL::UBIGINT AS k2"
        con.execute(f"CREATE TABLE ev2 AS SELECT * EXCLUDE (head, prompt_hash), {keys} FROM ev")
    else:
        con.register("tk", _head_keys(con))
        con.execute("CREATE TABLE ev2 AS SELECT e.* EXCLUDE (head, prompt_hash), tk.k0, tk.k1, tk.k2 FROM ev e "
                    "LEFT JOIN tk USING (head)")  # fmt: skip
        con.unregister("tk")
    con.execute("DROP TABLE ev; ALTER TABLE ev2 RENAME TO ev")


def _mask_sql(text: str) -> str:
    """SQL masking `text`: a capitalised word after whitespace -> N, lower case, digit runs -> 0."""
    return f"regexp_replace(lower(regexp_replace({text}, '(\\s)[A-Z][a-z]+', '\\1N', 'g')), '[0-9]+', '0', 'g')"


def _head_keys(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """(head, k0, k1, k2) for each distinct head: MinHash with DuckDB's hash(shingle, j), j < 12, band key
    hash(h_4b .. h_4b+3).

    Written out because the plain SQL (a list of shingle strings per head, 12 hashes each) was a third of detect's
    time: a head's words are masked once per distinct word, a shingle's 12 hashes once per distinct shingle (a
    million heads hold ~100k), and the minimum over a head's shingles is one numpy pass per hash."""
    heads = con.sql("SELECT head, string_split(head, ' ') AS w FROM (SELECT DISTINCT head FROM ev "
                    "WHERE head IS NOT NULL)").to_arrow_table()  # fmt: skip
    words, heads = heads["w"].combine_chunks(), heads.select(["head"])
    # int32 where it fits: at 16M events the token arrays are the largest thing outside DuckDB.
    parent = np.repeat(np.arange(len(words), dtype=np.int32), np.diff(words.offsets.to_numpy()))  # by head
    enc = pc.list_flatten(words).dictionary_encode()
    tok, vocab = enc.indices.to_numpy(), enc.dictionary  # int32
    del words, enc
    # Masking a head (digits -> 0, a capitalised word after a space -> N, lower case) is masking each word, the first
    # without a space before it; masked forms are numbered so that "Alice" and "Bob" become one word.
    con.register("vocab", pa.table({"w": vocab}))
    after_space = _mask_sql("' ' || w")
    masked = con.sql(f"SELECT {_mask_sql('w')} AS m0, substr({after_space}, 2) AS m1 FROM vocab").to_arrow_table()
    con.unregister("vocab")
    first = np.r_[True, parent[1:] != parent[:-1]]
    forms = pa.chunked_array(masked["m0"].chunks + masked["m1"].chunks).combine_chunks().dictionary_encode()
    mw = forms.indices.to_numpy()[tok + np.where(first, 0, len(vocab)).astype(np.int32)]
    del tok
    # Shingles: consecutive masked words of one head (a one-word head is its own shingle, as (word, none)).
    v = len(forms.dictionary) + 1
    nxt = np.r_[parent[1:] == parent[:-1], False]
    single = first & ~nxt
    keep = nxt | single
    code = mw[keep].astype(np.int64) * v + np.where(nxt, np.r_[mw[1:], 0], v - 1)[keep]
    owner = parent[keep]
    enc = pa.array(code).dictionary_encode()  # hashing, not sorting: np.unique took 2 s per million heads
    inv = enc.indices.to_numpy()
    text = forms.dictionary.to_pylist()
    shingles = [text[c // v] + (" " + text[c % v] if c % v != v - 1 else "") for c in enc.dictionary.to_pylist()]
    con.register("shingles", pa.table({"s": shingles}))
    hashes = con.sql("SELECT " + ", ".join(f"hash(s, {j}) AS h{j}" for j in range(12)) + " FROM shingles").fetchnumpy()
    con.unregister("shingles")
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # every head has at least one shingle
    mins = {}
    for j in range(12):  # the minimum over ranks (uint32, 3x faster to gather), then the hash of that rank
        h = hashes[f"h{j}"]
        order = np.argsort(h)
        rank = np.empty(len(h), np.uint32)
        rank[order] = np.arange(len(h), dtype=np.uint32)
        mins[f"h{j}"] = h[order][np.minimum.reduceat(rank[inv], starts)]
    con.register("mins", pa.table({"head": heads["head"], **mins}))
    keys = con.sql("SELECT head, hash(h0, h1, h2, h3) AS k0, hash(h4, h5, h6, h7) AS k1, "
                   "hash(h8, h9, h10, h11) AS k2 FROM mins").to_arrow_table()  # fmt: skip
    con.unregister("mins")
    return keys


def _count(ctx: Ctx, cond: str) -> np.ndarray:
    """Per account: requests meeting `cond` (SQL over ev)."""
    return ctx.per_account(f"SELECT acct, count(*) FILTER (WHERE {cond}) FROM ev GROUP BY acct")


def _share(ctx: Ctx, hits: np.ndarray, prior_n: float = 5.0) -> np.ndarray:
    """Per-account share of requests that are `hits`, shrunk towards the typical account's share (accounts with few
    requests are not extreme by chance).

    The prior is the median share over accounts with at least `prior_n` requests, not the pooled event rate: a few
    heavy accounts (a campaign is exactly that) would otherwise drag the pooled rate up, and every one-request
    account, shrunk towards it, would look like them (the demo's 1.1% false positives came from this)."""
    n = ctx.n_req
    big = n >= prior_n
    prior = float(np.median((hits / n)[big] if big.any() else hits / n))
    return (hits + prior_n * prior) / (n + prior_n)


def _account_templates(ctx: Ctx) -> str:
    """Table ak (acct, k0, c): requests per account and template, which the template signals all start from."""
    return ctx.table("ak", "SELECT acct, k0, count(*) AS c FROM ev GROUP BY ALL")


def _template_reuse(ctx: Ctx) -> np.ndarray:
    ak = _account_templates(ctx)
    return _share(ctx, ctx.per_account(
        f"SELECT acct, sum(c) FROM {ak} WHERE k0 IN (SELECT k0 FROM {ak} WHERE k0 IS NOT NULL GROUP BY k0 "
        "HAVING count(*) >= 5 AND sum(c) >= 3 * count(*)) GROUP BY acct"
    ))  # fmt: skip


def _concentration(ctx: Ctx) -> np.ndarray:
    top3 = ctx.per_account(
        f"SELECT acct, sum(c) FROM (SELECT acct, c, row_number() OVER (PARTITION BY acct ORDER BY c DESC) AS r "
        f"FROM {_account_templates(ctx)}) WHERE r <= 3 GROUP BY acct"
    )
    return top3 / (ctx.n_req + 3)


def _volume(ctx: Ctx) -> np.ndarray:
    days = np.maximum((ctx.per_account("SELECT acct, last - first FROM nacc")) / 86400, 1)
    return np.log1p(ctx.n_req / days)


def _regularity(ctx: Ctx) -> np.ndarray:
    """-log(coefficient of variation of gaps): scripts pace requests, people come in bursts (CV >> 1)."""
    x = ctx.per_account(
        "SELECT acct, -ln(greatest(stddev_samp(g) / nullif(avg(g), 0), 1e-3)) FROM "
        "(SELECT acct, t - lag(t) OVER (PARTITION BY acct ORDER BY t) AS g FROM ev) WHERE g IS NOT NULL "
        "GROUP BY acct HAVING count(*) >= 5",
        np.nan,
    )
    return np.where(np.isnan(x), np.nanmedian(x) if np.isfinite(x).any() else 0.0, x)


def _flat_hours(ctx: Ctx) -> np.ndarray:
    """Normalised entropy of the account's hour-of-day histogram: automation runs around the clock. Only flatness
    is used, never which hours (that would be a proxy for geography)."""
    rows = ctx.con.execute(
        "SELECT acct, CAST(floor(t / 3600) % 24 AS INTEGER) AS h, count(*) AS c FROM ev GROUP BY 1, 2"
    ).fetchnumpy()
    hist = np.zeros((ctx.n, 24))
    hist[rows["acct"], rows["h"]] = rows["c"]
    tot = hist.sum(1, keepdims=True)
    p = hist / np.maximum(tot, 1)
    ent = -(p * np.log(np.where(p > 0, p, 1))).sum(1) / np.log(24)
    # Few requests cannot fill 24 bins: compare with the entropy a perfectly flat account of that size could reach.
    reach = np.log(np.minimum(tot[:, 0], 24).clip(1)) / np.log(24)
    return np.where(tot[:, 0] >= 12, ent / np.maximum(reach, 1e-9), np.nan)


def _pivot(ctx: Ctx) -> np.ndarray:
    """Share of an account's requests in the 24 h after a new model's release that go to that model."""
    con = ctx.con
    first = con.execute(
        "SELECT model, min(t) FROM ev WHERE model IS NOT NULL GROUP BY model ORDER BY 2 DESC LIMIT 1"
    ).fetchall()
    first = first[0] if first else None
    if first is None or first[1] < ctx.t_min + 86400:
        ctx.notes["pivot"] = "no model released during the log window"
        return np.zeros(ctx.n)
    model, rel = first
    ctx.notes["pivot"] = f"new model {model!r} first seen {_iso(rel)}"
    return ctx.per_account(
        f"SELECT acct, (sum(CASE WHEN model = '{model.replace(chr(39), '')}' THEN 1.0 ELSE 0 END)) / (count(*) + 3) "
        f"FROM ev WHERE t >= {rel} AND t < {rel + 86400} GROUP BY acct"
    )


def _coverage(ctx: Ctx) -> np.ndarray:
    """Entropy (bits) of the account's payload shape classes: a campaign sweeps arithmetic, code, tool calls and text
    through one wrapper; a batch job sends one kind of record, a person mostly prose. Shrunk for small accounts."""
    h = ctx.per_account("""
        WITH c AS (SELECT acct, shape, count(*) AS c FROM ev WHERE shape IS NOT NULL GROUP BY ALL),
        p AS (SELECT acct, c, sum(c) OVER (PARTITION BY acct) AS n FROM c)
        SELECT acct, -sum(c / n * log2(c / n)) * any_value(n) / (any_value(n) + 5) FROM p GROUP BY acct
    """)  # fmt: skip
    return np.maximum(h, 0.0)


def _novelty(ctx: Ctx) -> np.ndarray:
    """Share of the account's requests whose exact prompt occurs once in the whole log: an extractor wants new
    answers; a benchmark re-run, a class pasting one assignment or a retried job asks the same thing again."""
    rep = ctx.table("rep", "SELECT ph, count(*) AS c FROM ev WHERE ph IS NOT NULL GROUP BY ph")
    return _share(ctx, ctx.per_account(f"SELECT acct, count(*) FILTER (WHERE r.c = 1) FROM ev JOIN {rep} r "
                                       "USING (ph) GROUP BY acct"))  # fmt: skip


def _long_outputs(ctx: Ctx) -> np.ndarray:
    """Mean log completion length: reasoning traces are long, in any language; labels, tool calls and short answers
    are not. Shrunk towards the typical account's mean."""
    x = ctx.per_account("SELECT acct, sum(ln(1 + completion_tokens)) FROM ev WHERE completion_tokens IS NOT NULL "
                        "GROUP BY acct")  # fmt: skip
    k = ctx.per_account("SELECT acct, count(completion_tokens) FROM ev GROUP BY acct")
    big = k >= 5
    prior = float(np.median((x / np.maximum(k, 1))[big])) if big.any() else 0.0
    return (x + 5 * prior) / (k + 5)


def _sync_cells(ctx: Ctx) -> str:
    """Cells (template, time bucket) where many accounts act at once, well above that template's usual rate; table
    akb (k0, b, acct, c) holds requests per template, bucket and account, from which both signals read.

    The usual rate is scaled up in buckets busier than average (a backlog replayed at once, a log flushed with one
    timestamp): there every template rises together, which is not coordination on one template."""
    cfg = ctx.cfg
    n_buckets = max(1.0, (ctx.t_max - ctx.t_min) / cfg.sync_bucket_s)
    akb = ctx.table("akb", f"SELECT k0, CAST(floor(t / {cfg.sync_bucket_s}) AS BIGINT) AS b, acct, count(*) AS c "
                           "FROM ev GROUP BY ALL")  # fmt: skip
    return ctx.table("cells", f"""
        WITH c AS (SELECT k0, b, count(*) AS na FROM {akb} WHERE k0 IS NOT NULL GROUP BY 1, 2),
        r AS (SELECT k0, sum(na) / {n_buckets} AS rate FROM c GROUP BY 1),
        a AS (SELECT b, count(DISTINCT acct) AS act FROM {akb} GROUP BY 1),
        am AS (SELECT sum(act) / {n_buckets} AS mean_act FROM a)
        SELECT c.k0, c.b FROM c JOIN r USING (k0) JOIN a USING (b), am
        WHERE na >= {cfg.sync_min_accounts} AND na >= {cfg.sync_ratio} * rate * greatest(1, act / mean_act)
    """)  # fmt: skip


def _sync_share(ctx: Ctx) -> np.ndarray:
    cells = _sync_cells(ctx)
    return _share(ctx, ctx.per_account(f"SELECT acct, sum(c) FROM akb JOIN {cells} USING (k0, b) GROUP BY acct"))


def _links(ctx: Ctx, pairs: str, min_count: int = 2, prefix: str = "") -> tuple[np.ndarray, pa.Array]:
    """(account, artifact) pairs where the artifact carries >= min_share of the account's traffic. `pairs`: SQL
    giving (acct, key, c) = the account's requests carrying that key; `prefix` is put before each key's text."""
    rows = ctx.con.sql(f"""
        SELECT p.acct, {prefix!r} || CAST(p.key AS VARCHAR) AS key FROM ({pairs}) p JOIN nacc n USING (acct)
        WHERE p.key IS NOT NULL AND p.c >= least({min_count}, n.tot) AND p.c >= {ctx.cfg.min_share} * n.tot
    """).to_arrow_table()  # fmt: skip
    return rows["acct"].to_numpy(), rows["key"].combine_chunks()


def _field_links(column: str, min_count: int = 2) -> Callable[[Ctx], tuple[np.ndarray, pa.Array]]:
    return lambda ctx: _links(ctx, f"SELECT acct, {column} AS key, count(*) AS c FROM ev GROUP BY 1, 2", min_count)


def _template_links(ctx: Ctx) -> tuple[np.ndarray, pa.Array]:
    # Only templates that their accounts use over and over: a popular phrasing ("Explain your reasoning step by step
    # for ...") is used once or twice by many people, and its users, who ask for reasoning more than most, would
    # otherwise be jointly unusual; a campaign sends its templates tens of times per account.
    parts = []
    for j in range(3):
        src = _account_templates(ctx) if j == 0 else f"(SELECT acct, k{j}, count(*) AS c FROM ev GROUP BY ALL)"
        pairs = (
            f"WITH p AS (SELECT acct, k{j} AS key, c FROM {src} WHERE k{j} IS NOT NULL) SELECT * FROM p WHERE key IN "
            f"(SELECT key FROM p GROUP BY key HAVING sum(c) >= {ctx.cfg.template_repeat} * count(*))"
        )
        parts.append(_links(ctx, pairs, prefix=f"b{j}:"))
    return np.concatenate([a for a, _ in parts]), pa.concat_arrays([k for _, k in parts])


def _sync_links(ctx: Ctx) -> tuple[np.ndarray, pa.Array]:
    cells = _sync_cells(ctx)
    rows = ctx.con.sql(
        f"SELECT acct, CAST(k0 AS VARCHAR) || '@' || CAST(b AS VARCHAR) AS key FROM akb JOIN {cells} USING (k0, b)"
    ).to_arrow_table()
    return rows["acct"].to_numpy(), rows["key"].combine_chunks()


SIGNALS: dict[str, Signal] = {
    # request signals: per-event columns the signals below read
    "elicitation": Signal(("prompt",), "request", "prompt asks for a reasoning trace, rubric grading or rewrite",
                          columns=ELICIT_COLUMN),
    "template": Signal(("prompt|prompt_hash",), "request", "MinHash/LSH template fingerprint of the masked prompt",
                       _template, TEMPLATE_COLUMNS),
    # account features: higher = more like an extraction campaign
    "volume": Signal((), "account", "log requests per active day", _volume),
    "regularity": Signal((), "account", "timing regularity: -log CV of inter-arrival gaps", _regularity),
    "flat_hours": Signal((), "account", "activity spread evenly over the 24 hours (flatness only)", _flat_hours),
    "elicit_share": Signal(("prompt",), "account", "share of requests eliciting reasoning/grading",
                           lambda c: _share(c, _count(c, "elicit")), ELICIT_COLUMN),
    # A popular phrasing is used once by many people; a campaign template is used over and over by each account.
    "template_reuse": Signal(("prompt|prompt_hash",), "account",
                             "share of requests on templates that 5+ accounts each use 3+ times on average",
                             _template_reuse),
    "concentration": Signal(("prompt|prompt_hash",), "account", "share of requests on the account's top 3 templates",
                            _concentration),
    "single_turn": Signal(("n_messages",), "account", "share of single-message requests (no conversation)",
                          lambda c: _share(c, _count(c, "n_messages <= 1")), {"n_messages": "n_messages"}),
    "logprobs": Signal(("logprobs_requested",), "account", "share of requests asking for logprobs",
                       lambda c: _share(c, _count(c, "logprobs_requested")),
                       {"logprobs_requested": "logprobs_requested"}),
    "coverage": Signal(("prompt",), "account", "entropy of payload shape classes (capabilities swept)", _coverage,
                       SHAPE_COLUMN),
    "novelty": Signal(("prompt|prompt_hash",), "account", "share of requests whose exact prompt is sent once",
                      _novelty, REPEAT_COLUMN),
    "long_outputs": Signal(("completion_tokens",), "account", "mean log completion length (traces are long)",
                           _long_outputs, {"completion_tokens": "completion_tokens"}),
    "pivot": Signal(("model",), "account", "traffic moved to a newly released model within 24 h", _pivot,
                    {"model": "model"}),
    "sync_share": Signal(("prompt|prompt_hash",), "account", "share of requests in synchronous template bursts",
                         _sync_share),
    # links: shared artifacts, weighted by how unusual their accounts are jointly
    "payment": Signal(("payment_fp",), "link", "shared payment fingerprint", _field_links("payment_fp", 1),
                      {"payment_fp": "payment_fp"}),
    "ip_prefix": Signal(("ip",), "link", "shared IPv4 /24 or IPv6 /48", _field_links("ip_prefix"), IP_PREFIX_COLUMN),
    "user_agent": Signal(("user_agent",), "link", "shared user agent", _field_links("user_agent"),
                         {"user_agent": "user_agent"}),
    "system_prompt": Signal(("system_prompt_hash",), "link", "shared system prompt",
                            _field_links("system_prompt_hash"), {"system_prompt_hash": "system_prompt_hash"}),
    "template_link": Signal(("prompt|prompt_hash",), "link", "shared prompt template (any LSH band)", _template_links),
    "synchrony": Signal(("prompt|prompt_hash",), "link", "acting on one template in the same time bucket",
                        _sync_links),
}  # fmt: skip


def _available(sig: Signal, present: set[str]) -> list[str]:
    """The fields `sig` lacks (empty when it can run)."""
    return [need for need in sig.needs if not any(f in present for f in need.split("|"))]


# ---------------------------------------------------------------------------------------------------------- statistics


def robust_z(x: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """(x - median) / robust scale, both from `ref` (default: x itself). The scale is 1.4826 MAD, or where most
    values tie (MAD = 0) the upper spread (q95 - q50) / 1.645, so a feature that is zero for most accounts still has
    a usable scale."""
    ref = x if ref is None else ref
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0:
        return np.zeros_like(x)
    med = np.median(ref)
    scale = 1.4826 * np.median(np.abs(ref - med))
    if scale <= 1e-12:
        scale = (np.quantile(ref, 0.95) - med) / 1.645
    if scale <= 1e-12:
        scale = (np.quantile(ref, 0.999) - med) / 3.09
    if scale <= 1e-12:
        scale = max(float(np.std(ref)), 1e-6)
    return (x - med) / scale


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values): reject H_i at FDR q when q_i <= q (Benjamini-Hochberg 1995)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def _iso(t: float | None) -> str | None:
    if t is None or not np.isfinite(t):
        return None
    return np.datetime_as_string(np.datetime64(int(t * 1000), "ms"), unit="ms") + "Z"


def _iso_all(t: np.ndarray) -> np.ndarray:
    """_iso over an array of epoch seconds (one call, not one per account)."""
    return np.char.add(np.datetime_as_string((t * 1000).astype(np.int64).astype("datetime64[ms]"), unit="ms"), "Z")


# ---------------------------------------------------------------------------------------------------------- run


def run(cfg: DetectConfig) -> dict:
    t_start = time.time()
    paths = _expand(cfg.logs)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ref_paths = _expand(cfg.reference) if cfg.reference else []
    with tempfile.TemporaryDirectory(prefix="alambic-detect-", dir=out) as tmp:
        con = _connect(cfg, tmp)
        try:
            result = _detect(con, cfg, paths, out, ref_paths, tmp)
        finally:
            con.close()
    result["seconds"] = round(time.time() - t_start, 2)
    (out / "manifest.json").write_text(json.dumps({"stage": "guard.detect", "inputs": [str(p) for p in paths],
                                                   **result}, indent=2) + "\n")  # fmt: skip
    return result


def _connect(cfg: DetectConfig, tmp: str) -> duckdb.DuckDBPyConnection:
    # In-memory database: tables beyond `memory_limit` spill to `tmp` (out of core), and nothing pays for
    # compressing and checkpointing a database file that is thrown away (4x faster to load 16M events).
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{cfg.memory_limit}'; SET temp_directory = '{tmp}'; SET TimeZone = 'UTC'; "
                "SET preserve_insertion_order = false; SET enable_progress_bar = false")  # fmt: skip
    if cfg.threads:
        con.execute(f"SET threads = {cfg.threads}")
    return con


def _detect(con, cfg: DetectConfig, paths: list[Path], out: Path, ref_paths: list[Path], tmp: str) -> dict:
    until = None
    if cfg.until:
        until = con.execute(f"SELECT {_ts_expr(repr(cfg.until))}").fetchall()[0][0]
        if until is None:
            raise LogError(f"until={cfg.until!r} is not an ISO-8601 time or epoch seconds")
    clock = time.time()
    seconds: dict[str, float] = {}  # per stage, in the manifest: where the time goes on a large log

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(seconds.get(stage, 0.0) + time.time() - clock, 2)
        clock = time.time()

    unknown = [s for s in cfg.signals if s not in SIGNALS]
    if unknown:
        raise ValueError(f"unknown signal(s) {unknown}; known: {', '.join(SIGNALS)}")
    info = load(con, paths, until, {k: v for s in cfg.signals for k, v in SIGNALS[s].columns.items()})
    if info["events"] == 0:
        raise LogError(f"no usable events in {[str(p) for p in paths]}; malformed: {info['malformed']}")
    con.execute("CREATE TEMP TABLE nacc AS SELECT acct, count(*) AS tot, min(t) AS first, max(t) AS last FROM ev "
                "GROUP BY acct")  # fmt: skip
    stats = con.execute("SELECT acct, tot, first, last FROM nacc ORDER BY acct").fetchnumpy()
    lap("load")
    present = set(info["present"])
    n = con.execute("SELECT count(*) FROM acc").fetchall()[0][0]
    n_req = stats["tot"].astype(np.float64)
    ctx = Ctx(con, n, cfg, present, info["t_min"], info["t_max"], n_req)
    skipped: dict[str, str] = {}
    used = []
    for name in cfg.signals:
        lack = _available(SIGNALS[name], present)
        if lack:
            skipped[name] = "log lacks " + ", ".join(lack)
        else:
            used.append(name)

    features: dict[str, np.ndarray] = {}
    links: dict[str, tuple[np.ndarray, pa.Array]] = {}
    for name in used:
        sig = SIGNALS[name]
        if sig.kind == "request" and sig.fn is not None:
            sig.fn(ctx)
            lap(name)
    # A signal may depend on a request signal that was skipped (e.g. concentration needs templates).
    for name in used:
        sig = SIGNALS[name]
        if sig.kind == "account":
            x = np.asarray(sig.fn(ctx), dtype=np.float64)
            features[name] = x
        elif sig.kind == "link":
            links[name] = sig.fn(ctx)
        lap(name)

    z = _account_z(cfg, features)
    p_acct = ndtr(-z)
    camp = _campaigns(cfg, n, z, links)
    lap("campaigns")
    purpose = {k: features[k] for k in PURPOSE if k in features}
    ref = None
    if ref_paths:
        rcon = _connect(cfg, tmp)
        try:
            ref = _reference(rcon, cfg, ref_paths, list(purpose))
        finally:
            rcon.close()
        lap("reference")
    camp, calibration, appeals = _judge(cfg, camp, purpose, n_req, ref)
    lap("judge")

    ids = con.sql("SELECT account_id FROM acc ORDER BY acct").to_arrow_table()["account_id"]
    first_last = {k: stats[k] for k in ("acct", "first", "last")}
    summary = _write(
        cfg, out, ids, n_req, features, z, p_acct, camp, first_last, info, skipped, ctx.notes, calibration, appeals
    )
    cfg.dump(out / "config.json")
    lap("write")
    return summary | {"stage_seconds": seconds}


def _reference(con, cfg: DetectConfig, paths: list[Path], names: list[str]) -> dict:
    """Purpose features of the accounts in a known-benign log (each with >= reference_min_requests requests)."""
    info = load(con, paths, None, {k: v for s in names for k, v in SIGNALS[s].columns.items()})
    if info["events"] == 0:
        raise LogError(f"reference log(s) {[str(p) for p in paths]} hold no usable events; malformed: "
                       f"{info['malformed']}")  # fmt: skip
    con.execute("CREATE TEMP TABLE nacc AS SELECT acct, count(*) AS tot, min(t) AS first, max(t) AS last FROM ev "
                "GROUP BY acct")  # fmt: skip
    n_req = con.execute("SELECT tot FROM nacc ORDER BY acct").fetchnumpy()["tot"].astype(np.float64)
    ctx = Ctx(con, len(n_req), cfg, set(info["present"]), info["t_min"], info["t_max"], n_req)
    keep = n_req >= cfg.reference_min_requests
    feats = {name: np.asarray(SIGNALS[name].fn(ctx), np.float64)[keep] for name in names
             if not _available(SIGNALS[name], ctx.present)}  # fmt: skip
    return {"features": feats, "source": "trusted log(s): " + ", ".join(str(p) for p in paths),
            "lacks": [k for k in names if k not in feats], "events": info["events"]}  # fmt: skip


def _judge(
    cfg: DetectConfig, camp: Campaigns, purpose: dict[str, np.ndarray], n_req: np.ndarray, ref: dict | None
) -> tuple[Campaigns, dict, list[dict]]:
    """Coordination is not extraction: a community of linked accounts is flagged only when what its traffic is for
    looks like extraction, judged against known-benign traffic; otherwise it is reported for review.

    Each purpose feature becomes a robust z against the reference accounts (capped at +-purpose_cap, so one extreme
    feature cannot carry an account alone, and a multi-turn, repetitive account can count against); their sum is the
    account's purpose score. The threshold is the (1 - target_fpr) quantile of the reference accounts' scores, so the
    share of benign accounts above it is an estimate from data, not a hope. A community is flagged when its median
    member is above it: members of one job behave alike, so a benign community passes about as often as one benign
    account does. The reference is a trusted log when given, else the accounts that no significant artifact links
    (a held-out slice: campaigns are linked, so they are mostly left out of it)."""
    n, cap = len(n_req), cfg.purpose_cap
    if ref is None:
        sel = (camp.linked == 0) & (n_req >= cfg.reference_min_requests)
        ref = {"features": {k: x[sel] for k, x in purpose.items()}, "lacks": [],
               "source": f"held-out slice: accounts with >= {cfg.reference_min_requests} requests that no significant "
               "artifact links"}  # fmt: skip
    feats = ref["features"]
    zs, medians = {}, {}
    ref_score = 0.0
    for k, x in purpose.items():
        r = feats.get(k)
        if r is None or not len(r):
            continue
        medians[k] = float(np.median(r))
        zs[k] = np.clip(robust_z(x, r), -cap, cap)
        ref_score = ref_score + np.clip(robust_z(r, r), -cap, cap)
    score = sum(zs.values()) if zs else np.zeros(n)
    ref_score = np.atleast_1d(np.asarray(ref_score, np.float64))
    n_ref = len(ref_score) if zs else 0
    thr = float(np.quantile(ref_score, 1 - cfg.target_fpr, method="higher")) if n_ref else float("inf")
    above = int((ref_score > thr).sum()) if n_ref else 0
    from scipy.stats import beta

    calibration = {
        "reference": ref["source"], "reference_accounts": n_ref, "features": list(zs),
        "features_missing_in_reference": ref["lacks"], "target_fpr": cfg.target_fpr, "threshold": round(thr, 4),
        "reference_above": above, "expected_benign_fpr": round(above / max(1, n_ref), 6),
        "expected_benign_fpr_upper95": round(float(beta.ppf(0.95, above + 1, max(1, n_ref - above))), 6),
        "reference_too_small": bool(n_ref * cfg.target_fpr < 1),
    }  # fmt: skip
    label, flagged = np.full(n, -1), np.zeros(n, bool)
    review, review_label = np.zeros(n, bool), np.full(n, -1)
    kept, reviews = [], []
    for c in camp.campaigns:
        mem = c["members"]
        c["purpose_median"] = round(float(np.median(score[mem])), 3)
        if c["purpose_median"] > thr:
            label[mem], flagged[mem] = len(kept), True
            kept.append(c)
        else:
            review_label[mem], review[mem] = len(reviews), True
            reviews.append(c)
    evidence = [e + [f"purpose={score[i]:.1f} > {thr:.1f}"] if flagged[i] else [] for i, e in enumerate(camp.evidence)]
    appeals = []
    for i in np.flatnonzero(flagged | review):
        rows = [
            {
                "evidence": k,
                "kind": "purpose",
                "value": round(float(purpose[k][i]), 4),
                "reference_median": round(medians[k], 4),
                "z": round(float(zs[k][i]), 3),
            }
            for k in zs
        ]
        rows += [{"evidence": kind, "kind": "link", "artifact": a["artifact"], "accounts": a["accounts"],
                  "q": a["q"], "z": round(min(cap, a["stouffer_z"]), 3)}
                 for kind, a in camp.links.get(int(i), {}).items()]  # fmt: skip
        total = sum(abs(r["z"]) for r in rows) or 1.0
        for r in rows:
            r["share"] = round(r["z"] / total, 4)
        rows.sort(key=lambda r: -abs(r["z"]))
        appeals.append({"acct": int(i), "status": "flagged" if flagged[i] else "review",
                        "group": int(label[i] if flagged[i] else review_label[i]), "purpose_score": round(float(
                            score[i]), 3), "threshold": round(thr, 4), "evidence": rows})  # fmt: skip
    out = Campaigns(label, flagged, camp.q_account, evidence, kept, camp.n_artifacts, camp.n_significant, camp.linked,
                    camp.links, review, review_label, reviews, score)  # fmt: skip
    return out, calibration, appeals


def _account_z(cfg: DetectConfig, features: dict[str, np.ndarray]) -> np.ndarray:
    """Combine features into one robust z per account (empirical null from the bulk of accounts)."""
    if not features:
        return np.zeros(0)
    zs = []
    for x in features.values():
        fill = np.nanmedian(x) if np.isfinite(x).any() else 0.0  # e.g. flat_hours when every account is tiny
        x = np.where(np.isfinite(x), x, fill)
        zs.append(np.clip(robust_z(x), -4, 8))  # a single extreme feature cannot carry an account alone
    s = np.sum(zs, axis=0)
    # Normal scores of the ranks (Blom 1958), not robust_z(s): the summed score has a heavy right tail even among
    # benign accounts (power users, pipelines), and artifacts shared by a few such accounts then looked jointly
    # unusual. Ranks make z exactly N(0, 1) when every account is benign, and conservative for benign accounts when
    # campaigns take the top ranks, so Stouffer's combination over an artifact's accounts is calibrated.
    return ndtri((rankdata(s) - 0.375) / (len(s) + 0.25))


@dataclass
class Campaigns:
    label: np.ndarray  # per account: campaign index or -1
    flagged: np.ndarray  # per account bool
    q_account: np.ndarray  # per account: best q of a significant artifact linking it (1 if none)
    evidence: list[list[str]]  # per account: artifact descriptions
    campaigns: list[dict]
    n_artifacts: int
    n_significant: int
    linked: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per account: significant artifacts tying it
    links: dict[int, dict[str, dict]] = field(default_factory=dict)  # community member -> link kind -> best artifact
    review: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # linked, no extraction evidence
    review_label: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # review group or -1
    reviews: list[dict] = field(default_factory=list)
    purpose_score: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _campaigns(cfg: DetectConfig, n: int, z: np.ndarray, links: dict) -> Campaigns:
    """Artifacts -> Stouffer p-values -> BH -> components over significant artifacts -> campaigns."""
    rows, cols, names, sig_of = [], [], [], []
    for name, (acct, key) in links.items():
        if len(acct) == 0:
            continue
        # Hashing, then sorting only the distinct keys: 10x faster than np.unique on a million strings. Sorted, so
        # artifacts are numbered the same whatever order DuckDB's threads returned the rows in.
        enc = key.dictionary_encode()
        order = pc.sort_indices(enc.dictionary).to_numpy()
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        uniq = enc.dictionary.take(order).to_pylist()
        rows.append(acct.astype(np.int64))
        cols.append(rank[enc.indices.to_numpy()] + len(names))
        names += [f"{name}:{u}" for u in uniq]
        sig_of += [name] * len(uniq)
    if not names:
        empty = np.zeros(n, bool)
        return Campaigns(np.full(n, -1), empty, np.ones(n), [[] for _ in range(n)], [], 0, 0, np.zeros(n))
    r, c = np.concatenate(rows), np.concatenate(cols)
    m = sparse.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, len(names)))
    m.data[:] = 1.0  # an account counts once per artifact
    df = np.asarray(m.sum(0)).ravel()
    zsum = m.T @ z
    keep = (df >= 2) & (df <= max(2.0, cfg.max_df_frac * n))
    stouffer = np.where(keep, zsum / np.sqrt(np.maximum(df, 1)), 0.0)
    effect = np.where(keep, zsum / np.maximum(df, 1), 0.0)
    p = np.where(keep, ndtr(-stouffer), 1.0)
    tested = np.flatnonzero(keep)
    q = np.ones(len(names))
    q[tested] = bh(p[tested])
    sig = (q <= cfg.fdr) & (effect >= cfg.min_effect)
    ms = m[:, sig].tocsr()
    k = int(sig.sum())
    sig_idx = np.flatnonzero(sig)
    linked = np.asarray(ms.sum(1)).ravel()
    # Distinct kinds of significant link per account: two kinds (say template + card) rarely tie an innocent.
    # Shared IP prefixes and user agents are weak on their own (a home /24 next to a proxy exit), so an account
    # tied only by them needs a second kind of link.
    kinds, kind_of = np.unique(np.array(sig_of)[sig], return_inverse=True) if k else (np.array([]), np.zeros(0, int))
    onehot = sparse.csr_matrix((np.ones(k), (np.arange(k), kind_of)), shape=(k, max(1, len(kinds))))
    by_kind = (ms @ onehot) > 0
    n_kinds = np.asarray(by_kind.sum(1)).ravel()
    strong_cols = [j for j, name in enumerate(kinds) if name not in WEAK_LINKS]
    strong = np.asarray(by_kind[:, strong_cols].sum(1)).ravel() > 0 if strong_cols else np.zeros(n, bool)
    eligible = (linked > 0) & ((strong & (z >= cfg.member_min_z)) | (n_kinds >= 2))
    # Each linked account's best artifact (lowest q; the first column among ties).
    q_acc = np.ones(n)
    best = np.full(n, -1)
    row = np.repeat(np.arange(n), np.diff(ms.indptr))
    art = sig_idx[ms.indices]
    first = np.lexsort((art, q[art], row))
    first = first[np.r_[True, row[first][1:] != row[first][:-1]]] if len(first) else first
    best[row[first]] = art[first]
    q_acc[row[first]] = q[art[first]]
    # Components over eligible accounts + significant artifacts (bipartite graph), so an account that is not itself
    # flagged can never bridge two campaigns or pull in its neighbours.
    strong_art = sparse.diags(np.array([sig_of[j] not in WEAK_LINKS for j in sig_idx], dtype=float))
    me = sparse.diags(eligible.astype(float)) @ ms @ strong_art  # weak kinds corroborate, never join
    me = me.tocoo()
    adj = sparse.coo_matrix((np.ones(me.nnz), (me.row, n + me.col)), shape=(n + k, n + k))
    n_comp, comp = connected_components(adj, directed=False)
    comp = comp[:n].copy()
    me = me.tocsr()
    members = np.flatnonzero(eligible)
    sizes = np.bincount(comp[members], minlength=n_comp)
    for cid in np.flatnonzero(sizes >= 2 * cfg.min_campaign_accounts):  # campaigns merged through a few accounts
        mem = members[comp[members] == cid]
        part = split_community(me[mem], cfg.split_resolution, cfg.split_max_bridge)
        comp[mem] = np.where(part == 0, cid, n_comp + part - 1)
        n_comp += int(part.max())
    flagged = eligible.copy()
    label = np.full(n, -1)
    campaigns = []
    fl_comps = np.unique(comp[flagged])
    fl_sizes = np.bincount(comp[flagged], minlength=n_comp)
    for cid in fl_comps[np.argsort(-fl_sizes[fl_comps], kind="stable")]:
        mem = np.flatnonzero(flagged & (comp == cid))
        if len(mem) < cfg.min_campaign_accounts:
            flagged[mem] = False
            continue
        arts = np.unique(sig_idx[ms[mem].indices])
        label[mem] = len(campaigns)
        campaigns.append({"members": mem, "artifacts": arts})
    flagged &= label >= 0
    evidence = [[] for _ in range(n)]
    for i in np.flatnonzero(flagged):
        evidence[i] = [
            f"{names[best[i]]} (q={q[best[i]]:.2g})",
            f"links={int(linked[i])} of {int(n_kinds[i])} kind(s)",
            f"z={z[i]:.2f}",
        ]
    for cmp in campaigns:
        arts = cmp["artifacts"]
        cmp["artifact_rows"] = [
            {"signal": sig_of[j], "artifact": names[j].split(":", 1)[1], "accounts": int(df[j]),
             "mean_z": round(float(effect[j]), 3), "stouffer_z": round(float(stouffer[j]), 2), "q": float(q[j])}
            for j in arts[np.argsort(q[arts])]
        ]  # fmt: skip
        cmp["q"] = float(q[arts].min()) if len(arts) else 1.0
    # Each community member's strongest artifact of each kind: the link half of its appeal view.
    links: dict[int, dict[str, dict]] = {}
    for i in np.flatnonzero(flagged):
        own = sig_idx[ms.indices[ms.indptr[i] : ms.indptr[i + 1]]]
        best_of: dict[str, dict] = {}
        for j in own[np.argsort(q[own], kind="stable")]:
            best_of.setdefault(sig_of[j], {"artifact": names[j].split(":", 1)[1], "accounts": int(df[j]),
                                           "q": float(q[j]), "stouffer_z": float(stouffer[j])})  # fmt: skip
        links[int(i)] = best_of
    return Campaigns(label, flagged, q_acc, evidence, campaigns, int(len(tested)), int(sig.sum()), linked, links)


SPLIT_LINKS = 16


def split_community(m: sparse.csr_matrix, resolution: float, max_bridge: float) -> np.ndarray:
    """Split one connected community (m: its accounts x artifacts) where only a few accounts join its parts; returns a
    part number per account (0 = the part of the first account; all 0 when nothing splits).

    Campaigns that borrow the same camouflage (a popular ordinary phrasing, acted on in one 10-minute bucket) share an
    artifact through a handful of accounts, and connected components then merge them. Louvain (Blondel et al. 2008,
    networkx) on the account-artifact graph separates such parts. Each account's edges weigh 1 in total, so a
    campaign counts by its accounts, not by how many artifacts each has (one wave campaign makes hundreds of
    synchrony cells); accounts with the same artifacts are one node (a proxy network's thousands of accounts often
    are); each account then goes to the part holding most of its artifacts. A part stays with another when more than
    `max_bridge` of its accounts also link into that one: a campaign's own artifacts (templates, cards, access paths)
    share most of their accounts."""
    import networkx as nx

    m = m[:, np.flatnonzero(m.getnnz(0))].tocsr()
    n_acc, k = m.shape
    if k < 2 or max_bridge <= 0:
        return np.zeros(n_acc, np.int64)
    groups: dict[tuple, int] = {}
    group = np.array([groups.setdefault(tuple(m.indices[m.indptr[i] : m.indptr[i + 1]]), len(groups))
                      for i in range(n_acc)])  # fmt: skip
    size = np.bincount(group)
    df = m.getnnz(0)
    g = nx.Graph()
    for arts, gi in groups.items():
        # Louvain sees an account's SPLIT_LINKS most shared artifacts (a wave campaign's account acts in thousands of
        # synchrony cells, and Louvain in Python is linear in edges); the parts are then judged on every link.
        top = sorted(arts, key=lambda a: -df[a])[:SPLIT_LINKS]
        g.add_weighted_edges_from((k + gi, a, size[gi] / len(top)) for a in top)
    parts = nx.community.louvain_communities(g, weight="weight", resolution=resolution, seed=0)
    part_of = np.full(k + len(groups), -1)
    for i, p in enumerate(parts):
        part_of[list(p)] = i
    # Each account goes to the part most of its artifacts are in (Louvain may place a bridging account with the one
    # camouflage artifact it shares rather than with its own campaign's three); artifacts Louvain did not see abstain.
    seen = np.flatnonzero(part_of[:k] >= 0)
    vote = sparse.csr_matrix((np.ones(len(seen)), (seen, part_of[seen])), shape=(k, len(parts)))
    links = (m @ vote).toarray()
    home = links.argmax(1)  # (accounts,)
    touch = links > 0
    both = (touch.T.astype(np.int64) @ touch).astype(np.float64)  # (parts, parts): accounts linking into both
    # Each part joins the one part it shares most of its accounts with, if that is more than `max_bridge` of them
    # (one edge per part: a handful of accounts acting on shared camouflage cannot chain campaigns together).
    n_part = np.maximum(np.bincount(home, minlength=len(parts)), 1)
    np.fill_diagonal(both, 0)
    share = both / n_part[:, None]
    best = share.argmax(1)
    join = np.flatnonzero(share[np.arange(len(parts)), best] > max_bridge)
    edges = sparse.csr_matrix((np.ones(len(join)), (join, best[join])), shape=(len(parts), len(parts)))
    _, root = connected_components(edges, directed=False)
    # Renumber in order of first account, so an unsplit community keeps part 0.
    _, first, label = np.unique(root[home], return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[label]


def _write(
    cfg,
    out: Path,
    ids,
    n_req,
    features,
    z,
    p_acct,
    camp: Campaigns,
    first_last,
    info,
    skipped,
    notes,
    calibration: dict,
    appeals: list[dict],
):
    n = len(ids)
    cols = {"account_id": ids, "requests": pa.array(n_req.astype(np.int64))}
    cols |= {f"f_{k}": pa.array(np.round(v, 4)) for k, v in features.items()}
    cols |= {
        "z": pa.array(np.round(z, 4)),
        "p_value": pa.array(p_acct),
        "q_value": pa.array(camp.q_account),
        "purpose_score": pa.array(np.round(camp.purpose_score, 4)),
        "campaign": pa.array([f"C{c:03d}" if c >= 0 else None for c in camp.label], pa.string()),
        "flagged": pa.array(camp.flagged),
        "review": pa.array(camp.review),
        "review_group": pa.array([f"R{c:03d}" if c >= 0 else None for c in camp.review_label], pa.string()),
        "evidence": pa.array(["; ".join(e) for e in camp.evidence]),
        "first_seen": pa.array(_iso_all(first_last["first"])),
    }  # fmt: skip
    pq.write_table(pa.table(cols), out / "accounts.parquet")
    t_first, t_last = first_last["first"], first_last["last"]

    def describe(c: dict, cid: str, status: str) -> dict:
        mem = c["members"]
        feats = {k: round(float(np.mean(v[mem])), 4) for k, v in features.items()}
        base = {k: round(float(np.median(v)), 4) for k, v in features.items()}
        return {
            "id": cid,
            "status": status,
            "accounts": int(len(mem)),
            "exchanges": int(n_req[mem].sum()),
            "q_value": c["q"],
            "purpose_score_median": c["purpose_median"],
            "threshold": calibration["threshold"],
            "link_kinds": sorted({r["signal"] for r in c["artifact_rows"]}),
            "first_seen": _iso(float(t_first[mem].min())),
            "last_seen": _iso(float(t_last[mem].max())),
            "mean_account_z": round(float(z[mem].mean()), 3),
            "features_mean": feats,
            "features_population_median": base,
            "evidence": c["artifact_rows"][:20],
            "n_artifacts": len(c["artifact_rows"]),
            "members": ids.take(mem).to_pylist(),
        }  # fmt: skip

    campaigns = [describe(c, f"C{i:03d}", "flagged") for i, c in enumerate(camp.campaigns)]
    reviews = [describe(c, f"R{i:03d}", "review") for i, c in enumerate(camp.reviews)]
    (out / "campaigns.json").write_text(json.dumps(campaigns, indent=1) + "\n")
    (out / "review.json").write_text(json.dumps(reviews, indent=1) + "\n")
    id_list = ids.to_pylist() if appeals else []
    with open(out / "appeals.jsonl", "w") as f:
        for a in appeals:
            a["account_id"] = id_list[a.pop("acct")]
            a["group"] = ("C" if a["status"] == "flagged" else "R") + f"{a['group']:03d}"
            f.write(json.dumps(a) + "\n")
    summary = {
        "events": info["events"],
        "accounts": n,
        "flagged_accounts": int(camp.flagged.sum()),
        "campaigns": len(campaigns),
        "campaign_sizes": [c["accounts"] for c in campaigns],
        "review_accounts": int(camp.review.sum()),
        "review_groups": len(reviews),
        "review_sizes": [c["accounts"] for c in reviews],
        "calibration": calibration,
        "artifacts_tested": camp.n_artifacts,
        "artifacts_significant": camp.n_significant,
        "signals_used": [s for s in cfg.signals if s not in skipped],
        "signals_skipped": skipped,
        "notes": notes,
        "malformed": info["malformed"],
        "malformed_examples": info["examples"],
        "fields_present": info["present"],
        "outputs": {k: str(out / k) for k in ("accounts.parquet", "campaigns.json", "review.json", "appeals.jsonl",
                                               "report.md", "report.html")},
    }  # fmt: skip
    (out / "report.md").write_text(_report(summary, campaigns, reviews))
    (out / "report.html").write_text(_report_html(summary, campaigns, reviews, appeals))
    return summary


def _calibration_text(c: dict) -> str:
    """The operating point in one paragraph: where the threshold comes from and the benign FPR expected at it."""
    small = (f" The reference is too small to resolve a rate of {c['target_fpr']:.2%} (it needs at least "
             f"{int(np.ceil(1 / c['target_fpr'])):,} accounts); its highest score is the threshold.")  # fmt: skip
    return (
        f"Flag threshold: purpose score > {c['threshold']:.2f}, the {1 - c['target_fpr']:.3%} quantile of "
        f"{c['reference_accounts']:,} reference accounts ({c['reference']}). {c['reference_above']:,} of them are "
        f"above it: expected benign false-positive rate {c['expected_benign_fpr']:.3%} per account in a linked "
        f"community (95% upper bound {c['expected_benign_fpr_upper95']:.3%}), and no more than that over all benign "
        "accounts, since a community is flagged only when its median member is above the threshold."
        + (small if c["reference_too_small"] else "")
        + (f" Not in the reference, so not counted: {', '.join(c['features_missing_in_reference'])}."
           if c["features_missing_in_reference"] else "")
    )  # fmt: skip


def _report(s: dict, campaigns: list[dict], reviews: list[dict]) -> str:
    lines = [
        "# Distillation campaigns found in API traffic",
        "",
        f"{s['events']:,} events from {s['accounts']:,} accounts; {s['flagged_accounts']:,} accounts flagged in "
        f"{s['campaigns']} campaign(s) ({s['artifacts_significant']:,} of {s['artifacts_tested']:,} shared artifacts "
        f"significant at the configured FDR); {s['review_accounts']:,} accounts in {s['review_groups']} linked "
        "group(s) without extraction evidence, for review (not flagged).",
        "",
        _calibration_text(s["calibration"]),
        "",
        "## Campaigns",
        "",
        "| id | accounts | exchanges | q | first seen | last seen | strongest evidence |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for c in campaigns:
        ev = ", ".join(f"{e['signal']} ({e['accounts']} accts, mean z {e['mean_z']})" for e in c["evidence"][:3])
        lines.append(f"| {c['id']} | {c['accounts']:,} | {c['exchanges']:,} | {c['q_value']:.2g} | "
                     f"{c['first_seen']} | {c['last_seen']} | {ev} |")  # fmt: skip
    if reviews:
        lines += ["", "## For review (coordination without extraction evidence; not flagged)", "",
                  "| id | accounts | exchanges | link kinds | median purpose score | threshold |",
                  "|---|---:|---:|---|---:|---:|"]  # fmt: skip
        lines += [f"| {c['id']} | {c['accounts']:,} | {c['exchanges']:,} | {', '.join(c['link_kinds'])} | "
                  f"{c['purpose_score_median']:.2f} | {c['threshold']:.2f} |" for c in reviews]  # fmt: skip
    lines += ["", "Each flagged or reviewed account's evidence, with its share of the score: appeals.jsonl and the "
              "appeal view in report.html."]  # fmt: skip
    lines += ["", "## Signals", "", "Used: " + ", ".join(s["signals_used"]) + ".", ""]
    if s["signals_skipped"]:
        lines += ["Skipped (the log lacks the fields they need):", ""]
        lines += [f"- `{k}`: {v}" for k, v in s["signals_skipped"].items()]
        lines.append("")
    if s["notes"]:
        lines += [f"- {k}: {v}" for k, v in s["notes"].items()] + [""]
    if s["malformed"]:
        lines += ["## Malformed input (skipped)", ""]
        lines += [f"- {k}: {v:,} line(s)" for k, v in s["malformed"].items()]
        lines += [f"  - e.g. {e['file']}:{e['line']}: `{e['text'][:80]}`" for e in s["malformed_examples"]]
        lines.append("")
    lines += [
        "Geography is never a signal. p-values: account z from an empirical null over the bulk of accounts;",
        "artifacts by one-sided Stouffer over their accounts; Benjamini-Hochberg across tested artifacts.",
        "",
    ]
    return "\n".join(lines)


# One self-contained page (no scripts, no external files) beside report.md: what an analyst opens first.
REPORT_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Distillation campaigns: {{ s.flagged_accounts }} accounts</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
details { margin: .4em 0; } summary { cursor: pointer; font-weight: 600; } code { font-size: 90%; }
</style></head><body>
<h1>Distillation campaigns found in API traffic</h1>
<p>{{ "{:,}".format(s.events) }} events from {{ "{:,}".format(s.accounts) }} accounts;
<b>{{ "{:,}".format(s.flagged_accounts) }}</b> accounts flagged in <b>{{ s.campaigns }}</b> campaign(s)
({{ "{:,}".format(s.artifacts_significant) }} of {{ "{:,}".format(s.artifacts_tested) }} shared artifacts significant
at the configured FDR); {{ "{:,}".format(s.review_accounts) }} accounts in {{ s.review_groups }} linked group(s)
without extraction evidence, for review (not flagged).</p>
<p>{{ calibration }}</p>
<h2>Campaigns</h2>
<table><tr><th>id</th><th>accounts</th><th>exchanges</th><th>q</th><th>first seen</th><th>last seen</th>
<th>mean account z</th><th>median purpose score</th></tr>
{% for c in campaigns %}<tr><td><a href="#{{ c.id }}">{{ c.id }}</a></td>
<td class="n">{{ "{:,}".format(c.accounts) }}</td><td class="n">{{ "{:,}".format(c.exchanges) }}</td>
<td class="n">{{ "%.2g" % c.q_value }}</td><td>{{ c.first_seen }}</td><td>{{ c.last_seen }}</td>
<td class="n">{{ c.mean_account_z }}</td><td class="n">{{ c.purpose_score_median }}</td></tr>
{% endfor %}</table>
{% if reviews %}<h2>For review: coordination without extraction evidence (not flagged)</h2>
<table><tr><th>id</th><th>accounts</th><th>exchanges</th><th>link kinds</th><th>median purpose score</th>
<th>threshold</th></tr>
{% for c in reviews %}<tr><td>{{ c.id }}</td><td class="n">{{ "{:,}".format(c.accounts) }}</td>
<td class="n">{{ "{:,}".format(c.exchanges) }}</td><td>{{ c.link_kinds | join(", ") }}</td>
<td class="n">{{ c.purpose_score_median }}</td><td class="n">{{ c.threshold }}</td></tr>
{% endfor %}</table>{% endif %}
{% for c in campaigns %}<details id="{{ c.id }}"{% if loop.first %} open{% endif %}><summary>{{ c.id }}:
{{ "{:,}".format(c.accounts) }} accounts, {{ c.n_artifacts }} significant artifact(s)</summary>
<table><tr><th>signal</th><th>artifact</th><th>accounts</th><th>mean z</th><th>Stouffer Z</th><th>q</th></tr>
{% for e in c.evidence %}<tr><td>{{ e.signal }}</td><td><code>{{ e.artifact }}</code></td>
<td class="n">{{ e.accounts }}</td><td class="n">{{ e.mean_z }}</td><td class="n">{{ e.stouffer_z }}</td>
<td class="n">{{ "%.2g" % e.q }}</td></tr>
{% endfor %}</table>
<table><tr><th>feature</th><th>campaign mean</th><th>population median</th></tr>
{% for k, v in c.features_mean.items() %}<tr><td>{{ k }}</td><td class="n">{{ v }}</td>
<td class="n">{{ c.features_population_median[k] }}</td></tr>
{% endfor %}</table>
<p>Members (first 50): {% for m in c.members[:50] %}<code>{{ m }}</code> {% endfor %}</p></details>
{% endfor %}
{% if appeals %}<h2>Appeal view</h2>
<p>Every flagged or reviewed account{% if n_appeals > appeals | length %} (the first {{ appeals | length }} of
{{ "{:,}".format(n_appeals) }}; appeals.jsonl holds all){% endif %}: each piece of evidence in z units (purpose
features against the reference, links by their artifact's Stouffer Z, each capped) and its share of the account's
evidence; a negative share counts against extraction.</p>
{% for a in appeals %}<details id="appeal-{{ a.account_id }}"><summary><code>{{ a.account_id }}</code>: {{ a.status }}
({{ a.group }}), purpose score {{ a.purpose_score }} vs threshold {{ a.threshold }}</summary>
<table><tr><th>evidence</th><th>kind</th><th>value / artifact</th><th>reference median / accounts</th><th>z</th>
<th>share</th></tr>
{% for e in a.evidence %}<tr><td>{{ e.evidence }}</td><td>{{ e.kind }}</td>
<td>{% if e.kind == "link" %}<code>{{ e.artifact[:60] }}</code> (q {{ "%.2g" % e.q }})
{%- else %}{{ e.value }}{% endif %}</td>
<td class="n">{% if e.kind == "link" %}{{ e.accounts }}{% else %}{{ e.reference_median }}{% endif %}</td>
<td class="n">{{ e.z }}</td><td class="n">{{ "%.0f%%" % (100 * e.share) }}</td></tr>
{% endfor %}</table></details>
{% endfor %}{% endif %}
<h2>Signals</h2>
<p>Used: {{ s.signals_used | join(", ") }}.</p>
{% if s.signals_skipped %}<p>Skipped (the log lacks the fields they need):</p><ul>
{% for k, v in s.signals_skipped.items() %}<li><code>{{ k }}</code>: {{ v }}</li>{% endfor %}</ul>{% endif %}
{% if s.notes %}<ul>{% for k, v in s.notes.items() %}<li>{{ k }}: {{ v }}</li>{% endfor %}</ul>{% endif %}
{% if s.malformed %}<h2>Malformed input (skipped)</h2><ul>
{% for k, v in s.malformed.items() %}<li>{{ k }}: {{ "{:,}".format(v) }} line(s)</li>{% endfor %}
{% for e in s.malformed_examples %}<li>e.g. {{ e.file }}:{{ e.line }}: <code>{{ e.text[:80] }}</code></li>{% endfor %}
</ul>{% endif %}
<p>Geography is never a signal. p-values: account z from an empirical null over the bulk of accounts; artifacts by
one-sided Stouffer over their accounts; Benjamini-Hochberg across tested artifacts.</p>
</body></html>
"""


APPEALS_IN_HTML = 2000  # accounts with an appeal view in report.html; appeals.jsonl holds every one


def _report_html(s: dict, campaigns: list[dict], reviews: list[dict], appeals: list[dict]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(REPORT_HTML).render(s=s, campaigns=campaigns, reviews=reviews,
                                               appeals=appeals[:APPEALS_IN_HTML], n_appeals=len(appeals),
                                               calibration=_calibration_text(s["calibration"]))  # fmt: skip


__all__ = ["SIGNALS", "DetectConfig", "LogError", "Signal", "bh", "load", "robust_z", "run"]
