"""``slicefleet train-length``: train the generation-length predictor on ShareGPT and print its report.

The packaged artefact ``predictor/artifacts/length_xgb.zip`` was written with

    slicefleet train-length --out predictor/artifacts/length_xgb.zip --report predictor/artifacts/length_report.md

(lengths in the default model's tokenizer; the exact command is also stored in the artefact's ``meta.json``).
Embeddings are cached under ``~/.cache/slicefleet/embeddings``, so a retrain after the first costs about a
minute. Heavy imports stay inside :func:`run` so ``--help`` is instant.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="artefact path (default: ~/.cache/slicefleet/length_xgb.zip)")
    parser.add_argument("--model", default=None,
                        help="serving model directory whose tokenizer counts lengths (default: the default model)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N sampled requests")
    parser.add_argument("--seed", type=int, default=0, help="sampling and split seed")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of conversations")
    parser.add_argument("--max-len", type=int, default=40, help="word pieces the sentence encoder reads")
    parser.add_argument("--embed-dtype", default="auto", choices=("auto", "bfloat16", "float32", "int8"),
                        help="sentence-encoder precision (auto: bfloat16 where the CPU has it natively; int8: "
                        "dynamic quantisation, faster but batch-dependent)")
    parser.add_argument("--report", type=Path, default=None, help="also write the metrics table (Markdown) here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args) -> int:
    from transformers import AutoTokenizer

    from predictor.length import TrainConfig, format_report, train_length_predictor
    from predictor.sharegpt import sample_requests

    model_dir = args.model
    if model_dir is None:
        from worker.make_model import ensure_default_model

        model_dir = str(ensure_default_model())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    requests = sample_requests(tokenizer, args.limit, seed=args.seed)
    log.info("%d ShareGPT requests (vLLM filter) in %s's tokens", len(requests), model_dir)
    command = "slicefleet train-length " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 1 and sys.argv[1] == "train-length" else None
    cfg = TrainConfig(test_fraction=args.test_fraction, seed=args.seed, max_len=args.max_len,
                      embed_dtype=args.embed_dtype)
    result = train_length_predictor(requests, cfg, command=command)
    result.predictor.meta["data"]["tokenizer_model"] = Path(model_dir).name
    out = args.out or Path.home() / ".cache" / "slicefleet" / "length_xgb.zip"
    result.predictor.save(out)
    table = format_report(result.report)
    timing = result.report["timing"]
    summary = (f"held-out: {result.report['n_test']} requests from unseen conversations "
               f"(train {result.report['n_train']}); median {result.report['median']:.0f} tokens, bucket edges "
               f"{[round(e) for e in result.report['bucket_edges']]}; prediction {timing['ms_per_request']:.2f} "
               f"ms/request wall, {timing['cpu_ms_per_request']:.2f} ms/request CPU time (batches of "
               f"{timing['batch']}, one CPU thread, embedding included; 1-min load average "
               f"{timing.get('load_avg_1min')} on {timing.get('cpus')} CPUs)")
    if args.json:
        print(json.dumps(result.report, indent=1))
    else:
        print(table)
        print(summary)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(f"# Length predictor report\n\n{table}\n\n{summary}\n\nCommand: `{command}`\n\n"
                               "The prompt-only ceiling and the fine-tuned-encoder experiment: "
                               "`length_experiments.md`.\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0
