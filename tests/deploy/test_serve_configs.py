"""Ray Serve configs for GPU fleets (configs/serve-gpu.yaml): Ray Serve's schema, then Slicefleet's config."""

from __future__ import annotations

import pytest
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from .helpers import CONFIGS, SAMPLE_ENV, load_yaml, placeholders, validate_slicefleet_args

# The Serve configs this folder owns (configs/serve.yaml is the lead's and has its own tests).
SERVE_CONFIGS = [CONFIGS / "serve-gpu.yaml"]


@pytest.fixture(params=SERVE_CONFIGS, ids=lambda p: p.name)
def serve_config(request):
    return request.param, load_yaml(request.param)


def test_loads_into_serve_deploy_schema(serve_config):
    path, raw = serve_config
    schema = ServeDeploySchema.model_validate(raw)
    # ServeDeploySchema accepts unknown keys for forward compatibility; a typo would be silently ignored.
    assert set(raw) <= set(ServeDeploySchema.model_fields), set(raw) - set(ServeDeploySchema.model_fields)
    for app in raw["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
    (app,) = schema.applications
    assert app.import_path == "cluster.app:build_app"
    assert app.route_prefix == "/"
    assert schema.http_options.port == 8000


def test_args_are_a_slicefleet_config(serve_config, tmp_path):
    _, raw = serve_config
    args = raw["applications"][0]["args"]
    assert placeholders(args) <= set(SAMPLE_ENV), placeholders(args) - set(SAMPLE_ENV)
    cfg = validate_slicefleet_args(args, SAMPLE_ENV, tmp_path)
    # GPU fleet: DeepSpeed-Inference with kernel injection, one GPU per replica, Redis from the environment.
    assert cfg.engine.backend == "deepspeed" and cfg.engine.kernel_inject and cfg.engine.device == "cuda"
    assert cfg.replicas.num_gpus == 1
    assert cfg.redis.url == SAMPLE_ENV["SLICEFLEET_REDIS_URL"]
    assert cfg.redis.password == SAMPLE_ENV["SLICEFLEET_REDIS_PASSWORD"]
    assert args["redis"]["url"] == "${SLICEFLEET_REDIS_URL}"
    assert cfg.api.host == "0.0.0.0" and cfg.api.port == raw["http_options"]["port"]
    assert cfg.model.dtype in ("float16", "bfloat16"), "DeepSpeed kernels run in half precision"


def test_no_secret_in_the_file(serve_config):
    path, raw = serve_config
    redis = raw["applications"][0]["args"]["redis"]
    assert redis["password"].startswith("${") and "@" not in redis["url"]

