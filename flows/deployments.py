"""The deployments of ``prefect.yaml`` as runner deployments, for ``dataengine serve``.

``prefect.yaml`` is the one place deployments are defined: ``prefect deploy --all`` sends them to a
work pool; :func:`load_deployments` builds the same ones (entrypoint, parameters, cron schedules,
tags) so :func:`serve` can run them from one process with ``prefect.serve``.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"


def read_prefect_yaml(path: str | Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The ``deployments`` list of a ``prefect.yaml`` (anchors resolved)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prefect.yaml {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    deps = data.get("deployments")
    if not isinstance(deps, list) or not deps:
        raise ValueError(f"{p}: no `deployments` list")
    return deps


def load_flow(entrypoint: str):
    """The flow object named by a module entrypoint ``package.module:function``."""
    module, _, func = entrypoint.partition(":")
    if not func or module.endswith(".py"):
        raise ValueError(f"entrypoint {entrypoint!r} is not of the form package.module:function")
    return getattr(importlib.import_module(module), func)


def load_deployments(path: str | Path = PREFECT_YAML, names: list[str] | None = None,
                     parameters: dict[str, Any] | None = None) -> list[Any]:
    """Runner deployments for the ``names`` (all when None) of ``prefect.yaml``.

    ``parameters`` are merged over each deployment's own (only those its flow accepts).
    """
    from prefect.schedules import Cron

    specs = read_prefect_yaml(path)
    known = [d["name"] for d in specs]
    unknown = sorted(set(names or []) - set(known))
    if unknown:
        raise ValueError(f"deployment(s) {unknown} not in {path}; known: {known}")
    out = []
    for d in specs:
        if names and d["name"] not in names:
            continue
        fl = load_flow(d["entrypoint"])
        accepted = set(fl.parameters.properties)
        params = {**(d.get("parameters") or {}),
                  **{k: v for k, v in (parameters or {}).items() if k in accepted}}
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC"))
                     for s in d.get("schedules") or [] if s.get("cron") and s.get("active", True)]
        out.append(fl.to_deployment(name=d["name"], parameters=params, schedules=schedules or None,
                                    description=d.get("description"), tags=d.get("tags")))
    return out


def serve(path: str | Path = PREFECT_YAML, names: list[str] | None = None,
          parameters: dict[str, Any] | None = None, limit: int | None = None) -> None:
    """Serve the deployments of ``prefect.yaml`` from this process until interrupted."""
    from prefect import serve as prefect_serve

    os.environ.setdefault("DATAENGINE_HOME", str(Path(path).resolve().parent))
    deployments = load_deployments(path, names, parameters)
    logger.info("serving %s", [d.name for d in deployments])
    prefect_serve(*deployments, limit=limit)
