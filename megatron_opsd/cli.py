"""The ``opsd`` command line.

Each command group lives next to the code it drives, in a module listed in ``COMMAND_MODULES``
that defines ``register(subparsers)``: it adds its parser(s) and sets the default ``func`` (takes
the parsed arguments, returns an exit code). A ``UserError`` (``errors.py``) is the user's to fix:
printed as one clear message with exit code 2, never as a traceback. A command
with an ``overrides`` positional (``nargs="*"``) receives every dotted ``key=value`` word of the
command line, before or after its options.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from megatron_opsd.errors import UserError
from megatron_opsd.processes import RunStopped, end_children_with_this_process

COMMAND_MODULES: tuple[str, ...] = (
    "megatron_opsd.preview",  # opsd data preview
    "megatron_opsd.eval.cli",  # opsd eval
    "megatron_opsd.convert",  # opsd convert
    "megatron_opsd.train.cli",  # opsd train
    "megatron_opsd.demo",  # opsd demo
    "megatron_opsd.compare",  # opsd compare
    "megatron_opsd.rollout.sglang.serve",  # opsd serve (the CPU stand-in for an SGLang server)
    "megatron_opsd.launch",  # opsd launch (SLURM jobs: slurm/*.sh)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opsd", description="On-Policy Self-Distillation on Megatron-core")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(commands)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``key=value`` words anywhere after the options join ``args.overrides`` of commands that take them."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    stray = [w for w in rest if w.startswith("-") or "=" not in w]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":  # httpx logs every request at INFO: a line per rollout from a fleet
        logging.getLogger("httpx").setLevel(logging.WARNING)
    end_children_with_this_process()
    try:
        return args.func(args)
    except RunStopped as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"opsd: {stop}", file=sys.stderr)
        return stop.exit_code
    except UserError as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank meets the same error: say it once
            print(f"opsd: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
