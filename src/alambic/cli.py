"""The `alambic` command: one verb per stage, each verb's flags generated from its stage's Config.

Only this module prints. A verb = a stage's `Config` class + the function that runs it (litgpt style):
`command(app, "serve", ServeConfig, serve_main)`; field descriptions become `--help`.
"""

from __future__ import annotations

import inspect
import logging
import sys
import typing
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import typer
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.table import Table

from . import __version__
from .config import Config, ConfigError

console = Console(stderr=True)
out = Console()

app = typer.Typer(
    name="alambic",
    help="LLM knowledge distillation from both sides of the API: distil a teacher, guard against being distilled.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
teacher_app = typer.Typer(help="Make the demo teacher model.", no_args_is_help=True)
app.add_typer(teacher_app, name="teacher")
guard_app = typer.Typer(help="The provider's side: find distillation campaigns in API access logs, watermark "
                        "outputs, test a suspect's provenance.",
                        no_args_is_help=True)
app.add_typer(guard_app, name="guard")


def _option_type(annotation):
    """The type typer should parse for a config field (Optional[...] since unset flags mean 'not given')."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return _option_type(args[0])
    if origin is list:
        return list[args[0]] if args else list[str]
    if origin is typing.Literal:
        return str
    if annotation in (int, float, str, bool, Path):
        return annotation
    return str


def command(parent: typer.Typer, name: str, cfg_cls: type[Config], main: Callable[[Config], None], help: str = ""):
    """Register `name` on `parent`: flags from `cfg_cls` fields, plus `--config FILE.toml`, then call `main(cfg)`."""
    params = []
    for field_name, info in cfg_cls.model_fields.items():
        info: FieldInfo
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        typ = _option_type(info.annotation)
        default_txt = "" if info.is_required() else f" (default: {info.get_default(call_default_factory=True)})"
        desc = (info.description or "") + default_txt
        if extra.get("positional"):
            default = typer.Argument(None, help=desc, show_default=False, metavar=field_name.upper())
        else:
            flag = "--" + field_name.replace("_", "-")
            decls = [f"{flag}/--no-{field_name.replace('_', '-')}"] if typ is bool else [flag]
            default = typer.Option(None, *decls, help=desc, show_default=False)
        params.append(
            inspect.Parameter(field_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=typ | None)
        )
    params.append(
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", help="TOML file of settings (flags override it)."),
            annotation=Path | None,
        )
    )
    params.append(
        inspect.Parameter(
            "verbose",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--verbose", "-v", help="Log progress details."),
            annotation=bool,
        )
    )

    def handler(**kwargs):
        file = kwargs.pop("config")
        verbose = kwargs.pop("verbose")
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        try:
            cfg = cfg_cls.resolve(file, section=name, **kwargs)
            main(cfg)
        except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
            console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    handler.__signature__ = inspect.Signature(params)
    handler.__name__ = name.replace("-", "_")
    handler.__doc__ = help or (cfg_cls.__doc__ or "").strip()
    parent.command(name, help=handler.__doc__)(handler)


def print_accuracy(title: str, acc: dict[str, float]) -> None:
    table = Table(title=title)
    table.add_column("skill")
    table.add_column("held-out accuracy", justify="right")
    for k, v in acc.items():
        table.add_row(k, f"{100 * v:.1f}%", style="bold" if k == "mean" else None)
    out.print(table)


# --- verbs -------------------------------------------------------------------------------------------------------


def _teacher_train(cfg):
    from .teacher import run

    with console.status("training the demo teacher") as status:
        manifest = run(cfg, progress=lambda p: status.update(f"step {p['step']} loss {p['loss']:.3f}"))
    print_accuracy(f"demo teacher ({manifest['parameters']:,} parameters)", manifest["heldout_accuracy"])
    out.print(f"saved to {cfg.out} in {manifest['train_seconds']:.0f}s")


def _serve(cfg):
    from .serve import run

    run(cfg, on_ready=lambda url: console.print(f"serving {cfg.model} at {url}/v1 (Ctrl-C to stop)"))


@contextmanager
def collect_progress():
    """A live bar for collection: done/total, requests/s, tokens/s, cache hits, errors, spend, ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [TextColumn("collect"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("collect", total=None, info="")

        def progress(v):
            info = (f"{v['requests_per_s']:.1f} req/s  {v['tokens_per_s']:.0f} tok/s  cached {v['cached']}  "
                    f"errors {v['errors']}  retries {v['retries']}  ${v['spent_usd']:.4f}")
            bar.update(task, total=v["total"], completed=v["done"], info=info)

        yield progress


def print_collect(m: dict) -> None:
    where = m['teacher'].get('base_url') or m['teacher'].get('teacher_id')
    table = Table(title=f"collected from {m['teacher']['model']} at {where}")
    for k in ("prompts", "records", "from_cache", "requests_sent", "retries", "errors", "prompt_tokens",
              "completion_tokens", "spent_usd", "capability", "elapsed_s"):
        table.add_row(k, str(m[k]))
    out.print(table)
    if m["retired_keys"]:
        console.print(f"[yellow]retired keys (401/403):[/] {', '.join(m['retired_keys'])}")
    if m["budget_stop"]:
        console.print(f"[yellow]budget reached:[/] stopped after {m['records']} records, "
                      f"{m['not_collected_budget']} prompts not collected; raise the cap and re-run to continue")
    if m["errors"]:
        console.print(f"[yellow]{m['errors']} prompts failed;[/] see errors.jsonl beside the output")
    out.print(f"interactions: {m['output']}")


def _collect(cfg):
    from .collect import run

    with collect_progress() as progress:
        m = run(cfg, progress=progress)
    print_collect(m)


def _train(cfg):
    from .train.trainer import run

    with console.status("training the student") as status:
        m = run(cfg, progress=lambda p: status.update(
            "step {} loss {}".format(p.get("step"), p.get("loss", p.get("train_loss", "?")))))
    print_summary("student", {k: m[k] for k in m if k not in ("config",)})


def _demo(cfg):
    from .demo import guard_verdict, run

    if cfg.profile == "smollm2":
        from .smollm2 import Smollm2Config

        return _demo_smollm2(Smollm2Config(out=cfg.out if cfg.out != "runs/demo" else "runs/smollm2", seed=cfg.seed))
    with collect_progress() as progress:
        result = run(cfg, log=lambda msg: console.print(msg), progress=progress)
    marked = ", watermarked" if result.get("teacher_watermark") else ""
    print_accuracy(f"demo teacher answering over HTTP ({result['teacher_url']}{marked})", result["teacher_accuracy"])
    if result["collect"]:
        print_collect(result["collect"])
    if result["guard"]:
        g = result["guard"]
        status, verdict = guard_verdict(g)
        colour = {"found": "green", "review": "yellow", "missed": "red"}[status]
        out.print(f"guard: the demo's collection ({g['demo_accounts']} accounts) among {g['benign_accounts']} "
                  f"simulated benign accounts: [{colour}]{verdict}[/]")
    if result.get("student"):
        out.print(f"student: {describe_student(result['student'])}")
    if result.get("evaluation"):
        import json

        print_evaluation(json.loads((Path(cfg.out) / "evaluate" / "evaluation.json").read_text()))
    if result.get("provenance"):
        pv = result["provenance"]
        out.print("watermark provenance (p < 1e-6 is strong evidence of training on the marked outputs): "
                  + "; ".join(f"{name} p = {pv[name]['p_value']:.2g} over {pv[name]['tokens_scored']} pairs"
                              for name in ("student", "control")))
    if result.get("report"):
        out.print(f"report: {result['report']}")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result["stages"].items())
    out.print(f"demo finished in {result['seconds']:.0f}s ({stages}); outputs in {cfg.out}")


def describe_student(st: dict) -> str:
    """How a demo student was made, in one line."""
    m = st.get("made") or {}
    if m.get("kind") == "prune":
        how = (f"pruned from {m['source']} (Minitron-style: layers {m['layers']}, hidden {m['hidden']}, "
               f"{m['heads']} heads, MLP {m['mlp']})")
    elif m.get("kind") == "preset":
        how = f"built from scratch (preset {m['preset']})"
    else:
        how = f"from {m.get('source', '?')}"
    rel = (f" (the first {st['relation_steps']} also on the teacher's attention relations, MiniLMv2)"
           if st.get("relation_steps") else "")
    return (f"{st['parameters']:,} parameters, {how}, distilled with {st['loss']} for {st.get('steps', '?')} steps"
            f"{rel} in {st['train_seconds']:.0f}s")


def _demo_smollm2(cfg):
    import json

    from .smollm2 import run

    with collect_progress() as progress:
        result = run(cfg, log=lambda msg: console.print(msg), progress=progress)
    print_evaluation(json.loads((Path(cfg.out) / "evaluate" / "evaluation.json").read_text()))
    if result.get("report"):
        out.print(f"report: {result['report']}")
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result["stages"].items())
    out.print(f"smollm2 profile finished in {result['seconds']:.0f}s ({stages}); outputs in {cfg.out}")


def _fmt_pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def print_evaluation(r: dict) -> None:
    """Teacher and student side by side: accuracy per skill (95% CI), fidelity, size and speed."""
    t, s = r["teacher"], r["student"]
    table = Table(title=f"student vs teacher on {r['n']} held-out prompts")
    for col in ("", "teacher", "student", "student 95% CI"):
        table.add_column(col, justify="right" if col else "left")
    for g in t["accuracy"]:
        ci = s["accuracy"][g].get("ci95")
        table.add_row(g, _fmt_pct(t["accuracy"][g]["accuracy"]), _fmt_pct(s["accuracy"][g]["accuracy"]),
                      f"{_fmt_pct(ci[0])}–{_fmt_pct(ci[1])}" if ci else "", style="bold" if g == "mean" else None)
    table.add_row("parameters", f"{t['parameters']:,}" if t["parameters"] else "—",
                  f"{s['parameters']:,}" if s["parameters"] else "—", "")
    table.add_row("tokens/s", str(t["speed"]["tokens_per_s"]), str(s["speed"]["tokens_per_s"]), "")
    table.add_row("latency p50 (s)", str(t["speed"]["latency_p50_s"]), str(s["speed"]["latency_p50_s"]), "")
    out.print(table)
    f, q = r["fidelity"], r["ratios"]
    out.print(f"agreement with the teacher {_fmt_pct(f['agreement'])}, held-out token KL {f['token_kl']}; "
              f"accuracy kept {_fmt_pct(q['accuracy_kept'])} at {q['parameters']}x the parameters, "
              f"{q['speedup_tokens_per_s']}x the tokens/s")


def _evaluate(cfg):
    from .evaluate import run

    with console.status("evaluating") as status:
        r = run(cfg, log=status.update)
    print_evaluation(r)
    out.print(f"details: {cfg.out}/evaluation.json, {cfg.out}/replies.jsonl")


def _report(cfg):
    from .report import run

    r = run(cfg)
    out.print(f"report: {r['html']} (Markdown twin: {r['markdown']}); sections: {', '.join(r['sections'])}")


def _loop(cfg):
    from .loop import run

    r = run(cfg, log=lambda msg: console.print(msg))
    table = Table(title="student held-out accuracy against teacher queries (mean over seeds)")
    table.add_column("queries", justify="right")
    for arm in r["curves"]:
        table.add_column(arm, justify="right")
    for i, p in enumerate(next(iter(r["curves"].values()))):
        table.add_row(str(p["queries"]), *(f"{100 * c[i]['accuracy']:.1f}% ± {100 * c[i]['accuracy_sd']:.1f}"
                                           for c in r["curves"].values()))
    out.print(table)
    out.print(f"{r['summary']}; curves: {cfg.out}/loop/loop.json (`alambic report {cfg.out}` plots them)")


def print_summary(title: str, result: dict) -> None:
    """A stage's summary dict, as indented JSON under a title."""
    out.rule(title)
    out.print_json(data=result, default=str)


def _guard(stage: str, fn: str = "run"):
    def main(cfg):
        import importlib

        from .guard.detect import LogError

        module = importlib.import_module(f".guard.{stage}", __package__)
        try:
            result = getattr(module, fn)(cfg)
        except LogError as e:
            raise ValueError(str(e)) from None
        print_summary(f"guard {stage}" + (f" {fn}" if fn != "run" else ""), result)

    return main


def _register() -> None:
    from .collect import CollectConfig
    from .demo import DemoConfig
    from .serve import ServeConfig
    from .smollm2 import Smollm2Config
    from .teacher import TeacherConfig

    command(teacher_app, "train", TeacherConfig, _teacher_train, help="Train the demo teacher on the skill suite.")
    command(app, "serve", ServeConfig, _serve,
            help="Serve any HF causal LM (directory or .gguf) with an OpenAI- and Anthropic-compatible API.")
    command(app, "collect", CollectConfig, _collect,
            help="Ask a teacher many prompts: concurrent, rate-limited, cached, resumable, budgeted.")
    from .train.trainer import TrainConfig

    command(app, "train", TrainConfig, _train,
            help="Train a student on teacher interactions: sft, forward/reverse KL, JSD (full or top-k), on-policy.")
    from .evaluate import EvaluateConfig

    command(app, "evaluate", EvaluateConfig, _evaluate,
            help="Student beside teacher on held-out prompts: accuracy (95% CI), agreement, token KL, size, speed.")
    from .loop import LoopConfig

    command(app, "loop", LoopConfig, _loop,
            help="Rounds of collect → train → evaluate under a teacher budget, queries spent where the student is "
                 "weakest; compared with uniform allocation.")
    from .report import ReportConfig

    command(app, "report", ReportConfig, _report,
            help="One self-contained HTML page (and a Markdown twin) with plots about a run directory.")
    from .guard.detect import DetectConfig
    from .guard.robustness import RobustnessConfig
    from .guard.score import ScoreConfig
    from .guard.simulate import SimulateConfig

    command(guard_app, "simulate", SimulateConfig, _guard("simulate"),
            help="Write synthetic access logs (benign population + campaign playbooks) with ground-truth labels.")
    command(guard_app, "detect", DetectConfig, _guard("detect"),
            help="Find distillation campaigns in access logs (JSONL/Parquet): accounts, campaigns, evidence.")
    command(guard_app, "score", ScoreConfig, _guard("score"),
            help="Score a detection against ground-truth labels, beside two baselines (volume, PRADA).")
    command(guard_app, "robustness", RobustnessConfig, _guard("robustness"),
            help="Recall and false-positive rate as each evasion knob of the simulation is turned.")
    from .guard.provenance import ProvenanceConfig
    from .guard.watermark import KeygenConfig, WatermarkScoreConfig

    watermark_app = typer.Typer(help="Green-list watermark: make a key, score a text.", no_args_is_help=True)
    guard_app.add_typer(watermark_app, name="watermark")
    command(watermark_app, "keygen", KeygenConfig, _guard("watermark", "keygen"),
            help="Write a new watermark key file for `alambic serve --watermark-key-file`.")
    command(watermark_app, "score", WatermarkScoreConfig, _guard("watermark", "score"),
            help="Is this text watermarked with our key? z-score and exact binomial p-value.")
    command(guard_app, "provenance", ProvenanceConfig, _guard("provenance"),
            help="Was this suspect model trained on our watermarked outputs? Radioactivity test with a null check.")
    command(app, "demo", DemoConfig, _demo, help="Run the main job offline on the embedded demo teacher.")
    command(app, "demo-smollm2", Smollm2Config, _demo_smollm2,
            help="The demo on a real LLM: SmolLM2-135M-Instruct teaches a student pruned from itself (slow).")


def version_callback(value: bool):
    if value:
        out.print(f"alambic {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                      help="Print the version and exit.")):
    """alambic: distil a teacher model into a student, and detect distillation of your own API."""


_register()


if __name__ == "__main__":
    app()
