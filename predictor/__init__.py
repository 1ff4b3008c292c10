"""What the balancer needs to know ahead of time, fitted on real measurements.

- :mod:`predictor.memory` — KV-cache bytes per token from a model config, the replica's KV budget, and a
  ``LinearKVMemory`` estimator (largest batch that fits).
- :mod:`predictor.latency` — SCLS's bilinear slice-time model: least-squares fit, versioned profile files
  (``load_profile``), and ``OnlineLatencyEstimator`` that refits from reported slice timings.
  :mod:`predictor.profiler` / :mod:`predictor.engine_runner` run an engine over a grid
  (``slicefleet profile``).
- :mod:`predictor.length` — generation-length prediction (XGBoost on prompt length, MiniLM embedding and
  task cues; ``load_length_predictor``), with constant, length-only linear and oracle predictors
  (``slicefleet train-length``). Helpers: :mod:`predictor.features`, :mod:`predictor.embed`,
  :mod:`predictor.text_models`.
- :mod:`predictor.sharegpt` — ShareGPT loading and vLLM-rule request sampling shared by training, the
  simulator and the benchmark.

Nothing here imports Ray or the cluster; heavy libraries (torch, transformers, xgboost) load lazily.
"""
