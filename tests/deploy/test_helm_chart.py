"""The Helm chart (k8s/slicefleet): lint and render with the Helm library, then validate what it renders.

Rendering is a real `helm install` into a recording fake Kubernetes API (helm_render.py). The rendered
manifests are validated against Kubernetes' schemas (kubernetes-validate, strict: unknown fields fail),
the RayService against the KubeRay CRD schema kept in k8s/crds/ (strict too), and the Serve app's args
inside serveConfigV2 against Slicefleet's own configuration model.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from functools import lru_cache

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from .helm_render import lint, render
from .helpers import CHART, CRDS, load_yaml, placeholders, validate_slicefleet_args

GPU_VALUES = CHART / "values-gpu.yaml"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest kubernetes-validate knows.
KUBE_VERSIONS = ["1.27", kubernetes_validate.utils.latest_version()]
CRD_KINDS = {"RayService", "ServiceMonitor", "PodMonitor"}

# The default values' manifests, by kind and name (release "slicefleet"). Also in docs/deploy.md.
DEFAULT_MANIFESTS = [
    ("ConfigMap", "slicefleet-dashboard"),
    ("ConfigMap", "slicefleet-redis"),
    ("RayService", "slicefleet"),
    ("Secret", "slicefleet-redis"),
    ("Service", "slicefleet-redis"),
    ("Service", "slicefleet-redis-headless"),
    ("StatefulSet", "slicefleet-redis"),
]
GPU_MANIFESTS = sorted(DEFAULT_MANIFESTS + [("Ingress", "slicefleet"), ("ServiceMonitor", "slicefleet"),
                                            ("PodMonitor", "slicefleet-ray")])

# Metric families the Grafana dashboard charts (the API's /metrics, cluster/metrics.py; docs/metrics.md).
DASHBOARD_METRICS = {
    "slicefleet:generation_tokens_total",
    "slicefleet:prompt_tokens_total",
    "slicefleet:num_requests_running",
    "slicefleet:num_requests_waiting",
    "slicefleet:time_to_first_token_seconds",
    "slicefleet:inter_token_latency_seconds",
    "slicefleet:request_time_per_output_token_seconds",
    "slicefleet:e2e_request_latency_seconds",
    "slicefleet:request_queue_time_seconds",
    "slicefleet:kv_cache_usage_perc",
    "slicefleet:num_preemptions_total",
    "slicefleet:request_success_total",
    "slicefleet:request_generation_tokens",
    "slicefleet_moves_total",
    "slicefleet_requests_requeued_total",
    "slicefleet_pool_depth",
    "slicefleet_running_requests",
    "slicefleet_slices_run_total",
    "slicefleet_batches_run_total",
    "slicefleet_batch_size_mean",
    "slicefleet_replica_expected_completion_seconds",
    "slicefleet_replica_busy_seconds_total",
    "slicefleet_predicted_output_tokens",
    "slicefleet_predicted_slice_seconds_total",
    "slicefleet_actual_slice_seconds_total",
    "slicefleet_slice_time_mape",
    "slicefleet_ingress_requests_total",
    "slicefleet_ingress_errors_total",
    "slicefleet_ingress_rejected_total",
    "slicefleet_backlog_seconds",
}


@pytest.fixture(scope="module")
def default():
    return render()


@pytest.fixture(scope="module")
def gpu():
    return render(load_yaml(GPU_VALUES))


@pytest.fixture(params=["default", "gpu"])
def rendered(request):
    return request.getfixturevalue(request.param)


# --- lint and render --------------------------------------------------------------------------------

def test_lint_clean():
    result = lint()
    assert result["TotalChartsLinted"] == 1
    assert not result["Errors"], result
    # Helm's severities: 1 info, 2 warning, 3 error. The one info is "icon is recommended".
    assert all(m["Severity"] <= 1 for m in result["Messages"]), result["Messages"]


def test_default_manifests(default):
    assert default.kinds_and_names() == DEFAULT_MANIFESTS


def test_gpu_manifests(gpu):
    assert gpu.kinds_and_names() == GPU_MANIFESTS


def test_helm_sent_every_rendered_object(rendered):
    """Helm mapped each object through the API's discovery and created it: nothing unknown to a cluster."""
    sent = sorted((o["kind"], o["metadata"]["name"]) for o in rendered.created)
    assert sent == rendered.kinds_and_names()
    for obj in rendered.created:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert obj["metadata"]["annotations"]["meta.helm.sh/release-name"] == "slicefleet"


# --- Kubernetes and CRD schemas ------------------------------------------------------------------------

@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_kubernetes_schemas(rendered, kube_version):
    unresolved = set()
    for doc in rendered.docs:
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            unresolved.add(doc["kind"])
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} vs Kubernetes {kube_version}: {path}: {e.message}")
    assert unresolved <= CRD_KINDS, unresolved


def _int_format(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return lambda v: not isinstance(v, int) or isinstance(v, bool) or lo <= v <= hi


@lru_cache(maxsize=1)
def rayservice_validator():
    """The KubeRay CRD's openAPIV3Schema, strict: unknown fields fail (kubectl's default field validation)."""
    docs = list(yaml.safe_load_all((CRDS / "ray.io_rayservices.yaml").read_text()))
    (crd,) = [d for d in docs if d and d.get("kind") == "CustomResourceDefinition"]
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    formats = jsonschema.FormatChecker()
    formats.checks("int32")(_int_format(32))
    formats.checks("int64")(_int_format(64))
    return jsonschema.Draft7Validator(schema, format_checker=formats)


def test_rayservice_against_kuberay_crd(rendered):
    rs = rendered.one("RayService")
    errors = sorted(rayservice_validator().iter_errors(rs), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:20])


def test_crd_validator_rejects_typos(default):
    rs = copy.deepcopy(default.one("RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo of maxReplicas
    assert not rayservice_validator().is_valid(rs)
    rs = copy.deepcopy(default.one("RayService"))
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "x"
    assert not rayservice_validator().is_valid(rs)
    rs = copy.deepcopy(default.one("RayService"))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = 2 ** 31  # not an int32
    assert not rayservice_validator().is_valid(rs)


def test_crd_file_is_a_valid_structural_crd():
    crd = next(d for d in yaml.safe_load_all((CRDS / "ray.io_rayservices.yaml").read_text()) if d)
    kubernetes_validate.validate(crd, KUBE_VERSIONS[-1], strict=True)
    assert crd["metadata"]["name"] == "rayservices.ray.io"
    assert crd["metadata"]["annotations"]["slicefleet.io/kuberay-version"] == "v1.6.2"
    assert (CRDS / "README.md").is_file()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    jsonschema.Draft7Validator.check_schema(schema)

    def walk(node, path="$"):
        assert "$ref" not in node, path
        if "properties" in node:
            assert node.get("type") == "object", path
            assert "additionalProperties" not in node, f"{path}: not structural"
            for k, v in node["properties"].items():
                walk(v, f"{path}.{k}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}[{key}]")

    walk(schema)


# --- the Serve application ----------------------------------------------------------------------------

# Secrets the operator creates before installing (values-gpu.yaml's apiKeys.existingSecret), as they would hold.
OPERATOR_SECRETS = {"slicefleet-api-keys": {"api-key": "operator-made-key-0123456789"}}


def pod_env(rendered, container: dict) -> dict[str, str]:
    """A container's environment as the kubelet would give it, Secret references resolved from the release
    or, for Secrets the release names but does not make, from OPERATOR_SECRETS."""
    secrets = {s["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
               for s in rendered.by_kind("Secret")}
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = {**OPERATOR_SECRETS, **secrets}[ref["name"]][ref["key"]]
    return env


def ray_containers(rendered):
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    yield cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]["containers"][0]


def test_serve_config_v2(rendered, tmp_path):
    serve = yaml.safe_load(rendered.one("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)
    assert set(serve) <= set(ServeDeploySchema.model_fields)
    (app,) = serve["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "cluster.app:build_app" and app["route_prefix"] == "/"
    # The args are a SlicefleetConfig once each Ray container's environment fills the placeholders.
    args = app["args"]
    for container in ray_containers(rendered):
        env = pod_env(rendered, container)
        assert placeholders(args) <= set(env), placeholders(args) - set(env)
        cfg = validate_slicefleet_args(args, env, tmp_path)
        assert cfg.redis.url.startswith("redis://slicefleet-redis.slicefleet.svc:6379")
        assert cfg.redis.password and len(cfg.redis.password) >= 16


def test_serve_config_follows_values(default, gpu, tmp_path):
    values = load_yaml(CHART / "values.yaml")["slicefleet"]
    args = yaml.safe_load(default.one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["model"]["name"] == values["model"]["name"] and "path" not in args["model"]
    assert args["scheduler"]["slice_len"] == values["scheduler"]["sliceLen"]
    assert args["scheduler"]["mode"] == values["scheduler"]["mode"]
    assert args["replicas"]["num_replicas"] == values["replicas"]
    assert args["engine"] == {"backend": "hf", "device": "cpu", "kernel_inject": False, "memory_safety": 0.8}

    gv = load_yaml(GPU_VALUES)["slicefleet"]
    args = yaml.safe_load(gpu.one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["engine"]["backend"] == "deepspeed" and args["engine"]["kernel_inject"] is True
    assert args["replicas"] == {"num_replicas": gv["replicas"], "num_cpus": 4, "num_gpus": 1}
    assert args["model"]["path"] == gv["model"]["path"]
    assert args["api"]["max_backlog_seconds"] == 300  # extraConfig merged in
    assert args["scheduler"]["slice_len"] == gv["scheduler"]["sliceLen"]


def test_values_override_scheduler_through_set(tmp_path):
    r = render({"slicefleet": {"scheduler": {"mode": "sls", "sliceLen": 16}, "replicas": 3}})
    args = yaml.safe_load(r.one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert (args["scheduler"]["mode"], args["scheduler"]["slice_len"], args["replicas"]["num_replicas"]) == ("sls", 16, 3)


# --- what must hold between the objects ---------------------------------------------------------------

def test_head_and_gpu_workers(gpu):
    cluster = gpu.one("RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    (workers,) = cluster["workerGroupSpecs"]
    pod = workers["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    args = yaml.safe_load(gpu.one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    need = args["replicas"]["num_replicas"] * args["replicas"]["num_gpus"]
    assert need <= workers["maxReplicas"] * int(limits["nvidia.com/gpu"])
    assert cluster["enableInTreeAutoscaling"] is True
    for c in ray_containers(gpu):
        assert pod_env(gpu, c)["DS_ACCELERATOR"] == "cuda"
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]


def api_service(rendered) -> dict:
    """The API Service as KubeRay creates it from RayService.spec.serveService."""
    return {"apiVersion": "v1", "kind": "Service", **rendered.one("RayService")["spec"]["serveService"]}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_api_service_declared_for_kuberay(rendered, kube_version):
    svc = api_service(rendered)
    kubernetes_validate.validate(svc, kube_version, strict=True)
    assert svc["metadata"]["name"] == "slicefleet-api"
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "api"
    # KubeRay sets the selector itself (active cluster, ray.io/serve=true); one given here would be ignored.
    assert "selector" not in svc["spec"]
    # ... and takes the port from the head container's port named "serve": they must agree.
    assert svc["spec"]["ports"] == [{"name": "serve", "port": 8000}]
    cluster = rendered.one("RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        ports = {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == 8000
    # The chart renders no Service of its own that would compete for the name.
    assert all(s["metadata"]["name"] != svc["metadata"]["name"] for s in rendered.by_kind("Service"))


def test_ingress_and_service_monitor_point_at_the_api(gpu):
    svc = api_service(gpu)
    ing = gpu.one("Ingress")
    for rule in ing["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == svc["metadata"]["name"]
            assert backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    sm = gpu.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"]["matchNames"] == ["slicefleet"]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
    # Every serving pod's proxy answers /metrics from the one Ingress replica: one target (the head) only,
    # or each counter is read once per pod.
    assert ep["relabelings"] == [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
                                  "regex": "head", "action": "keep"}]
    # No Service the chart renders matches the monitor's selector (only the API Service does).
    for other in gpu.by_kind("Service"):
        assert not sm["spec"]["selector"]["matchLabels"].items() <= other["metadata"]["labels"].items()
    # With API keys /metrics needs one: the scraper reads the first key of the API-key Secret.
    keys = load_yaml(GPU_VALUES)["apiKeys"]
    assert ep["authorization"] == {"type": "Bearer", "credentials": {"name": keys["existingSecret"],
                                                                     "key": keys["secretKeys"][0]}}


def test_service_monitor_without_api_keys_scrapes_without_auth():
    (sm,) = render({"serviceMonitor": {"enabled": True}}).by_kind("ServiceMonitor")
    assert "authorization" not in sm["spec"]["endpoints"][0]


def test_redis_statefulset_durable_and_password_from_secret(rendered):
    sts = rendered.one("StatefulSet", "-redis")
    conf = rendered.one("ConfigMap", "-redis")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M) and re.search(r"^appendfsync everysec$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    secret = rendered.one("Secret", "-redis")
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"]
    assert "$(REDIS_PASSWORD)" in c["args"] and not any(
        base64.b64decode(v).decode() in json.dumps(sts) for v in secret["data"].values())
    # The Redis Service the app's URL names selects this StatefulSet's pods, on the same port.
    svc = rendered.one("Service", "-redis")
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["serviceName"] == rendered.one("Service", "-redis-headless")["metadata"]["name"]


def test_generated_redis_password_survives_upgrades(default):
    """A second install/upgrade reads the password already in the cluster instead of generating a new one."""
    secret = default.one("Secret", "-redis")
    generated = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert len(generated) == 32
    existing = {"/api/v1/namespaces/slicefleet/secrets/slicefleet-redis": {
        "apiVersion": "v1", "kind": "Secret",
        # As the first install left it (and as `helm uninstall` keeps it: helm.sh/resource-policy: keep).
        "metadata": {"name": "slicefleet-redis", "namespace": "slicefleet",
                     "labels": {"app.kubernetes.io/managed-by": "Helm"},
                     "annotations": {"meta.helm.sh/release-name": "slicefleet",
                                     "meta.helm.sh/release-namespace": "slicefleet"}},
        "data": {"redis-password": base64.b64encode(b"kept-from-the-first-install").decode()}}}
    again = render(existing=existing).one("Secret", "-redis")
    assert base64.b64decode(again["data"]["redis-password"]) == b"kept-from-the-first-install"
    assert again["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_gcs_fault_tolerance_redis_is_separate(gpu):
    cluster = gpu.one("RayService")["spec"]["rayClusterConfig"]
    gcs = cluster["gcsFaultToleranceOptions"]["redisAddress"]
    for c in ray_containers(gpu):
        assert gcs.split(":")[0] not in pod_env(gpu, c)["SLICEFLEET_REDIS_URL"]


def test_ray_pod_monitor_scrapes_every_ray_pod(gpu, default):
    """Ray's own metrics: every Ray pod's metrics agent, each pod a target of its own."""
    assert not default.by_kind("PodMonitor")  # needs the Prometheus Operator's CRDs: off by default
    pm = gpu.one("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pm["spec"]["namespaceSelector"]["matchNames"] == ["slicefleet"]
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    cluster = gpu.one("RayService")["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        assert pm["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}
        assert ports[ep["port"]] == 8080  # Ray's metrics export port (KubeRay's default)
    assert {r["targetLabel"] for r in ep["relabelings"]} == {"ray_io_cluster", "ray_io_node_type"}
    # Nothing else the chart renders carries the Ray pod label (the Redis pods must not be scraped as Ray).
    for sts in gpu.by_kind("StatefulSet"):
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert not pm["spec"]["selector"]["matchLabels"].items() <= labels.items()


def dashboard_series(dash: dict) -> set[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b([a-z_:][a-z0-9_:]*)\{", e)}


def test_grafana_dashboard(rendered):
    cm = rendered.one("ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["slicefleet.json"])
    assert dash == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    names = dashboard_series(dash)
    assert names and all(n.startswith(("slicefleet_", "slicefleet:")) for n in names), names
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert families == DASHBOARD_METRICS, families ^ DASHBOARD_METRICS
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("pool depth", "slices run", "batch size", "expected completion per replica",
                 "predicted vs actual output length", "slice time", "errors", "tokens/s",
                 "time to first token", "kv cache usage per replica", "preemptions"):
        assert word in titles, word


def test_dashboard_works_without_kubernetes_labels():
    """Namespace and model default to "All" (=~".*", which also matches a series without the label, as on a
    `ray up` cluster), and every selector of every query goes through the namespace variable."""
    dash = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    for name in ("namespace", "model_name"):
        v = variables[name]
        assert v["includeAll"] and v["allValue"] == ".*" and v["current"]["value"] == ["$__all"], v
    for p in dash["panels"]:
        for t in p["targets"]:
            selectors = re.findall(r"\{([^{}]*)\}", t["expr"])
            assert selectors and all('namespace=~"$namespace"' in sel for sel in selectors), t["expr"]
            assert '="$' not in t["expr"], t["expr"]  # "=" would not match "All"
            for metric in re.findall(r"\b(slicefleet:[a-z0-9_:]*)\{([^{}]*)\}", t["expr"]):
                assert 'model_name=~"$model_name"' in metric[1], t["expr"]


def test_dashboard_reads_what_the_api_exports():
    """Every series the dashboard queries is in the /metrics text cluster/metrics.py produces after one request
    (tests/cluster/test_metrics_e2e.py checks the same against a live cluster)."""
    from prometheus_client.parser import text_string_to_metric_families

    from cluster.messages import MetricsSnapshot, ReplicaMetrics
    from cluster.metrics import REQUEST_LATENCY_BUCKETS, IngressMetrics, SnapshotHistogram

    m = IngressMetrics("m")
    for status in (200, 400, 429, 500):
        m.observe_response("chat_completions", status)
    m.rejected.inc()
    m.accepted("r", prompt_len=5, max_tokens=8, t0=0.0, predicted_len=6.0)
    m.output("r", 2, now=0.5)
    m.output("r", 2, now=0.7)
    m.ended("r", "length", 4, now=0.8)
    queue = SnapshotHistogram(REQUEST_LATENCY_BUCKETS)
    queue.observe(0.2)
    # A dispatcher snapshot as the dispatcher publishes it.
    snapshot = MetricsSnapshot(
        time=0.0, mode="scls", epoch=1, pool_depth=3, running=8, slices_run=120, batches_run=10,
        batch_size_mean=12.0, backlog_seconds=4.5, slice_time_mape=0.07, predicted_slice_seconds_sum=30.0,
        actual_slice_seconds_sum=31.0, moves=1, requests_requeued=2, preemptions=3, queue_time=queue.snapshot(),
        replicas={"r0": ReplicaMetrics(expected_completion_s=1.2, busy_seconds=50.0, inflight_batches=1,
                                       running_requests=8, kv_usage=0.4)})
    text = m.render(snapshot).decode()
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    wanted = dashboard_series(json.loads((CHART / "files" / "grafana-dashboard.json").read_text()))
    assert wanted <= exported, sorted(wanted - exported)


# --- values: schema and guards -------------------------------------------------------------------------

def test_values_schema_accepts_shipped_values():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(load_yaml(CHART / "values.yaml"), schema)


@pytest.mark.parametrize("values, message", [
    ({"slicefleet": {"scheduler": {"mode": "fifo"}}}, "mode"),
    ({"replicaCount": 3}, "replicaCount"),
    ({"slicefleet": {"engine": {"kernelInject": True}}}, "backend"),
    ({"workers": {"groupName": "GPU_Workers"}}, "groupName"),
])
def test_schema_rejects_bad_values(values, message):
    from .helm_render import helm

    with pytest.raises(helm().HelmError, match="(?s)schema.*" + message):
        render(values)


@pytest.mark.parametrize("values, message", [
    # 8 one-GPU replicas cannot fit on at most 4 one-GPU pods.
    ({"workers": {"maxReplicas": 4}}, "needs more GPUs"),
    ({"gcsFaultTolerance": {"redisAddress": "slicefleet-redis.slicefleet.svc:6379"}}, "must not be the request-state Redis"),
    ({"gcsFaultTolerance": {"redisAddress": "slicefleet-redis:6379"}}, "must not be the request-state Redis"),
    # The GPU values' engine runs on cuda: a worker group without GPUs cannot host it.
    ({"slicefleet": {"replicaResources": {"numGpus": 0}}, "workers": {"resources": {"limits": {"nvidia.com/gpu": 0}}}},
     "no nvidia.com/gpu"),
])
def test_guards_fail_on_unservable_settings(values, message):
    from .helm_render import helm

    base = load_yaml(GPU_VALUES)
    merged = _merge(copy.deepcopy(base), values)
    with pytest.raises(helm().HelmError, match=message):
        render(merged)


def test_fractional_gpus_are_counted(gpu):
    from .helm_render import helm

    base = load_yaml(GPU_VALUES)
    # 8 replicas x 0.5 GPU fit on 4 one-GPU pods; 10 do not.
    fits = _merge(copy.deepcopy(base), {"slicefleet": {"replicaResources": {"numGpus": 0.5}},
                                        "workers": {"maxReplicas": 4, "replicas": 4, "minReplicas": 2}})
    args = yaml.safe_load(render(fits).one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["replicas"]["num_gpus"] == 0.5
    fits["slicefleet"]["replicas"] = 10
    with pytest.raises(helm().HelmError, match="needs more GPUs"):
        render(fits)


def test_external_redis_mode(tmp_path):
    r = render({
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": {"name": "my-redis", "urlKey": "url"},
                          "passwordSecret": {"name": "my-redis", "key": "password"}},
    })
    assert not [d for d in r.docs if "redis" in d["metadata"]["name"]]
    head = next(ray_containers(r))
    env = {e["name"]: e for e in head["env"]}
    assert env["SLICEFLEET_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}
    assert env["SLICEFLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "password"}
    args = yaml.safe_load(r.one("RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    env = {"SLICEFLEET_REDIS_URL": "rediss://cache.example.com:6380/0", "SLICEFLEET_REDIS_PASSWORD": "pw"}
    assert validate_slicefleet_args(args, env, tmp_path).redis.url == env["SLICEFLEET_REDIS_URL"]


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            _merge(a[k], v)
        else:
            a[k] = v
    return a


def test_docs_list_the_default_manifests_and_metrics():
    from .helpers import REPO

    docs = (REPO / "docs" / "deploy.md").read_text()
    rows = [line for line in docs.splitlines() if line.startswith("| ")]
    for kind, name in DEFAULT_MANIFESTS:
        assert any(line.startswith(f"| {kind} |") and f"`{name}`" in line for line in rows), (kind, name)
    metrics_doc = (REPO / "docs" / "metrics.md").read_text()
    for metric in DASHBOARD_METRICS:
        assert f"`{metric}`" in metrics_doc, metric


def test_every_serve_proxy_gets_the_head_deadline_and_nginx_passes_the_api_body_limit(rendered, gpu):
    """Each Ray pod runs a Serve proxy, and uvicorn there times out nothing while a head arrives: the chart
    installs cluster.http_limits on all of them. Behind nginx, its body limit must not undercut the app's."""
    from cluster.config import ApiSettings
    from cluster.http_limits import CALLBACK, CALLBACK_ENV

    for container in ray_containers(rendered):
        assert pod_env(rendered, container)[CALLBACK_ENV] == CALLBACK
    limit = gpu.one("Ingress")["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert limit.endswith("m") and int(limit[:-1]) * 2**20 > ApiSettings().max_request_bytes
