"""The upgrade harness: its accounting on made-up outcomes, and (slow) a short live NewCluster upgrade: two
``slicefleet serve`` clusters on one real Redis, the old one fenced and then deleted under load."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from bench import upgrade
from bench.faults import Outcome


def done(index, text="abc", tokens=3, sent=0.0, end=2.0):
    return Outcome(index, status=200, accepted=True, completed=True, text=text, finish_reason="length",
                   usage={"prompt_tokens": 4, "completion_tokens": tokens}, sent=sent, done=end,
                   chunk_times=[sent + 0.5, end])


def test_verify_counts_what_redis_holds_against_the_reference():
    reference = {i: ("length", [1, 2, 3]) for i in range(6)}
    outcomes = [done(i) for i in range(5)] + [Outcome(5, status=429)]  # 5 was refused: not accepted
    found = {
        0: ("done", "length", [1, 2, 3], ["b-1"]),
        1: ("done", "length", [1, 2, 3, 3], ["a-1", "b-1"]),  # a slice applied twice
        2: ("done", "length", [1, 2, 4], ["b-1"]),  # other tokens
        3: ("done", "cancelled", [1], ["a-1"]),  # finished, but not as the reference did: lost
        # 4: never found (its record gone): lost
    }
    s = upgrade.verify(outcomes, found, reference)
    assert (s["accepted"], s["completed"], s["lost"], s["duplicated"], s["corrupted"]) == (5, 1, 2, 1, 1)
    assert (s["lost_indices"], s["duplicated_indices"], s["corrupted_indices"]) == ([3, 4], [1], [2])
    found[4] = ("live", None, [1], ["a-1"])  # still running when the harness gave up waiting
    assert upgrade.verify(outcomes, found, reference)["lost_indices"] == [3, 4]
    # Without a reference the greedy check is the oracle, and a request not ended by EOS holds its whole budget.
    s = upgrade.verify(outcomes, found, None, greedy=lambda i, tokens: tokens[:3] == [1, 2, 3] or tokens == [1, 2, 4],
                       budgets={i: 3 for i in range(6)})
    assert (s["completed"], s["duplicated_indices"], s["corrupted_indices"]) == (2, [1], [])
    s = upgrade.verify(outcomes, found, None, greedy=lambda i, tokens: i != 2, budgets={i: 3 for i in range(6)})
    assert s["corrupted_indices"] == [2]
    # An output the model would produce greedily (float noise flipped a near-tie) is completed, not corrupted.
    s = upgrade.verify(outcomes, found, reference, greedy=lambda i, tokens: tokens == [1, 2, 4])
    assert (s["completed"], s["identical"], s["near_tie_indices"], s["corrupted"]) == (2, 1, [2], 0)


def test_greedy_check_accepts_the_models_own_choices_and_rejects_a_repeated_slice():
    import torch
    from transformers import AutoModelForCausalLM

    from worker.make_model import ensure_default_model

    model_dir = ensure_default_model()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = [1, 57, 300, 12, 999]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    greedy = upgrade.greedy_check(model_dir, {0: prompt})
    assert greedy(0, out)
    assert not greedy(0, out[:8] + out[4:8] + out[8:20])  # four tokens applied twice


def test_clients_cut_off_with_the_old_ingress_are_told_apart_from_lost_ones():
    reference = [done(i) for i in range(4)]
    cut = Outcome(1, status=200, accepted=True, error="RemoteProtocolError", sent=1.0, done=10.5)
    early = Outcome(2, status=200, accepted=True, error="ReadError", sent=1.0, done=4.0)  # failed before the kill
    outcomes = [done(0), cut, early, done(3, text="abd", sent=8.0, end=12.0)]
    unanswered = Outcome(4, status=None, error="RemoteProtocolError", sent=9.9, done=10.2)  # A went before its 200
    refused = Outcome(5, status=503, error="unavailable", sent=11.0, done=11.1)
    outcomes += [unanswered, refused]
    reference += [done(4), done(5)]
    via = ["A", "A", "A", "B", "A", "B"]
    view = upgrade.client_view(outcomes, via, reference, kill=10.0)
    assert (view["via_a"], view["via_b"], view["cut"], view["cut_indices"]) == (4, 2, 1, [1])
    assert (view["unanswered"], view["refused"]) == ([4], [5])
    assert (view["lost"], view["lost_indices"], view["differing"]) == (1, [2], 1)
    # A near-tie's text differs from the reference by design: not counted against the client.
    assert upgrade.client_view(outcomes, via, reference, kill=10.0, near_tie=frozenset({3}))["differing"] == 0
    # Without a deletion nobody was cut off: both unfinished clients are lost.
    assert upgrade.client_view(outcomes, via, reference, kill=None)["lost"] == 2


def passing():
    redis = {"lost": 0, "duplicated": 0, "corrupted": 0, "lost_indices": [], "duplicated_indices": [],
             "corrupted_indices": []}
    clients = {"lost": 0, "differing": 0, "lost_indices": [], "refused": []}
    up = vars(upgrade.Upgrade(fence=5.0, a_unready=5.2, kill=20.0, in_flight_at_fence=[1, 2], live_at_fence=3,
                              held_logged=3, live_at_kill=["r1"], on_a_workers=[4]))
    return redis, clients, up, {"not_by_b": []}, {"completed": 4, "requests": 4}


def test_verdict_passes_only_a_handover_that_hit_requests_in_flight_and_lost_nothing():
    redis, clients, up, by_b, ref = passing()
    assert upgrade.verdict(redis, clients, up, by_b, ref) == []
    assert upgrade.verdict(redis | {"lost": 1, "lost_indices": [3]}, clients, up, by_b, ref)
    assert upgrade.verdict(redis | {"duplicated": 1, "duplicated_indices": [3]}, clients, up, by_b, ref)
    assert upgrade.verdict(redis, clients | {"differing": 1}, up, by_b, ref)
    assert upgrade.verdict(redis, clients | {"refused": [6]}, up, by_b, ref)
    assert upgrade.verdict(redis, clients, up | {"fence": None}, by_b, ref)  # nothing was fenced
    assert upgrade.verdict(redis, clients, up | {"held_logged": 0}, by_b, ref)  # A held nothing then
    assert upgrade.verdict(redis, clients, up | {"in_flight_at_fence": []}, by_b, ref)
    assert upgrade.verdict(redis, clients, up | {"a_unready": None}, by_b, ref)  # A's health never said so
    assert upgrade.verdict(redis, clients, up | {"on_a_workers": []}, by_b, ref)  # the deletion hit nothing
    assert upgrade.verdict(redis, clients, up, {"not_by_b": [7]}, ref)
    assert upgrade.verdict(redis, clients, up, by_b, {"completed": 3, "requests": 4})


def test_the_fenced_dispatchers_log_line_is_read(tmp_path):
    log = tmp_path / "replica_slicefleet_Dispatcher_x.log"
    log.write_text("INFO started\nWARNING dispatcher epoch 1 superseded by epoch 2 (another dispatcher started on "
                   "this Redis): handed its 7 requests over and stopped dispatching\n")
    line, held = upgrade.fence_line([tmp_path / "missing.log", log])
    assert held == 7 and "superseded by epoch 2" in line
    assert upgrade.fence_line([]) == ("", None)


def test_registered_with_help():
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "upgrade", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--deletion-delay" in out.stdout and "--reference-rate" in out.stdout
    parser = argparse.ArgumentParser()
    upgrade.add_arguments(parser)
    assert parser.parse_args(["--reference-rate", "inf"]).reference_rate == float("inf")
    with pytest.raises(SystemExit):
        parser.parse_args(["--reference-rate", "0"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_newcluster_upgrade_hands_every_request_to_the_new_cluster(tmp_path):
    """Cluster B starts on A's Redis while A streams long requests; A is deleted (SIGKILL) once B serves."""
    parser = argparse.ArgumentParser()
    upgrade.add_arguments(parser)
    # B's dispatcher starts 25-45 s after B does on 2 loaded cores: long generations sent over 50 s keep
    # requests in flight until the fence, and past it until A's deletion. No reference run (it would take as
    # long as the load): the greedy check is the oracle.
    args = parser.parse_args(["--requests", "40", "--rate", "0.8", "--no-reference", "--min-tokens", "400",
                              "--max-tokens", "1200", "--prompts", "fixed", "--replicas", "1", "--upgrade-at", "0",
                              "--min-in-flight", "1", "--out", str(tmp_path), "--no-progress"])
    result = upgrade.run_upgrade(args)
    up, redis, clients = result["upgrade"], result["redis"], result["clients"]

    # Every accepted request finished once in Redis, each token the model's greedy choice, the whole budget.
    # A request sent to A just as it went may get no answer at all; every other one was accepted.
    assert redis["accepted"] == 40 - len(clients["unanswered"]) and not clients["refused"], clients
    assert redis["completed"] == redis["accepted"], result["problems"]
    assert redis["lost"] == 0 and redis["duplicated"] == 0 and redis["corrupted"] == 0
    assert clients["lost"] == 0 and clients["differing"] == 0, clients
    # A was fenced while it held requests that clients were streaming, and its health said so.
    assert up["epochs"][1] > up["epochs"][0]
    assert up["in_flight_at_fence"] and up["live_at_fence"] >= 1
    assert up["held_logged"] >= 1 and "superseded" in up["fence_log"]  # it said so in its own log
    assert up["a_unready"] is not None and up["a_health"]["dispatcher_ready"] is False
    # The deletion caught requests running on A's workers, and B's workers finished every request live then.
    assert up["on_a_workers"] and up["live_at_kill"]
    assert result["finished_by_b"]["by_b"] == len(up["live_at_kill"]) >= 1
    assert not result["problems"], result["problems"]
    assert (tmp_path / "upgrade.png").stat().st_size > 0
