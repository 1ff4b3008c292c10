"""Cluster configuration: how a replica's KV budget is shared between running batches and kept caches."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cluster.config import EngineSettings


def test_kv_budget_split_between_batches_and_kept_caches():
    eng = EngineSettings(kv_keep_fraction=0.25)
    batch, keep = eng.split_kv_budget(8e9)
    assert (batch, keep) == (6e9, 2e9)
    # without KV reuse nothing is kept, so batches get the whole budget
    assert EngineSettings(kv_reuse=False).split_kv_budget(8e9) == (8e9, 0.0)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_kv_keep_fraction_must_leave_room_for_both(fraction):
    with pytest.raises(ValidationError, match="kv_keep_fraction"):
        EngineSettings(kv_keep_fraction=fraction)


@pytest.mark.parametrize("keys", [[""], ["good-key", "  "]])
def test_an_empty_api_key_is_refused(keys, monkeypatch, tmp_path):
    """An empty key would admit "Authorization: Bearer " with nothing after it; an unset ${VAR} expands to one."""
    from cluster.config import SlicefleetConfig, load_config

    with pytest.raises(ValidationError, match="empty key"):
        SlicefleetConfig.model_validate({"api": {"api_keys": keys}})
    monkeypatch.delenv("SLICEFLEET_TEST_UNSET_KEY", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("api: {api_keys: ['${SLICEFLEET_TEST_UNSET_KEY}']}\n")
    with pytest.raises(ValidationError, match="empty key"):
        load_config(path)
    assert SlicefleetConfig.model_validate({"api": {"api_keys": []}}).api.api_keys == []


@pytest.mark.parametrize("scheduler, replicas, expected", [
    ({}, 2, 128),                                               # continuous_slices: 2 x max_running 64
    ({"max_running": 16}, 3, 48),
    ({"mode": "ils", "ils_max_concurrency": 16}, 2, 32),
    ({"mode": "scls", "max_batch_size": 32, "queue_depth": 2}, 2, 128),  # queue_depth batches each
    ({"mode": "sls", "sls_batch_size": 8, "queue_depth": 3}, 1, 24),
])
def test_max_inflight_defaults_to_what_the_replicas_hold(scheduler, replicas, expected):
    from cluster.config import SlicefleetConfig

    cfg = SlicefleetConfig.model_validate({"scheduler": scheduler, "replicas": {"num_replicas": replicas}})
    assert cfg.api.max_inflight is None and cfg.inflight_limit == expected
    assert f"at most {expected} requests in flight" in cfg.admission_summary()
    assert "derived" in cfg.admission_summary()


def test_an_explicit_max_inflight_wins():
    from cluster.config import SlicefleetConfig

    cfg = SlicefleetConfig.model_validate({"api": {"max_inflight": 512}})
    assert cfg.inflight_limit == 512 and "512 requests in flight per ingress replica (api.max_inflight, set)" in \
        cfg.admission_summary()
    with pytest.raises(ValidationError):
        SlicefleetConfig.model_validate({"api": {"max_inflight": 0}})


def test_scheduler_settings_are_the_scheduler_dataclass_declared_once():
    """``scheduler:`` has every field of balancer.config.SchedulerConfig but the engine-owned kv_reuse, with its
    default and its docstring; a range the dataclass refuses is a validation error named as in the YAML."""
    import dataclasses

    from pydantic import ValidationError

    from balancer.config import SchedulerConfig
    from cluster.config import SchedulerSettings, SlicefleetConfig

    declared = {f.name: f.default for f in dataclasses.fields(SchedulerConfig) if f.name != "kv_reuse"}
    assert set(SchedulerSettings.model_fields) == set(declared)
    settings = SchedulerSettings()
    for name, default in declared.items():
        assert getattr(settings, name) == default, name
        assert SchedulerSettings.model_fields[name].description, f"{name} has no description"
    assert "S: decode steps" in SchedulerSettings.model_fields["slice_len"].description
    assert settings.to_balancer(kv_reuse=False) == SchedulerConfig(kv_reuse=False)
    with pytest.raises(ValidationError, match=r"scheduler\.slice_len must be >= 1"):
        SlicefleetConfig.model_validate({"scheduler": {"slice_len": 0}})
    with pytest.raises(ValidationError, match="'fcfs', 'sjf' or 'hrrn'"):
        SlicefleetConfig.model_validate({"scheduler": {"ordering": "lifo"}})
