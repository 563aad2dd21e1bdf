"""``opsd eval MODEL --data FILE [--k K] [--out report.json] [key=value ...]``: accuracy of a model on held-out problems.

``MODEL`` is a Hugging Face directory or a Megatron checkpoint with an ``hf/`` subdirectory: a model
checkpoint (``opsd convert hf-to-megatron`` output) or one step of a training run
(``checkpoint.dir/step_NNNNNN``; only its model weights are read: the student's, not the teacher's).
A Megatron checkpoint is loaded into Megatron in this process (a world of one) and streamed into
the embedded engine through the same HF-name exporter the trainer and the conversion tool use, so
what is evaluated is exactly what the checkpoint holds. With ``engine.kind`` ``sglang`` or ``vllm``
the samples come from a server fleet instead (the trainer's ``rollout.engine`` keys), serving the
HF directory, or the checkpoint exported to one in a temporary directory. Problems are rendered
with the eval prompt and graded by :func:`evaluate`; the JSON report records the model and data
set it came from.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field

from megatron_opsd.config import config_reference, load_config
from megatron_opsd.data.prompts import PromptBuilder, PromptConfig, load_tokenizer
from megatron_opsd.data.sources import DataConfig, DataError, Problem, load_problems
from megatron_opsd.errors import UserError
from megatron_opsd.eval.evaluate import EvalConfig, evaluate, reference_of, write_report
from megatron_opsd.fileio import unreadable_safetensors
from megatron_opsd.platform import current_device
from megatron_opsd.rollout.embedded import EmbeddedEngine, EmbeddedEngineConfig
from megatron_opsd.rollout.engine import RolloutEngine
from megatron_opsd.rollout.factory import SamplingEngineConfig, start_fleet
from megatron_opsd.section import Section

T = TypeVar("T")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class EvalRunConfig(Section):
    """Everything ``opsd eval`` reads (a YAML file via ``--config``, and ``key=value`` overrides)."""

    data: DataConfig = Field(description="the problems; --data FILE sets data.path")
    tokenizer: str | None = Field(default=None, description="tokenizer directory; default: the model's own files")
    prompts: PromptConfig = PromptConfig()
    eval: EvalConfig = Field(default_factory=EvalConfig, description="sampling and metrics; --k sets eval.k")
    engine: SamplingEngineConfig = Field(
        default_factory=EmbeddedEngineConfig, description="what samples, by kind: embedded (this process; the "
        "default), sglang or vllm (a server fleet, with the keys of the trainer's rollout.engine)")
    limit: int | None = Field(default=None, ge=1, description="evaluate only the first N usable problems")


class ModelError(UserError, ValueError):
    """A model path that cannot be loaded: not a model, a damaged checkpoint, an unsupported config."""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval", help="Avg@k, pass@k and maj@k of a model (HF directory or Megatron checkpoint) on a data set",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_reference(EvalRunConfig))
    p.add_argument("model", type=Path, help="Hugging Face directory, Megatron model checkpoint or training step_NNNNNN")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. eval.max_new_tokens=2048")
    p.add_argument("--data", help="local jsonl/json/parquet/arrow file or save_to_disk directory (sets data.path)")
    p.add_argument("--k", type=int, help="samples per problem (sets eval.k; default 12)")
    p.add_argument("--out", type=Path, default=Path("eval_report.json"), help="JSON report (default: %(default)s)")
    p.add_argument("--config", type=Path, help="YAML file with the keys below")
    p.set_defaults(func=run)


def model_tokenizer(configured: str | None, model_files: Path) -> Any:
    """The configured tokenizer, else the one saved with the model."""
    if configured is None and not any((model_files / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{model_files} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); set tokenizer=DIR")
    return load_tokenizer(configured or model_files)


def _from_megatron(path: Path, use: Callable[[list, Any, Path], T]) -> T:
    """``use(chunks, hf_config, hf_dir)`` of the checkpoint loaded into Megatron (one process).

    Megatron is imported here, not at module level: it costs seconds that other commands should not pay.
    """
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from megatron_opsd.fileio import CheckpointError
    from megatron_opsd.models import UnsupportedConfigError, build_model, checkpoint, checkpoint_dtype, load_hf_config
    from megatron_opsd.parallel import Layout, initialize, teardown

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ModelError("opsd eval runs as a single process; start it without torchrun")
    try:
        hf_dir = checkpoint.hf_config_dir(path)
        config = load_hf_config(hf_dir)
        groups = initialize(Layout())
        try:
            chunks = build_model(config, checkpoint_dtype(config), groups=groups)
            checkpoint.load(chunks, path)
            return use(chunks, config, hf_dir)
        finally:
            teardown()
            dist.destroy_process_group()
    except (OSError, CheckpointError, CheckpointingException, UnsupportedConfigError) as exc:
        raise ModelError(f"cannot load Megatron checkpoint {path}: {exc}") from exc


def _into_embedded(cfg: EmbeddedEngineConfig) -> Callable[[list, Any, Path], tuple[EmbeddedEngine, Path]]:
    def load(chunks: list, config: Any, hf_dir: Path) -> tuple[EmbeddedEngine, Path]:
        from megatron_opsd.models.bridge import model_hf_tensors

        engine = EmbeddedEngine.from_hf_config(config, cfg, current_device())
        engine.update_weights(model_hf_tensors(chunks), version=0)
        return engine, hf_dir

    return load


def _into_hf_dir(out: Path) -> Callable[[list, Any, Path], Path]:
    """Write the checkpoint as an HF directory ``out`` (its config and tokenizer files beside the weights)."""
    def export(chunks: list, _: Any, hf_dir: Path) -> Path:
        from megatron_opsd.models.bridge import write_hf_model

        def copy_files(tmp: Path) -> None:
            for file in hf_dir.iterdir():
                if file.is_file() and not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
                    shutil.copy(file, tmp / file.name)

        return write_hf_model(chunks, out, copy_files)

    return export


def _hf_dir_or_checkpoint(path: Path) -> bool:
    """True for an intact HF directory, False for a Megatron checkpoint; a ModelError for anything else."""
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    if (path / "config.json").is_file():
        damaged = unreadable_safetensors(path)
        if damaged:
            raise ModelError(f"cannot load Hugging Face model {path}: " + "; ".join(damaged))
        return True
    if (path / "metadata.json").is_file():
        return False
    raise ModelError(
        f"{path} is neither a Hugging Face model directory (config.json) nor a Megatron checkpoint (metadata.json "
        f"and hf/config.json, as written by opsd convert hf-to-megatron, or a step_NNNNNN directory that opsd train "
        f"writes under checkpoint.dir)")


@contextmanager
def open_model(path: Path, cfg: Any) -> Iterator[tuple[RolloutEngine, Path, int]]:
    """The engine ``cfg`` names sampling from the model at ``path``, the directory holding the
    model's config and tokenizer files, and its context length; a fleet is stopped on leaving."""
    hf = _hf_dir_or_checkpoint(path)
    if cfg.kind == "embedded":
        if hf:
            try:
                engine = EmbeddedEngine.from_pretrained(path, cfg, current_device())
            except OSError as exc:  # what transformers raises for missing or unreadable files
                raise ModelError(f"cannot load Hugging Face model {path}: {exc}") from exc
            yield engine, path, engine.context_length
        else:
            engine, hf_dir = _from_megatron(path, _into_embedded(cfg))
            yield engine, hf_dir, engine.context_length
        return
    with tempfile.TemporaryDirectory(prefix="opsd-eval-") as tmp:
        served = path if hf else _from_megatron(path, _into_hf_dir(Path(tmp) / "model"))
        config = json.loads((served / "config.json").read_text())
        engine = start_fleet(cfg, served, Path(tmp) / "logs", int(config["vocab_size"]))
        try:
            yield engine, served, int(config["max_position_embeddings"])
        finally:
            engine.close()


def _check_problems(problems: list[Problem], builder: PromptBuilder, cfg: EvalRunConfig, context: int, label: str) -> None:
    """Fail before any sampling on a row that cannot be graded or whose prompt leaves no room to answer."""
    errors = []
    for problem in problems:
        try:
            reference_of(problem)
        except ValueError as exc:
            errors.append(str(exc))
        length = len(builder.eval_ids(problem))
        if length + cfg.eval.max_new_tokens > context:
            errors.append(f"row {problem.index}: eval prompt of {length} tokens + eval.max_new_tokens="
                          f"{cfg.eval.max_new_tokens} exceed the model's max_position_embeddings={context}")
    if errors:
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        raise DataError(f"{label}: {'; '.join(errors[:3])}{more}")


def run(args: argparse.Namespace) -> int:
    flags = ["data.source=local", f"data.path={json.dumps(args.data)}"] if args.data is not None else []
    flags += [f"eval.k={args.k}"] if args.k is not None else []
    cfg = load_config(EvalRunConfig, args.config, [*flags, *args.overrides])
    problems = load_problems(cfg.data)
    chosen = list(problems.problems[:cfg.limit])
    with open_model(args.model, cfg.engine) as (engine, model_files, context):
        builder = PromptBuilder(model_tokenizer(cfg.tokenizer, model_files), cfg.prompts)
        _check_problems(chosen, builder, cfg, context, problems.label)
        report = evaluate(engine, chosen, builder, cfg.eval, progress=True)
    report = {"model": str(args.model.resolve()), "data": problems.label, **report}
    write_report(args.out, report)
    k = cfg.eval.k
    print(f"eval: {args.model} on {problems.label}: {len(chosen)} problems x {k} samples")
    print("  " + " | ".join(f"{name} {value:.1%}" for name, value in report["metrics"].items()))
    print(f"  no answer {report['no_answer_rate']:.1%}, truncated {report['truncated_rate']:.1%}, "
          f"mean response {report['mean_response_tokens']:.0f} tokens")
    print(f"report: {args.out}")
    return 0
