"""The ``slicefleet`` command.

Each subcommand lives in its own module with two functions, ``add_arguments(parser)`` and
``run(args) -> int``. Modules keep heavy imports (torch, Ray) inside ``run`` so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Order is the order --help lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("cluster.serve_cli", "start the cluster (Ray Serve + Redis) and the OpenAI-compatible API"),
    "simulate": ("cluster.sim.cli", "run the scheduler against a simulated cluster in virtual time"),
    "make-model": ("worker.make_model", "build the small default Llama and its tokenizer (no hub needed)"),
    "profile": ("predictor.profile_cli", "profile an engine and fit the slice serving-time model"),
    "train-length": ("predictor.length_cli", "train the generation-length predictor on ShareGPT"),
    "bench": ("bench.cli", "benchmark SCLS against SLS and ILS on the live cluster"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slicefleet",
        description="Slicefleet: LLM serving on Ray Serve with slice-level scheduling (SCLS). "
        "Run 'slicefleet COMMAND --help' for each command's options.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
