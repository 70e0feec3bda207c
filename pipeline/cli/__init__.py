"""The ``dataengine`` command line (typer): one subcommand per stage."""

from dataengine.pipeline.cli.app import app, main

__all__ = ["app", "main"]
