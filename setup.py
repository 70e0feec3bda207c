"""The package list of the one import root: ``pipeline/``, ``models/`` and ``flows/`` install as
``dataengine.pipeline``, ``dataengine.models`` and ``dataengine.flows``
(metadata: pyproject.toml)."""

from setuptools import find_packages, setup

FOLDERS = ("pipeline", "models", "flows")
DATA_DIRS = ["dataengine.pipeline.server.static"]  # the web app's pages, shipped as data

setup(
    packages=["dataengine", *(f"dataengine.{p}" for p in
                              find_packages(include=[f"{f}" for f in FOLDERS]
                                            + [f"{f}.*" for f in FOLDERS])), *DATA_DIRS],
    package_dir={"dataengine": "dataengine", **{f"dataengine.{f}": f for f in FOLDERS}},
)
