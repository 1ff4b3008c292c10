"""Experiment: fine-tune the all-MiniLM-L6-v2 encoder itself as a regressor of log output length.

Why: the packaged predictor feeds a *frozen* sentence embedding to XGBoost. A frozen encoder was trained to
place paraphrases together, not to separate "write an essay" from "write a title"; fine-tuning it on the
target may recover signal the frozen vector loses. This script answers whether it does, on the same
held-out ShareGPT conversations (same split rule and seed as ``slicefleet train-length``) and with the same
metrics, on CPU with one torch thread. It does not touch the packaged artefact or the serving path (a
fine-tuned encoder is ~90 MB, too big to commit); ``--save`` keeps the weights somewhere else if wanted.

Model: the encoder's mean-pooled last hidden state (the pooling the frozen embedder uses) and
log(1 + prompt length in the serving model's tokens) — the encoder reads at most ``--max-len`` word pieces,
so it cannot count a long prompt itself — into one linear unit predicting standardised log(1 + output
length). Loss: mean squared error on that; training runs for ``--epochs`` or ``--max-minutes``, whichever
ends first, in bfloat16 autocast where the CPU has native bf16.

Run: ``python -m predictor.finetune_length --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np


def length_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator, window: int = 50
                   ) -> list[np.ndarray]:
    """Shuffled mini-batches of indices whose items have similar lengths (little padding on CPU).

    Indices are shuffled, cut into windows of ``window`` batches, sorted by length inside each window, cut
    into batches, and the batches shuffled again: every item appears exactly once per epoch.
    """
    order = rng.permutation(len(lengths))
    lengths = np.asarray(lengths)
    batches = []
    span = batch_size * window
    for s in range(0, len(order), span):
        chunk = order[s : s + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


class LengthRegressor:
    """The encoder plus a linear head over [mean-pooled hidden state, log1p(prompt length)]."""

    def __init__(self, encoder, tokenizer, ids_fn, y_mean: float, y_std: float):
        import torch

        self.encoder = encoder
        self.tokenizer = tokenizer
        self.ids_fn = ids_fn
        self.head = torch.nn.Linear(encoder.config.hidden_size + 1, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.y_mean, self.y_std = float(y_mean), float(y_std)

    def parameters(self):
        return [*self.encoder.parameters(), *self.head.parameters()]

    def forward(self, ids: Sequence[Sequence[int]], prompt_lens: Sequence[int]):
        """Standardised log-length predictions (a tensor) for pre-tokenised prompts."""
        import torch

        pad = self.tokenizer.pad_token_id or 0
        width = max(len(x) for x in ids)
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, seq in enumerate(ids):
            x[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        hidden = self.encoder(input_ids=x, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        # Centred and scaled so it is on the pooled vector's scale (~unit) and the head starts balanced.
        plen = ((torch.log1p(torch.tensor(prompt_lens, dtype=torch.float32)) - 3.5) / 1.5).unsqueeze(1)
        feats = torch.cat([pooled.float(), plen], dim=1)
        return self.head(feats).squeeze(1)

    def predict(self, prompts: Sequence[str], prompt_lens: Sequence[int], batch_size: int = 256,
                autocast: bool = False) -> np.ndarray:
        """Output lengths in tokens (the back-transformed log prediction, a median-like estimate)."""
        import torch

        self.encoder.eval()
        ids = self.ids_fn(prompts)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros(len(ids), dtype=np.float64)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                z = self.forward([ids[i] for i in idx], [prompt_lens[i] for i in idx]).float().numpy()
                out[idx] = z
        return np.clip(np.expm1(out * self.y_std + self.y_mean), 1.0, None)


def train(requests, max_len: int = 64, epochs: float = 1.0, max_minutes: float = 25.0, batch_size: int = 32,
          lr: float = 5e-5, head_lr: float = 1e-3, seed: int = 0, test_fraction: float = 0.2, limit_train=None,
          log_every: int = 20):
    """Fine-tune on the training side of the conversation split; returns (model, train_side, test_side, info)."""
    import torch

    from predictor.embed import SentenceEmbedder, _resolve_dtype
    from predictor.sharegpt import split_by_conversation

    torch.manual_seed(seed)
    train_reqs, test_reqs = split_by_conversation(list(requests), test_fraction, seed)
    fit_reqs = train_reqs if limit_train is None else train_reqs[:limit_train]
    # The frozen embedder's own tokenisation (head and tail word pieces), loaded in float32 for training.
    embedder = SentenceEmbedder(max_len=max_len, head_tail=True, dtype="float32", threads=1)
    autocast = _resolve_dtype("auto", "cpu") == "bfloat16"
    y = np.log1p([r.output_len for r in fit_reqs])
    model = LengthRegressor(embedder.model, embedder.tokenizer, embedder._ids, y.mean(), y.std())
    target = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32)
    ids = embedder._ids([r.prompt for r in fit_reqs])
    plens = [r.prompt_len for r in fit_reqs]
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(fit_reqs) / batch_size)
    total_steps = max(int(steps_per_epoch * epochs), 1)
    opt = torch.optim.AdamW([{"params": list(model.encoder.parameters()), "lr": lr},
                             {"params": list(model.head.parameters()), "lr": head_lr}], weight_decay=0.01)
    warmup = max(total_steps // 20, 1)
    # Linear warm-up then linear decay to zero at the planned last step.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(total_steps - s, 0) / max(total_steps - warmup, 1)))
    model.encoder.train()
    t0 = time.perf_counter()
    step, running = 0, []
    stopped = "epochs"
    while step < total_steps:
        for batch in length_batches([len(x) for x in ids], batch_size, rng):
            if step >= total_steps:
                break
            if time.perf_counter() - t0 > max_minutes * 60:
                stopped = "time"
                break
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                pred = model.forward([ids[i] for i in batch], [plens[i] for i in batch])
            loss = torch.nn.functional.mse_loss(pred.float(), target[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            running.append(float(loss))
            step += 1
            if step % log_every == 0:
                print(f"step {step}/{total_steps} loss {np.mean(running[-log_every:]):.3f} "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
        if stopped == "time":
            break
    info = {"steps": step, "planned_steps": total_steps, "stopped_by": stopped, "train_requests": len(fit_reqs),
            "train_seconds": round(time.perf_counter() - t0, 1), "max_len": max_len, "batch_size": batch_size,
            "lr": lr, "autocast_bf16": autocast, "final_loss": float(np.mean(running[-50:])) if running else None}
    return model, train_reqs, test_reqs, info


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.finetune_length",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-len", type=int, default=64, help="word pieces the encoder reads (head and tail)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training side")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="stop training after this long")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (head: 1e-3)")
    parser.add_argument("--limit-train", type=int, default=None, help="train on the first N training requests")
    parser.add_argument("--limit-test", type=int, default=None, help="evaluate on the first N held-out requests")
    parser.add_argument("--seed", type=int, default=0, help="sampling, split and training seed")
    parser.add_argument("--save", type=Path, default=None, help="directory for the fine-tuned encoder and head")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics and settings here as JSON")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from predictor.length import (BUCKET_QUANTILES, ConstantLengthPredictor, LinearLengthPredictor, evaluate,
                                  format_report, load_length_predictor)
    from predictor.sharegpt import sample_requests
    from worker.make_model import ensure_default_model

    torch.set_num_threads(1)  # a shared 2-core machine; also what the serving budget assumes
    tokenizer = AutoTokenizer.from_pretrained(str(ensure_default_model()))
    requests = sample_requests(tokenizer, None, seed=args.seed)
    model, train_reqs, test_reqs, info = train(
        requests, max_len=args.max_len, epochs=args.epochs, max_minutes=args.max_minutes,
        batch_size=args.batch_size, lr=args.lr, seed=args.seed, limit_train=args.limit_train)
    test_reqs = test_reqs[: args.limit_test] if args.limit_test else test_reqs
    y_train = np.asarray([r.output_len for r in train_reqs], dtype=float)
    median = float(np.median(y_train))
    edges = [float(np.percentile(y_train, q)) for q in BUCKET_QUANTILES]
    prompts, plens = [r.prompt for r in test_reqs], [r.prompt_len for r in test_reqs]
    y_test = [r.output_len for r in test_reqs]

    rows = {
        "constant (train median)": evaluate(ConstantLengthPredictor(median).predict(prompts, plens), y_test,
                                            median, edges),
        "log-linear (prompt length only)": evaluate(
            LinearLengthPredictor.fit([r.prompt_len for r in train_reqs], y_train, log=True).predict(prompts, plens),
            y_test, median, edges),
    }
    packaged = load_length_predictor(cache_embeddings=True)
    rows["packaged xgb regressor"] = evaluate(packaged.predict(prompts, plens), y_test, median, edges)
    if info["autocast_bf16"]:
        # Serve as the frozen embedder does on this CPU: bfloat16 weights (autocast would recast every call).
        model.encoder.to(torch.bfloat16)
    model.predict(prompts[:8], plens[:8])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    pred = model.predict(prompts, plens)
    ms, cpu_ms = ((time.perf_counter() - t0) * 1e3 / len(prompts), (time.process_time() - c0) * 1e3 / len(prompts))
    name = f"fine-tuned MiniLM ({args.max_len} pieces)"
    rows[name] = evaluate(pred, y_test, median, edges)
    rows[name]["ms_per_request"] = ms
    report = {"metrics": rows, "median": median, "bucket_edges": edges, "n_test": len(test_reqs),
              "training": info, "predict_ms_per_request": ms, "predict_cpu_ms_per_request": cpu_ms,
              "load_avg_1min": os.getloadavg()[0]}
    print(format_report(report))
    print(json.dumps({k: v for k, v in report.items() if k != "metrics"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        model.encoder.save_pretrained(args.save)
        model.tokenizer.save_pretrained(args.save)
        np.savez(args.save / "head.npz", weight=model.head.weight.detach().numpy(),
                 bias=model.head.bias.detach().numpy(), y_mean=model.y_mean, y_std=model.y_std)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
