"""What every subcommand shares: option help texts, stage configs, result tables, and the one
place where errors a user can act on become a red ``error:`` line and exit code 2."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

ROOT_HELP = "Corpus root: a local path or any fsspec URL (s3://bucket/prefix, memory://...)."
CONFIG_HELP = ("YAML config: a stage file (keys are the stage config's fields) or a pipeline "
               "YAML (configs/*.yaml), whose section for this stage is used.")
SET_HELP = "Override one config field, KEY=VALUE (repeatable; dotted keys for nested fields)."

#: Exceptions that mean "bad input": reported in one line (exit 2), never as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError,
               NotADirectoryError, IsADirectoryError)

console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(fn: F) -> F:
    """Wrap a command so that :data:`USER_ERRORS` print ``error: ...`` and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


def add_commands(app: typer.Typer, commands: dict[str, Callable[..., Any]]) -> None:
    """Register ``{name: function}`` on ``app``, each with the CLI's error reporting."""
    for name, fn in commands.items():
        app.command(name)(reports_errors(fn))


def stage_config(cls: type, path: str | None, overrides: list[str] | None,
                 section: str | None = None, **explicit: Any) -> Any:
    """A stage's config: defaults <- ``path`` <- ``--set`` overrides <- explicit options.

    ``path`` is a stage YAML, or a pipeline YAML whose ``section`` (a mapping) is used.
    """
    import yaml

    from dataengine.pipeline.core.config import load_config

    use_section = None
    if path and section and Path(path).is_file():
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path!r} is not valid YAML: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get(section), dict):
            use_section = section
    return load_config(cls, path, list(overrides or []), section=use_section, **explicit)


def with_workers(overrides: list[str] | None, workers: int | None) -> list[str]:
    """``--set`` overrides plus ``scale.num_workers=N`` when ``--workers N`` was given."""
    return list(overrides or []) + ([f"scale.num_workers={workers}"] if workers else [])


def print_fields(result: dict[str, Any], keys: list[str] | None = None,
                 title: str | None = None) -> None:
    """A two-column table of ``result`` (``keys`` in order, or every key)."""
    table = Table(title=title, show_header=False)
    for k in keys or list(result):
        v = result.get(k)
        if isinstance(v, (dict, list)) and v:
            v = json.dumps(v, default=str)[:200]
        table.add_row(str(k), str(v))
    console.print(table)
