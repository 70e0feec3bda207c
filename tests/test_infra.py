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
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)(\s*;.+)?", dep.strip())
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


def _env_of(container: dict) -> dict:
    return {e["name"]: e for e in container.get("env", [])}


def test_ray_dashboard_is_locked_down_in_both_cluster_files():
    cfg = _cluster()
    text = (REPO / "ray-cluster.yaml").read_text()
    assert "0.0.0.0" not in text, "ray-cluster.yaml binds something to every interface"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head          # reached through `ray dashboard` (ssh)
    opts = cfg["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in opts          # every node: token authentication
    path = next(o.split("=", 1)[1] for o in opts if o.startswith("--env RAY_AUTH_TOKEN_PATH="))
    assert cfg["file_mounts"][path] == "~/.ray/auth_token"   # `ray get-auth-token --generate`
    spec = _kuberay()["spec"]
    containers = list(spec["headGroupSpec"]["template"]["spec"]["containers"])
    for g in spec["workerGroupSpecs"]:
        containers += g["template"]["spec"]["containers"]
    for c in containers:
        env = _env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", c["name"]
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "dataengine-ray-auth" and ref["key"] == "auth_token"
        assert "value" not in env["RAY_AUTH_TOKEN"], "a token written into the manifest"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_a_head_started_like_the_cluster_file_refuses_jobs_without_the_token(tmp_path):
    """`ray start --head` with the head's own dashboard flags and the cluster's auth variables:
    the job API (remote code execution) answers 401 without the token, and listens on loopback
    only."""
    import contextlib
    import os
    import shlex
    import socket
    import subprocess
    import sys
    import time

    import httpx

    cmd = next(c for c in _cluster()["head_start_ray_commands"] if "ray start" in c)
    flags = [f for f in shlex.split(cmd) if f.startswith("--dashboard-host")]
    port = free_port()
    dash = free_port()
    token = "t" * 32
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    tmp = f"/tmp/ray-auth-{os.getpid()}"  # short: Ray's socket paths have a length limit
    start = [ray_bin, "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
             "--include-dashboard=true", "--num-cpus=1", f"--temp-dir={tmp}",
             "--node-ip-address=127.0.0.1", *flags]
    # --block keeps this head's processes under one process group of ours: stopped by its id
    # at the end (never `ray stop`, which would end every Ray on the machine)
    head = subprocess.Popen(start, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}/api/jobs/"
        deadline = time.time() + 240   # a head starts in ~10 s idle, minutes on busy cores
        while True:
            try:
                r = httpx.get(url, timeout=5)
                if r.status_code != 503:
                    break
            except httpx.HTTPError:
                pass
            assert head.poll() is None, "ray start exited"
            assert time.time() < deadline, "the dashboard did not come up"
            time.sleep(1)
        assert r.status_code == 401, (r.status_code, r.text[:200])
        ok = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert ok.status_code == 200, ok.text[:200]
        # loopback only: another address of this host is refused
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://{other}:{dash}/api/jobs/", timeout=5)
    finally:
        import signal

        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # children that outlived their parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
