"""Behaviour-unchanged check for restructurings: the same short runs before and after, every metric
of every step compared bitwise (wall times, throughput and memory left out).

    python bench/equality.py record OUT.json [--only NAME ...]   run them at this checkout
    python bench/equality.py compare BEFORE.json AFTER.json      every metric identical, or the differences

The runs: the shipped demo config shortened (warm-up, OPSD, SFT), OPSD on the tiny Qwen3 in one
process and under torchrun at TP=2, PP=2 and DP=2 (distributed optimizer), and the tiny SGLang and
vLLM fleet examples shortened (stand-ins behind the real router; real vLLM CPU servers, which need
``make vllm-env``). One torch thread each, so that the numbers do not depend on the machine's load.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_opsd.platform import free_port
from megatron_opsd.tracking import read_metrics

# Keys that measure the machine (or the clock) rather than the run.
MACHINE = ("time/", "tokens_per_s/", "peak_memory", "eval/seconds")


def _machine(key: str) -> bool:
    return key == "time" or key.startswith(MACHINE)
SHORT = ["steps=3", "prompts_per_step=4", "rollout.max_new_tokens=12", "eval.limit=4", "eval.max_new_tokens=8",
         "eval.interval=2", "tracking.wandb=false", "tracking.progress=false", "checkpoint.interval=1"]
DEMO = ["steps=2", "prompts_per_step=2", "rollout.max_new_tokens=8", "eval.limit=4", "eval.max_new_tokens=8",
        "checkpoint.interval=1", "tracking.wandb=false", "tracking.progress=false", "--warmup-steps", "2",
        "--warmup-prompts-per-step", "2"]
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": ["optim.distributed_optimizer=true"]}


def _opsd(cli: list[str], config: Path, run_dir: Path, *extra: str, ranks: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "megatron_opsd.cli"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", "-m", "megatron_opsd.cli"]
    own = [f"checkpoint.dir={run_dir / 'ckpt'}"] if cli == ["train"] else []  # a run resumes only its own
    return [*launcher, *cli, str(config), f"run_dir={run_dir}", *own, *extra]


def _tiny_config(work: Path) -> Path:
    """A config over the tiny Qwen3 of the tests (tests/support/train_configs.py), saved under ``work``."""
    from tests.support.tiny_models import save_tiny_model
    from tests.support.train_configs import write_config

    return write_config(work / "tiny", save_tiny_model("qwen3", work / "tiny_hf"))


def runs(work: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (command, the directory whose metrics files it writes)."""
    tiny = _tiny_config(work)
    out = {"demo": (_opsd(["demo"], REPO / "examples/tiny_cpu.yaml", work / "demo", *DEMO), work / "demo"),
           "one_process": (_opsd(["train"], tiny, work / "one", *SHORT), work / "one")}
    for name, extra in LAYOUTS.items():
        out[name] = (_opsd(["train"], tiny, work / name, *SHORT, *extra, ranks=2), work / name)
    fleet = ["steps=2", "prompts_per_step=4", "rollout.max_new_tokens=12", "eval.limit=4", "eval.max_new_tokens=8",
             "tracking.wandb=false", "tracking.progress=false"]
    for name in ("sglang", "vllm"):
        out[name] = (_opsd(["train"], REPO / f"examples/tiny_cpu_{name}.yaml", work / name, *fleet), work / name)
    return out


def _metrics(run_dir: Path) -> dict[str, list[dict]]:
    """Every metrics file under ``run_dir`` (the demo's phases are subdirectories), machine keys dropped."""
    return {str(path.relative_to(run_dir)): [{k: v for k, v in record.items() if not _machine(k)}
                                             for record in read_metrics(path)]
            for path in sorted(run_dir.rglob("metrics.jsonl"))}


def record(out: Path, only: list[str] | None) -> int:
    results: dict = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="opsd-equality-") as tmp:
        for name, (command, run_dir) in runs(Path(tmp)).items():
            if only and name not in only:
                continue
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{name}: exit {done.returncode}\n{done.stderr[-4000:]}", file=sys.stderr)
                return 1
            results[name] = _metrics(run_dir)
            print(f"{name}: {sum(len(v) for v in results[name].values())} records")
    out.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


def _same(a: object, b: object) -> bool:
    return (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)) or a == b


def compare(before: Path, after: Path) -> int:
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    problems = [f"{name}: only in {before if name in old else after}" for name in sorted(set(old) ^ set(new))]
    for name in sorted(set(old) & set(new)):
        for file in sorted(set(old[name]) | set(new[name])):
            a, b = old[name].get(file, []), new[name].get(file, [])
            if len(a) != len(b):
                problems.append(f"{name}/{file}: {len(a)} records before, {len(b)} after")
            for i, (x, y) in enumerate(zip(a, b)):
                for key in sorted(k for k in set(x) | set(y) if not _machine(k)):
                    if not _same(x.get(key), y.get(key)):
                        problems.append(f"{name}/{file} record {i} {key}: {x.get(key)!r} -> {y.get(key)!r}")
    for line in problems[:50]:
        print(line)
    counted = sum(not _machine(k) for run in new.values() for f in run.values() for r in f for k in r)
    print(f"equality: {len(set(old) & set(new))} runs, {counted} values compared, {len(problems)} differences")
    return 1 if problems else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--only", nargs="*")
    cmp_ = commands.add_parser("compare")
    cmp_.add_argument("before", type=Path)
    cmp_.add_argument("after", type=Path)
    args = parser.parse_args()
    return record(args.out, args.only) if args.command == "record" else compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
