"""``opsd convert hf-to-megatron | megatron-to-hf | verify [TOOL ARGS]``: the conversion tools under one command.

Each subcommand hands its arguments, unparsed, to the ``main(argv)`` of the matching module here
(``hf_to_megatron``, ``megatron_to_hf``, ``verify``; ``tools/*.py`` are their script entries, and
``opsd convert verify --help`` prints that tool's options), so the flags and the logic have one
home. Parallel layouts work as with the scripts::

    torchrun --nproc-per-node=2 -m megatron_opsd.cli convert hf-to-megatron --hf-dir DIR --out DIR --tp 2

Bad input (missing files, unsupported configs, an existing output) is reported as one line, exit 2.
This package sits outside ``megatron_opsd.models`` because importing that package imports Megatron,
which would slow every ``opsd`` command by seconds; a tool module imports it only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
from functools import partial

from megatron_opsd.errors import UserError

TOOLS = {
    "hf-to-megatron": ("hf_to_megatron", "Hugging Face directory -> Megatron dist checkpoint (any TP/PP)"),
    "megatron-to-hf": ("megatron_to_hf", "Megatron dist checkpoint -> Hugging Face directory"),
    "verify": ("verify", "max |logit diff| of a Megatron checkpoint against its HF source; exit 1 above tol"),
}


class ConversionInputError(UserError, ValueError):
    """Input the user has to fix: a missing file, an unsupported config, an output that already exists."""


def register(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="HF <-> Megatron checkpoint conversion and verification",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = convert.add_subparsers(dest="convert_command", required=True, metavar="COMMAND")
    for name, (script, help_text) in TOOLS.items():
        # No option prefix of its own: every word, --help included, reaches the tool's parser.
        p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="+")
        p.add_argument("tool_args", nargs="*", help=f"arguments of megatron_opsd.convert.{script}")
        p.set_defaults(func=partial(run, script))


def run(script: str, args: argparse.Namespace) -> int:
    from megatron_opsd.fileio import CheckpointError
    from megatron_opsd.models import UnsupportedConfigError

    tool = importlib.import_module(f"{__name__}.{script}")
    try:
        code = tool.main(args.tool_args)
    except (OSError, CheckpointError, UnsupportedConfigError) as exc:  # OSError: missing files, existing output
        raise ConversionInputError(str(exc)) from exc
    return code or 0
