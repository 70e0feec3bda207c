"""``dataengine serve``, ``run-pipeline`` and ``demo``: the Prefect side of the CLI.

``serve`` runs the deployments of ``prefect.yaml`` from this process (``prefect.serve``), for users
without a work pool and worker; ``run-pipeline`` runs the ``pipeline`` flow once (against
``PREFECT_API_URL`` when set, else an ephemeral Prefect API). Prefect is imported inside the
commands so ``dataengine --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from dataengine.pipeline.cli.common import CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands

OVERRIDE_HELP = SET_HELP + " Keys are SECTION.KEY (pipeline, shard, engine, train_ldm, ...)."


def serve_cmd(
    root: str = typer.Option(None, "--root", help=ROOT_HELP + " Overrides the deployments'."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP + " Pipeline YAML passed "
                               "to every deployment (default: prefect.yaml's)."),
    overrides: list[str] = typer.Option(
        None, "--set", help=SET_HELP + " Passed as every deployment's `overrides` parameter "
        "(SECTION.KEY for pipeline / engine-round, KEY for single-stage flows)."),
    deployment: list[str] = typer.Option(None, "--deployment", "-d",
                                         help="Serve only this deployment (repeatable)."),
    prefect_yaml: Path = typer.Option(Path("prefect.yaml"), "--prefect-yaml",
                                      help="Deployments file."),
    limit: int = typer.Option(None, "--limit", help="Most flow runs at once."),
) -> None:
    """Serve the deployments of prefect.yaml (schedules included) until Ctrl-C."""
    from dataengine.flows.deployments import serve

    params: dict[str, object] = {}
    if root:
        params["root"] = root
    if config:
        params["config"] = config
    if overrides:
        params["overrides"] = list(overrides)
    serve(prefect_yaml, list(deployment) or None, params, limit)

def run_pipeline_cmd(
    config: str = typer.Option(..., "--config", help="Pipeline YAML (configs/*.yaml)."),
    root: str = typer.Option(None, "--root", help=ROOT_HELP + " Overrides pipeline.root."),
    data: str = typer.Option(None, "--data", help="Replaces {data} in pipeline.sources."),
    overrides: list[str] = typer.Option(None, "--set", help=OVERRIDE_HELP),
    step: list[str] = typer.Option(None, "--step", help="Run only these steps (repeatable)."),
) -> None:
    """Run the pipeline flow once from a YAML config."""
    from dataengine.flows.pipeline import pipeline_flow

    result = pipeline_flow(config=config, root=root, data=data,
                           overrides=list(overrides or []) or None,
                           steps=list(step) if step else None)
    typer.echo(json.dumps({k: result[k] for k in ("root", "ran", "missing")}, indent=1))


def demo_cmd(
    data: str = typer.Option("../shared/data", "--data", help="Sample data folder (coco-mini/, "
                             "coco128-seg/)."),
    root: str = typer.Option("demo-corpus", "--root", help="Corpus root (a local folder)."),
    config: str = typer.Option(None, "--config", help="Pipeline YAML (default: "
                               "configs/demo.yaml)."),
    overrides: list[str] = typer.Option(None, "--set", help=OVERRIDE_HELP),
    step: list[str] = typer.Option(None, "--step", help="Run only these steps (repeatable)."),
) -> None:
    """The whole pipeline on the sample data with tiny models (what `make demo` runs)."""
    from dataengine.flows.demo import DEFAULT_CONFIG, run_demo

    run_demo(data, root, config or DEFAULT_CONFIG, list(overrides or []) or None,
             list(step) if step else None)


def register(app: typer.Typer) -> None:
    """Add ``serve``, ``run-pipeline`` and ``demo`` to ``app``."""
    add_commands(app, {"serve": serve_cmd, "run-pipeline": run_pipeline_cmd, "demo": demo_cmd})
