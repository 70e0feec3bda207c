"""The ``dataengine`` command line: one subcommand per stage, each a thin wrapper.

Every subcommand takes the corpus as ``--root ROOT`` (a local path or any fsspec URL). Heavy
libraries (torch, ray) are imported inside the commands so ``dataengine --help`` stays fast.
Each stage module registers its own commands with :func:`register` below.
"""

from __future__ import annotations

import importlib
import logging

import typer
from rich.logging import RichHandler

app = typer.Typer(
    name="dataengine",
    help="A distributed data engine for computer vision: SAM data-engine rounds and latent "
         "diffusion over WebDataset shards, on Ray and Prefect.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

ROOT_HELP = "Corpus root: a local path or any fsspec URL (s3://bucket/prefix, memory://...)."
CONFIG_HELP = "YAML config file for this stage (keys are the stage config's fields)."
SET_HELP = "Override one config field, KEY=VALUE (repeatable; dotted keys for nested fields)."


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Set up logging once for every subcommand."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(rich_tracebacks=False, show_path=False)])


# Modules that add subcommands to ``app`` through a ``register(app)`` function, in help order.
# A stage adds its module here (one line); the module keeps its command definitions.
COMMAND_MODULES = [
    "pipeline.commands.corpus",
    "pipeline.commands.annotate",
    "pipeline.commands.train",
    "pipeline.commands.pretrain",
    "pipeline.commands.flows",
    "pipeline.commands.dashboard",
    "pipeline.commands.ldm",
    "pipeline.commands.detector",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_all()
