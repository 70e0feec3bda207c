"""What every dataengine flow shares: task options, logging bridge, Ray, artifacts, S3 credentials.

- Tasks persist their results as JSON (``result_serializer="json"``), never pickle, under a key
  unique to the task run: no run reuses another's result. Whether work is done is decided by the
  stages' own done records in storage, not by a Prefect cache that could drift from storage.
- ``pipeline``/``models``/``flows`` log through ``logging``; :func:`bridge_logging` forwards those
  records to Prefect's run logger while a flow or task runs, so they show in the Prefect UI.
- :func:`connect_ray` joins the cluster named by ``RAY_ADDRESS`` (or starts a local Ray) with a
  ``runtime_env`` that carries the package and ``PREFECT_API_URL`` to the Ray workers.
- :func:`apply_aws_credentials` prefers the standard AWS environment; when it has no credentials
  and prefect-aws is installed, the ``AwsCredentials`` block named by ``DATAENGINE_AWS_BLOCK``
  fills it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from prefect import task

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]

def run_key(context: Any, parameters: dict[str, Any]) -> str:
    """Result key of a task run: its own id, so a result is stored but never reused by another run
    (whether work is done is the stages' done records' business, not a cache's)."""
    return f"dataengine-task-{context.task_run.id}"


#: Options for every task: retries with a delay, JSON results keyed by task run (no input cache).
TASK_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [5, 20],
    "persist_result": True,
    "result_serializer": "json",
    "cache_key_fn": run_key,
}

#: Options for every flow: JSON results, and the flow's parameters validated by Prefect.
FLOW_OPTIONS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",
    "log_prints": True,
}


def stage_task(name: str, **overrides: Any):
    """``@task`` with :data:`TASK_OPTIONS` (retries, JSON results, no cache) and a name."""
    return task(name=name, **{**TASK_OPTIONS, **overrides})


# --- JSON-safe values ----------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types: dataclasses, paths, numpy scalars/arrays, sets, datetimes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return jsonable(value.tolist())
    return str(value)


# --- logging -------------------------------------------------------------------------------------

class _RunLoggerBridge(logging.Handler):
    """Re-logs ``logging`` records on Prefect's run logger when a flow or task run is active."""

    def emit(self, record: logging.LogRecord) -> None:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        if getattr(record, "_dataengine_bridged", False):
            return
        try:
            run_logger = get_run_logger()
        except MissingContextError:
            return
        except Exception:  # noqa: BLE001 - logging must never break the work
            return
        try:
            run_logger.log(record.levelno, "[%s] %s", record.name, record.getMessage(),
                           extra={"_dataengine_bridged": True})
        except Exception:  # noqa: BLE001
            self.handleError(record)


_BRIDGE = _RunLoggerBridge(level=logging.INFO)


def bridge_logging(names: tuple[str, ...] = ("dataengine",), level: int = logging.INFO) -> None:
    """Forward the records of the ``names`` loggers to Prefect's run logger (idempotent)."""
    for name in names:
        lg = logging.getLogger(name)
        if _BRIDGE not in lg.handlers:
            lg.addHandler(_BRIDGE)
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a run, this module's logger outside one."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logger


# --- storage credentials -------------------------------------------------------------------------

def apply_aws_credentials(block_name: str | None = None) -> str:
    """Make S3 credentials available to storage and Ray workers; returns where they came from.

    The standard AWS environment wins (``AWS_ACCESS_KEY_ID``/``AWS_PROFILE``/instance roles through
    boto's chain). Otherwise, when prefect-aws is installed and a block name is given (argument
    or ``DATAENGINE_AWS_BLOCK``), that ``AwsCredentials`` block's keys are exported to the env.
    """
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return "environment"
    block_name = block_name or os.environ.get("DATAENGINE_AWS_BLOCK")
    if not block_name:
        return "default-chain"
    try:
        from prefect_aws import AwsCredentials  # type: ignore[import-not-found]
    except ImportError:
        logger.warning("DATAENGINE_AWS_BLOCK=%s is set but prefect-aws is not installed; "
                       "using the standard AWS credential chain", block_name)
        return "default-chain"
    creds = AwsCredentials.load(block_name)
    env = {
        "AWS_ACCESS_KEY_ID": creds.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": (creds.aws_secret_access_key.get_secret_value()
                                  if creds.aws_secret_access_key else None),
        "AWS_SESSION_TOKEN": creds.aws_session_token,
        "AWS_DEFAULT_REGION": creds.region_name,
    }
    for k, v in env.items():
        if v:
            os.environ[k] = v
    return f"prefect-block:{block_name}"


# --- Ray -----------------------------------------------------------------------------------------

_FORWARDED_ENV = ("PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                  "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL",
                  "AWS_ENDPOINT_URL_S3", "DATAENGINE_S3_ENDPOINT", "AWS_EC2_METADATA_DISABLED",
                  "TOKENIZERS_PARALLELISM", "RAY_TRAIN_V2_ENABLED")


def ray_runtime_env(*, remote: bool) -> dict[str, Any]:
    """The ``runtime_env`` for Ray workers: environment (``PREFECT_API_URL``, S3) and the package.

    On a local Ray the workers import the package from this checkout (``PYTHONPATH``); on a remote
    cluster the ``dataengine`` package is uploaded as a ``py_module`` (:func:`package_dir`)
    unless ``DATAENGINE_RAY_UPLOAD_PACKAGE=0`` (clusters whose image has the same version).
    """
    env_vars = {k: os.environ[k] for k in _FORWARDED_ENV if os.environ.get(k)}
    try:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
        if api_url:
            env_vars.setdefault("PREFECT_API_URL", api_url)
    except Exception:  # noqa: BLE001 - settings unavailable: nothing to forward
        pass
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if remote:
        if os.environ.get("DATAENGINE_RAY_UPLOAD_PACKAGE", "1") != "0":
            runtime_env["py_modules"] = [str(package_dir())]
    else:
        paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env_vars["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return runtime_env


def package_dir() -> Path:
    """A folder that is the whole ``dataengine`` package: the installed one, or (in a source
    checkout, where the subpackages are the top-level folders) a copy assembled once per
    process in a temporary folder."""
    import shutil
    import tempfile

    import dataengine

    here = Path(dataengine.__file__).resolve().parent
    if (here / "pipeline").is_dir():
        return here
    global _PACKAGE_COPY
    if _PACKAGE_COPY is None or not _PACKAGE_COPY.is_dir():
        dest = Path(tempfile.mkdtemp(prefix="dataengine-pkg-")) / "dataengine"
        shutil.copytree(here, dest, ignore=shutil.ignore_patterns("__pycache__"))
        for sub in ("pipeline", "models", "flows"):
            shutil.copytree(REPO / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__"))
        _PACKAGE_COPY = dest
    return _PACKAGE_COPY


_PACKAGE_COPY: Path | None = None


def connect_ray(address: str | None = None, *, num_cpus: int | None = None) -> str:
    """Join the Ray cluster at ``address``/``RAY_ADDRESS``, or start a local one; returns which.

    Does nothing when Ray is already initialised in this process (tests, ``ray job submit``).
    """
    import ray

    if ray.is_initialized():
        return "existing"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, runtime_env=ray_runtime_env(remote=True), log_to_driver=True)
        where = f"cluster {address}"
    else:
        os.environ["PYTHONPATH"] = ray_runtime_env(remote=False)["env_vars"]["PYTHONPATH"]
        # the dashboard serves the State API that Ray Train's controller polls
        # address="local": a new Ray for this run, never one that happens to run on the machine
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", log_to_driver=True,
                 runtime_env=ray_runtime_env(remote=False))
        where = "local"
    logger.info("ray (%s): %s", where, ray.cluster_resources())
    return where


# --- artifacts -----------------------------------------------------------------------------------

def artifact_key(*parts: Any) -> str:
    """A Prefect artifact key: lowercase letters, digits and dashes only."""
    key = "-".join(str(p) for p in parts if p not in (None, ""))
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", key.lower())).strip("-")[:100] or "x"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a markdown table (columns in first-seen order)."""
    if not rows:
        return "_(no rows)_"
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def metrics_rows(metrics: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """A flat ``metric | value`` table from a (nested) metrics dict; lists are summarised."""
    rows: list[dict[str, Any]] = []
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += metrics_rows(v, prefix=f"{name}.")
        elif isinstance(v, (list, tuple)):
            if v and all(isinstance(x, (int, float)) for x in v) and len(v) > 8:
                rows.append({"metric": name, "value": f"{len(v)} values, last {_cell(v[-1])}"})
            elif len(str(v)) <= 120:
                rows.append({"metric": name, "value": str(v)})
        else:
            rows.append({"metric": name, "value": v})
    return rows


def publish(key: str, title: str, *, metrics: dict[str, Any] | None = None,
            rows: list[dict[str, Any]] | None = None, links: dict[str, str] | None = None) -> None:
    """Publish a markdown artifact (title, a table, links to outputs) and one link artifact each.

    Outside a flow run (``python -m dataengine.flows.jobs``) it only logs.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    body = [f"# {title}", ""]
    if rows:
        body += [markdown_table(rows), ""]
    if metrics:
        body += [markdown_table(metrics_rows(jsonable(metrics))), ""]
    if links:
        body += ["## Outputs", *[f"- {name}: `{url}`" for name, url in links.items()]]
    text = "\n".join(body)
    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        logger.info("%s", text)
        return
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    key = artifact_key(key)
    create_markdown_artifact(markdown=text, key=key, description=title)
    for name, url in (links or {}).items():
        create_link_artifact(link=_as_link(url), link_text=name, key=artifact_key(key, name),
                             description=f"{title}: {name}")


def _as_link(url: str) -> str:
    if "://" in url:
        return url
    return Path(url).resolve().as_uri()
