"""dataengine: a distributed data engine for computer vision.

Subpackages: :mod:`dataengine.models` (pure torch model builders and checkpoint formats),
:mod:`dataengine.pipeline` (the engine: storage, stages, server, CLI) and
:mod:`dataengine.flows` (Prefect flows and deployments). An installed wheel holds them under
this package; in a source checkout they are the repository's top-level ``models/``,
``pipeline/`` and ``flows/`` folders, which this module adds to the package path so that
``python -m dataengine...`` and ``ray job submit --working-dir .`` work from the checkout too.
"""

from pathlib import Path

__version__ = "0.1.0"

_here = Path(__file__).resolve().parent
_checkout = _here.parent
if not (_here / "pipeline").is_dir() and (_checkout / "pipeline" / "__init__.py").is_file() \
        and (_checkout / "pyproject.toml").is_file():
    __path__.append(str(_checkout))  # type: ignore[name-defined]
