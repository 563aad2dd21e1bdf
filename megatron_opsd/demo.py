"""``opsd demo CONFIG [--warmup-steps N] [--warmup-lr LR] [key=value ...]``: OPSD vs SFT from one warm-up.

CONFIG is an OPSD training config (``examples/tiny_cpu.yaml``) with held-out ``eval.data``. Under
``run_dir`` the demo runs, in this process and through the real trainer:

1. ``warmup/``: SFT on the reference solutions from the config's model, half of the examples with
   the teacher's prompt (so that the model learns to use a solution in context; without it the
   teacher role gives OPSD no signal), its learning rate decayed along a cosine to a tenth (the
   annealing matters: bench/RESULTS.md, "CPU demo"), exported as an HF directory;
2. ``opsd/``: OPSD from the warm-up, evaluated before its first step (the base) and at the end;
3. ``sft/``: SFT from the warm-up with the same steps, prompts per step and optimizer (the paper's
   baseline), evaluated at the end.

It prints, last, ``demo: base B% -> opsd O% (sft S%) in T s`` (eval ``avg@k``) and writes the same
numbers to ``run_dir/summary.json``. A demo that was stopped or killed resumes when started again
with the same settings: each phase continues from its own checkpoints (a finished one is skipped).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megatron_opsd.config import ConfigError, load_config

DEMO_FILE = "demo.json"  # the settings of the demo a run directory holds


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="SFT warm-up, then OPSD vs SFT from it, with held-out accuracy",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="OPSD training config with eval.data (see opsd train --help)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config, e.g. steps=30")
    register_warmup_options(p)
    p.set_defaults(func=run)


def phase(base: Any, root: Path, name: str, **update: Any) -> Any:
    """``base`` with its own run directory (its checkpoints under it) ``root/name``, plus ``update``."""
    checkpoint = base.checkpoint.model_copy(update={"dir": None, "load": None})
    return base.model_copy(update={"run_dir": str(root / name), "checkpoint": checkpoint, **update})


def with_algorithm(base: Any, name: str, sft: Any = None) -> Any:
    """``base``'s algorithm section with algorithm ``name`` and SFT settings ``sft`` (default: base's)."""
    return base.algorithm.model_copy(update={"name": name, "sft": sft or base.algorithm.sft})


@dataclass(frozen=True)
class WarmUp:
    """The SFT warm-up every compared method starts from (see the module docstring, step 1)."""

    steps: int = 600
    lr: float = 3e-3
    prompts_per_step: int = 32
    teacher_prompt_fraction: float = 0.5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> WarmUp:
        return cls(args.warmup_steps, args.warmup_lr, args.warmup_prompts_per_step, args.warmup_teacher_fraction)

    def run(self, base: Any, root: Path) -> Any:
        """Train ``root/warmup`` from ``base``'s model on ``base``'s data (resuming it, or skipping it when
        finished); the model config of its HF export."""
        from megatron_opsd.models import ModelConfig
        from megatron_opsd.train.loop import train

        optim = base.optim.model_copy(update={
            "lr": self.lr, "min_lr": self.lr / 10, "schedule": "cosine", "warmup_steps": self.steps // 20})
        sft = base.algorithm.sft.model_copy(update={"teacher_prompt_fraction": self.teacher_prompt_fraction})
        train(phase(base, root, "warmup", algorithm=with_algorithm(base, "sft", sft), steps=self.steps, export_hf=True,
                    prompts_per_step=self.prompts_per_step, optim=optim, eval=base.eval.model_copy(update={"data": None})))
        return ModelConfig(hf=str(root / "warmup" / "hf"), dtype=base.model.dtype)


def register_warmup_options(p: argparse.ArgumentParser) -> None:
    default = WarmUp()
    p.add_argument("--warmup-steps", type=int, default=default.steps, help="SFT warm-up steps (default %(default)s)")
    p.add_argument("--warmup-lr", type=float, default=default.lr,
                   help="SFT warm-up peak learning rate, decayed to a tenth along a cosine (default %(default)s)")
    p.add_argument("--warmup-prompts-per-step", type=int, default=default.prompts_per_step,
                   help="problems per SFT warm-up step (default %(default)s)")
    p.add_argument("--warmup-teacher-fraction", type=float, default=default.teacher_prompt_fraction,
                   help="share of warm-up examples with the teacher prompt (default %(default)s)")


def _claim(root: Path, settings: dict[str, Any]) -> bool:
    """Take ``root`` for a demo of ``settings``; True when it holds one of the same settings already,
    which is then resumed (each phase from its own checkpoints). Any other non-empty directory is
    refused, with what to do."""
    from megatron_opsd.eval.evaluate import write_report
    from megatron_opsd.train.config import config_differences

    marker = root / DEMO_FILE
    if root.exists() and any(root.iterdir()):
        if not marker.is_file():
            raise ConfigError(f"run_dir {root} is not empty and holds no demo: set run_dir=NEW_DIR (or delete {root})")
        previous = json.loads(marker.read_text())
        differences = config_differences(previous["config"], settings["config"]) + [
            f"warm-up {k}: {previous['warmup'].get(k)!r} -> {v!r}"
            for k, v in settings["warmup"].items() if previous["warmup"].get(k) != v]
        if differences:
            raise ConfigError(f"run_dir {root} holds a demo with other settings ({'; '.join(differences)}): delete "
                              f"{root} to start it over, or set run_dir=NEW_DIR")
        return True
    write_report(marker, settings)
    return False


def _final(run_dir: Path, metric: str, step: int) -> float:
    """A phase's held-out accuracy at ``step``, from its eval report (also when the phase had finished before)."""
    return json.loads((run_dir / "eval" / f"step_{step:06d}.json").read_text())["metrics"][metric]


def run(args: argparse.Namespace) -> int:
    from megatron_opsd.eval.evaluate import write_report
    from megatron_opsd.train.cli import quiet_megatron
    from megatron_opsd.train.config import TrainConfig
    from megatron_opsd.train.loop import train

    quiet_megatron()
    start = time.perf_counter()
    base = load_config(TrainConfig, args.config, [*args.overrides, "algorithm.name=opsd"])
    if base.eval.data is None:
        raise ConfigError(f"{args.config}: the demo needs held-out problems in eval.data")
    root = Path(base.run_dir)
    warm_up = WarmUp.from_args(args)
    warmup_args = asdict(warm_up)
    resumed = _claim(root, {"config": base.model_dump(mode="json"), "warmup": warmup_args})
    if resumed:
        print(f"demo: resuming the demo in {root}")
    metric = f"avg@{base.eval.k}"

    warm = warm_up.run(base, root)
    at_start = base.eval.model_copy(update={"at_start": True})
    train(phase(base, root, "opsd", model=warm, eval=at_start))
    train(phase(base, root, "sft", algorithm=with_algorithm(base, "sft"), model=warm))

    summary = {
        "metric": metric,
        "base": _final(root / "opsd", metric, 0),
        "opsd": _final(root / "opsd", metric, base.steps),
        "sft": _final(root / "sft", metric, base.steps),
        "seconds": round(time.perf_counter() - start, 1),
        "resumed": resumed,
        "warmup": warmup_args,
        "steps": base.steps,
        "prompts_per_step": base.prompts_per_step,
    }
    write_report(root / "summary.json", summary)
    print(f"demo: base {summary['base']:.1%} -> opsd {summary['opsd']:.1%} (sft {summary['sft']:.1%}) "
          f"in {summary['seconds']:.0f} s")
    return 0
