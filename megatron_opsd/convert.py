"""``opsd convert hf-to-megatron | megatron-to-hf | verify [TOOL ARGS]``: the conversion tools under one command.

Each subcommand hands its arguments, unparsed, to the ``main(argv)`` of the matching script in the
repository's ``tools/`` (``opsd convert verify --help`` prints that tool's options), so the flags and
the logic have one home. Parallel layouts work as with the scripts::

    torchrun --nproc-per-node=2 -m megatron_opsd.cli convert hf-to-megatron --hf-dir DIR --out DIR --tp 2

Bad input (missing files, unsupported configs, an existing output) is reported as one line, exit 2.
This module sits outside ``megatron_opsd.models`` because importing that package imports Megatron,
which would slow every ``opsd`` command by seconds; the tools import it when they run.
"""
from __future__ import annotations

import argparse
import importlib.util
from functools import partial
from pathlib import Path
from types import ModuleType

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"
TOOLS = {
    "hf-to-megatron": ("convert_hf_to_megatron", "Hugging Face directory -> Megatron dist checkpoint (any TP/PP)"),
    "megatron-to-hf": ("convert_megatron_to_hf", "Megatron dist checkpoint -> Hugging Face directory"),
    "verify": ("verify_conversion", "max |logit diff| of a Megatron checkpoint against its HF source; exit 1 above tol"),
}


class ConversionInputError(ValueError):
    """Input the user has to fix: a missing file, an unsupported config, an output that already exists."""


def register(commands: argparse._SubParsersAction) -> None:
    convert = commands.add_parser("convert", help="HF <-> Megatron checkpoint conversion and verification",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = convert.add_subparsers(dest="convert_command", required=True, metavar="COMMAND")
    for name, (script, help_text) in TOOLS.items():
        # No option prefix of its own: every word, --help included, reaches the tool's parser.
        p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="+")
        p.add_argument("tool_args", nargs="*", help=f"arguments of tools/{script}.py")
        p.set_defaults(func=partial(run, script), user_errors=(ConversionInputError,))


def load_tool(script: str) -> ModuleType:
    path = TOOLS_DIR / f"{script}.py"
    if not path.is_file():
        raise ConversionInputError(f"{path} not found: opsd convert runs the repository's tools/ scripts; "
                                   f"install megatron-opsd from a checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"megatron_opsd_tools.{script}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(script: str, args: argparse.Namespace) -> int:
    from megatron_opsd.models import UnsupportedConfigError
    from megatron_opsd.models.hf_io import CheckpointError

    tool = load_tool(script)
    try:
        code = tool.main(args.tool_args)
    except (OSError, CheckpointError, UnsupportedConfigError) as exc:  # OSError: missing files, existing output
        raise ConversionInputError(str(exc)) from exc
    return code or 0
