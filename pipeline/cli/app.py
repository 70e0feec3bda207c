"""The ``dataengine`` command line: one subcommand per stage, each a thin wrapper over a typed
stage function.

Every subcommand takes the corpus as ``--root ROOT`` (a local path or any fsspec URL), a
``--config`` YAML and repeatable ``--set key=value``. Heavy libraries (torch, ray, prefect) are
imported inside the commands so ``dataengine --help`` stays fast. Errors a user can act on are
reported in one place (:func:`dataengine.pipeline.cli.common.reports_errors`).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback

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


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _shutdown() -> None:
    """Stop what native threads this process started (Ray's driver, first), then run the
    interpreter's exit handlers."""
    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - shutting down; the command's result stands
            logging.getLogger(__name__).debug("ray.shutdown failed", exc_info=True)
    atexit._run_exitfuncs()
    logging.shutdown()


def main() -> None:
    """The console script: runs the command, shuts down, and leaves with its exit code.

    The process ends with ``os._exit`` after an explicit shutdown: native libraries (Ray,
    onnxruntime, torch) keep threads whose C++ destructors race the interpreter's own exit and
    could abort a command that had succeeded ("terminate called without an active exception",
    exit 134).
    """
    code = 0
    try:
        app(prog_name="dataengine")
    except SystemExit as exc:
        code = _exit_code(exc)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - reported, then the same exit as an uncaught error
        traceback.print_exc()
        code = 1
    try:
        _shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the exit code
                pass
        os._exit(code)
