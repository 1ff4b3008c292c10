"""The container image (Dockerfile at the repository root): lint with hadolint, then what it must contain."""

from __future__ import annotations

import re
import subprocess

from .helpers import REPO, load_yaml, ray_version, require_tool

DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_clean():
    hadolint = require_tool("hadolint")
    # Every finding fails, down to "info"; the two justified exceptions are inline `# hadolint ignore=`.
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_base_image_is_ray_gpu_matching_the_package():
    text = DOCKERFILE.read_text()
    m = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert m, "base image must be a Ray image"
    tag = m.group(1)
    assert tag.endswith("-gpu") and tag.split("-")[0] == ray_version()
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)


def test_installs_pinned_torch_before_the_package():
    text = DOCKERFILE.read_text()
    pinned = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M).group(1)
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert f'torch=={pinned}' in setup, "the image's torch must be the version scripts/setup.sh pins"
    assert text.index('"torch==${TORCH_VERSION}"') < text.index("pip install --no-cache-dir .")


def test_dockerignore_keeps_the_package_sources():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert pkg not in ignored, f"{pkg}/ is part of the package: the image build needs it"
    assert {"pyproject.toml", "README.md", "configs"}.isdisjoint(ignored)
    assert ".git" in ignored


def test_chart_and_launchers_use_this_image():
    values = load_yaml(REPO / "k8s" / "slicefleet" / "values.yaml")
    assert values["image"]["tag"].endswith("-gpu")
    assert values["rayVersion"] == ray_version()
