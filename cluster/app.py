"""The Ray Serve application: Ingress -> (Dispatcher, N x SliceWorker), talking through Redis.

``build_app(args)`` is the import path for ``serve run`` / ``serve deploy`` configs
(``import_path: cluster.app:build_app``; ``args`` is a SlicefleetConfig mapping).
"""

from __future__ import annotations

import logging
import os

from ray import serve

from cluster.config import SlicefleetConfig, expand_env
from cluster.dispatcher import Dispatcher
from cluster.worker_replica import SliceWorker

log = logging.getLogger("slicefleet.app")

# Environment every engine process wants; set through runtime_env so it is there when the process starts
# (the allocator setting must be, and CUDA/DeepSpeed read theirs at import).
ENGINE_ENV = {
    "GLIBC_TUNABLES": "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

_embedded_redis = None


def _with_redis(cfg: SlicefleetConfig) -> SlicefleetConfig:
    """No Redis URL configured: start the embedded one (lives as long as this process)."""
    global _embedded_redis
    if cfg.redis.url:
        return cfg
    from cluster.redis_server import EmbeddedRedis

    if _embedded_redis is None:
        _embedded_redis = EmbeddedRedis.private().start().supervise()
        log.warning("no redis.url configured: started an embedded Redis at %s for this process's lifetime; "
                    "set redis.url for 'serve deploy' or a multi-node cluster", _embedded_redis.safe_url)
    return cfg.with_redis_url(_embedded_redis.url)


def engine_env(cfg: SlicefleetConfig) -> dict[str, str]:
    env = dict(ENGINE_ENV)
    if not cfg.engine.device.startswith("cuda"):
        env["DS_ACCELERATOR"] = "cpu"
    for name in ("SLICEFLEET_MODEL_DIR", "SLICEFLEET_CACHE", "SLICEFLEET_TORCH_THREADS"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def build_app_from_config(cfg: SlicefleetConfig):
    from cluster.ingress import Ingress

    cfg = _with_redis(cfg)
    log.info("%s", cfg.admission_summary())
    conf = cfg.model_dump()
    env = {"env_vars": engine_env(cfg)}
    workers = serve.deployment(SliceWorker, name="SliceWorker").options(
        num_replicas=cfg.replicas.num_replicas,
        ray_actor_options={"num_cpus": cfg.replicas.num_cpus, "num_gpus": cfg.replicas.num_gpus,
                           "runtime_env": env},
        health_check_period_s=2,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=2,
    ).bind(conf)
    dispatcher = serve.deployment(Dispatcher, name="Dispatcher").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0.1, "runtime_env": env},
        health_check_period_s=2, graceful_shutdown_timeout_s=2,
    ).bind(conf)
    return Ingress.options(ray_actor_options={"num_cpus": 0.1, "runtime_env": env}).bind(conf, dispatcher, workers)


def build_app(args: dict | None = None):
    """Serve's application builder: ``args`` is a SlicefleetConfig mapping (environment variables expanded)."""
    return build_app_from_config(SlicefleetConfig.model_validate(expand_env(dict(args or {}))))
