"""Worker engines: run a batch for one slice on a real model, behind one protocol (no Ray, no cluster).

- ``worker.protocol``: ``SamplingParams``, ``SliceItem``, ``ItemOutput``, ``EngineSliceResult``, ``Engine``.
- ``worker.factory.build_engine(backend, model_path, device, dtype, kv_reuse)``: 'hf', 'deepspeed', 'continuous'.
- ``worker.hf_engine.HFEngine`` / ``worker.deepspeed_engine.DeepSpeedEngine``: ``run_slice(items, max_steps)``.
- ``worker.continuous.ContinuousBatchingEngine``: ``add(item)``, ``step()``, ``has_work()`` (ILS baseline).
- ``worker.make_model``: ``slicefleet make-model``, ``default_model_dir()``, ``ensure_default_model()``.

Modules import torch lazily from here: importing ``worker`` itself stays cheap.
"""
