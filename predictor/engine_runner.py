"""Profile the worker's real slice engine (``worker.factory.build_engine`` → ``run_slice``).

Why: the profile must time what actually serves — the engine's padding, masks, cache handling and
sampling — not a bare model forward. The engine's accounting (see ``worker.protocol``): a slice of S tokens
is one prefill forward (which yields the first token) plus S-1 decode steps, so to measure ``steps`` decode
steps we ask for ``steps + 1`` tokens. Rows run in trace mode (``target_len``) so no row stops early at EOS,
and with KV reuse off so every run really prefills.
"""

from __future__ import annotations

import itertools

from predictor.profiler import EngineRunner


def worker_engine_runner(model_path: str, engine: str = "hf", device: str = "cpu", dtype: str = "float32",
                         num_threads: int | None = None, seed: int = 0) -> EngineRunner:
    """An :class:`~predictor.profiler.EngineRunner` over ``build_engine(engine, model_path, ...)``.

    Raises ``ImportError`` when the worker package has no engine factory (the caller then falls back to
    plain model forwards).
    """
    import torch

    from worker.factory import build_engine
    from worker.protocol import SliceItem

    eng = build_engine(engine, model_path, device=device, dtype=dtype, kv_reuse=False, num_threads=num_threads)
    model = getattr(eng, "model", None)
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000) or 1000)
    gen = torch.Generator().manual_seed(seed)
    counter = itertools.count()

    def make_batch(n: int, length: int, steps: int):
        ids = torch.randint(16, vocab, (n, length), generator=gen).tolist()
        run = next(counter)
        return [SliceItem(request_id=f"profile-{run}-{i}", token_ids=row, prompt_len=length,
                          max_new_tokens=steps + 1, target_len=steps + 1) for i, row in enumerate(ids)]

    class _Runner(EngineRunner):
        def run(self, n: int, length: int, steps: int):
            items = make_batch(n, length, steps)
            result = self.engine.run_slice(items, max_steps=steps + 1)
            self.engine.drop([it.request_id for it in items])
            return float(result.prefill_time), [float(t) for t in result.decode_step_times]

    return _Runner(eng, make_batch)
