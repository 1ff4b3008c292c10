"""The lease loop's bookkeeping, against a recording store and a scripted engine (a unit test of one class)."""

from __future__ import annotations

from types import SimpleNamespace

from balancer.types import FinishReason
from cluster.lease_loop import LeaseLoop
from cluster.messages import BatchOrder, Progress
from worker.protocol import ItemOutput, SliceItem


class Store:
    def __init__(self):
        self.posted: list = []

    def post_results(self, messages):
        self.posted += messages

    def post_result(self, message):
        self.posted.append(message)


class Engine:
    """Produces one token per step for its one request; the test sets its waste counters."""

    def __init__(self):
        self.tokens: dict[str, list[int]] = {}
        self.stats = SimpleNamespace(pad_tokens=0, invalid_tokens=0)

    def add(self, item):
        self.tokens[item.request_id] = []

    def step(self):
        for toks in self.tokens.values():
            toks.append(7)
        return []

    def produced(self):
        return self.tokens

    def abort(self, rid):
        return self.tokens.pop(rid, None) is not None


def test_waste_between_reports_is_reported_once_even_across_progress_only_flushes():
    store, engine = Store(), Engine()
    loop = LeaseLoop(store, engine, "w", lambda ids: ([SliceItem(i, [1, 2], 2, 100) for i in ids], []),
                     stream_every=1)
    loop.handle_all([BatchOrder("b1", 0, 3, ["r"])])
    engine.stats.pad_tokens, engine.stats.invalid_tokens = 5, 2
    loop.step()
    loop.flush()  # progress only: the waste waits for the next report
    assert isinstance(store.posted[-1], Progress) and loop.rows["r"].published == 1
    loop.step()
    loop.step()
    loop.flush()  # the lease of 3 tokens is used up: a slice report
    report = store.posted[-1]
    assert report.batch_id == "b1" and report.outputs[0].finish == FinishReason.SLICE_END.value
    assert report.outputs[0].at == 1 and report.outputs[0].total == 3
    assert (report.pad_tokens, report.invalid_tokens) == (5, 2)
    engine.stats.pad_tokens = 6
    loop.handle_all([BatchOrder("b2", 0, 3, ["r"], continues=True)])
    loop.rows["r"].final = ItemOutput("r", list(engine.tokens["r"]) + [7], FinishReason.EOS)
    loop.flush()
    final = store.posted[-1]
    assert final.batch_id == "b2" and final.outputs[0].finish == "eos"
    assert (final.pad_tokens, final.invalid_tokens) == (1, 0) and "r" not in loop.rows
