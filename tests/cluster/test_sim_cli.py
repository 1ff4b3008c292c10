"""``slicefleet simulate --requests N`` replays exactly N requests, also beyond what passes ShareGPT's filter
(oversampled as vLLM's benchmark does), or refuses clearly with ``--no-oversample``."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from cluster.sim import cli as sim_cli
from cluster.sim.workload import oversample


@dataclass(frozen=True)
class Item:
    id: str
    length: int


def test_oversample_keeps_every_original_then_draws_copies_with_new_ids():
    items = [Item(f"c{i}", 10 + i) for i in range(5)]
    out = oversample(items, 23, seed=4)
    assert len(out) == 23 and out[:5] == items
    assert len({x.id for x in out}) == 23
    by_id = {x.id: x for x in items}
    for copy in out[5:]:
        base, _, k = copy.id.partition("#")
        assert k.isdigit() and copy.length == by_id[base].length
    assert len({x.id.partition("#")[0] for x in out[5:]}) > 1  # drawn, not one record repeated
    assert oversample(items, 23, seed=4) == out and oversample(items, 23, seed=5) != out
    assert oversample(items, 3) == items[:3] and oversample([], 4) == []


@pytest.fixture()
def few_conversations(monkeypatch):
    """ShareGPT cut to its first 40 usable records, so that a small --requests is above what passes."""
    from predictor import sharegpt

    first = sharegpt.load_conversations(limit=40)
    monkeypatch.setattr(sharegpt, "load_conversations", lambda limit=None, path=None: list(first))
    return first


def _args(argv):
    p = argparse.ArgumentParser()
    sim_cli.add_arguments(p)
    return p.parse_args(argv)


def test_simulate_gives_exactly_the_requests_asked_for(few_conversations, tmp_path):
    from transformers import AutoTokenizer

    from predictor.sharegpt import sample_requests
    from worker.make_model import ensure_default_model

    passing = len(sample_requests(AutoTokenizer.from_pretrained(ensure_default_model()), None))
    assert 0 < passing <= 40
    wanted = passing + 25
    out = tmp_path / "sim.json"
    assert sim_cli.run(_args(["--requests", str(wanted), "--replicas", "2", "--mode", "scls,ils",
                              "--json", str(out)])) == 0
    reports = json.loads(out.read_text())["reports"]
    assert [r["requests"] for r in reports] == [wanted, wanted]
    assert all(r["extra"]["oversampled"] == 25 for r in reports)


def test_simulate_no_oversample_refuses_with_the_count(few_conversations):
    with pytest.raises(SystemExit) as exc:
        sim_cli.run(_args(["--requests", "1000", "--no-oversample"]))
    assert "pass the filter" in str(exc.value) and "1000 were asked for" in str(exc.value)
    with pytest.raises(SystemExit):
        sim_cli.run(_args(["--requests", "0"]))


def test_simulate_with_a_killed_replica_and_cancellations(tmp_path):
    out = tmp_path / "sim.json"
    assert sim_cli.run(_args(["--requests", "120", "--replicas", "3", "--rate", "10", "--kill", "sim-1@3",
                              "--cancel-fraction", "0.1", "--json", str(out)])) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert report["extra"]["replicas_lost"] == 1 and 0 < report["extra"]["cancelled"] <= 12
    assert report["requests"] + report["extra"]["cancelled"] == 120


@pytest.mark.parametrize("argv, message", [(["--kill", "sim-5@3"], "no replica 'sim-5'"),
                                           (["--kill", "sim-1"], "expected REPLICA@SECONDS"),
                                           (["--cancel-fraction", "1.5"], "must be in [0, 1]")])
def test_simulate_refuses_a_bad_fault_with_the_reason(argv, message):
    with pytest.raises(SystemExit) as exc:
        sim_cli.run(_args(["--requests", "20", "--replicas", "2", *argv]))
    assert message in str(exc.value)
