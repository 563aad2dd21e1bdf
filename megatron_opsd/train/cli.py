"""``opsd train CONFIG [key=value ...]``: OPSD or SFT training (``algorithm.name``; see ``megatron_opsd.train.loop``).

Runs as a single process, or as every rank of a ``torchrun`` launch for TP / PP / DP
(``parallel.tp``, ``parallel.pp``; data parallelism is what the world size leaves). A run
directory with checkpoints resumes from the latest one.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from megatron_opsd.config import config_reference, load_config


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("train", help="train with OPSD or SFT (single process or under torchrun)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML config (keys below)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=50 optim.lr=1e-5")
    p.set_defaults(func=run)
    _reference_on_help(p)


def _reference_on_help(parser: argparse.ArgumentParser) -> None:
    """Append every config key to ``--help``, built only when help is shown: the schema imports
    Megatron (seconds), which the other commands' start-up should not pay."""
    format_help = parser.format_help

    def with_reference() -> str:
        from megatron_opsd.train.config import TrainConfig

        parser.epilog = config_reference(TrainConfig, how="YAML CONFIG, or key=value")
        return format_help()

    parser.format_help = with_reference


def quiet_megatron() -> None:
    """Megatron logs every parameter name and its optimizer config at INFO; keep them for DEBUG."""
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("megatron.core").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from megatron_opsd.eval.evaluate import write_report
    from megatron_opsd.train.config import TrainConfig
    from megatron_opsd.train.loop import train

    quiet_megatron()
    cfg = load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if summary is None:
        print(f"train: {cfg.run_dir} has finished its {cfg.steps} steps: nothing to train, its results are left as "
              f"they are (raise steps to continue it)")
        return 0
    write_report(Path(cfg.run_dir) / "summary.json", summary)
    shown = {k: v for k, v in summary["metrics"].items() if k in ("loss", "grad_norm")} | summary["eval"]
    print(f"train: {cfg.algorithm.name} {summary['steps']} steps, " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    return 0
