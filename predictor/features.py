"""Cheap, hand-made features of a prompt that hint at how long the answer will be.

Why: an embedding knows the topic, but some cues are sharper as plain counts: Magnus finds that for
translation, correction, rewriting and code translation the output length follows the *input* length;
"list 10 ideas", "in 500 words", "one sentence", "yes or no" and code fences all move the answer's length
in ways a regression tree can split on directly. Each feature costs microseconds, so they are free next to
the sentence encoder.

Everything here is a pure function of the prompt text (and its length in the serving model's tokens), so
training and serving compute exactly the same thing.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# (feature name, regex; lower case). Matched on the lower-cased first and last 1,000 characters of the
# prompt, where the instruction usually is.
KEYWORDS: tuple[tuple[str, str], ...] = (
    ("kw_translate", r"\btranslat|\bin (?:english|chinese|french|spanish|german|korean|japanese)\b"),
    ("kw_summarize", r"\bsummar|\btl;?dr\b|\bin short\b|\bkey points\b"),
    ("kw_rewrite", r"\brewrite|\brephrase|\bparaphrase|\bproofread|\bcorrect (?:the|this|my)|\bgrammar\b|\bimprove (?:the|this|my)"),
    ("kw_code", r"\bcode\b|\bpython\b|\bjavascript\b|\bfunction\b|\bscript\b|\bsql\b|\bjava\b|\bc\+\+|\bhtml\b|\bcss\b|\breact\b|\bapi\b|\bclass\b|\bimplement"),
    ("kw_fix", r"\berror\b|\bbug\b|\bfix\b|\bdebug|\bexception\b|\btraceback\b|\bdoesn'?t work"),
    ("kw_list", r"\blist\b|\bbullet|\bsteps?\b|\bideas\b|\bexamples\b|\boutline\b|\btable\b|\bplan\b"),
    ("kw_write", r"\bwrite\b|\bcompose\b|\bdraft\b|\bcreate\b|\bgenerate\b"),
    ("kw_long_form", r"\bessay\b|\barticle\b|\bblog\b|\bstory\b|\breport\b|\bchapter\b|\bscript\b|\bcurriculum\b|\bcourse\b|\bproposal\b|\bdetailed\b|\bcomprehensive\b|\bin depth\b"),
    ("kw_short_form", r"\bpoem\b|\bhaiku\b|\bslogan\b|\btitle\b|\bheadline\b|\btweet\b|\bcaption\b|\bname for\b|\bone (?:word|sentence|line|paragraph)\b|\bbrief(?:ly)?\b|\bshort\b|\bconcise\b"),
    ("kw_explain", r"\bexplain\b|\bwhat is\b|\bwhat are\b|\bhow (?:do|does|can|to)\b|\bwhy\b|\bdifference between\b|\bdescribe\b"),
    ("kw_yesno", r"\byes or no\b|\btrue or false\b|^(?:is|are|can|do|does|did|will|should|could|would)\b"),
    ("kw_email", r"\bemail\b|\bletter\b|\bcover letter\b|\bmessage\b"),
    ("kw_roleplay", r"\bact as\b|\bpretend\b|\bi want you to\b|\byou are an?\b|\brole ?play"),
    ("kw_ack", r"\bjust (?:say|answer|reply)\b|\breply (?:with )?(?:only|just)\b|\backnowledge\b|\bok\b|\bunderstood\b|\bwait for\b|\bdon'?t (?:write|reply|answer|respond)"),
    ("kw_continue", r"^\s*continue\b|\bgo on\b|\bkeep going\b|\bmore\b"),
    ("kw_math", r"\bcalculate\b|\bsolve\b|\bequation\b|\bprove\b|\d+\s*[\+\-\*/\^]\s*\d+"),
    ("kw_chinese_etc", r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]"),
)
# Matched on the lower-cased window: case-insensitive matching is several times slower in ``re``.
_KEYWORD_RES = tuple((name, re.compile(rx, re.MULTILINE)) for name, rx in KEYWORDS)
# "10 ideas", "500 words", "3 paragraphs": the asked-for size.
_COUNT_RE = re.compile(
    r"\b(\d{1,4})\s*(?:-\s*\d{1,4}\s*)?(words?|sentences?|paragraphs?|lines?|bullets?|points?|ideas?|examples?|"
    r"items?|steps?|questions?|tips?|names?|titles?|pages?|tweets?|slides?|days?|chapters?|reasons?|ways?)\b",
    re.IGNORECASE,
)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_DIGIT = re.compile(r"[0-9]")
_UPPER = re.compile(r"[A-Z]")
_CODE_PUNCT = re.compile(r"[{}()\[\];=<>]")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s", re.MULTILINE)
_UNIT_WEIGHT = {"word": 1.3, "sentence": 25.0, "paragraph": 120.0, "line": 12.0, "page": 600.0, "chapter": 800.0,
                "day": 60.0, "slide": 60.0}

NUMERIC = (
    "prompt_len", "log_prompt_len", "chars", "log_chars", "words", "lines", "log_lines", "question_marks",
    "ends_with_question", "code_fence", "non_ascii_frac", "digit_frac", "upper_frac", "punct_frac",
    "mean_word_len", "asked_count", "log_asked_tokens", "bullets_in_prompt", "urls", "colon_end",
)
FEATURE_NAMES: tuple[str, ...] = NUMERIC + tuple(name for name, _ in KEYWORDS)


def _asked(text: str) -> tuple[float, float]:
    """The largest count asked for ("10 ideas") and a rough token size of it ("500 words" -> 650)."""
    best_count, best_tokens = 0.0, 0.0
    for m in _COUNT_RE.finditer(text):
        count = float(m.group(1))
        if count > 5000:
            continue
        unit = m.group(2).lower().rstrip("s")
        tokens = count * _UNIT_WEIGHT.get(unit, 40.0)
        best_count = max(best_count, count)
        best_tokens = max(best_tokens, tokens)
    return best_count, best_tokens


def cue_features(prompt: str, prompt_len: int) -> list[float]:
    """The :data:`FEATURE_NAMES` values of one prompt (``prompt_len`` in the serving model's tokens)."""
    text = prompt or ""
    window = text if len(text) <= 2000 else text[:1000] + "\n" + text[-1000:]
    words = text.split()
    lines = text.count("\n") + 1
    sample = text[:2000]
    ns = max(len(sample), 1)
    count, tokens = _asked(window)
    stripped = text.rstrip()
    values = [
        float(prompt_len),
        math.log1p(prompt_len),
        float(len(text)),
        math.log1p(len(text)),
        float(len(words)),
        float(lines),
        math.log1p(lines),
        float(text.count("?")),
        float(stripped.endswith("?")),
        float(text.count("```")),
        len(_NON_ASCII.findall(sample)) / ns,
        len(_DIGIT.findall(sample)) / ns,
        len(_UPPER.findall(sample)) / ns,
        len(_CODE_PUNCT.findall(sample)) / ns,
        (sum(len(w) for w in words[:500]) / max(min(len(words), 500), 1)),
        count,
        math.log1p(tokens),
        float(len(_BULLET.findall(window))),
        float(text.count("http")),
        float(stripped.endswith(":")),
    ]
    lower = window.lower()
    values.extend(float(bool(rx.search(lower))) for _, rx in _KEYWORD_RES)
    return values


def cue_matrix(prompts: Sequence[str], prompt_lens: Sequence[int]) -> np.ndarray:
    """Cue features of many prompts: float32 [n, len(FEATURE_NAMES)]."""
    rows = [cue_features(p, int(n)) for p, n in zip(prompts, prompt_lens)]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(FEATURE_NAMES))
