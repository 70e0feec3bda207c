"""Cluster files: ray-cluster.yaml against Ray's own schema, KubeRay manifest, pinned versions."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = {}
    for dep in data["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        assert m, f"pyproject dependency {dep!r} is not pinned with =="
        pins[m.group(1).lower()] = m.group(3)
    pins["dataengine"] = data["project"]["version"]
    pins["python"] = re.search(r">=(\d+\.\d+)", data["project"]["requires-python"]).group(1)
    return pins


def _cluster() -> dict:
    return yaml.safe_load((REPO / "ray-cluster.yaml").read_text())


def _kuberay() -> dict:
    return yaml.safe_load((REPO / "infra" / "kuberay-raycluster.yaml").read_text())


def test_ray_cluster_yaml_validates_against_ray_schema():
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _cluster()
    jsonschema.validate(cfg, schema)
    # the validator really rejects a broken file (a node type without resources)
    broken = yaml.safe_load((REPO / "ray-cluster.yaml").read_text())
    del broken["available_node_types"]["gpu-train"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_ray_cluster_shape():
    cfg = _cluster()
    types = cfg["available_node_types"]
    assert cfg["provider"]["type"] == "aws"
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = {n: t for n, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {"gpu-inference", "gpu-train"} <= set(gpu)
    assert gpu["gpu-train"]["resources"]["GPU"] > gpu["gpu-inference"]["resources"]["GPU"]
    for name, t in types.items():
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])


def test_kuberay_manifest_names_the_same_image_and_ray_version():
    docs = _kuberay()
    assert docs["apiVersion"] == "ray.io/v1" and docs["kind"] == "RayCluster"
    spec = docs["spec"]
    images = {c["image"] for c in spec["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in spec["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
        assert group["minReplicas"] <= group["maxReplicas"]
    assert images == {_cluster()["docker"]["image"]}
    assert spec["rayVersion"] == _pyproject_pins()["ray"]
    gpus = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"]
            .get("nvidia.com/gpu", 0) for g in spec["workerGroupSpecs"]}
    assert gpus["gpu-train"] > gpus["gpu-inference"] > 0


def test_pinned_versions_match_pyproject():
    pins = _pyproject_pins()
    docker = (REPO / "infra" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", docker, flags=re.M))
    assert args["DATAENGINE_VERSION"] == pins["dataengine"]
    assert args["PYTHON_VERSION"] == pins["python"]
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["PREFECT_VERSION"] == pins["prefect"]
    assert args["TORCH_VERSION"] == pins["torch"]
    assert re.search(r"^FROM nvidia/cuda:\S+", docker, flags=re.M), "CUDA base image"
    assert "requirements.lock" in docker
    # the image tag carries the package version
    assert _cluster()["docker"]["image"].endswith(":" + pins["dataengine"])
    # every pkg==version in the cluster files equals pyproject's pin
    text = "\n".join((REPO / p).read_text() for p in
                     ("ray-cluster.yaml", "infra/kuberay-raycluster.yaml", "infra/Dockerfile"))
    found = re.findall(r"([a-z][a-z0-9_-]+)(?:\[[^\]]*\])?==\$?\{?([0-9A-Za-z_.]+)\}?", text)
    checked = 0
    for name, version in found:
        if name.lower() in pins and not version.endswith("VERSION"):
            assert version == pins[name.lower()], f"{name}=={version} vs pyproject {pins[name]}"
            checked += 1
    version_checks = r"(\w+)\.__version__(?:\.split\('\+'\)\[0\])? == '([^']+)'"
    for mod, version in re.findall(version_checks, text):
        assert version == pins[mod], f"{mod} {version} vs pyproject {pins[mod]}"
        checked += 1
    assert checked >= 3


def test_lock_file_agrees_with_pyproject():
    pins = _pyproject_pins()
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==(\S+)", line.strip())
        if m:
            lock[m.group(1).lower().replace("_", "-")] = m.group(2)
    for name, version in pins.items():
        if name in ("dataengine", "python"):
            continue
        key = name.replace("_", "-")
        assert lock.get(key) == version, f"{name}: lock {lock.get(key)} vs pyproject {version}"
