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
    "bench": ("bench.cli", ("benchmark a running OpenAI endpoint (--base-url), or SCLS against SLS, ILS and "
                            "vLLM on clusters it starts")),
    "faults": ("bench.faults", "kill a worker, the dispatcher or Redis under seeded load and compare with a clean run"),
    "overload": ("bench.overload", ("measure capacity, then 3x it for a minute: 429s with Retry-After, latency of the "
                                    "admitted, peak RSS per process, time back to normal")),
    "upgrade": ("bench.upgrade", ("a NewCluster upgrade on one Redis under load: a second cluster takes over, the "
                                  "first is deleted mid-run; requests lost and duplicated, handover time")),
    "soak": ("bench.soak", ("steady load at a share of capacity for 30 min with a worker killed every 5 min: memory per "
                            "process, Redis memory and keys, requests lost, over time")),
}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default. Help text that already explains its default (it says
    "default") is left as written, since "(default: None)" would tell a user nothing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.default is None:
            return text + " (default: not set)"
        if action.nargs == 0:  # store_true / store_false
            return text + (" (default: on)" if action.default else " (default: off)")
        if isinstance(action.default, (list, tuple)):
            shown = ",".join("inf" if v is None else str(v) for v in action.default)
            return text + f" (default: {shown.replace('%', '%%')})"
        return text + " (default: %(default)s)"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("slicefleet")
    except PackageNotFoundError:  # a source checkout run with PYTHONPATH, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slicefleet", formatter_class=DefaultsFormatter,
        description="Slicefleet: LLM serving on Ray Serve with slice-level scheduling (SCLS). "
        "Run 'slicefleet COMMAND --help' for each command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                        help="logging level; also accepted after the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsFormatter)
        module.add_arguments(cmd)
        # SUPPRESS: when it is not given after the command, the value given before it (or INFO) stands.
        cmd.add_argument("--log-level", default=argparse.SUPPRESS, type=str.upper, choices=LOG_LEVELS,
                         help="logging level (default: INFO, or the level given before the command)")
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
