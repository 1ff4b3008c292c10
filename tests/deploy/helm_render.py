"""Render the Helm chart with the real Helm library (helm-sdkpy), against a recording fake Kubernetes API.

helm-sdkpy bundles Helm v4's Go library but exposes no dry-run or template action. So the chart is
*installed*, for real, into a tiny in-process Kubernetes API server on 127.0.0.1 that:

* answers discovery (/version, /api, /apis, /apis/<group>/<version>) for the built-in kinds the chart uses
  plus the CRDs a real cluster would have (ray.io from the KubeRay operator, monitoring.coreos.com from the
  Prometheus Operator), so Helm's REST mapping of every rendered object is checked as on a cluster;
* reports that nothing exists yet (404 on GET, empty lists), and accepts every create/update by echoing it.

Helm renders the templates (validating the values against values.schema.json first), maps and creates
each object, and returns the release, whose ``manifest`` is the rendered YAML. The objects Helm POSTed
are recorded too, so a test sees exactly what `helm install` would send to a cluster.

Helm runs in a separate worker process (spawned once per test session): the Go runtime it loads installs
signal handlers and threads that have no business in the process that runs the rest of the test suite.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import multiprocessing
import os
import platform
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from .helpers import CHART

# group/version -> [(plural, kind, namespaced)]
API_RESOURCES: dict[str, list[tuple[str, str, bool]]] = {
    "v1": [
        ("configmaps", "ConfigMap", True),
        ("secrets", "Secret", True),
        ("services", "Service", True),
        ("serviceaccounts", "ServiceAccount", True),
        ("persistentvolumeclaims", "PersistentVolumeClaim", True),
        ("pods", "Pod", True),
        ("namespaces", "Namespace", False),
    ],
    "apps/v1": [("statefulsets", "StatefulSet", True), ("deployments", "Deployment", True)],
    "networking.k8s.io/v1": [("ingresses", "Ingress", True), ("networkpolicies", "NetworkPolicy", True)],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget", True)],
    # CRDs: the KubeRay operator's and the Prometheus Operator's.
    "ray.io/v1": [("rayservices", "RayService", True), ("rayclusters", "RayCluster", True)],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor", True), ("podmonitors", "PodMonitor", True)],
}


def _discovery(path: str, kube_version: str):
    major, minor = kube_version.split(".")[:2]
    if path == "/version":
        return {"major": major, "minor": minor, "gitVersion": f"v{kube_version}", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        groups = {}
        for gv in API_RESOURCES:
            if "/" in gv:
                g, v = gv.split("/")
                groups.setdefault(g, []).append({"groupVersion": gv, "version": v})
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{"name": g, "versions": vs, "preferredVersion": vs[0]} for g, vs in groups.items()],
        }
    gv = path.removeprefix("/api/") if path.startswith("/api/") else path.removeprefix("/apis/")
    if gv in API_RESOURCES:
        return {
            "kind": "APIResourceList",
            "groupVersion": gv,
            "resources": [
                {"name": plural, "singularName": kind.lower(), "namespaced": ns, "kind": kind,
                 "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                for plural, kind, ns in API_RESOURCES[gv]
            ],
        }
    return None


@dataclass
class FakeKubeAPI:
    """A recording Kubernetes API on a loopback port (see the module docstring)."""

    kube_version: str = "1.31.0"
    # Objects already in the cluster, by API path (e.g. /api/v1/namespaces/ns/secrets/name): what `lookup` sees.
    existing: dict[str, dict] = field(default_factory=dict)
    created: list[dict] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def __enter__(self) -> "FakeKubeAPI":
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _json(self, code: int, obj) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                path = self.path.split("?")[0]
                api.requests.append(("GET", path))
                found = _discovery(path, api.kube_version)
                if found is not None:
                    return self._json(200, found)
                if path in api.existing:
                    return self._json(200, api.existing[path])
                last = path.rstrip("/").split("/")[-1]
                if any(last == plural for res in API_RESOURCES.values() for plural, _, _ in res):
                    return self._json(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []})
                return self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404, "message": f"{path} not found"})

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(n)
                ctype = self.headers.get("Content-Type", "application/json")
                api.requests.append((self.command, self.path.split("?")[0]))
                # Helm stores its release record as protobuf; the chart's objects arrive as JSON.
                if self.command == "POST" and ctype.startswith("application/json"):
                    api.created.append(json.loads(body))
                if self.command == "PATCH":
                    # A patch of an existing object (an upgrade): answer with the object as stored.
                    path = self.path.split("?")[0]
                    return self._json(200, api.existing.get(path, {}))
                # Echo the object back (JSON or protobuf alike): "created as sent".
                self.send_response(201 if self.command == "POST" else 200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(n))
                self.end_headers()
                self.wfile.write(body)

            do_PUT = do_POST
            do_PATCH = do_POST

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def kubeconfig(self) -> str:
        port = self._server.server_address[1]
        return yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        })


def helm():
    """The helm_sdkpy module, or a skip where its bundled Helm library cannot exist (non-x86_64 Linux)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"helm-sdkpy bundles Helm only for linux-amd64, not {platform.system()}-{platform.machine()}")
    try:
        import helm_sdkpy
    except ImportError:
        pytest.fail("helm-sdkpy is not installed: run bash scripts/setup.sh (it installs it with "
                    "--ignore-requires-python on Python 3.11)")
    return helm_sdkpy


@dataclass
class Rendered:
    manifest: str
    docs: list[dict]
    created: list[dict]
    release: dict
    # (method, path) of every call Helm made to the API server, e.g. the GET of a `lookup`.
    requests: list[tuple[str, str]] = field(default_factory=list)

    def by_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [d for d in self.by_kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {[d['metadata']['name'] for d in found]}"
        return found[0]

    def kinds_and_names(self) -> list[tuple[str, str]]:
        return sorted((d["kind"], d["metadata"]["name"]) for d in self.docs)


_executor: ProcessPoolExecutor | None = None


def _worker() -> ProcessPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        atexit.register(_executor.shutdown, wait=True, cancel_futures=True)
    return _executor


def _install(values: dict, release: str, namespace: str, kube_version: str, existing: dict) -> dict:
    """In the worker process: `helm install` into a fresh fake API; Helm's errors propagate."""
    import helm_sdkpy as h

    os.environ.setdefault("HELM_CACHE_HOME", "/tmp/slicefleet-helm-cache")
    with FakeKubeAPI(kube_version=kube_version, existing=existing) as api:
        cfg = h.Configuration(namespace=namespace, kubeconfig=api.kubeconfig)
        result = asyncio.run(h.Install(cfg).run(release, str(CHART), values=values, wait=False, timeout=60))
        return {"release": result, "created": list(api.created), "requests": list(api.requests)}


def _lint() -> dict:
    import helm_sdkpy as h

    with FakeKubeAPI() as api:
        cfg = h.Configuration(namespace="slicefleet", kubeconfig=api.kubeconfig)
        return asyncio.run(h.Lint(cfg).run(str(CHART)))


def render(values: dict | None = None, *, release: str = "slicefleet", namespace: str = "slicefleet",
           kube_version: str = "1.31.0", existing: dict[str, dict] | None = None) -> Rendered:
    """`helm install` of k8s/slicefleet with ``values`` (merged over values.yaml, like `-f`), into a cluster
    holding ``existing`` objects (by API path)."""
    helm()
    out = _worker().submit(_install, values or {}, release, namespace, kube_version, existing or {}).result()
    result = out["release"]
    docs = [d for d in yaml.safe_load_all(result["manifest"]) if d]
    return Rendered(manifest=result["manifest"], docs=docs, created=out["created"], release=result,
                    requests=[tuple(r) for r in out["requests"]])


def lint() -> dict:
    """`helm lint` of k8s/slicefleet (default values)."""
    helm()
    return _worker().submit(_lint).result()
