"""Linear text models whose predictions feed the length booster as stacked features.

Why: gradient-boosted trees split on one column at a time, so they use a 384-dimensional embedding (or tens
of thousands of word n-grams) poorly; a ridge regression on the same inputs sums evidence across all of
them. On ShareGPT, a TF-IDF ridge alone predicts log output length about as well as XGBoost on the raw
embedding, and feeding both ridge predictions to the booster beats either (see the report of
``slicefleet train-length``). During training the booster sees *out-of-fold* ridge predictions (grouped by
conversation), so it never learns from a ridge that saw the row's own answer.

Both models are stored as plain arrays (no pickle): the TF-IDF one as its vocabulary, IDF weights and
coefficients, re-applied with a fixed-vocabulary ``CountVectorizer`` at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

TFIDF_HEAD_CHARS = 3000
TFIDF_TAIL_CHARS = 1000


def tfidf_text(prompt: str) -> str:
    """What the TF-IDF model reads: the prompt's start and end (the instruction is usually in one of them)."""
    if len(prompt) <= TFIDF_HEAD_CHARS + TFIDF_TAIL_CHARS:
        return prompt
    return prompt[:TFIDF_HEAD_CHARS] + " " + prompt[-TFIDF_TAIL_CHARS:]


@dataclass
class EmbeddingRidge:
    """log1p(length) ≈ embedding · coef + intercept."""

    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, emb: np.ndarray, target: np.ndarray, alpha: float = 3.0) -> "EmbeddingRidge":
        from sklearn.linear_model import Ridge

        m = Ridge(alpha=alpha).fit(emb, target)
        return cls(np.asarray(m.coef_, dtype=np.float64), float(m.intercept_))

    def predict(self, emb: np.ndarray) -> np.ndarray:
        return np.asarray(emb, dtype=np.float64) @ self.coef + self.intercept

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}coef": self.coef, f"{prefix}intercept": np.array([self.intercept])}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str) -> "EmbeddingRidge":
        return cls(np.asarray(arrays[f"{prefix}coef"], dtype=np.float64), float(arrays[f"{prefix}intercept"][0]))


@dataclass
class TfidfRidge:
    """log1p(length) ≈ TF-IDF(word 1–2-grams, sublinear tf, l2-normalised) · coef + intercept."""

    vocabulary: list[str]
    idf: np.ndarray
    coef: np.ndarray
    intercept: float
    ngram_max: int = 2

    @classmethod
    def fit(cls, prompts: Sequence[str], target: np.ndarray, alpha: float = 3.0, max_features: int = 30000,
            min_df: int = 3, ngram_max: int = 2) -> "TfidfRidge":
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import Ridge

        vec = TfidfVectorizer(min_df=min_df, max_features=max_features, ngram_range=(1, ngram_max),
                              sublinear_tf=True, dtype=np.float32)
        x = vec.fit_transform([tfidf_text(p) for p in prompts])
        m = Ridge(alpha=alpha).fit(x, target)
        vocab = [""] * len(vec.vocabulary_)
        for term, i in vec.vocabulary_.items():
            vocab[i] = term
        return cls(vocab, np.asarray(vec.idf_, dtype=np.float32), np.asarray(m.coef_, dtype=np.float32),
                   float(m.intercept_), ngram_max)

    def _vectorizer(self):
        if getattr(self, "_vec", None) is None:
            from sklearn.feature_extraction.text import CountVectorizer

            self._vec = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                                        ngram_range=(1, self.ngram_max), dtype=np.float32)
        return self._vec

    def transform(self, prompts: Sequence[str]):
        """The same matrix sklearn's fitted ``TfidfVectorizer`` would give."""
        from sklearn.preprocessing import normalize

        x = self._vectorizer().transform([tfidf_text(p) for p in prompts]).tocsr()
        x.data = 1.0 + np.log(x.data)
        x = x.multiply(self.idf[None, :]).tocsr()
        return normalize(x, norm="l2", copy=False)

    def predict(self, prompts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.transform(prompts) @ self.coef, dtype=np.float64).reshape(-1) + self.intercept

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}idf": self.idf, f"{prefix}coef": self.coef,
                f"{prefix}intercept": np.array([self.intercept]), f"{prefix}ngram_max": np.array([self.ngram_max])}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str, vocabulary: list[str]) -> "TfidfRidge":
        return cls(list(vocabulary), np.asarray(arrays[f"{prefix}idf"], dtype=np.float32),
                   np.asarray(arrays[f"{prefix}coef"], dtype=np.float32), float(arrays[f"{prefix}intercept"][0]),
                   int(arrays[f"{prefix}ngram_max"][0]))


def out_of_fold(fit_predict, n: int, groups: Sequence[str], folds: int = 5, seed: int = 0) -> np.ndarray:
    """Predictions for rows 0..n-1, each from a model fitted on the other folds (folds grouped by
    conversation). ``fit_predict(train_idx, pred_idx) -> predictions for pred_idx``."""
    from sklearn.model_selection import GroupKFold

    out = np.zeros(n, dtype=np.float64)
    for tr, te in GroupKFold(n_splits=folds).split(np.zeros(n), groups=groups):
        out[te] = fit_predict(tr, te)
    return out
