"""The ``dataengine`` command line: one subcommand per stage, each a thin wrapper over a typed
stage function.

Every subcommand takes the corpus as ``--root ROOT`` (a local path or any fsspec URL), a
``--config`` YAML and repeatable ``--set key=value``. Heavy libraries (torch, ray, prefect) are
imported inside the commands so ``dataengine --help`` stays fast. Errors a user can act on are
reported in one place (:func:`dataengine.pipeline.cli.common.reports_errors`).
"""

from __future__ import annotations

import logging

import typer
from rich.logging import RichHandler

from dataengine.pipeline.cli import annotate, corpus, curate, detector, flows, ldm, sam, server

app = typer.Typer(
    name="dataengine",
    help="A distributed data engine for computer vision: SAM data-engine rounds and latent "
         "diffusion over WebDataset shards, on Ray and Prefect.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    """Set up logging once for every subcommand."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(rich_tracebacks=False, show_path=False)])


for _group in (corpus, annotate, sam, detector, flows, server, ldm, curate):
    _group.register(app)


def main() -> None:
    """The console script."""
    app(prog_name="dataengine")
