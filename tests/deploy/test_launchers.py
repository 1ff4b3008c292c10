"""`ray up` cluster launchers (configs/cluster-*.yaml): Ray's own schema, then what Slicefleet needs of them."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
from ray.autoscaler._private.util import prepare_config, validate_config

from .helpers import CONFIGS, REPO, env_example_names, load_yaml, ray_version, require_tool

LAUNCHERS = sorted(CONFIGS.glob("cluster-*.yaml"))
RAY_SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_both_clouds_present():
    assert {p.name for p in LAUNCHERS} >= {"cluster-aws.yaml", "cluster-gcp.yaml"}


@pytest.fixture(params=LAUNCHERS, ids=lambda p: p.name)
def launcher(request):
    return request.param, load_yaml(request.param)


def test_validates_against_ray_cluster_schema(launcher):
    path, cfg = launcher
    jsonschema.Draft7Validator.check_schema(RAY_SCHEMA)
    errors = sorted(jsonschema.Draft7Validator(RAY_SCHEMA).iter_errors(cfg), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{path.name}: {list(e.path)}: {e.message}" for e in errors)


def test_ray_up_prepare_and_validate(launcher):
    """The steps `ray up` runs before it talks to the cloud: merge with the provider defaults, validate."""
    _, cfg = launcher
    validate_config(copy.deepcopy(cfg))
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    # Our commands survive the merge with the provider's defaults (nothing of the defaults' wheels).
    setup = prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    assert all("ray-wheels" not in c for c in setup)
    assert any("setup-node.sh" in c for c in prepared["head_setup_commands"])
    assert any("setup-node.sh" in c for c in prepared["worker_setup_commands"])


def test_cpu_head_and_autoscaling_gpu_workers(launcher):
    path, cfg = launcher
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) >= 1}
    assert gpu_types, f"{path.name}: no GPU worker node type"
    for name, t in gpu_types.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
        assert t["max_workers"] > t["min_workers"], f"{name}: min == max leaves nothing to autoscale"
    # The Serve config's GPU demand fits the fleet at its largest.
    serve = load_yaml(CONFIGS / "serve-gpu.yaml")["applications"][0]["args"]["replicas"]
    capacity = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    assert serve["num_replicas"] * serve["num_gpus"] <= capacity
    per_node_cpu = min(t["resources"]["CPU"] for t in gpu_types.values())
    assert serve["num_cpus"] <= per_node_cpu, "a SliceWorker replica must fit one GPU node's CPUs"


def test_provider_specifics(launcher):
    path, cfg = launcher
    types = cfg["available_node_types"]
    if cfg["provider"]["type"] == "aws":
        for t in types.values():
            assert t["node_config"]["InstanceType"]
            assert t["node_config"]["ImageId"].startswith(("ami-", "resolve:ssm:"))
    elif cfg["provider"]["type"] == "gcp":
        assert cfg["provider"]["project_id"]
        for t in types.values():
            nc = t["node_config"]
            assert nc["machineType"]
            if t["resources"].get("GPU"):
                acc = nc["guestAccelerators"]
                assert sum(a["acceleratorCount"] for a in acc) == t["resources"]["GPU"]
                # GPU VMs cannot live-migrate: GCE refuses them without TERMINATE on host maintenance.
                assert {"onHostMaintenance": "TERMINATE"} in nc["scheduling"]
    else:
        pytest.fail(f"{path.name}: unexpected provider {cfg['provider']['type']}")


def test_image_and_commands(launcher):
    path, cfg = launcher
    image = cfg["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.endswith("-gpu")
    # Same Ray on the cluster as in the package under test and in the Dockerfile's base image.
    assert image.split(":")[1].split("-")[0] == ray_version()
    assert f"RAY_IMAGE={image}" in (REPO / "Dockerfile").read_text()
    # Every launcher script the commands name exists in the synced checkout.
    assert cfg["file_mounts"]["/home/ray/slicefleet-src"] == "."
    commands = [c for key in ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in cfg[key]]
    for c in commands:
        for word in c.split():
            if word.startswith("~/slicefleet-src/"):
                assert (REPO / word.removeprefix("~/slicefleet-src/")).is_file(), f"{path.name}: {word}"
    assert "start-head.sh" in " ".join(cfg["head_start_ray_commands"])
    assert "start-worker.sh" in " ".join(cfg["worker_start_ray_commands"])
    assert "serve deploy" in path.read_text() and "serve-gpu.yaml" in path.read_text()


def test_launcher_scripts_pass_shellcheck():
    scripts = sorted((CONFIGS / "launcher").glob("*.sh"))
    assert {s.name for s in scripts} >= {"setup-node.sh", "start-head.sh", "start-worker.sh"}
    shellcheck = require_tool("shellcheck")
    for s in scripts:
        subprocess.run(["bash", "-n", str(s)], check=True)
    out = subprocess.run([shellcheck, "-x", *map(str, scripts)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_nodes_install_the_length_extra_against_the_constraints():
    """The nodes serve with the length predictor, at the versions the tests pass with; the constraints file
    reaches them (file_mounts syncs the repository, rsync_exclude must not drop it)."""
    setup = (CONFIGS / "launcher" / "setup-node.sh").read_text()
    installs = [line for line in setup.splitlines() if "pip install" in line and "${SRC}" in line]
    assert installs and all('"${PIN[@]}" "${SRC}[length]"' in line for line in installs), installs
    assert 'PIN=(-c "$SRC/constraints.txt")' in setup
    for name in ("cluster-aws.yaml", "cluster-gcp.yaml"):
        cfg = load_yaml(CONFIGS / name)
        assert cfg["file_mounts"]["/home/ray/slicefleet-src"] == "."
        assert "constraints.txt" not in cfg.get("rsync_exclude", [])


def test_start_scripts_keep_redis_off_ray_port():
    head = (CONFIGS / "launcher" / "start-head.sh").read_text()
    assert "REDIS_PORT=${SLICEFLEET_REDIS_PORT:-6380}" in head
    assert "appendonly yes" in head and "requirepass" in head
    # The password never goes on a command line.
    assert "--requirepass" not in head


def test_env_example_documents_every_placeholder():
    from .helpers import placeholders

    used = placeholders(load_yaml(CONFIGS / "serve-gpu.yaml"))
    assert used <= env_example_names(), used - env_example_names()
