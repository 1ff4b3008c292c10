"""The ``python -m bench.<harness>`` entry point the live harnesses share (faults, overload, soak, upgrade)."""

from __future__ import annotations

import argparse
import logging
import sys


def harness_main(module_name: str, argv: list[str] | None = None) -> int:
    """Parse the harness module's arguments (its ``add_arguments``; its docstring's first paragraph is the
    description), log at INFO, and run it (its ``run``)."""
    module = sys.modules[module_name]
    name = module.__spec__.name if module.__spec__ is not None else module_name  # "__main__" under python -m
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return module.run(args)
