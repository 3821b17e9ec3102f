"""Every file in cluster/ validates (launcher YAMLs against Ray's ray-schema.json and the launcher's own
config preparation; KubeRay manifests against the vendored CRD schemas), and broken copies of them fail
with the file and the path of the broken field. Offline and Ray-free: nothing is started."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lakeray.cluster.validate import check_file, validate_file
from lakeray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))
LAKERAY = str(Path(sys.executable).parent / "lakeray")


def test_cluster_folder_has_what_the_design_promises():
    assert {p.name for p in LAUNCHER} == {"aws.yaml", "gcp.yaml", "azure.yaml", "local.yaml"}
    assert {p.name for p in KUBERAY} == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    assert (CLUSTER / "docker" / "Dockerfile").is_file()


@pytest.mark.parametrize("path", LAUNCHER + KUBERAY, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_shipped_file_is_valid(path):
    report = check_file(path)
    assert report.problems == []
    assert report.documents


@pytest.mark.parametrize("path", [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml", CLUSTER / "azure.yaml"],
                         ids=lambda p: p.name)
def test_cloud_yaml_has_the_lakeray_parts(path):
    config = yaml.safe_load(path.read_text())
    node_types = config["available_node_types"]
    assert {"head", "cpu_worker", "gpu_worker"} <= set(node_types)
    assert node_types["gpu_worker"]["resources"].get("GPU", 0) >= 1
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= node_types[name]["min_workers"] <= node_types[name]["max_workers"]
    setup = " ".join(config["setup_commands"])
    assert "openjdk-17" in setup and "requirements.lock" in setup and "lakeray setup" in setup
    assert "spark-node.sh master" in " ".join(config["head_start_ray_commands"])
    assert "spark-node.sh worker" in " ".join(config["worker_start_ray_commands"])
    env = " ".join(config["docker"]["run_options"])
    assert "LAKERAY_STORAGE__ROOT=" in env
    # Token auth as in local.yaml: the operator's token file travels, every container asks for it.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    # Instance identity only: no key material anywhere in the file.
    text = path.read_text()
    for secret in ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "AccountKey=", "private_key_id", "sig="):
        assert secret not in text


def _broken(tmp_path, source, mutate, name="broken.yaml"):
    docs = list(yaml.safe_load_all((CLUSTER / source).read_text()))
    mutate(docs[0])
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def _set(*keys, value):
    def mutate(doc):
        for key in keys[:-1]:
            doc = doc[key]
        doc[keys[-1]] = value
    return mutate


def _drop(*keys):
    def mutate(doc):
        for key in keys[:-1]:
            doc = doc[key]
        del doc[keys[-1]]
    return mutate


def _rename(*keys, to):
    def mutate(doc):
        for key in keys[:-1]:
            doc = doc[key]
        doc[to] = doc.pop(keys[-1])
    return mutate


BROKEN = {
    "negative min_workers": ("aws.yaml", _set("available_node_types", "gpu_worker", "min_workers", value=-1),
                             "available_node_types.gpu_worker.min_workers: -1 is less than the minimum of 0"),
    "min above max": ("gcp.yaml", _set("available_node_types", "cpu_worker", "min_workers", value=9),
                      "available_node_types.cpu_worker.min_workers: 9 is more than its max_workers (8)"),
    "wrong type": ("aws.yaml", _set("max_workers", value="ten"), "max_workers: 'ten' is not of type 'integer'"),
    "misspelled field": ("azure.yaml", _rename("idle_timeout_minutes", to="idle_timeout_minute"),
                         "idle_timeout_minute: unknown field (did you mean 'idle_timeout_minutes'?)"),
    "misspelled node field": ("aws.yaml", _rename("available_node_types", "cpu_worker", "max_workers",
                                                  to="maxWorkers"),
                              "available_node_types.cpu_worker.maxWorkers: unknown field"),
    "missing required key": ("aws.yaml", _drop("provider"), "provider: required field missing"),
    "missing node_config": ("azure.yaml", _drop("available_node_types", "head", "node_config"),
                            "available_node_types.head.node_config: required field missing"),
    "unknown provider": ("aws.yaml", _set("provider", "type", value="digitalocean"),
                         "provider.type: unknown provider 'digitalocean'"),
    "head type not a node type": ("gcp.yaml", _set("head_node_type", value="ray_head"),
                                  "head_node_type: 'ray_head' is not one of available_node_types"),
    "wrong command type": ("aws.yaml", _set("setup_commands", value="lakeray setup"),
                           "setup_commands: 'lakeray setup' is not of type 'array'"),
    "local without head_ip": ("local.yaml", _drop("provider", "head_ip"), "Please supply a `head_ip`"),
    "kuberay misspelled field": ("kuberay/raycluster.yaml",
                                 _rename("spec", "workerGroupSpecs", 1, "maxReplicas", to="maxReplica"),
                                 "spec.workerGroupSpecs[1].maxReplica: unknown field (did you mean 'maxReplicas'?)"),
    "kuberay wrong type": ("kuberay/raycluster.yaml", _set("spec", "enableInTreeAutoscaling", value="yes"),
                           "spec.enableInTreeAutoscaling: 'yes' is not of type 'boolean'"),
    "kuberay missing required": ("kuberay/rayjob.yaml",
                                 _drop("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers"),
                                 "spec.rayClusterSpec.headGroupSpec.template.spec.containers: required field missing"),
    "kuberay old api": ("kuberay/rayjob.yaml", _set("apiVersion", value="ray.io/v1alpha1"),
                        "apiVersion: 'ray.io/v1alpha1' is not 'ray.io/v1'"),
    "kuberay bad serve config": ("kuberay/rayservice.yaml",
                                 _set("spec", "serveConfigV2", value="applications:\n  - name: x\n    route_prefix: /x\n"),
                                 "spec.serveConfigV2.applications[0].import_path: Field required"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_file_names_the_path(tmp_path, case):
    source, mutate, expected = BROKEN[case]
    path = _broken(tmp_path, source, mutate)
    problems = check_file(path).problems
    assert any(p.startswith(f"{path}: ") and expected in p for p in problems), problems
    with pytest.raises(ConfigError) as info:
        validate_file(path)
    assert info.value.exit_code == 2 and str(path) in info.value.headline


def test_not_a_cluster_file_and_bad_yaml(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("name: x\n")
    assert "neither a Ray cluster launcher config" in check_file(other).problems[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    assert check_file(bad).problems[0].startswith(f"{bad}: line ")
    assert "cannot be read" in check_file(tmp_path / "missing.yaml").problems[0]


def test_cli_validate_exit_codes(tmp_path):
    ok = subprocess.run([LAKERAY, "cluster", "validate", str(CLUSTER / "local.yaml"),
                         str(CLUSTER / "kuberay" / "raycluster.yaml")], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "ok  " in ok.stdout and "KubeRay RayCluster" in ok.stdout
    broken = _broken(tmp_path, "aws.yaml", BROKEN["negative min_workers"][1])
    bad = subprocess.run([LAKERAY, "cluster", "validate", str(CLUSTER / "local.yaml"), str(broken)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert f"error: {broken}: available_node_types.gpu_worker.min_workers: -1 is less than the minimum of 0" \
        in bad.stderr
    assert "1 of 2 file(s) invalid" in bad.stderr and "Traceback" not in bad.stderr
