"""The package's shape: one import root, dependencies in one direction, and an installed wheel
that a user's own ``models`` / ``pipeline`` packages cannot shadow (nor it theirs)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("models", "pipeline", "flows")

#: What each unit may import (ARCHITECTURE.md, "Dependencies"); everything else is a violation.
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "pipeline.core": {"models"},
    "pipeline.ingest": {"models", "pipeline.core"},
    "pipeline.sam": {"models", "pipeline.core"},
    "pipeline.ldm": {"models", "pipeline.core"},
    "pipeline.curate": {"pipeline.core", "pipeline.sam"},
    "pipeline.detector": {"models", "pipeline.core", "pipeline.sam"},
    "pipeline.formats": {"models", "pipeline.core"},
    "pipeline.annotate": {"models", "pipeline.core", "pipeline.sam", "pipeline.detector",
                          "pipeline.formats"},
    "pipeline.engine": {"models", "pipeline.core", "pipeline.sam", "pipeline.detector",
                        "pipeline.annotate", "pipeline.curate"},
    "pipeline.server": {"models", "pipeline.core", "pipeline.sam", "pipeline.detector",
                        "pipeline.annotate", "pipeline.curate"},
    "flows": {"models", "pipeline.core", "pipeline.ingest", "pipeline.sam", "pipeline.ldm",
              "pipeline.detector", "pipeline.annotate", "pipeline.engine"},
    "pipeline.cli": {"models", "pipeline.core", "pipeline.ingest", "pipeline.sam",
                     "pipeline.ldm", "pipeline.detector", "pipeline.annotate", "pipeline.engine",
                     "pipeline.server", "pipeline.curate", "pipeline.formats", "flows"},
}
#: Third-party packages only some units may import.
RESTRICTED = {"prefect": {"flows", "pipeline.cli"}, "faiss": {"pipeline.curate"}}


def unit_of(module: str) -> str:
    """``dataengine.pipeline.sam.train`` -> ``pipeline.sam``; ``dataengine.models.sam`` ->
    ``models``; the unit whose import rules apply."""
    parts = module.split(".")[1:]
    if parts[0] == "pipeline" and len(parts) > 1:
        return f"pipeline.{parts[1]}"
    return parts[0]


def package_modules() -> list[tuple[str, Path]]:
    out = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(("dataengine", *parts)).removesuffix(".__init__")
            out.append((name, path))
    return out


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import statement in a file (function-level ones included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return out


def test_every_unit_has_a_rule():
    units = {unit_of(name) for name, _ in package_modules() if name.count(".") > 1}
    assert units <= set(ALLOWED), f"units without an import rule: {sorted(units - set(ALLOWED))}"


def test_imports_point_one_way():
    problems = []
    for name, path in package_modules():
        if name.count(".") < 2:
            continue  # the folders' own __init__ modules
        unit = unit_of(name)
        for line, mod in imports_of(path):
            where = f"{path.relative_to(REPO)}:{line} imports {mod}"
            top = mod.split(".")[0]
            if top in FOLDERS:
                problems.append(f"{where} (outside the dataengine namespace)")
            elif top == "dataengine" and mod.count(".") >= 1:
                target = unit_of(mod)
                if target != unit and target not in ALLOWED[unit]:
                    problems.append(f"{where} ({unit} may import {sorted(ALLOWED[unit])})")
            elif top in RESTRICTED and unit not in RESTRICTED[top]:
                problems.append(f"{where} ({top} only in {sorted(RESTRICTED[top])})")
    assert not problems, "\n".join(problems)


def test_rules_catch_a_violation(tmp_path):
    """The checker flags an upward import (a test of the test: it can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("from dataengine.pipeline.server.app import create_app\n")
    assert imports_of(bad) == [(1, "dataengine.pipeline.server.app")]
    assert unit_of("dataengine.pipeline.server.app") not in ALLOWED["pipeline.sam"]


def test_tests_and_benchmarks_use_the_namespace():
    problems = [f"{p.relative_to(REPO)}:{line} imports {mod}"
                for folder in ("tests", "benchmarks") for p in sorted((REPO / folder).glob("*.py"))
                for line, mod in imports_of(p) if mod.split(".")[0] in FOLDERS]
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The project built as a wheel and installed (without dependencies) into a folder."""
    out = tmp_path_factory.mktemp("wheel")
    src = out / "src"  # a copy: building writes build/ and *.egg-info/ beside the sources
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "demo-corpus", "bench-output"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((out / "dist").glob("dataengine-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(out / "site"), str(wheel)], check=True, capture_output=True, timeout=300)
    return out / "site"


@pytest.mark.timeout(600)
def test_installed_wheel_beside_a_users_models_and_pipeline(installed_wheel, tmp_path):
    user = tmp_path / "user_repo"
    for name in ("models", "pipeline"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text("OWNER = 'user'\n")
    check = (
        "import dataengine, models, pipeline\n"
        "import dataengine.models.sam, dataengine.pipeline.core.storage, dataengine.flows.stages\n"
        "from dataengine.pipeline.cli import app\n"
        "assert models.OWNER == 'user' and pipeline.OWNER == 'user'\n"
        f"assert dataengine.__file__.startswith({str(installed_wheel)!r}), dataengine.__file__\n"
        f"assert dataengine.pipeline.__file__.startswith({str(installed_wheel)!r})\n"
        "from importlib import resources\n"
        "assert resources.files('dataengine.pipeline.server.static').joinpath("
        "'index.html').is_file()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed_wheel)
    # run from the user's folder: it comes first on sys.path, as for their own scripts
    r = subprocess.run([sys.executable, "-c", check], cwd=user, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "dataengine", "--help"], cwd=user, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "shard" in r.stdout, r.stderr[-3000:]
