"""cluster.yaml is a launchable Ray cluster config; examples/rayjob.yaml a consistent KubeRay RayJob.

The schema Ray ships checks the shape only (``provider.type`` is a free string, node types may have any
resources), so the rest is checked here: AWS provider, a GPU worker type, setup that installs kdray from the
checkout it mounts, shared storage on every node, an MLflow server on the head, nothing public by default.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess

import jsonschema
import pytest
import ray
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")


@pytest.fixture(scope="module")
def cluster() -> dict:
    with open(os.path.join(ROOT, "cluster.yaml")) as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def schema() -> dict:
    with open(SCHEMA) as fh:
        return json.load(fh)


def _commands(cfg: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in cfg.get(k) or []]


def test_validates_against_rays_schema(cluster, schema):
    jsonschema.validate(cluster, schema)
    # and what `ray up` itself runs first: defaults filled in, then the launcher's own checks
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_is_live(cluster, schema):
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["worker.gpu"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["worker.gpu"]["min_worker"] = 1  # misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_provider_and_node_types(cluster):
    assert cluster["provider"]["type"] == "aws" and cluster["provider"]["region"]
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = [name for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1]
    assert gpu, "a GPU worker node type"
    for name in gpu:
        assert re.match(r"^(g\d|p\d)", types[name]["node_config"]["InstanceType"]), "an AWS GPU instance"
        assert types[name].get("max_workers", 0) >= 1
    assert cluster["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())


def test_setup_installs_kdray_from_the_mounted_checkout(cluster):
    mounts = cluster["file_mounts"]
    repo = [remote for remote, local in mounts.items() if os.path.normpath(local) == "."]
    assert repo, "the repository is mounted on every node"
    installs = [c for c in _commands(cluster, "setup_commands") if "pip install" in c]
    assert any(repo[0] in c for c in installs), installs
    assert os.path.exists(os.path.join(ROOT, "pyproject.toml"))  # what `pip install <checkout>` builds
    # the image's Ray is the version kdray is tested with
    ray_version = ray.__version__
    for key in ("image", "worker_image"):
        assert f":{ray_version}-" in cluster["docker"][key], (key, ray_version)
    assert "-gpu" in cluster["docker"]["worker_image"]


def test_shared_storage_and_mlflow_server(cluster):
    init = " ".join(_commands(cluster, "initialization_commands"))
    assert "mount -t nfs4" in init and "/mnt/shared" in init
    assert "-v /mnt/shared:/mnt/shared" in cluster["docker"]["run_options"]
    head_start = " ".join(_commands(cluster, "head_start_ray_commands"))
    assert "mlflow server" in head_start and "--serve-artifacts" in head_start
    assert "sqlite:////mnt/shared/" in head_start or "postgresql://" in head_start
    assert "export MLFLOW_TRACKING_URI=http://" in head_start  # jobs on the head inherit it
    # nothing listens on all interfaces: the job server is reached through `ray dashboard` (SSH)
    assert "0.0.0.0" not in head_start
    assert "--dashboard-host=127.0.0.1" in head_start


def test_commands_are_valid_shell(cluster):
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    for command in _commands(cluster, *keys):
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, (command, check.stderr)


def test_rayjob_manifest():
    with open(os.path.join(ROOT, "examples", "rayjob.yaml")) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    by_kind = {d["kind"]: d for d in docs}
    job = by_kind["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["kdray", "run"]
    assert any(a.startswith("output_dir=/mnt/shared/") for a in argv)
    from kdray.config import load_config

    cfg = load_config(argv[2], [a for a in argv[3:] if "=" in a])  # the entrypoint's config is valid
    assert cfg.ray.num_workers >= 2 and cfg.ray.max_failures >= 1
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == ray.__version__
    claim = by_kind["PersistentVolumeClaim"]
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    pods = [cluster_spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts["/mnt/shared"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in cluster_spec["workerGroupSpecs"]
                  for c in g["template"]["spec"]["containers"]]
    assert any(gpu_limits)
