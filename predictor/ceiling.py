"""How predictable is output length from the prompt alone? A ceiling for any prompt-only length predictor.

Why: issue 3 asks for ≥ 80 % binary (≤/> train median) and ≥ 90 % 5-bucket ±1 accuracy. Before building
ever stronger models we want to know whether the *data* allows it. When the same prompt was sent more than
once (by different users, in different conversations), its answers are independent draws from the very
distribution a prompt-only predictor faces: no predictor that sees only the prompt can tell them apart.

* **Repeat pairs** — two records from different conversations whose prompts are equal (after collapsing
  whitespace and case), or, more loosely, whose all-MiniLM-L6-v2 embeddings (256 word pieces, head and
  tail) have cosine ≥ ``--cosine``. Pairs whose responses are character-identical are dropped: those are the
  same chat shared twice, not two draws.
* **Nearest-neighbour agreement** — how often one answer predicts the other's side of the median / bucket.
  Each record counts once (its agreement averaged over its partners). For the binary task, with q(x) the
  probability that prompt x's answer is long, the pair error is R_nn = E[2q(1-q)] and the Bayes error R* =
  E[min(q, 1-q)] satisfies R_nn/2 ≤ R* and 2R*(1-R*) ≥ R_nn (Cover & Hart 1967), so the Bayes accuracy lies
  between 1 - R_nn and (1 + sqrt(1 - 2 R_nn)) / 2. Pair agreement on ±1 buckets is likewise a lower bound
  on the Bayes ±1 accuracy (Σ_b p_b·W_b ≤ max_b W_b, W_b the probability of b's ±1 window).
* **Gaussian extrapolation** — the pooled within-repeat spread σ of log(1 + length) is the noise no
  prompt-only predictor removes. Assuming the same σ for every prompt, the Bayes accuracies on the whole
  held-out set follow from the variance of log length that is left for the prompt to explain (σ² of the
  total): each record's conditional mean is its log length shrunk towards the mean so that the means have
  variance Var - σ², and the Bayes decision under N(mean, σ²) is scored in closed form.

The repeated prompts are not a random sample (they skew to short, generic prompts: "continue", the ChatGPT
example prompts), so the figures are an estimate, not a proof; the report states the counts.

Run: ``python -m predictor.ceiling`` (uses the cached token counts and embeddings that ``slicefleet
train-length`` leaves; otherwise computes them, a few minutes).
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from predictor.length import BUCKET_QUANTILES, bucketize


def normalise_prompt(text: str) -> str:
    """The key for exact repeats: whitespace collapsed, lower case."""
    return " ".join(text.split()).lower()


def exact_repeat_pairs(prompts: Sequence[str], conversations: Sequence[str], responses: Sequence[str]
                       ) -> list[tuple[int, int]]:
    """Index pairs (i < j) with equal normalised prompts, from different conversations, whose responses
    differ (character-identical responses are one chat shared twice, not two draws)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[normalise_prompt(p)].append(i)
    pairs = []
    for members in groups.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                i, j = members[a], members[b]
                if conversations[i] != conversations[j] and responses[i] != responses[j]:
                    pairs.append((i, j))
    return pairs


def embedding_neighbour_pairs(emb: np.ndarray, conversations: Sequence[str], responses: Sequence[str],
                              cosine: float, block: int = 1024) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose unit-norm embeddings have cosine ≥ ``cosine``, with the same conversation
    and identical-response rules as :func:`exact_repeat_pairs`. Blocked so memory stays at block × n."""
    emb = np.asarray(emb, dtype=np.float32)
    pairs = []
    for s in range(0, len(emb), block):
        sims = emb[s : s + block] @ emb.T
        rows, cols = np.nonzero(sims >= cosine)
        for r, j in zip(rows.tolist(), cols.tolist()):
            i = s + r
            if i < j and conversations[i] != conversations[j] and responses[i] != responses[j]:
                pairs.append((i, j))
    return pairs


def pair_agreement(pairs: Sequence[tuple[int, int]], lengths: Sequence[float], median: float,
                   edges: Sequence[float]) -> dict:
    """Nearest-neighbour agreement over repeat pairs, each record weighted once (its agreements averaged
    over its partners), plus the Cover–Hart bounds on the binary Bayes accuracy."""
    y = np.asarray(lengths, dtype=float)
    long_ = y > median
    bucket = bucketize(y, edges)
    per_record: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for i, j in pairs:
        agree = (float(long_[i] == long_[j]), float(bucket[i] == bucket[j]), float(abs(bucket[i] - bucket[j]) <= 1))
        per_record[i].append(agree)
        per_record[j].append(agree)
    if not per_record:
        return {"pairs": 0, "records": 0}
    means = np.array([np.mean(v, axis=0) for v in per_record.values()])
    binary, exact, pm1 = means.mean(axis=0)
    nn_error = 1.0 - binary
    return {
        "pairs": len(pairs), "records": len(per_record),
        "binary_agreement": float(binary), "bucket_agreement": float(exact), "bucket_pm1_agreement": float(pm1),
        # Bayes binary accuracy bounds (see the module docstring).
        "binary_bayes_low": float(binary),
        "binary_bayes_high": float((1.0 + math.sqrt(max(1.0 - 2.0 * nn_error, 0.0))) / 2.0),
    }


def within_repeat_sigma(pairs: Sequence[tuple[int, int]], lengths: Sequence[float]) -> float:
    """Pooled within-prompt standard deviation of log(1 + length): for a pair, E[(a - b)²] = 2σ²."""
    y = np.log1p(np.asarray(lengths, dtype=float))
    d = np.array([y[i] - y[j] for i, j in pairs])
    return float(math.sqrt(np.mean(d**2) / 2.0)) if len(d) else float("nan")


def gaussian_ceiling(lengths: Sequence[float], sigma: float, median: float, edges: Sequence[float]) -> dict:
    """Bayes binary, 5-bucket exact and ±1 accuracy if every prompt's log length were Gaussian with spread
    ``sigma`` around a conditional mean the predictor knows exactly (see the module docstring)."""
    from scipy.stats import norm

    y = np.log1p(np.asarray(lengths, dtype=float))
    var = float(np.var(y))
    explained = max(var - sigma**2, 0.0)
    means = y.mean() + math.sqrt(explained / var) * (y - y.mean())
    cuts = np.log1p(np.asarray([*edges], dtype=float))
    # P(bucket b | prompt) for b = 0..len(edges): differences of the normal CDF at the bucket edges.
    cdf = norm.cdf((cuts[None, :] - means[:, None]) / sigma)
    proba = np.diff(np.hstack([np.zeros((len(y), 1)), cdf, np.ones((len(y), 1))]), axis=1)
    p_long = 1.0 - norm.cdf((math.log1p(median) - means) / sigma)
    k = proba.shape[1]
    windows = np.stack([proba[:, max(b - 1, 0) : b + 2].sum(axis=1) for b in range(k)], axis=1)
    return {
        "sigma": sigma, "log_length_sd": math.sqrt(var), "explainable_share": explained / var,
        "binary_acc": float(np.mean(np.maximum(p_long, 1.0 - p_long))),
        "bucket_acc": float(np.mean(proba.max(axis=1))),
        "bucket_pm1_acc": float(np.mean(windows.max(axis=1))),
    }


def measure(requests, test_fraction: float = 0.2, seed: int = 0, cosine: float = 0.98, emb: np.ndarray | None = None,
            responses: Sequence[str] | None = None) -> dict:
    """All ceiling figures for ``requests`` (objects with id, prompt, output_len). Median and bucket edges
    come from the training side of the length predictor's split, the Gaussian ceiling is scored on the
    held-out side, and repeat pairs are searched in all requests (more pairs; no model is fitted here)."""
    from predictor.sharegpt import conversation_id, split_by_conversation

    reqs = list(requests)
    train, test = split_by_conversation(reqs, test_fraction, seed)
    y_train = np.asarray([r.output_len for r in train], dtype=float)
    median = float(np.median(y_train))
    edges = [float(np.percentile(y_train, q)) for q in BUCKET_QUANTILES]
    prompts = [r.prompt for r in reqs]
    convs = [conversation_id(r.id) for r in reqs]
    # Without the response texts, equal output lengths stand in for "the same chat shared twice".
    resp = list(responses) if responses is not None else [str(r.output_len) for r in reqs]
    lengths = [r.output_len for r in reqs]
    out = {"n": len(reqs), "n_test": len(test), "median": median, "bucket_edges": edges, "cosine": cosine}
    exact = exact_repeat_pairs(prompts, convs, resp)
    out["exact"] = pair_agreement(exact, lengths, median, edges)
    out["exact"]["sigma"] = within_repeat_sigma(exact, lengths)
    starts = [r.id.endswith("_0") for r in reqs]
    out["exact_starts"] = pair_agreement([(i, j) for i, j in exact if starts[i] and starts[j]], lengths, median, edges)
    if emb is not None:
        near = embedding_neighbour_pairs(emb, convs, resp, cosine)
        out["embedding"] = pair_agreement(near, lengths, median, edges)
        out["embedding"]["sigma"] = within_repeat_sigma(near, lengths)
    sigma = out["exact"]["sigma"]
    out["gaussian"] = gaussian_ceiling([r.output_len for r in test], sigma, median, edges)
    return out


def format_ceiling(res: dict) -> str:
    """The ceiling figures as a Markdown section."""
    def pct(v):
        return f"{100 * v:.1f} %"

    lines = ["| repeat pairs | pairs | records | binary agreement | Bayes binary (bounds) | bucket exact agr. "
             "| bucket ±1 agr. | σ log length |", "|---" * 8 + "|"]
    labels = (("exact", "exact prompt repeats"), ("exact_starts", "exact repeats, conversation starts only"),
              ("embedding", f"embedding neighbours (cosine ≥ {res['cosine']})"))
    for key, label in labels:
        r = res.get(key)
        if not r or not r.get("pairs"):
            continue
        sigma = f"{r['sigma']:.2f}" if "sigma" in r else "–"
        lines.append(f"| {label} | {r['pairs']} | {r['records']} | {pct(r['binary_agreement'])} | "
                     f"{pct(r['binary_bayes_low'])}–{pct(r['binary_bayes_high'])} | {pct(r['bucket_agreement'])} | "
                     f"{pct(r['bucket_pm1_agreement'])} | {sigma} |")
    g = res["gaussian"]
    lines += ["", f"Gaussian extrapolation to the {res['n_test']} held-out requests (σ = {g['sigma']:.2f} from the "
              f"exact repeats; SD of log length {g['log_length_sd']:.2f}, so at most "
              f"{pct(g['explainable_share'])} of its variance is explainable by the prompt): Bayes binary "
              f"{pct(g['binary_acc'])}, 5-bucket exact {pct(g['bucket_acc'])}, ±1 {pct(g['bucket_pm1_acc'])}."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="sampling and split seed (as train-length)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of conversations")
    parser.add_argument("--cosine", type=float, default=0.98, help="embedding-neighbour threshold")
    parser.add_argument("--no-embedding", action="store_true", help="exact repeats only (no encoder)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from predictor.sharegpt import load_conversations, sample_requests
    from worker.make_model import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    reqs = sample_requests(tokenizer, None, seed=args.seed)
    response_by_id = {c.id: c.response for c in load_conversations()}
    emb = None
    if not args.no_embedding:
        from predictor.embed import EmbeddingCache, SentenceEmbedder

        # 256 word pieces: as close to the whole prompt as the encoder goes (bf16 where native, as cached).
        emb = EmbeddingCache(SentenceEmbedder(max_len=256, head_tail=True)).encode([r.prompt for r in reqs])
    res = measure(reqs, args.test_fraction, args.seed, args.cosine, emb, [response_by_id[r.id] for r in reqs])
    print(format_ceiling(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
