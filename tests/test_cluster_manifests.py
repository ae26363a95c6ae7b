"""The cluster files, checked against the schemas of the software that reads them:

- cluster/ray-cluster.yaml (the Ray cluster launcher's config) against ray/autoscaler/ray-schema.json,
  the schema inside the installed ray package (what `ray up` validates with);
- cluster/kuberay-rayjob.yaml and cluster/kuberay-raycluster.yaml against the OpenAPI v3 schemas of
  the KubeRay v1.7.0 CRDs (tests/data/kuberay-v1.7.0/, see SOURCE.md there), with unknown fields
  rejected as `kubectl apply`'s strict field validation does;
- every file names the image the Dockerfile builds, under the tag the README's build command gives.
"""

from __future__ import annotations

import copy
import gzip
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBERAY = REPO / "tests" / "data" / "kuberay-v1.7.0"
IMAGE = "bgrpo:0.1.0-gpu"


def _load_yaml(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / name).read_text())


def _crd_schema(name: str) -> dict[str, Any]:
    """The `v1` OpenAPI schema of a stored CRD, closed against unknown fields: Kubernetes' API server
    rejects a field the schema does not declare (strict field validation, kubectl's default) unless
    the schema says `x-kubernetes-preserve-unknown-fields`; plain JSON Schema would accept it."""
    crd = json.loads(gzip.decompress((KUBERAY / f"ray.io_{name}.json.gz").read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # apiVersion / kind / metadata are the API server's, declared loosely in every CRD
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def _errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    import ray

    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def rayjob_schema() -> dict[str, Any]:
    return _crd_schema("rayjobs")


@pytest.fixture(scope="module")
def raycluster_schema() -> dict[str, Any]:
    return _crd_schema("rayclusters")


def test_ray_cluster_launcher_config_matches_rays_schema(ray_schema):
    config = _load_yaml("cluster/ray-cluster.yaml")
    assert _errors(ray_schema, config) == []
    # the check can fail: a misspelt key and a wrong type are caught
    bad = {**config, "max_worker": 3}
    assert any("max_worker" in e for e in _errors(ray_schema, bad))
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = "six"
    assert _errors(ray_schema, bad)


def test_kuberay_rayjob_matches_the_crd(rayjob_schema):
    job = _load_yaml("cluster/kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert _errors(rayjob_schema, job) == []
    # unknown fields and wrong types are caught
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = True  # the real field is shutdownAfterJobFinishes
    assert any("shutdownAfterJobFinish" in e for e in _errors(rayjob_schema, bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "six"
    assert any("replicas" in e for e in _errors(rayjob_schema, bad))
    # the runtime env is a YAML string inside the manifest: it must parse and point at the image's code
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"
    assert job["spec"]["entrypoint"].startswith("bgrpo train --config ")
    preset = job["spec"]["entrypoint"].split("--config ")[1].split()[0]
    assert (REPO / "cluster" / "presets" / f"{preset}.yaml").is_file()


def test_kuberay_raycluster_matches_the_crd_and_the_rayjob(raycluster_schema):
    cluster = _load_yaml("cluster/kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert _errors(raycluster_schema, cluster) == []
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in _errors(raycluster_schema, bad))
    # one cluster shape for both ways of running: the long-lived cluster and the per-job one
    assert cluster["spec"] == _load_yaml("cluster/kuberay-rayjob.yaml")["spec"]["rayClusterSpec"]


def test_every_cluster_file_names_the_dockerfile_image():
    import ray

    def images(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
                i for v in node.values() for i in images(v)]
        if isinstance(node, list):
            return [i for v in node for i in images(v)]
        return []

    names = set()
    for name in ("cluster/kuberay-rayjob.yaml", "cluster/kuberay-raycluster.yaml", "cluster/ray-cluster.yaml"):
        found = images(_load_yaml(name))
        # the README's push step may prefix a registry (REGISTRY/bgrpo:...): the same in every file
        assert found and all(re.fullmatch(rf"([^\s]+/)?{re.escape(IMAGE)}", i) for i in found), (name, found)
        assert "your-org" not in (REPO / name).read_text()
        names |= set(found)
    assert len(names) == 1, names
    # the tag is the project's version; the README and the Dockerfile build that tag
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert IMAGE == f"bgrpo:{version}-gpu"
    build = f"docker build -t {IMAGE} ."
    assert build in (REPO / "README.md").read_text()
    dockerfile = (REPO / "Dockerfile").read_text()
    assert build in dockerfile
    # the image runs the Ray of the pins and the cluster files, with the GPU extra and chromium
    assert 'pip install ".[gpu]"' in dockerfile and "chromium" in dockerfile
    rayjob = _load_yaml("cluster/kuberay-rayjob.yaml")
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert f'"ray[default]=={ray.__version__}"' in (REPO / "pyproject.toml").read_text()
