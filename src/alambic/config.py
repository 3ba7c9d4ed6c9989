"""Typed run configs: defaults < TOML file < command-line flags, validated with clear errors.

Each stage declares one `Config` subclass (a pydantic model). Its fields are the stage's whole schema:
the same names work in a TOML file and as `--flags`, and each field's `description` becomes its `--help`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A config file or flag is wrong; the message says which and how to fix it."""


class Config(BaseModel):
    """Base of every stage's config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def resolve(cls, file: str | Path | None = None, section: str | None = None, **overrides: Any):
        """Build a config from defaults, then a TOML file (optionally one `[section]` of it), then overrides.

        Overrides whose value is None are ignored, so unset CLI flags never mask the file.
        """
        values: dict[str, Any] = {}
        if file is not None:
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} not found")
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from e
            # Top-level settings apply to every verb; a [section] table holds one verb's own settings. Tables that
            # are not settings of this config belong to other verbs' sections and are left to them.
            values.update({k: v for k, v in data.items() if not isinstance(v, dict) or k in cls.model_fields})
            if section is not None and isinstance(data.get(section), dict) and section not in cls.model_fields:
                values.update(data[section])
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as e:
            problems = []
            for err in e.errors():
                where = ".".join(str(x) for x in err["loc"]) or "(config)"
                if err["type"] == "extra_forbidden":
                    known = ", ".join(sorted(cls.model_fields))
                    problems.append(f"unknown setting {where!r}; known settings: {known}")
                else:
                    problems.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
            origin = f" in {str(file)!r}" if file else ""
            raise ConfigError(f"invalid {cls.__name__}{origin}: " + "; ".join(problems)) from None

    def dump(self, path: str | Path) -> None:
        """Write the resolved config as TOML-compatible JSON next to a run's outputs."""
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")
