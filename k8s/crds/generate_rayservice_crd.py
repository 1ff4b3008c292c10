"""Writes ray.io_rayservices.yaml: the KubeRay RayService CRD (ray.io/v1) schema this chart is checked against.

Why generated here: no PyPI package ships the KubeRay CRDs and GitHub is not reachable from where this
project is built, so the schema cannot be downloaded. It is rebuilt from two sources (README.md beside it):

* KubeRay's own fields (RayServiceSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, ...) are written
  out by hand below, field for field, from the KubeRay v1.6.2 API reference (ray-project/kuberay
  docs/reference/api.md at tag v1.6.2, generated upstream from ray-operator/apis/ray/v1/*_types.go):
  names, types, enums, defaults and minimums as listed there; `required` as the Go types' json tags say.
* The Kubernetes core/v1 types KubeRay embeds (PodTemplateSpec, Service, ResourceRequirements, EnvVar, ...)
  are generated from the Kubernetes OpenAPI definitions shipped in the `kubernetes-validate` package,
  transformed the way controller-gen writes them into a CRD: refs inlined, descriptions dropped (KubeRay
  builds its CRDs with maxDescLen=0), int-or-string and quantities as `x-kubernetes-int-or-string`,
  embedded ObjectMeta reduced to name/namespace/labels/annotations/finalizers (generateEmbeddedObjectMeta).

`status` is kept as an opaque object: the chart never writes it.

Usage: python k8s/crds/generate_rayservice_crd.py [--k8s-version 1.33]
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import yaml

KUBERAY_VERSION = "v1.6.2"
DEFAULT_K8S_VERSION = "1.33"
OUT = Path(__file__).with_name("ray.io_rayservices.yaml")

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
INT_OR_STRING = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": QUANTITY_PATTERN,
    "x-kubernetes-int-or-string": True,
}
EMBEDDED_OBJECT_META = {
    "type": "object",
    "properties": {
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "name": {"type": "string"},
        "namespace": {"type": "string"},
    },
}
# The x-kubernetes-* keys a CRD's JSONSchemaProps may carry (apiextensions.k8s.io/v1).
JSON_SCHEMA_PROPS_EXTENSIONS = {
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-validations",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
INT32 = {"type": "integer", "format": "int32"}
MANAGED_BY = {
    "type": "string",
    "x-kubernetes-validations": [
        {"rule": "self == oldSelf", "message": "the managedBy field is immutable"},
        {
            "rule": "self in ['ray.io/kuberay-operator', 'kueue.x-k8s.io/multikueue']",
            "message": "the managedBy field value must be either 'ray.io/kuberay-operator' or "
            "'kueue.x-k8s.io/multikueue'",
        },
    ],
}


class CoreV1:
    """Kubernetes OpenAPI definitions (kubernetes-validate's bundle) turned into CRD-style inline schemas."""

    def __init__(self, k8s_version: str):
        root = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{k8s_version}.0-local"
        self.defs = json.loads((root / "_definitions.json").read_text())["$defs"]
        self.k8s_version = k8s_version

    def schema(self, name: str) -> dict:
        return self._convert(self.defs[name], stack=(name,))

    def _convert(self, node, stack):
        if isinstance(node, list):
            return [self._convert(n, stack) for n in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            name = node["$ref"].split("/")[-1]
            if name == "io.k8s.apimachinery.pkg.util.intstr.IntOrString":
                return dict(INT_OR_STRING)
            if name == "io.k8s.apimachinery.pkg.api.resource.Quantity":
                return dict(QUANTITY)
            if name == "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta":
                return json.loads(json.dumps(EMBEDDED_OBJECT_META))
            if name in stack:
                raise ValueError(f"recursive type {name}: not representable in a structural schema")
            return self._convert(self.defs[name], stack + (name,))
        out = {}
        for key, value in node.items():
            if key in ("description", "$schema", "$id"):
                continue
            if key.startswith("x-kubernetes-") and key not in JSON_SCHEMA_PROPS_EXTENSIONS:
                continue  # e.g. x-kubernetes-patch-strategy: OpenAPI-only, not allowed in a CRD schema
            if key == "type" and isinstance(value, list):
                types = [t for t in value if t != "null"]
                value = types[0] if len(types) == 1 else types
            if key == "properties":
                out[key] = {k: self._convert(v, stack) for k, v in value.items()}
                continue
            out[key] = self._convert(value, stack)
        return out


def rayservice_schema(core: CoreV1) -> dict:
    pod_template = core.schema("io.k8s.api.core.v1.PodTemplateSpec")
    service = core.schema("io.k8s.api.core.v1.Service")
    env_var = core.schema("io.k8s.api.core.v1.EnvVar")
    redis_credential = {
        "type": "object",
        "properties": {"valueFrom": core.schema("io.k8s.api.core.v1.EnvVarSource"), "value": {"type": "string"}},
    }
    autoscaler_options = {
        "type": "object",
        "properties": {
            "resources": core.schema("io.k8s.api.core.v1.ResourceRequirements"),
            "image": {"type": "string"},
            "imagePullPolicy": {"type": "string"},
            "securityContext": core.schema("io.k8s.api.core.v1.SecurityContext"),
            "idleTimeoutSeconds": dict(INT32),
            "upscalingMode": {"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
            "version": {"type": "string", "enum": ["v1", "v2"]},
            "env": {"type": "array", "items": env_var},
            "envFrom": {"type": "array", "items": core.schema("io.k8s.api.core.v1.EnvFromSource")},
            "volumeMounts": {"type": "array", "items": core.schema("io.k8s.api.core.v1.VolumeMount")},
        },
    }
    head_group_spec = {
        "type": "object",
        "required": ["template"],
        "properties": {
            "template": pod_template,
            "headService": service,
            "enableIngress": {"type": "boolean"},
            "resources": dict(STRING_MAP),
            "labels": dict(STRING_MAP),
            "rayStartParams": dict(STRING_MAP),
            "serviceType": {"type": "string"},
        },
    }
    worker_group_spec = {
        "type": "object",
        "required": ["groupName", "template"],
        "properties": {
            "suspend": {"type": "boolean"},
            "groupName": {"type": "string"},
            "replicas": {**INT32, "default": 0},
            "minReplicas": {**INT32, "default": 0},
            "maxReplicas": {**INT32, "default": 2147483647},
            "idleTimeoutSeconds": dict(INT32),
            "resources": dict(STRING_MAP),
            "labels": dict(STRING_MAP),
            "rayStartParams": dict(STRING_MAP),
            "template": pod_template,
            "scaleStrategy": {
                "type": "object",
                "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
            },
            "numOfHosts": {**INT32, "default": 1},
        },
    }
    ray_cluster_spec = {
        "type": "object",
        "required": ["headGroupSpec"],
        "properties": {
            "upgradeStrategy": {
                "type": "object",
                "properties": {"type": {"type": "string", "enum": ["Recreate", "None"]}},
            },
            "authOptions": {
                "type": "object",
                "properties": {
                    "enableK8sTokenAuth": {"type": "boolean"},
                    "secretName": {"type": "string"},
                    "mode": {"type": "string", "enum": ["disabled", "token"]},
                },
            },
            "suspend": {"type": "boolean"},
            "managedBy": json.loads(json.dumps(MANAGED_BY)),
            "autoscalerOptions": autoscaler_options,
            "headServiceAnnotations": dict(STRING_MAP),
            "enableInTreeAutoscaling": {"type": "boolean"},
            "gcsFaultToleranceOptions": {
                "type": "object",
                "properties": {
                    "redisUsername": redis_credential,
                    "redisPassword": redis_credential,
                    "externalStorageNamespace": {"type": "string"},
                    "redisAddress": {"type": "string"},
                },
            },
            "headGroupSpec": head_group_spec,
            "rayVersion": {"type": "string"},
            "workerGroupSpecs": {"type": "array", "items": worker_group_spec},
        },
    }
    spec = {
        "type": "object",
        "properties": {
            "rayClusterDeletionDelaySeconds": {**INT32, "minimum": 0},
            "serviceUnhealthySecondThreshold": dict(INT32),
            "deploymentUnhealthySecondThreshold": dict(INT32),
            "serveService": service,
            "upgradeStrategy": {
                "type": "object",
                "properties": {
                    # NewClusterWithIncrementalUpgrade | NewCluster | None (no enum marker upstream).
                    "type": {"type": "string"},
                    "clusterUpgradeOptions": {
                        "type": "object",
                        "properties": {
                            "maxSurgePercent": {**INT32, "default": 100},
                            "stepSizePercent": dict(INT32),
                            "intervalSeconds": dict(INT32),
                            "gatewayClassName": {"type": "string"},
                        },
                    },
                },
            },
            "managedBy": json.loads(json.dumps(MANAGED_BY)),
            "serveConfigV2": {"type": "string"},
            "rayClusterConfig": ray_cluster_spec,
            "excludeHeadPodFromServeSvc": {"type": "boolean"},
        },
    }
    return {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    }


def crd(k8s_version: str) -> dict:
    core = CoreV1(k8s_version)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": "rayservices.ray.io",
            "annotations": {
                "slicefleet.io/kuberay-version": KUBERAY_VERSION,
                "slicefleet.io/core-v1-schema": f"kubernetes {k8s_version} (kubernetes-validate)",
                "slicefleet.io/provenance": "reconstructed: see k8s/crds/README.md",
            },
        },
        "spec": {
            "group": "ray.io",
            "names": {
                "categories": ["all"],
                "kind": "RayService",
                "listKind": "RayServiceList",
                "plural": "rayservices",
                "singular": "rayservice",
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": rayservice_schema(core)},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes every repeated sub-schema out in full, like controller-gen (no YAML anchors)."""

    def ignore_aliases(self, data):
        return True


HEADER = """\
# KubeRay RayService CRD (ray.io/v1), KubeRay {kuberay}: RECONSTRUCTED, not downloaded.
# Written by k8s/crds/generate_rayservice_crd.py; source, version and method in k8s/crds/README.md.
# Used by tests/deploy to validate the chart's rendered RayService. Install the real CRDs with the
# KubeRay operator's Helm chart (docs/deploy.md), not from this file.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k8s-version", default=DEFAULT_K8S_VERSION)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    text = HEADER.format(kuberay=KUBERAY_VERSION) + yaml.dump(crd(args.k8s_version), Dumper=_NoAliasDumper, sort_keys=False, width=120)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
