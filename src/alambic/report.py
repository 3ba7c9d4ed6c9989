"""`alambic report RUN_DIR`: one self-contained HTML page (and its Markdown twin) about a distillation run.

A run directory is what `alambic demo` or `alambic loop` writes; the report shows whatever stages it finds:

  collect/manifest.json     which teacher, when, how many exchanges, what they cost
  student/curve.jsonl       training curve (student/manifest.json: loss, parameters)
  evaluate/evaluation.json  per-skill accuracy, fidelity, size and speed of student and teacher
  loop/loop.json            quality against teacher queries, targeted vs uniform allocation
  manifest.json             the run's own summary (guard and provenance results, timings)

Plots are drawn with matplotlib: inline SVG in the HTML (no external files, so the page can be mailed), PNG files
beside the Markdown.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

from pydantic import Field

from . import __version__
from .config import Config

SECTIONS = ("collect/manifest.json", "student/curve.jsonl", "evaluate/evaluation.json", "loop/loop.json",
            "manifest.json")
TEACHER_COLOR, STUDENT_COLOR, UNIFORM_COLOR = "#4c72b0", "#dd8452", "#8c8c8c"


class ReportConfig(Config):
    """Settings of a report."""

    run_dir: str = Field(..., description="run directory (from `alambic demo` or `alambic loop`)",
                         json_schema_extra={"positional": True})
    out: str | None = Field(None, description="output folder (default: RUN_DIR/report)")
    title: str = Field("alambic distillation report", description="page title")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run the stage that wrote it") from None


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            if line.strip():
                rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i} is not valid JSON ({e}); re-run the stage that wrote it") from None
    return rows


def load_run(run_dir: Path) -> dict:
    """Everything the report can show, from the files a run left; a clear error when none is there."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} not found; give the folder `alambic demo` or "
                                "`alambic loop` wrote (e.g. runs/demo)")
    found = [s for s in SECTIONS if (run_dir / s).exists()]
    if not found:
        raise ValueError(f"{run_dir} holds no alambic run: none of {', '.join(SECTIONS)} is there; give the folder "
                         "`alambic demo` or `alambic loop` wrote")
    run = {
        "manifest": _read_json(run_dir / "manifest.json") or {},
        "collect": _read_json(run_dir / "collect" / "manifest.json"),
        "student": _read_json(run_dir / "student" / "manifest.json"),
        "curve": _read_jsonl(run_dir / "student" / "curve.jsonl"),
        "evaluation": _read_json(run_dir / "evaluate" / "evaluation.json"),
        "loop": _read_json(run_dir / "loop" / "loop.json"),
    }
    return run


# --- plots -----------------------------------------------------------------------------------------------------------


def _figure(w: float = 6.4, h: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(w, h), dpi=100)
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", alpha=0.3)
    return fig, ax


def _accuracy_plot(ev: dict):
    import numpy as np

    groups = [g for g in ev["teacher"]["accuracy"] if g != "mean"] + ["mean"]
    t = [100 * ev["teacher"]["accuracy"][g]["accuracy"] for g in groups]
    s = [100 * ev["student"]["accuracy"][g]["accuracy"] for g in groups]
    err = []
    for g in groups:
        a = ev["student"]["accuracy"][g]
        lo, hi = a.get("ci95") or (float("nan"), float("nan"))  # no interval (the mean): no error bar
        err.append([100 * (a["accuracy"] - lo), 100 * (hi - a["accuracy"])])
    fig, ax = _figure()
    x = np.arange(len(groups))
    ax.bar(x - 0.2, t, 0.4, label="teacher", color=TEACHER_COLOR)
    ax.bar(x + 0.2, s, 0.4, label="student (95% CI)", color=STUDENT_COLOR, yerr=np.array(err).T, capsize=3)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    return fig


def _curve_plot(curve: list[dict]):
    fig, ax = _figure()
    train = [(p["step"], p["loss"]) for p in curve if "loss" in p]
    val = [(p["step"], p["val_loss"]) for p in curve if "val_loss" in p]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color=STUDENT_COLOR)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", color=TEACHER_COLOR)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    acc = [(p["step"], 100 * p["heldout_acc"]["mean"]) for p in curve if isinstance(p.get("heldout_acc"), dict)]
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc, strict=True), "s--", color="#55a868", label="held-out accuracy (%)")
        ax2.set_ylabel("held-out accuracy (%)")
        ax2.set_ylim(0, 100)
        ax2.spines[["top"]].set_visible(False)
        ax2.legend(frameon=False, loc="center right")
    ax.legend(frameon=False, loc="upper right")
    return fig


def _loop_plot(loop: dict):
    fig, ax = _figure()
    for name, color in (("targeted", STUDENT_COLOR), ("uniform", UNIFORM_COLOR)):
        series = loop.get("curves", {}).get(name) or []
        if series:
            xs = [p["queries"] for p in series]
            ys = [100 * p["accuracy"] for p in series]
            ax.plot(xs, ys, "o-", label=name, color=color)
            if all("accuracy_sd" in p for p in series):
                sd = [100 * p["accuracy_sd"] for p in series]
                ax.fill_between(xs, [y - d for y, d in zip(ys, sd, strict=True)],
                                [y + d for y, d in zip(ys, sd, strict=True)], color=color, alpha=0.15)
    if loop.get("teacher_accuracy") is not None:
        ax.axhline(100 * loop["teacher_accuracy"], ls=":", color=TEACHER_COLOR, label="teacher")
    ax.set_xlabel("teacher queries")
    ax.set_ylabel("student held-out accuracy (%)")
    ax.legend(frameon=False)
    return fig


def p_value_plot(series: list[tuple[str, list[dict], str | None]]):
    """p-value against (context, token) pairs scored (Sander et al.'s radioactivity axes): one line per
    (label, `p_by_tokens` points, colour or None) — the report's student and control, the bench's watermarked shares."""
    from matplotlib.ticker import NullFormatter

    fig, ax = _figure()
    for label, pts, color in series:
        if pts:
            ax.plot([q["tokens_scored"] for q in pts], [max(q["p_value"], 1e-300) for q in pts], "o-", label=label,
                    color=color)
    ax.axhline(1e-6, ls=":", color=TEACHER_COLOR, label="p = 1e-6")
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = max((q["tokens_scored"] for _, pts, _ in series for q in pts), default=16)
    ticks = [16 * 2**i for i in range(12) if 16 * 2**i <= top]  # the sizes p_by_tokens reports
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("(context, token) pairs scored")
    ax.set_ylabel("p-value")
    ax.legend(frameon=False, fontsize=8)
    return fig


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)


# --- page ------------------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _watermark_section(p: dict) -> dict:
    """The student's and the control's radioactivity tests side by side. Only the student learned from watermarked
    answers, so only its p-value should be small; the null check (random keys) says whether the p-values hold."""
    acc = p.get("teacher_accuracy") or {}
    text = [f"The teacher served every completion with a green-list watermark (key `{p['key']}`: context width "
            f"{p['context_width']}, green fraction γ = {p['gamma']}, bias δ = {p['delta']}). Its held-out accuracy: "
            f"{_pct(acc.get('watermarked'))} as served (watermarked), {_pct(acc.get('clean'))} without the watermark "
            "(`alambic evaluate`, local weights): the mark's cost.",
            f"`guard provenance` sampled each model on held-out {', '.join(p['skills'])} prompts and tested its text "
            "for the key: a small p-value says it was trained on the watermarked outputs. The control learned the "
            f"same way from {_fmt(p['control_records'])} answers of the teacher served without the key "
            f"({_fmt(p['control_steps'])} steps)."]
    s, c = p["student"], p["control"]
    rows = [["", "student", "control"]] + [[label, f(s), f(c)] for label, f in (
        ("p-value", lambda r: _fmt(r["p_value"])),
        ("z", lambda r: _fmt(r["z"])),
        ("(context, token) pairs scored", lambda r: _fmt(r["tokens_scored"])),
        (f"green fraction (chance: {p['gamma']})", lambda r: _fmt(r["green_fraction"])),
        ("true key's rank among random keys", lambda r: f"{r['null_check']['true_key_rank']} of "
                                                        f"{r['null_check']['keys'] + 1}"),
        ("random keys: KS p (uniform p-values)", lambda r: _fmt(r["null_check"]["ks_p_value"])),
        (f"random keys: false positives at α = {s['null_check']['alpha']}",
         lambda r: _pct(r["null_check"]["false_positive_rate"])))]
    section = {"title": "Watermark provenance", "text": text, "table": rows}
    if s.get("p_by_tokens") and c.get("p_by_tokens"):
        section |= {"plot": lambda: p_value_plot([("student", s["p_by_tokens"], STUDENT_COLOR),
                                                  ("control", c["p_by_tokens"], UNIFORM_COLOR)]),
                    "name": "watermark"}
    return section


def sections(run: dict) -> list[dict]:
    """The report as a list of {title, text, table (rows of cells), plot (a figure factory)}."""
    out: list[dict] = []
    ev, col, stu, loop, man = run["evaluation"], run["collect"], run["student"], run["loop"], run["manifest"]
    if ev:
        r = ev["ratios"]
        lines = [f"The student keeps **{_pct(r['accuracy_kept'])}** of the teacher's mean held-out accuracy "
                 f"({_pct(ev['student']['accuracy']['mean']['accuracy'])} vs "
                 f"{_pct(ev['teacher']['accuracy']['mean']['accuracy'])}) with {_fmt(r['parameters'])}× the "
                 f"parameters, and generates {_fmt(r['speedup_tokens_per_s'])}× as many tokens per second.",
                 f"Agreement with the teacher's final answers: {_pct(ev['fidelity']['agreement'])}; held-out token "
                 f"KL(teacher ‖ student): {_fmt(ev['fidelity']['token_kl'])} nats/token. {ev['n']} prompts: "
                 f"{ev['prompts']}."]
        out.append({"title": "Summary", "text": lines})
        rows = [["skill", "teacher", "student", "student 95% CI"]]
        for g, t in ev["teacher"]["accuracy"].items():
            s = ev["student"]["accuracy"][g]
            ci = s.get("ci95")
            rows.append([g, _pct(t["accuracy"]), _pct(s["accuracy"]), f"{_pct(ci[0])} – {_pct(ci[1])}" if ci else ""])
        out.append({"title": "Accuracy per skill", "table": rows, "plot": lambda: _accuracy_plot(ev),
                    "name": "accuracy"})
        ts, ss = ev["teacher"], ev["student"]
        rows = [["", "teacher", "student", "student / teacher"],
                ["parameters", _fmt(ts["parameters"]), _fmt(ss["parameters"]), _fmt(r["parameters"])],
                ["size on disk (bytes)", _fmt(ts["size_bytes"]), _fmt(ss["size_bytes"]), _fmt(r["size_on_disk"])],
                ["generation tokens/s", _fmt(ts["speed"]["tokens_per_s"]), _fmt(ss["speed"]["tokens_per_s"]),
                 _fmt(r["speedup_tokens_per_s"])],
                ["latency p50 (s, one prompt)", _fmt(ts["speed"]["latency_p50_s"]),
                 _fmt(ss["speed"]["latency_p50_s"]), _fmt(r["latency"])]]
        out.append({"title": "Smaller and faster", "text": ["Both models measured in the same run on this machine."],
                    "table": rows})
    if run["curve"]:
        text = []
        if stu:
            text.append(f"Loss `{stu['loss']}` ({stu['signal']}), {stu['counts']['steps']} steps, "
                        f"{_fmt(stu['counts']['tokens_seen'])} tokens, {_fmt(stu['train_seconds'])} s; student "
                        f"{_fmt(stu['student'].get('parameters'))} parameters.")
        out.append({"title": "Training", "text": text, "plot": lambda: _curve_plot(run["curve"]), "name": "training"})
    if loop:
        text = [loop.get("summary", "")] if loop.get("summary") else []
        rows = [["teacher queries", "targeted", "uniform"]]
        tgt, uni = loop.get("curves", {}).get("targeted", []), loop.get("curves", {}).get("uniform", [])
        for i, p in enumerate(tgt):
            u = uni[i] if i < len(uni) else None
            rows.append([_fmt(p["queries"]), _pct(p["accuracy"]), _pct(u["accuracy"]) if u else "—"])
        out.append({"title": "Quality against teacher queries", "text": text, "table": rows,
                    "plot": lambda: _loop_plot(loop), "name": "loop"})
    if col:
        t = col["teacher"]
        rows = [["", ""], ["teacher", t.get("teacher_id") or t.get("model")], ["endpoint", t.get("base_url") or "—"],
                ["model", t.get("model")], ["backend", t.get("backend")],
                ["collected", f"{col['started_at']} → {col['ended_at']}"],
                ["exchanges (records)", _fmt(col["records"])],
                ["requests sent (not cached)", _fmt(col["requests_sent"])],
                ["prompt / completion tokens", f"{_fmt(col['prompt_tokens'])} / {_fmt(col['completion_tokens'])}"],
                ["spend (USD)", _fmt(col["spent_usd"])], ["teacher signal", col.get("capability")],
                ["errors / retries", f"{col['errors']} / {col['retries']}"]]
        if stu:
            rows.append(["training data (sha256)", ", ".join(str(v)[:16] for v in (stu.get("data") or {}).values())])
        out.append({"title": "Provenance", "text": ["Which teacher taught this student, when, and what it cost."],
                    "table": rows})
    if man.get("guard"):
        from .demo import guard_verdict

        g = man["guard"]
        out.append({"title": "Guard: the provider's view", "text": [
            f"The collection's {g['demo_accounts']} accounts hidden among {_fmt(g['benign_accounts'])} simulated "
            f"benign accounts: {guard_verdict(g)[1]}."]})
    if man.get("provenance"):
        out.append(_watermark_section(man["provenance"]))
    if man.get("stages"):
        rows = [["stage", "seconds"]] + [[k, _fmt(v)] for k, v in man["stages"].items()]
        out.append({"title": "Run time", "table": rows})
    return out


CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:58rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{padding:.2rem .8rem;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child{text-align:left}svg{max-width:100%;height:auto}.meta{color:#777;font-size:.85rem}"""


def _md_inline(text: str) -> str:
    """The little Markdown the texts use (**bold**, `code`), as HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def render(run: dict, title: str, out: Path) -> tuple[Path, Path, list[str]]:
    """Write report.html (self-contained) and report.md (+ PNGs) to `out`; returns both paths and the sections."""
    from jinja2 import Environment

    out.mkdir(parents=True, exist_ok=True)
    parts = sections(run)
    md = [f"# {title}", ""]
    for p in parts:
        p["html_text"] = [_md_inline(t) for t in p.get("text", [])]
        md += [f"## {p['title']}", ""] + [t + "\n" for t in p.get("text", [])]
        if p.get("table"):
            rows = p["table"]
            md += ["| " + " | ".join(map(str, rows[0])) + " |", "|" + "---|" * len(rows[0])]
            md += ["| " + " | ".join(map(str, r)) + " |" for r in rows[1:]] + [""]
        if p.get("plot"):
            _png(p["plot"](), out / f"{p['name']}.png")
            md += [f"![{p['title']}]({p['name']}.png)", ""]
            p["svg"] = _svg(p["plot"]())
    page = Environment(autoescape=True).from_string(TEMPLATE).render(
        title=title, css=CSS, parts=parts, version=__version__)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(page)
    md_path.write_text("\n".join(md) + f"\n\n_alambic {__version__}_\n")
    return html_path, md_path, [p["title"] for p in parts]


TEMPLATE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{{ css }}</style></head><body>
<h1>{{ title }}</h1>
{% for p in parts %}<section id="{{ p.name or loop.index }}"><h2>{{ p.title }}</h2>
{% for t in p.html_text %}<p>{{ t | safe }}</p>{% endfor %}
{% if p.svg %}<figure>{{ p.svg | safe }}</figure>{% endif %}
{% if p.table %}<table><tr>{% for c in p.table[0] %}<th>{{ c }}</th>{% endfor %}</tr>
{% for r in p.table[1:] %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
</section>{% endfor %}
<p class="meta">alambic {{ version }}</p></body></html>"""


def run(cfg: ReportConfig) -> dict:
    """Render the report of `cfg.run_dir`; returns the paths written and the sections shown."""
    run_dir = Path(cfg.run_dir)
    data = load_run(run_dir)
    html_path, md_path, titles = render(data, cfg.title, Path(cfg.out) if cfg.out else run_dir / "report")
    return {"html": str(html_path), "markdown": str(md_path), "sections": titles}


__all__ = ["ReportConfig", "load_run", "render", "run", "sections"]
