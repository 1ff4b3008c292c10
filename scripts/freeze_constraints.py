"""Write constraints.txt: the versions installed here of everything Slicefleet's install pulls in.

Run it after `scripts/test.sh` passed with new versions: `python scripts/freeze_constraints.py`. Not a plain
`pip freeze`, because that also pins whatever else the machine has installed and the editable install itself,
which a constraints file cannot hold. The closure starts at pyproject.toml's requirements with the extras
setup.sh installs (the vllm extra lives in its own venv) plus helm-sdkpy, and follows each installed
package's requirements, with their markers evaluated for this interpreter.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
EXTRAS = ("length", "bench", "test")
EXTRA_ROOTS = ["helm-sdkpy"]
# GPU wheels that follow the torch build: the CUDA torch of the image pins its own NVIDIA libraries exactly,
# the CPU torch needs none, so a pin taken on a CPU machine could only conflict there.
SKIP_PREFIXES = ("nvidia-", "triton")
OUT = REPO / "constraints.txt"

HEADER = """\
# Versions the test suite passes with (Linux x86_64, CPython 3.11), for reproducible installs:
#   pip install -c constraints.txt -e ".[test]"
# Used by scripts/setup.sh (so by scripts/test.sh, scripts/run.sh and CI) and the Dockerfile. Written by
# scripts/freeze_constraints.py from a passing environment; pyproject.toml keeps the loose floors.
# torch==X matches both the CPU build (X+cpu, from https://download.pytorch.org/whl/cpu) and PyPI's CUDA one.
# NVIDIA and triton wheels are left out: they follow the torch build.
"""


def closure(roots: list[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo = [(Requirement(r), frozenset(Requirement(r).extras)) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, extras = todo.pop()
        key = (canonicalize_name(req.name), extras)
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed: run scripts/setup.sh first")
        pins[canonicalize_name(req.name)] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            wanted = [e for e in extras] or [""]
            if sub.marker and not any(sub.marker.evaluate({**default_environment(), "extra": e}) for e in wanted):
                continue
            todo.append((sub, frozenset(sub.extras)))
    return pins


def roots() -> list[str]:
    """slicefleet's own requirements with EXTRAS, read from pyproject.toml (the installed metadata of an
    editable install can be older); its references to itself (slicefleet[length]) are already covered."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [r for r in reqs if canonicalize_name(Requirement(r).name) != "slicefleet"] + EXTRA_ROOTS


def main() -> None:
    pins = closure(roots())
    lines = []
    for name, version in sorted(pins.items()):
        if name.startswith(SKIP_PREFIXES):
            continue
        # A local label (2.13.0+cpu) would pin one build; the public version matches both.
        lines.append(f"{name}=={version.split('+')[0]}")
    OUT.write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{OUT}: {len(lines)} pins")


if __name__ == "__main__":
    main()
