import pytest
from typer.testing import CliRunner

from alambic.cli import app
from alambic.config import ConfigError
from alambic.teacher import TeacherConfig


def test_precedence_defaults_file_flags(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('steps = 7\nlr = 0.01\n[train]\nsteps = 9\n')
    cfg = TeacherConfig.resolve(f, steps=None, batch_size=3)
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.seed) == (7, 0.01, 3, 0)
    assert TeacherConfig.resolve(f, section="train").steps == 9
    assert TeacherConfig.resolve(f, steps=11).steps == 11


def test_bad_config_errors_name_the_problem(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("stepz = 7\n")
    with pytest.raises(ConfigError, match="unknown setting 'stepz'.*steps"):
        TeacherConfig.resolve(f)
    with pytest.raises(ConfigError, match="steps"):
        TeacherConfig.resolve(None, steps=-1)
    f.write_text("steps = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TeacherConfig.resolve(f)
    with pytest.raises(ConfigError, match="not found"):
        TeacherConfig.resolve(tmp_path / "missing.toml")


def test_every_verb_has_help():
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    verbs = ["demo", "serve", "teacher", "collect", "guard", "train"]
    for verb in verbs:
        assert verb in res.output
        sub = runner.invoke(app, [verb, "--help"])
        assert sub.exit_code == 0, sub.output
        assert "Usage" in sub.output
    for verb in ["simulate", "detect", "score", "robustness"]:
        sub = runner.invoke(app, ["guard", verb, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output, sub.output
    sub = runner.invoke(app, ["teacher", "train", "--help"])
    assert "--steps" in sub.output and "optimiser steps" in sub.output


def test_cli_reports_bad_flag_value_clearly(tmp_path):
    res = CliRunner().invoke(app, ["teacher", "train", "--steps", "0", "--out", str(tmp_path / "t")])
    assert res.exit_code == 2
    assert "steps" in res.output
